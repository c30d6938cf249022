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
#include <optional>
#include <vector>

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
// takes.
bool adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
               const std::vector<at::Tensor>& steps, const std::vector<int64_t>& group_sizes,
               const std::vector<std::vector<double>>& settings) {
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
  for (size_t i = 0; i < n; ++i) {
    if (!takes(grads[i]) || grads[i].scalar_type() != params[i].scalar_type()) return false;
    // the counters fused Adam keeps: 0-d CPU float32 tensors
    if (!steps[i].is_cpu() || steps[i].numel() != 1 || steps[i].scalar_type() != at::kFloat)
      return false;
  }
  for (const auto& step : steps) *step.data_ptr<float>() += 1.0f;
  int64_t first = 0;
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    const auto part = [&](const std::vector<at::Tensor>& v) {
      return at::TensorList(v).slice(first, group_sizes[g]);
    };
    const std::vector<double>& s = settings[g];
    at::_fused_adam_(part(params), part(grads), part(exp_avgs), part(exp_avg_sqs), {},
                     part(steps), s[0], s[1], s[2], s[3], s[4], /*amsgrad=*/false, s[5] != 0);
    first += group_sizes[g];
  }
  return true;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Gradient clipping and Adam's step, each as one call";
  m.def("clip_grad_norm", &clip_grad_norm,
        "(grads, max_norm) -> the global 2-norm (None: a gradient it does not take); the "
        "gradients scaled in place as torch.nn.utils.clip_grad_norm_ scales them");
  m.def("adam_step", &adam_step,
        "(params, grads, exp_avgs, exp_avg_sqs, steps, group_sizes, settings) -> False where a "
        "gradient is not one it takes, else torch.optim.Adam(fused=True)'s step of every group");
}
