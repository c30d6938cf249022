// The action heads' MLPs and the draw of the actions, shared by action_heads.cpp (the heads of a
// rollout step) and policy_step.cpp (the whole policy's rollout step). See action_heads.cpp for
// the equations.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../../memory/csrc/dense_products.h"
#include "../../memory/csrc/elementwise.h"

// Internal linkage, as for the memory kernels' headers: each extension compiles its own copy.
namespace {

// The activations between a head's layers (mnm_rl/agent/action_heads.py: ACTIVATION_CODES).
enum Activation : int64_t { kTanh = 0, kReLU = 1 };

// The activation between a head's layers, in place: ReLU as torch's relu_, tanh with the
// kernels' own (elementwise.h: branch-free, a few float ulps from torch.tanh, which on an AMD CPU
// goes through MKL's generic code at 2.4 ns a float and a dispatch of its own). The training
// heads (action_heads.cpp) and the rollout's use it alike, so a rollout's logits and values are
// those the update's first pass recomputes from the same latents, bit for bit.
inline void activate(at::Tensor& y, int64_t activation) {
  if (activation == kReLU) {
    y.relu_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "heads_tanh", [&] {
    scalar_t* p = y.data_ptr<scalar_t>();
    const int64_t n = y.numel();
    for (int64_t i = 0; i < n; ++i) p[i] = mnm_rl::tanh_(p[i]);
  });
}

// x through the layers [W_0, b_0, W_1, b_1, ...], the activation after every layer but the last
// (and after the last too with activate_last): activate's, or with torch_tanh torch's own tanh_
// (for a module that is PyTorch's in training: the MLP core). Rollout steps only: the weights'
// transposes are kept between calls (cached_packed_transpose).
at::Tensor run_head(at::Tensor x, const std::vector<at::Tensor>& layers, int64_t activation,
                    bool activate_last = false, bool torch_tanh = false) {
  TORCH_CHECK(!layers.empty() && layers.size() % 2 == 0,
              "action_heads: a head is a list of weight, bias pairs; got ", layers.size(),
              " tensors");
  const size_t count = layers.size() / 2;
  for (size_t i = 0; i < count; ++i) {
    x = mnm_rl::linear_out(x, layers[2 * i], layers[2 * i + 1], /*cache_transpose=*/true);
    if (i + 1 == count && !activate_last) break;
    if (torch_tanh && activation == kTanh)
      x.tanh_();
    else
      activate(x, activation);
  }
  return x;
}

// Log-probabilities and the drawn (or most likely) action of every row of logits [B, A].
template <typename T>
bool draw(const T* logits, const T* races, int64_t B, int64_t A, int64_t* actions,
          T* log_probs) {
  bool finite = true;
  for (int64_t b = 0; b < B; ++b) {
    const T* l = logits + b * A;
    T top = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < A; ++j) {
      finite = finite && std::isfinite(l[j]);
      top = std::max(top, l[j]);
    }
    T total = 0;
    for (int64_t j = 0; j < A; ++j) total += std::exp(l[j] - top);
    const T log_total = std::log(total);
    int64_t best = 0;
    T best_score = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < A; ++j) {
      const T log_p = (l[j] - top) - log_total;
      const T score = races == nullptr ? log_p : log_p - std::log(races[b * A + j]);
      if (score > best_score) {  // the first of equal scores, as argmax takes it
        best_score = score;
        best = j;
      }
    }
    actions[b] = best;
    log_probs[b] = (l[best] - top) - log_total;
  }
  return finite;
}

// The draw's races for B rows of A actions, from torch's default generator: what heads_step
// draws, for a caller that draws them ahead of the step (StepThread, policy_step.cpp).
inline at::Tensor draw_races(int64_t B, int64_t A, const at::TensorOptions& options) {
  return at::empty({B, A}, options).exponential_();
}

// (actions [B] int64, log_probs [B], values [B], every logit finite) for latent [B, F] (the
// actor's input) and value_latent [B, F] (the critic's). Unless deterministic, the actions are
// drawn with `races` where defined (draw_races' [B, A]), else with races drawn here.
std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> heads_step(
    const at::Tensor& latent, const at::Tensor& value_latent, const std::vector<at::Tensor>& actor,
    const std::vector<at::Tensor>& critic, int64_t activation, bool deterministic,
    at::Tensor races = at::Tensor()) {
  TORCH_CHECK(activation == kTanh || activation == kReLU, "action_heads: unknown activation ",
              activation);
  TORCH_CHECK(latent.dim() == 2 && value_latent.dim() == 2 &&
                  latent.size(0) == value_latent.size(0),
              "action_heads: expected latents [B, F] with the same B; got ", latent.sizes(),
              " and ", value_latent.sizes());
  const at::Tensor logits = run_head(latent, actor, activation).contiguous();
  const at::Tensor values = run_head(value_latent, critic, activation);
  TORCH_CHECK(values.size(1) == 1, "action_heads: the critic gives ", values.size(1),
              " outputs per row, not 1");
  const int64_t B = logits.size(0), A = logits.size(1);
  auto actions = at::empty({B}, logits.options().dtype(at::kLong));
  auto log_probs = at::empty({B}, logits.options());
  if (deterministic)
    races = at::Tensor();
  else if (!races.defined())
    races = draw_races(B, A, logits.options());
  TORCH_CHECK(deterministic || (races.sizes() == logits.sizes() && races.is_contiguous() &&
                                races.scalar_type() == logits.scalar_type()),
              "action_heads: races must be ", logits.sizes(), " like the logits");
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "heads_step", [&] {
    finite = draw<scalar_t>(logits.data_ptr<scalar_t>(),
                            deterministic ? nullptr : races.data_ptr<scalar_t>(), B, A,
                            actions.data_ptr<int64_t>(), log_probs.data_ptr<scalar_t>());
  });
  return {actions, log_probs, values.reshape({B}), finite};
}

}  // namespace
