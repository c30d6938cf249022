// The memory's reconstruction errors over a whole sequence in one pass: what
// FastWeightMemory.reconstruction_loss (mnm_rl/memory/fast_weights.py) computes, the mean over
// heads and dimensions of (answer - value)^2, for the answers after the write and before it.
// The explicit training pass (mnm_rl/memory/fused.py's explicit_sequence) reports both every
// minibatch; as ATen's subtraction, square and mean they were six calls over [T, B, H, D],
// about 2% of an update at 4 heads x 3 layers (benchmarks/update_pieces.py).
#include <torch/extension.h>

#include "elementwise.h"
#include "kernels.h"

namespace mnm_rl {

at::Tensor reconstruction_errors(const at::Tensor& after, const at::Tensor& before,
                                 const at::Tensor& values) {
  TORCH_CHECK(after.dim() >= 2 && after.sizes() == values.sizes() &&
                  before.sizes() == values.sizes(),
              "reconstruction_errors: after, before and values must have one shape [..., H, D], "
              "got ", after.sizes(), ", ", before.sizes(), " and ", values.sizes());
  TORCH_CHECK(after.scalar_type() == values.scalar_type() &&
                  before.scalar_type() == values.scalar_type(),
              "reconstruction_errors: after, before and values must have one dtype");
  TORCH_CHECK(values.device().is_cpu(), "reconstruction_errors: CPU tensors only");
  const BelowAutograd below_autograd;
  const int64_t n = values.size(-1) * values.size(-2);
  std::vector<int64_t> shape{2};
  for (int64_t k = 0; k + 2 < values.dim(); ++k) shape.push_back(values.size(k));
  auto out = at::empty(shape, values.options());
  if (n == 0) return out.fill_(NAN);  // the mean of nothing, as torch's
  const int64_t rows = values.numel() / n;
  const at::Tensor a = after.contiguous(), b = before.contiguous(), v = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "reconstruction_errors", [&] {
    using T = scalar_t;
    const T* v_p = v.data_ptr<T>();
    T* o = out.data_ptr<T>();
    std::vector<T> diff(n);
    for (int k = 0; k < 2; ++k) {
      const T* x = (k == 0 ? a : b).data_ptr<T>();
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < n; ++i) diff[i] = x[r * n + i] - v_p[r * n + i];
        o[k * rows + r] = dot(diff.data(), diff.data(), n) / T(n);
      }
    }
  });
  return out;
}

}  // namespace mnm_rl
