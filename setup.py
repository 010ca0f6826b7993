"""Builds the op library ``ocrkernels._C`` with torch.utils.cpp_extension.

CPU kernels are always built, as ``ocrkernels._C``. CUDA kernels (``csrc/ocrkernels/cuda/*.cu``)
are built when torch has CUDA and nvcc is found, or when ``FORCE_CUDA=1`` (compile and link
only; no GPU is needed), as a second library ``ocrkernels._C_cuda`` that only registers CUDA
implementations of the ops ``_C`` defines. ``ocrkernels.ops`` loads it only when torch has CUDA:
built against a CPU-only torch (FORCE_CUDA=1 here), it links without libc10_cuda / libtorch_cuda
and keeps their symbols undefined, to be resolved by a CUDA torch at load time; the package keeps
importing and running its CPU kernels either way.

Environment:
  FORCE_CUDA=1                     build the CUDA kernels even without a GPU / CUDA torch
  OCRKERNELS_CUDA_ARCH_LIST        default "8.0;9.0+PTX": sm_80 (A100) and sm_90 (H100) machine
                                   code, and compute_90 PTX that the driver JIT-compiles for
                                   newer GPUs. CUDA 13 cannot target sm_70 (V100): no "7.0".
  CUDA_HOME                        toolkit root; found from nvcc when unset
  MAX_JOBS                         parallel compile jobs (ninja)
  OCRKERNELS_SKIP_EXTENSION=1      install the pure-PyTorch package only
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc", "ocrkernels")


def _cuda_root_from_nvcc():
    """Toolkit root of the nvcc on PATH, also when that nvcc is a wrapper script elsewhere."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-v", "-c", "x.cu"], capture_output=True,
                             text=True, timeout=60)
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m:
            return os.path.dirname(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _resolve_cuda_home():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), _cuda_root_from_nvcc()):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")) and \
                os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")):
            return os.path.realpath(cand)
    return None


def _extensions(summary):
    if os.environ.get("OCRKERNELS_SKIP_EXTENSION") == "1":
        summary.append(("extension", "skipped (OCRKERNELS_SKIP_EXTENSION=1)"))
        return [], {}
    cuda_home = _resolve_cuda_home()
    if cuda_home:
        # cpp_extension reads CUDA_HOME when imported, so set it first.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) +
                         glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    torch_cuda = torch.version.cuda is not None
    want_cuda = bool(cuda_sources) and cuda_home is not None and (force or torch_cuda)
    arch_list = os.environ.get("OCRKERNELS_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    # No trapping math: lets GCC if-convert the clamps of the exp loops and vectorise them.
    # -ffp-contract=off: the BatchNorm-ReLU kernels recompute the forward's ReLU masks in
    # backward and must round identically in every loop; explicit FMA intrinsics are unaffected.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off",
                 "-DNDEBUG"]
    if sys.platform == "darwin":
        cxx_flags.remove("-fopenmp")
    link_flags = ["-fopenmp"] if "-fopenmp" in cxx_flags else []
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=link_flags)
    exts = [cpp_extension.CppExtension(name="ocrkernels._C", sources=cpu_sources,
                                       extra_compile_args={"cxx": cxx_flags}, **kwargs)]
    if want_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
        torch_inc = cpp_extension.include_paths()
        if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h"))
                   for p in torch_inc):
            # A CPU torch ships c10/cuda headers without this generated one; it only defines
            # Windows export macros, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips.
            nvcc_flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
        cuda_kwargs = dict(name="ocrkernels._C_cuda", sources=cuda_sources,
                           extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
        if torch_cuda:
            exts.append(cpp_extension.CUDAExtension(**cuda_kwargs, **kwargs))
        else:
            # A CPU torch leaves cpp_extension.CUDA_HOME at None whatever the environment says
            # (it is read when compiling the .cu files with nvcc): point it at the toolkit.
            cpp_extension.CUDA_HOME = cuda_home
            # CUDAExtension would ask the linker for c10_cuda and torch_cuda, which a CPU torch
            # lacks: link the toolkit's cudart only and leave torch's CUDA symbols undefined.
            lib_dir = next((d for d in (os.path.join(cuda_home, "lib64"),
                                        os.path.join(cuda_home, "lib"))
                            if os.path.exists(os.path.join(d, "libcudart.so"))), None)
            exts.append(cpp_extension.CppExtension(
                **cuda_kwargs, include_dirs=kwargs["include_dirs"] +
                [os.path.join(cuda_home, "include")],
                library_dirs=[lib_dir] if lib_dir else [], libraries=["cudart"],
                extra_link_args=link_flags))
    summary += [
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("CPU kernels", f"{len(cpu_sources)} sources, flags {' '.join(cxx_flags)}"),
        ("CUDA_HOME", cuda_home or "not found"),
        ("CUDA kernels", (f"yes: ocrkernels._C_cuda, {len(cuda_sources)} sources for arch "
                          f"{arch_list}" + ("" if torch_cuda else
                                            " (FORCE_CUDA=1, compile and link only: loads with a "
                                            "CUDA torch)")) if want_cuda else
         "no" + ("" if cuda_sources else " (no .cu sources)") +
         ("" if cuda_home else ", nvcc not found") +
         ("" if (force or torch_cuda) else ", torch has no CUDA and FORCE_CUDA is not 1")),
        ("MAX_JOBS", os.environ.get("MAX_JOBS", "default")),
    ]
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _print_summary(summary):
    width = max(len(k) for k, _ in summary)
    lines = ["", "ocrkernels build summary", "-" * 60]
    lines += [f"  {k.ljust(width)} : {v}" for k, v in summary]
    lines += ["-" * 60, ""]
    print("\n".join(lines), file=sys.stderr)


summary = []
ext_modules, cmdclass = _extensions(summary)
_print_summary(summary)

setup(
    packages=find_packages(include=["ocrkernels", "ocrkernels.*", "ocrnet", "ocrnet.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
