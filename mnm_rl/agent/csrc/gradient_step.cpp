// The end of a PPO minibatch's update as two compiled calls: the gradients' global norm with
// their clipping (torch.nn.utils.clip_grad_norm_), and Adam's step (torch.optim.Adam with
// fused=True) with its step counters. In PyTorch those are two foreach norms, a stack, a norm,
// a multiply per group of tensors, a foreach add of the step counters and the fused kernel,
// each a dispatch per tensor on the CPU, plus the optimizer's Python bookkeeping: about 230 us
// per minibatch for an lstm agent's 17 parameter tensors in a loop of their own (more in the
// training loop), against some 60 us of arithmetic.
// mnm_rl/agent/gradient_step.py says when these run; tests/test_gradient_step.py compares them
// with PyTorch's.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <vector>

#include "../../memory/csrc/parts.h"  // for_each_part

namespace {

template <typename T>
double sum_of_squares(const T* p, int64_t n) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(p[i]) * static_cast<double>(p[i]);
  return sum;
}

template <typename T>
void scale_in_place(T* p, int64_t n, T s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] *= s;
}

// The sum of the squares of a CPU float tensor's values, accumulated in double.
double squared_norm(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  double sum = 0;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "squared_norm",
                             [&] { sum = sum_of_squares(c.data_ptr<scalar_t>(), c.numel()); });
  return sum;
}

// Whether the kernels take this gradient: a dense CPU float or double tensor.
bool takes(const at::Tensor& g) {
  return g.defined() && g.is_cpu() && g.layout() == at::kStrided &&
         (g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble);
}

// Every gradient times min(1, max_norm / (norm + 1e-6)), as clip_grad_norm_ scales them, where
// norm is their global 2-norm; returns the norm, or nothing (and changes nothing) where a
// gradient is not one it takes. A non-finite norm scales nothing (PyTorch's would make every
// gradient NaN; the PPO loop skips such an update either way).
std::optional<double> clip_grad_norm(const std::vector<at::Tensor>& grads, double max_norm) {
  if (!std::all_of(grads.begin(), grads.end(), takes)) return std::nullopt;
  double sum = 0;
  for (const auto& g : grads) sum += squared_norm(g);
  const double norm = std::sqrt(sum);
  const double scale = max_norm / (norm + 1e-6);
  if (!(scale < 1.0)) return norm;  // also a NaN norm
  for (const auto& g : grads) {
    if (!g.is_contiguous()) {
      g.mul_(scale);
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "clip_grad_norm", [&] {
      scale_in_place(g.data_ptr<scalar_t>(), g.numel(), static_cast<scalar_t>(scale));
    });
  }
  return norm;
}

// Adam's step as torch.optim.Adam(fused=True) takes it, for every parameter group: every step
// counter (a 0-d float tensor) plus one, then ATen's fused Adam kernel over each group, the same
// arithmetic. The tensors of all groups come one group after another, group g's
// group_sizes[g] of them with settings[g] = (lr, beta1, beta2, weight_decay, eps, maximize).
// Returns false, having changed nothing, where a gradient or a step counter is not one it
// takes. With threads > 1 each group's tensors are dealt into that many parts of about equal
// size (the largest first, each to the part with the fewest elements so far), each part's fused
// Adam on a thread of its own (parts.h's for_each_part): every tensor's update is its own
// arithmetic, so the results are the same bit for bit whatever the parts.
bool adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
               const std::vector<at::Tensor>& steps, const std::vector<int64_t>& group_sizes,
               const std::vector<std::vector<double>>& settings, int64_t threads) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  steps.size() == n,
              "adam_step: one gradient, moment pair and step counter per parameter");
  TORCH_CHECK(settings.size() == group_sizes.size(), "adam_step: one setting row per group");
  int64_t total = 0;
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    TORCH_CHECK(group_sizes[g] >= 0 && settings[g].size() == 6,
                "adam_step: settings are (lr, beta1, beta2, weight_decay, eps, maximize)");
    total += group_sizes[g];
  }
  TORCH_CHECK(total == static_cast<int64_t>(n), "adam_step: the groups hold ", total,
              " tensors, not ", n);
  TORCH_CHECK(threads >= 1, "adam_step: threads must be positive, got ", threads);
  for (size_t i = 0; i < n; ++i) {
    if (!takes(grads[i]) || grads[i].scalar_type() != params[i].scalar_type()) return false;
    // the counters fused Adam keeps: 0-d CPU float32 tensors
    if (!steps[i].is_cpu() || steps[i].numel() != 1 || steps[i].scalar_type() != at::kFloat)
      return false;
  }
  for (const auto& step : steps) *step.data_ptr<float>() += 1.0f;
  const size_t groups = group_sizes.size();
  const int64_t parts = std::min<int64_t>(threads, static_cast<int64_t>(n));
  if (parts <= 1) {  // each group's tensors as they lie, one call per group
    size_t first = 0;
    for (size_t g = 0; g < groups; ++g) {
      const auto group = [&](const std::vector<at::Tensor>& v) {
        return at::TensorList(v).slice(first, group_sizes[g]);
      };
      const std::vector<double>& s = settings[g];
      at::_fused_adam_(group(params), group(grads), group(exp_avgs), group(exp_avg_sqs), {},
                       group(steps), s[0], s[1], s[2], s[3], s[4], /*amsgrad=*/false, s[5] != 0);
      first += group_sizes[g];
    }
    return true;
  }
  // members[part][group]: the indices of the group's tensors that the part steps
  std::vector<std::vector<std::vector<size_t>>> members(
      parts, std::vector<std::vector<size_t>>(groups));
  std::vector<int64_t> load(parts, 0);
  size_t first = 0;
  for (size_t g = 0; g < groups; ++g) {
    std::vector<size_t> order(group_sizes[g]);
    std::iota(order.begin(), order.end(), first);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return params[a].numel() > params[b].numel();
    });
    for (const size_t i : order) {
      const auto p = std::min_element(load.begin(), load.end()) - load.begin();
      members[p][g].push_back(i);
      load[p] += params[i].numel();
    }
    first += group_sizes[g];
  }
  mnm_rl::for_each_part(parts, parts, [&](int64_t p, int64_t, int64_t) {
    for (size_t g = 0; g < groups; ++g) {
      const std::vector<size_t>& picked = members[p][g];
      if (picked.empty()) continue;
      const auto pick = [&](const std::vector<at::Tensor>& v) {
        std::vector<at::Tensor> out;
        out.reserve(picked.size());
        for (const size_t i : picked) out.push_back(v[i]);
        return out;
      };
      const std::vector<double>& s = settings[g];
      at::_fused_adam_(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), {},
                       pick(steps), s[0], s[1], s[2], s[3], s[4], /*amsgrad=*/false, s[5] != 0);
    }
  });
  return true;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Gradient clipping and Adam's step, each as one call";
  m.def("clip_grad_norm", &clip_grad_norm,
        "(grads, max_norm) -> the global 2-norm (None: a gradient it does not take); the "
        "gradients scaled in place as torch.nn.utils.clip_grad_norm_ scales them");
  // Without the GIL: the parts' threads take the caller's thread-local state (see parts.h).
  m.def("adam_step", &adam_step,
        "(params, grads, exp_avgs, exp_avg_sqs, steps, group_sizes, settings, threads) -> False "
        "where a gradient is not one it takes, else torch.optim.Adam(fused=True)'s step of "
        "every group, its tensors in `threads` parallel parts",
        py::call_guard<py::gil_scoped_release>());
}
