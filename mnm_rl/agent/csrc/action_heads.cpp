// The policy's action and value heads for one step of a batch, with the actions drawn, as one
// call (mnm_rl/agent/action_heads.py): what RecurrentMemoryPolicy's heads and its sample() do in
// about fifteen PyTorch operators, each a few microseconds at the rollout's batch of 8 envs.
//
// Each head is an MLP: Linear layers (weight W [out, in], bias b [out]) with one activation, tanh
// or ReLU, between consecutive layers. The actor's last layer gives the logits l [B, A], the
// critic's the values [B, 1]. Then, per row,
//
//   log p_j = (l_j - m) - log sum_k exp(l_k - m),   m = max_k l_k     (log-softmax)
//   a       = argmax_j (log p_j - log E_j),   E_j ~ Exp(1)             (the draw)
//
// or a = argmax_j log p_j (the mode) when deterministic. The draw is the exponential race of
// RecurrentMemoryPolicy.sample: E is drawn by exponential_() on a [B, A] tensor from torch's
// default generator, as sample() draws it, so the same seed gives the same actions. Whether every
// logit is finite is returned too, so that the caller can stop before stepping the envs.

#include <torch/extension.h>

#include "heads.h"  // heads_step

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("heads_step", &heads_step,
        "the action and value heads for one step, with the actions drawn");
}
