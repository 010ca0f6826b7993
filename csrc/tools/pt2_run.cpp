// A C++ deployment of an `ocrnet export --format pt2` package: loads the AOTInductor package
// with LibTorch's loader and runs it on one image, with the fused ocrkernels ops the package
// calls served by the CMake-built op library (linked, so registered at program start).
//
//   pt2_run PACKAGE.pt2 IMAGE.bin N C H W OUT.bin
//
// IMAGE.bin: the normalised image, N*C*H*W float32 values in NCHW order (native byte order),
// as model(img) takes it. OUT.bin: the package's first output, contiguous, as float32 (argmax
// ids converted); its shape is printed on stdout as "shape d0 d1 ...".
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 8) {
    std::cerr << "usage: pt2_run PACKAGE.pt2 IMAGE.bin N C H W OUT.bin\n";
    return 2;
  }
  std::vector<int64_t> shape;
  for (int i = 3; i < 7; ++i) {
    const int64_t d = std::stoll(argv[i]);
    if (d < 1) {
      std::cerr << "pt2_run: sizes must be positive, got " << argv[i] << "\n";
      return 2;
    }
    shape.push_back(d);
  }
  at::Tensor img = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  std::ifstream in(argv[2], std::ios::binary);
  in.read(reinterpret_cast<char*>(img.data_ptr<float>()),
          static_cast<std::streamsize>(img.numel() * sizeof(float)));
  if (!in || in.peek() != std::char_traits<char>::eof()) {
    std::cerr << "pt2_run: " << argv[2] << " does not hold exactly " << img.numel()
              << " float32 values\n";
    return 1;
  }
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::vector<at::Tensor> outputs = loader.run({img});
  at::Tensor out = outputs.at(0).contiguous().to(at::kFloat);
  std::ofstream file(argv[7], std::ios::binary);
  file.write(reinterpret_cast<const char*>(out.const_data_ptr<float>()),
             static_cast<std::streamsize>(out.numel() * sizeof(float)));
  if (!file) {
    std::cerr << "pt2_run: cannot write " << argv[7] << "\n";
    return 1;
  }
  std::printf("shape");
  for (int64_t d : out.sizes()) std::printf(" %lld", static_cast<long long>(d));
  std::printf("\n");
  return 0;
}
