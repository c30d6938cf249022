// A Linear layer, y = x W^T + b, forward and backward by the hand-written products of
// dense_products.h instead of ATen's (MKL's AVX2 code on our AMD CPUs): the input projections
// of the LSTM, GRU and MNM cores over a whole sequence (mnm_rl/memory/products.py). With
// `parts` > 1 the rows of each product are split between that many threads (parts.h): the same
// results bit for bit, as each row's sums are the same whatever part computes it.
#include <torch/extension.h>

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "dense_products.h"
#include "kernels.h"
#include "parts.h"

namespace mnm_rl {
namespace {

// Whether the hand-written products run on these tensors: switched on, float or double alike.
bool own_products_take(std::initializer_list<at::Tensor> tensors) {
  const auto type = tensors.begin()->scalar_type();
  if (!dense_products_on() || (type != at::kFloat && type != at::kDouble)) return false;
  for (const auto& t : tensors)
    if (t.scalar_type() != type) return false;
  return true;
}

}  // namespace

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, int64_t parts) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear_forward: x [N, in] and weight [out, in], got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(parts >= 1, "linear_forward: parts must be positive");
  const BelowAutograd below_autograd;
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  const int64_t N = x.size(0), in = x.size(1), O = weight.size(0);
  parts = std::min(parts, std::max<int64_t>(N, 1));
  if (parts == 1 || !own_products_take({x, weight}) ||
      (b.defined() && (b.dim() != 1 || !b.is_contiguous() || b.scalar_type() != x.scalar_type())))
    return linear_out(x, weight, b);
  at::Tensor out = at::empty({N, O}, x.options());
  const at::Tensor weight_t = packed_transpose(weight);  // [in, out]
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_forward", [&] {
    using T = scalar_t;
    const T* x_p = x.data_ptr<T>();
    const T* w_p = weight_t.data_ptr<T>();
    const T* b_p = b.defined() ? b.data_ptr<T>() : nullptr;
    T* o_p = out.data_ptr<T>();
    const int64_t x_rs = x.stride(0), x_ks = x.stride(1);
    for_each_part(N, parts, [&](int64_t, int64_t r0, int64_t r1) {
      // biased_product_into's order: the bias first, then the product added to it
      if (b_p != nullptr)
        for (int64_t r = r0; r < r1; ++r) std::copy(b_p, b_p + O, o_p + r * O);
      dense_product<T>(x_p + r0 * x_rs, x_rs, x_ks, w_p, O, o_p + r0 * O, O, r1 - r0, O, in,
                       b_p != nullptr);
    });
  });
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
  const at::Tensor g_bias = needs_bias ? g.sum(0) : at::Tensor();
  const int64_t N = x.size(0), in = x.size(1), O = weight.size(0);
  if (parts == 1 || !own_products_take({g, w, xs}))
    return {needs_x ? product(g, w) : at::Tensor(), needs_weight ? product(g.t(), xs) : at::Tensor(),
            g_bias};
  at::Tensor g_x = needs_x ? at::empty({N, in}, x.options()) : at::Tensor();
  at::Tensor g_w = needs_weight ? at::empty({O, in}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_backward", [&] {
    using T = scalar_t;
    const T* g_p = g.data_ptr<T>();
    const int64_t g_rs = g.stride(0), g_ks = g.stride(1);
    // g_x [N, in] = g w: rows of g
    if (needs_x) {
      const T* w_p = w.data_ptr<T>();
      T* out = g_x.data_ptr<T>();
      for_each_part(N, std::min(parts, std::max<int64_t>(N, 1)), [&](int64_t, int64_t r0, int64_t r1) {
        dense_product<T>(g_p + r0 * g_rs, g_rs, g_ks, w_p, w.stride(0), out + r0 * in, in, r1 - r0,
                         in, O, false);
      });
    }
    // g_w [out, in] = g^T x: rows of g^T, the columns of g
    if (needs_weight) {
      const T* x_p = xs.data_ptr<T>();
      T* out = g_w.data_ptr<T>();
      for_each_part(O, std::min(parts, std::max<int64_t>(O, 1)), [&](int64_t, int64_t r0, int64_t r1) {
        dense_product<T>(g_p + r0 * g_ks, g_ks, g_rs, x_p, xs.stride(0), out + r0 * in, in,
                         r1 - r0, in, N, false);
      });
    }
  });
  return {g_x, g_w, g_bias};
}

}  // namespace mnm_rl
