// Autograd for the differentiable ops, device-independent: the forward and backward ops it calls
// dispatch to the CPU or CUDA kernels (or to the fake kernels under torch.compile).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace ocrkernels {
namespace {

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& probs, const at::Tensor& feats,
                                                double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ocrkernels::spatial_gather_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&,
                                                                 const at::Tensor&, double)>();
  return op.call(probs, feats, scale);
}

std::tuple<at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_out,
                                                 const at::Tensor& probs, const at::Tensor& feats,
                                                 const at::Tensor& lse, double scale) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ocrkernels::spatial_gather_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&, double)>();
  return op.call(grad_out, probs, feats, lse, scale);
}

// Saves the two inputs (which autograd keeps alive anyway) and the (B, K) log-sum-exp: nothing
// of size N beyond the inputs.
class SpatialGatherFunction : public torch::autograd::Function<SpatialGatherFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& probs,
                            const at::Tensor& feats, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = call_forward(probs, feats, scale);
    ctx->save_for_backward({probs, feats, lse});
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const double scale = ctx->saved_data["scale"].toDouble();
    auto [grad_probs, grad_feats] = call_backward(grads[0], saved[0], saved[1], saved[2], scale);
    return {grad_probs, grad_feats, at::Tensor()};
  }
};

at::Tensor spatial_gather_autograd(const at::Tensor& probs, const at::Tensor& feats,
                                   double scale) {
  return SpatialGatherFunction::apply(probs, feats, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(ocrkernels, Autograd, m) {
  m.impl("spatial_gather", &spatial_gather_autograd);
}

}  // namespace ocrkernels
