// A Linear layer, y = x W^T + b, forward and backward by the hand-written products of
// dense_products.h instead of ATen's (MKL's AVX2 code on our AMD CPUs): the input projections
// of the LSTM, GRU and MNM cores over a whole sequence (mnm_rl/memory/products.py). With
// `parts` > 1 the rows of each product are split between that many threads (parts.h's
// product_into_parts): the same results bit for bit.
#include <torch/extension.h>

#include <vector>

#include "dense_products.h"
#include "kernels.h"
#include "parts.h"

namespace mnm_rl {

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, int64_t parts) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear_forward: x [N, in] and weight [out, in], got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(parts >= 1, "linear_forward: parts must be positive");
  const BelowAutograd below_autograd;
  // linear_out's products, their rows in parts (one part: product_into itself)
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  const at::Tensor weight_t = packed_transpose(weight);  // [in, out]
  if (!bias.has_value() || !bias->defined()) {
    product_into_parts(out, x, weight_t, false, parts);
  } else if (!products_apply(out, x, weight_t)) {
    biased_product_into(out, *bias, x, weight_t);  // ATen's addmm
  } else {
    copy_bias(out, *bias);  // as biased_product_into
    product_into_parts(out, x, weight_t, true, parts);
  }
  return out;
}

std::vector<at::Tensor> linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                        const at::Tensor& weight, bool needs_x, bool needs_weight,
                                        bool needs_bias, int64_t parts) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0),
              "linear_backward: grad must be [", x.size(0), ", ", weight.size(0), "]");
  TORCH_CHECK(parts >= 1, "linear_backward: parts must be positive");
  const BelowAutograd below_autograd;
  const at::Tensor g = grad.stride(1) == 1 ? grad : grad.contiguous();
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
  return {needs_x ? product_parts(g, w, parts) : at::Tensor(),
          needs_weight ? product_parts(g.t(), xs, parts) : at::Tensor(),
          needs_bias ? g.sum(0) : at::Tensor()};
}

}  // namespace mnm_rl
