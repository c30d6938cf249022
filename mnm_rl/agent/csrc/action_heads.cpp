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
//
// For training it also runs the two heads over a minibatch, forward and backward, as one call
// each (heads_forward, heads_backward; mnm_rl/agent/action_heads.py: train_heads): the products
// through the kernels' hand-written products (memory/csrc/dense_products.h), the activations
// in place as the rollout's (heads.h: activate) and their derivatives through the outputs. With
// threads = 2 the actor and the critic run on a thread each (memory/csrc/parts.h), the same
// arithmetic as one after the other.

#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "../../memory/csrc/parts.h"
#include "heads.h"  // heads_step

namespace {

// g *= the activation's derivative, written through its output y (tanh: 1 - y^2; ReLU: y > 0).
void times_derivative(at::Tensor& g, const at::Tensor& y, int64_t activation) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "heads_derivative", [&] {
    scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t n = g.numel();
    if (activation == kReLU)
      for (int64_t i = 0; i < n; ++i) gp[i] = yp[i] > scalar_t(0) ? gp[i] : scalar_t(0);
    else
      for (int64_t i = 0; i < n; ++i) gp[i] *= scalar_t(1) - yp[i] * yp[i];
  });
}

// x [N, F] through a head's layers [W_0, b_0, ...]: the output, and every layer's input (x, then
// each hidden activation), which the backward pass reads.
std::vector<at::Tensor> head_forward(const at::Tensor& x, const std::vector<at::Tensor>& layers,
                                     int64_t activation) {
  TORCH_CHECK(!layers.empty() && layers.size() % 2 == 0,
              "action_heads: a head is a list of weight, bias pairs; got ", layers.size(),
              " tensors");
  std::vector<at::Tensor> out{x.contiguous()};
  const size_t count = layers.size() / 2;
  for (size_t i = 0; i < count; ++i) {
    at::Tensor y = mnm_rl::linear_out(out.back(), layers[2 * i], layers[2 * i + 1]);
    if (i + 1 < count) activate(y, activation);
    out.push_back(y);
  }
  return out;  // the inputs of layers 0..count-1, then the output
}

// From the output's gradient g [N, out] and head_forward's tensors: the gradient of x, then the
// layers' [dW_0, db_0, ...].
std::vector<at::Tensor> head_backward(at::Tensor g, const std::vector<at::Tensor>& layers,
                                      const std::vector<at::Tensor>& inputs,
                                      int64_t activation) {
  const size_t count = layers.size() / 2;
  std::vector<at::Tensor> grads(layers.size() + 1);
  for (size_t i = count; i-- > 0;) {
    grads[1 + 2 * i] = mnm_rl::product(g.t(), inputs[i]);
    grads[2 + 2 * i] = g.sum(0);
    at::Tensor gx = mnm_rl::product(g, layers[2 * i].contiguous());
    if (i > 0) times_derivative(gx, inputs[i], activation);
    g = gx;
  }
  grads[0] = g;
  return grads;
}

// (logits [N, A], values [N], the actor's layer inputs, the critic's) for latent and
// value_latent [N, F].
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
heads_forward(const at::Tensor& latent, const at::Tensor& value_latent,
              const std::vector<at::Tensor>& actor, const std::vector<at::Tensor>& critic,
              int64_t activation, int64_t threads) {
  TORCH_CHECK(activation == kTanh || activation == kReLU, "action_heads: unknown activation ",
              activation);
  TORCH_CHECK(latent.dim() == 2 && value_latent.dim() == 2 && latent.is_cpu(),
              "action_heads: expected CPU latents [N, F]");
  std::vector<at::Tensor> a, c;
  mnm_rl::run_both(
      threads >= 2, [&] { a = head_forward(latent, actor, activation); },
      [&] { c = head_forward(value_latent, critic, activation); });
  TORCH_CHECK(c.back().size(1) == 1, "action_heads: the critic gives ", c.back().size(1),
              " outputs per row, not 1");
  at::Tensor logits = a.back(), values = c.back().reshape({-1});
  a.pop_back();
  c.pop_back();
  return {logits, values, a, c};
}

// (d latent, d value_latent, the actor's [dW_0, db_0, ...], the critic's) from the gradients of
// the logits [N, A] and the values [N] (an empty one is zero).
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
heads_backward(const at::Tensor& g_logits, const at::Tensor& g_values,
               const std::vector<at::Tensor>& actor, const std::vector<at::Tensor>& critic,
               const std::vector<at::Tensor>& actor_inputs,
               const std::vector<at::Tensor>& critic_inputs, int64_t activation,
               int64_t threads) {
  const at::Tensor& x = actor_inputs[0];
  const int64_t N = x.size(0);
  at::Tensor ga = g_logits.numel() > 0 ? g_logits.contiguous()
                                     : at::zeros({N, actor[actor.size() - 2].size(0)}, x.options());
  at::Tensor gv = g_values.numel() > 0 ? g_values.reshape({N, 1}).contiguous()
                                     : at::zeros({N, 1}, x.options());
  std::vector<at::Tensor> da, dc;
  mnm_rl::run_both(
      threads >= 2, [&] { da = head_backward(ga, actor, actor_inputs, activation); },
      [&] { dc = head_backward(gv, critic, critic_inputs, activation); });
  at::Tensor d_latent = da[0], d_value_latent = dc[0];
  da.erase(da.begin());
  dc.erase(dc.begin());
  return {d_latent, d_value_latent, da, dc};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "heads_step",
      [](const at::Tensor& latent, const at::Tensor& value_latent,
         const std::vector<at::Tensor>& actor, const std::vector<at::Tensor>& critic,
         int64_t activation, bool deterministic) {
        return heads_step(latent, value_latent, actor, critic, activation, deterministic);
      },
      "the action and value heads for one step, with the actions drawn");
  // The GIL released: with two threads each takes the caller's thread-local state (parts.h).
  m.def("heads_forward", &heads_forward,
        "(latent, value_latent, actor, critic, activation, threads) -> (logits, values, actor "
        "inputs, critic inputs): the heads over a minibatch, for training",
        py::call_guard<py::gil_scoped_release>());
  m.def("heads_backward", &heads_backward,
        "(g_logits, g_values, actor, critic, actor inputs, critic inputs, activation, threads) "
        "-> (d latent, d value_latent, actor grads, critic grads)",
        py::call_guard<py::gil_scoped_release>());
}
