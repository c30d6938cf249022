// What a training log reads of a core's diagnostics, in one call: the mean of each of a few
// tensors and the largest element of the last (mnm_rl/memory/base.py's diagnostics_summary:
// the MNM core's five [T, B] diagnostics and the largest fast-weight norm). As ATen's stack,
// mean, max and host reads they were half a dozen calls a PPO minibatch, each costing several
// times its warm-loop time right after the kernels' passes (benchmarks/update_pieces.py's
// "minibatch loss glue").
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"

namespace mnm_rl {

std::vector<double> summary_statistics(const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(!tensors.empty(), "summary_statistics: no tensors");
  const BelowAutograd below_autograd;
  std::vector<double> out;
  out.reserve(tensors.size() + 1);
  double largest = std::numeric_limits<double>::quiet_NaN();  // of nothing, or with a NaN
  for (size_t k = 0; k < tensors.size(); ++k) {
    const at::Tensor& x = tensors[k];
    TORCH_CHECK(x.device().is_cpu(), "summary_statistics: CPU tensors only");
    const at::Tensor c = x.contiguous();
    const int64_t n = c.numel();
    double sum = 0;
    const bool last = k + 1 == tensors.size();
    AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "summary_statistics", [&] {
      const scalar_t* p = c.data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(p[i]);
      if (last && n > 0) {
        double top = static_cast<double>(p[0]);
        for (int64_t i = 1; i < n && !std::isnan(top); ++i) {
          const double v = static_cast<double>(p[i]);
          if (std::isnan(v) || v > top) top = v;  // a NaN anywhere is the largest, as torch's
        }
        largest = top;
      }
    });
    out.push_back(n > 0 ? sum / static_cast<double>(n) : std::numeric_limits<double>::quiet_NaN());
  }
  out.push_back(largest);
  return out;
}

}  // namespace mnm_rl
