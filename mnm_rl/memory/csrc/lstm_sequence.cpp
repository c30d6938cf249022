// An LSTM over a whole sequence with episode resets inside it, forward and backward, as one CPU
// kernel each: the baseline LSTM core's training pass (mnm_rl/memory/rnn_kernels.py).
//
// It computes what torch.nn.LSTM computes, in PyTorch's gate order (i, f, g, o), except that
// before step t the state of every sequence b with keep[t, b] == 0 is set to zero (an episode
// starts there):
//
//   h', c'  = keep[t] * (h, c)
//   gates   = gates_x[t] + W_hh h'          (gates_x = W_ih x + b_ih + b_hh, computed outside)
//   c       = sigmoid(f) c' + sigmoid(i) tanh(g)
//   h       = sigmoid(o) tanh(c)
//
// A fused nn.LSTM call cannot reset part of a batch mid-sequence, so the PyTorch code splits the
// sequence at every step where any sequence starts an episode and runs one call per span; with
// short episodes and 16 sequences that is a call every step or two. Here a reset is a mask: one
// BLAS call per step for the recurrent product, plain loops for the cell, and the recurrent
// weight's gradient as one product over all steps at the end. tests/test_rnn_kernels.py checks
// it against nn.LSTM run span by span: outputs, final state and every gradient.

#include <torch/extension.h>

#include <vector>

#include "dense_products.h"
#include "elementwise.h"
#include "kernels.h"
#include "rnn_common.h"

namespace mnm_rl {

// Forward over a sequence. gates_x [T, B, 4H], keep [T, B], h0 and c0 [B, H], w_hh [4H, H].
// Returns [hs [T, B, H], c_final [B, H], cs [T, B, H] (every step's cell state), acts [T, B, 4H]
// (every step's gate activations)]; with store=false, cs and acts are empty (no backward pass).
std::vector<at::Tensor> lstm_forward(const at::Tensor& gates_x, const at::Tensor& keep,
                                     const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_hh, bool store) {
  const int64_t H = check_rnn_inputs(gates_x, keep, {h0, c0}, 4, "lstm_forward");
  const int64_t T = gates_x.size(0), B = gates_x.size(1);
  const auto opts = gates_x.options();
  const at::Tensor gates_x_c = gates_x.contiguous(), keep_c = keep.contiguous();
  const at::Tensor h0_c = h0.contiguous();
  auto hs = at::empty({T, B, H}, opts);
  auto c_state = c0.clone(at::MemoryFormat::Contiguous);
  auto cs = at::empty({store ? T : 0, B, H}, opts);
  auto acts = at::empty({store ? T : 0, B, 4 * H}, opts);
  auto h_in = at::empty({B, H}, opts);
  auto gates = at::empty({B, 4 * H}, opts);  // without store; else each step's row of acts
  const auto w_hh_t = packed_transpose(w_hh);  // [H, 4H], for every step's product
  const bool own = dense_products_on();
  AT_DISPATCH_FLOATING_TYPES(gates_x.scalar_type(), "lstm_forward", [&] {
    using T_ = scalar_t;
    const BelowAutograd below_autograd;
    const T_* keep_p = keep_c.data_ptr<T_>();
    const T_* gx = gates_x_c.data_ptr<T_>();
    const T_* w_t = w_hh_t.data_ptr<T_>();
    T_* c_p = c_state.data_ptr<T_>();
    T_* u = h_in.data_ptr<T_>();
    const T_* h_prev = h0_c.data_ptr<T_>();
    T_* h_all = hs.data_ptr<T_>();
    const int64_t step_gates = B * 4 * H, step_states = B * H;
    for (int64_t t = 0; t < T; ++t) {
      kept_rows(u, h_prev, keep_p + t * B, B, H);
      kept_rows(c_p, c_p, keep_p + t * B, B, H);
      T_* out = store ? acts.data_ptr<T_>() + t * step_gates : gates.data_ptr<T_>();
      std::copy(gx + t * step_gates, gx + (t + 1) * step_gates, out);
      product_raw(out, u, w_t, B, H, 4 * H, /*accumulate=*/true, own);
      // The activations in place, then the cell (elementwise.h).
      T_* h_p = h_all + t * step_states;
      for (int64_t b = 0; b < B; ++b) lstm_cell_row(out + b * 4 * H, c_p + b * H, h_p + b * H, H);
      if (store) std::copy(c_p, c_p + step_states, cs.data_ptr<T_>() + t * step_states);
      h_prev = h_p;
    }
  });
  return {hs, c_state, cs, acts};
}

// Backward over a sequence from the gradients of hs [T, B, H] and of the final c [B, H] (an
// empty tensor is zero), with what lstm_forward stored. Returns the gradients of gates_x, h0, c0
// and w_hh.
std::vector<at::Tensor> lstm_backward(const at::Tensor& g_hs, const at::Tensor& g_c_final,
                                      const at::Tensor& keep, const at::Tensor& h0,
                                      const at::Tensor& c0, const at::Tensor& w_hh,
                                      const at::Tensor& hs, const at::Tensor& cs,
                                      const at::Tensor& acts) {
  const int64_t T = hs.size(0), B = hs.size(1), H = hs.size(2);
  const auto opts = hs.options();
  const at::Tensor w_hh_c = w_hh.contiguous(), c0_c = c0.contiguous();
  auto g_gates = at::empty({T, B, 4 * H}, opts);
  auto dh = at::zeros({B, H}, opts);  // grad of the (unmasked) state entering step t + 1
  auto dc = g_c_final.defined() && g_c_final.numel() > 0 ? g_c_final.clone(at::MemoryFormat::Contiguous)
                                                          : at::zeros({B, H}, opts);
  const bool own = dense_products_on();
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "lstm_backward", [&] {
    using T_ = scalar_t;
    const BelowAutograd below_autograd;
    const T_* keep_p = keep.data_ptr<T_>();
    const T_* g_hs_p = loss_grads<T_>(g_hs);
    const T_* acts_p = acts.data_ptr<T_>();
    const T_* cs_p = cs.data_ptr<T_>();
    const T_* w = w_hh_c.data_ptr<T_>();
    T_* dh_p = dh.data_ptr<T_>();
    T_* dc_p = dc.data_ptr<T_>();
    T_* g_all = g_gates.data_ptr<T_>();
    std::vector<T_> tanh_c_buffer(B * H), dh_total(B * H);
    T_* tanh_c = tanh_c_buffer.data();
    const T_* dht = dh_total.data();
    const int64_t step_gates = B * 4 * H, step_states = B * H;
    for (int64_t t = T - 1; t >= 0; --t) {
      output_grad(dh_total.data(), dh_p, g_hs_p, t, step_states);
      const T_* a_p = acts_p + t * step_gates;
      const T_* c_p = cs_p + t * step_states;
      const T_* c_prev = t == 0 ? c0_c.data_ptr<T_>() : cs_p + (t - 1) * step_states;
      const T_* keep_t = keep_p + t * B;
      T_* gg = g_all + t * step_gates;
      for (int64_t x = 0; x < B * H; ++x) tanh_c[x] = tanh_(c_p[x]);  // a loop it vectorises
      for (int64_t b = 0; b < B; ++b) {
        const T_ k = keep_t[b] != T_(0) ? T_(1) : T_(0);
        const T_* __restrict__ a = a_p + b * 4 * H;
        T_* __restrict__ gb = gg + b * 4 * H;
        for (int64_t i = 0; i < H; ++i) {
          const T_ ig = a[i], fg = a[H + i], cg = a[2 * H + i], og = a[3 * H + i];
          const T_ tc = tanh_c[b * H + i];
          const T_ dh_i = dht[b * H + i];
          const T_ dcell = dc_p[b * H + i] + dh_i * og * (T_(1) - tc * tc);
          gb[i] = dcell * cg * ig * (T_(1) - ig);
          gb[H + i] = dcell * k * c_prev[b * H + i] * fg * (T_(1) - fg);
          gb[2 * H + i] = dcell * ig * (T_(1) - cg * cg);
          gb[3 * H + i] = dh_i * tc * og * (T_(1) - og);
          dc_p[b * H + i] = dcell * fg * k;  // a reset passes nothing to the previous step
        }
      }
      product_raw(dh_p, gg, w, B, 4 * H, H, /*accumulate=*/false, own);
      kept_rows(dh_p, dh_p, keep_t, B, H);
    }
  });
  // The recurrent weight's gradient, once over all steps: sum_t g_gates[t]^T (keep[t] h_{t-1}).
  auto h_prev = entering_states(h0, hs, keep);
  auto g_w_hh = product(g_gates.reshape({T * B, 4 * H}).t(), h_prev.reshape({T * B, H}));
  return {g_gates, dh, dc, g_w_hh};
}

}  // namespace mnm_rl
