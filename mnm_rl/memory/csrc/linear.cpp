// A Linear layer, y = x W^T + b, forward and backward by the hand-written products of
// dense_products.h instead of ATen's (MKL's AVX2 code on our AMD CPUs): the input projections
// of the LSTM, GRU and MNM cores over a whole sequence (mnm_rl/memory/products.py).
#include <torch/extension.h>

#include <vector>

#include "dense_products.h"
#include "kernels.h"

namespace mnm_rl {

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear_forward: x [N, in] and weight [out, in], got ", x.sizes(), " and ",
              weight.sizes());
  const BelowAutograd below_autograd;
  return linear_out(x, weight, bias.has_value() ? *bias : at::Tensor());
}

std::vector<at::Tensor> linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                        const at::Tensor& weight, bool needs_x, bool needs_weight,
                                        bool needs_bias) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0),
              "linear_backward: grad must be [", x.size(0), ", ", weight.size(0), "]");
  const BelowAutograd below_autograd;
  const at::Tensor g = grad.stride(1) == 1 ? grad : grad.contiguous();
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
  return {needs_x ? product(g, w) : at::Tensor(), needs_weight ? product(g.t(), xs) : at::Tensor(),
          needs_bias ? g.sum(0) : at::Tensor()};
}

}  // namespace mnm_rl
