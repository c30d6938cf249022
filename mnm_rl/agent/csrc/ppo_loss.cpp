// PPO's clipped loss over a minibatch of N steps and its gradient, as one call
// (mnm_rl/agent/ppo_loss.py): what MemoryPPO's loss takes about thirty PyTorch operators forward
// and as many backward for, a few microseconds each at a minibatch of 256 steps.
//
// Per step i, with logits l [N, A], values v [N] and the rollout's action a, old log-probability
// o, advantage g, return R and old value u:
//
//   log p_j = l_j - logsumexp(l)          H = -sum_j p_j log p_j          (Categorical(logits))
//   r       = exp(log p_a - o)             g' = (g - mean g) / (std g + 1e-8)   (if normalised)
//   policy  = -mean_i min(g' r, g' clamp(r, 1 - c, 1 + c))
//   v'      = u + clamp(v - u, -c_v, c_v)  (v' = v without a value clip)
//   value   = mean_i (R - v')^2            entropy = -mean_i H
//   loss    = policy + k_H entropy + k_v value
//
// and, without gradients, approx_kl = mean((r - 1) - (log p_a - o)) and clip_fraction =
// mean(|r - 1| > c). The gradient is written out in the forward pass (the loss is a scalar: the
// backward pass only scales it), following autograd's conventions where they choose: at a tie of
// min's two arguments each gets half the gradient; clamp passes it where its input lies within
// the bounds, both included; a probability of exactly 0 adds nothing to the entropy or to its
// gradient, as Categorical's clamped logits do. std is the unbiased one, as torch.std.

#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>

namespace {

// Every input of one minibatch, flattened to N steps.
template <typename T>
struct Steps {
  const T* logits;  // [N, A]
  const T* values;
  const int64_t* actions;
  const T* old_log_probs;
  const T* advantages;
  const T* returns;
  const T* old_values;  // nullptr without a value clip
  int64_t N, A;
};

struct Settings {
  double clip_range, clip_range_vf, ent_coef, vf_coef;  // clip_range_vf < 0: no value clip
  bool normalize_advantage;
};

// Mean and unbiased standard deviation of x [N], in double.
template <typename T>
std::pair<double, double> mean_std(const T* x, int64_t N) {
  double sum = 0;
  for (int64_t i = 0; i < N; ++i) sum += x[i];
  const double mean = sum / static_cast<double>(N);
  double squares = 0;
  for (int64_t i = 0; i < N; ++i) squares += (x[i] - mean) * (x[i] - mean);
  return {mean, std::sqrt(squares / static_cast<double>(N - 1))};
}

// min(x, y) that is NaN when either is, as torch.minimum.
inline double minimum(double x, double y) {
  return std::isnan(x) || std::isnan(y) ? std::numeric_limits<double>::quiet_NaN()
                                        : std::min(x, y);
}

// Writes the gradients of the loss into grad_logits [N, A] and grad_values [N]; returns
// {policy, value, entropy, approx_kl, clip_fraction}.
template <typename T>
std::array<double, 5> loss_and_gradient(const Steps<T>& s, const Settings& k, T* grad_logits,
                                        T* grad_values) {
  const int64_t N = s.N, A = s.A;
  const double n = static_cast<double>(N);
  double adv_mean = 0, adv_scale = 1;
  if (k.normalize_advantage && N > 1) {
    const auto [mean, std] = mean_std(s.advantages, N);
    adv_mean = mean;
    adv_scale = 1.0 / (std + 1e-8);
  }
  const double low = 1 - k.clip_range, high = 1 + k.clip_range;
  double policy = 0, value = 0, entropy = 0, kl = 0, clipped = 0;
  for (int64_t i = 0; i < N; ++i) {
    const T* l = s.logits + i * A;
    T* dl = grad_logits + i * A;
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < A; ++j) top = std::max(top, static_cast<double>(l[j]));
    double total = 0;
    for (int64_t j = 0; j < A; ++j) total += std::exp(l[j] - top);
    const double log_total = top + std::log(total);
    double h = 0;  // the entropy of step i
    for (int64_t j = 0; j < A; ++j) {
      const double log_p = l[j] - log_total, p = std::exp(log_p);
      dl[j] = static_cast<T>(p);  // p_j for now
      if (p != 0) h -= p * log_p;
    }
    entropy -= h;

    // the policy term through log p_a: r = exp(log p_a - o)
    const int64_t a = s.actions[i];
    TORCH_CHECK(a >= 0 && a < A, "ppo_loss: action ", a, " of step ", i, " is not in [0, ", A,
                ")");
    const double log_ratio = (l[a] - log_total) - s.old_log_probs[i];
    const double r = std::exp(log_ratio);
    const double g = (s.advantages[i] - adv_mean) * adv_scale;
    const double r_clipped = std::clamp(r, low, high);
    const double unclipped = g * r, clipped_term = g * r_clipped;
    policy -= minimum(unclipped, clipped_term);
    const bool inside = r >= low && r <= high;  // clamp passes the gradient, bounds included
    double d_ratio;  // d policy / d r, times N
    if (unclipped < clipped_term) {
      d_ratio = -g;
    } else if (unclipped > clipped_term) {
      d_ratio = inside ? -g : 0.0;
    } else {  // a tie (or NaN): half to each argument of min
      d_ratio = -0.5 * g - (inside ? 0.5 * g : 0.0);
    }
    const double d_log_p_a = d_ratio * r / n;
    kl += (r - 1) - log_ratio;
    clipped += std::abs(r - 1) > k.clip_range ? 1.0 : 0.0;

    // d/dl_j: of log p_a, (delta_ja - p_j); of H, -p_j (log p_j + H); entropy's weight -k_H / N
    const double d_h = -k.ent_coef / n;
    for (int64_t j = 0; j < A; ++j) {
      const double p = dl[j];
      const double from_entropy = p == 0 ? 0.0 : -p * ((l[j] - log_total) + h) * d_h;
      dl[j] = static_cast<T>(d_log_p_a * ((j == a ? 1.0 : 0.0) - p) + from_entropy);
    }

    // the value term
    double v = s.values[i], d_v = 1;
    if (s.old_values != nullptr) {
      const double shift = v - s.old_values[i];
      d_v = shift >= -k.clip_range_vf && shift <= k.clip_range_vf ? 1.0 : 0.0;
      v = s.old_values[i] + std::clamp(shift, -k.clip_range_vf, k.clip_range_vf);
    }
    const double error = v - s.returns[i];
    value += error * error;
    grad_values[i] = static_cast<T>(k.vf_coef * 2 * error / n * d_v);
  }
  return {policy / n, value / n, entropy / n, kl / n, clipped / n};
}

at::Tensor flat(const at::Tensor& x, int64_t N, const char* name) {
  TORCH_CHECK(x.numel() == N, "ppo_loss: ", name, " has ", x.numel(), " elements, not ", N);
  return x.reshape({N}).contiguous();
}

// (loss [], stats [5] = policy, value and entropy losses, approx_kl, clip_fraction,
//  grad_logits [..., A], grad_values [...]) for logits [..., A] and the other inputs [...];
// old_values is used only when clip_range_vf >= 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_loss(
    const at::Tensor& logits, const at::Tensor& values, const at::Tensor& actions,
    const at::Tensor& old_log_probs, const at::Tensor& advantages, const at::Tensor& returns,
    const at::Tensor& old_values, double clip_range, double clip_range_vf, double ent_coef,
    double vf_coef, bool normalize_advantage) {
  TORCH_CHECK(logits.device().is_cpu(), "ppo_loss: CPU tensors only");
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, "ppo_loss: logits [..., A], A > 0");
  const int64_t A = logits.size(-1), N = logits.numel() / A;
  TORCH_CHECK(N > 0, "ppo_loss: an empty minibatch");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "ppo_loss: float32 or float64");
  const at::Tensor l = logits.reshape({N, A}).contiguous();
  const at::Tensor v = flat(values, N, "values").to(dtype);
  const at::Tensor act = flat(actions, N, "actions").to(at::kLong);
  const at::Tensor olp = flat(old_log_probs, N, "old_log_probs").to(dtype);
  const at::Tensor adv = flat(advantages, N, "advantages").to(dtype);
  const at::Tensor ret = flat(returns, N, "returns").to(dtype);
  const bool clip_values = clip_range_vf >= 0;
  const at::Tensor ov = clip_values ? flat(old_values, N, "old_values").to(dtype) : at::Tensor();
  at::Tensor grad_logits = at::empty_like(l);
  at::Tensor grad_values = at::empty({N}, l.options());
  std::array<double, 5> stats{};
  const Settings settings{clip_range, clip_range_vf, ent_coef, vf_coef, normalize_advantage};
  AT_DISPATCH_FLOATING_TYPES(dtype, "ppo_loss", [&] {
    const Steps<scalar_t> steps{
        l.data_ptr<scalar_t>(),   v.data_ptr<scalar_t>(),   act.data_ptr<int64_t>(),
        olp.data_ptr<scalar_t>(), adv.data_ptr<scalar_t>(), ret.data_ptr<scalar_t>(),
        clip_values ? ov.data_ptr<scalar_t>() : nullptr,    N, A};
    stats = loss_and_gradient(steps, settings, grad_logits.data_ptr<scalar_t>(),
                              grad_values.data_ptr<scalar_t>());
  });
  const double loss = stats[0] + ent_coef * stats[2] + vf_coef * stats[1];
  at::Tensor stats_tensor = at::empty({5}, l.options().dtype(at::kDouble));
  std::copy(stats.begin(), stats.end(), stats_tensor.data_ptr<double>());
  return {at::scalar_tensor(loss, l.options()), stats_tensor, grad_logits.view(logits.sizes()),
          grad_values.view(values.sizes())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ppo_loss", &ppo_loss,
        "PPO's clipped loss, its statistics and its gradients w.r.t. logits and values");
}
