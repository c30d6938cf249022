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
//
// The sequences of a batch are independent in the recurrence, so both passes can run the batch
// in parts, one thread each (parts.h): each part steps its own rows [b0, b1) of the same
// output tensors, and the recurrent weight's gradient is one product over the whole batch after
// them. With the hand-written products a row's arithmetic is the same whatever part it is in,
// so every output is the same bit for bit as with one part; with ATen's (MNM_RL_DENSE_PRODUCTS=0)
// the same to rounding (tests/test_rnn_kernels.py).

#include <torch/extension.h>

#include <vector>

#include "dense_products.h"
#include "elementwise.h"
#include "kernels.h"
#include "parts.h"
#include "rnn_common.h"

namespace mnm_rl {

// Forward over a sequence. gates_x [T, B, 4H], keep [T, B], h0 and c0 [B, H], w_hh [4H, H].
// Returns [hs [T, B, H], c_final [B, H], cs [T, B, H] (every step's cell state), acts [T, B, 4H]
// (every step's gate activations)]; with store=false, cs and acts are empty (no backward pass).
// The batch runs in `parts` parts, one thread each.
std::vector<at::Tensor> lstm_forward(const at::Tensor& gates_x, const at::Tensor& keep,
                                     const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_hh, bool store, int64_t parts) {
  const int64_t H = check_rnn_inputs(gates_x, keep, {h0, c0}, 4, "lstm_forward");
  const int64_t T = gates_x.size(0), B = gates_x.size(1);
  TORCH_CHECK(parts >= 1 && parts <= std::max<int64_t>(B, 1), "lstm_forward: parts must be in ",
              "[1, batch size]");
  const auto opts = gates_x.options();
  const at::Tensor gates_x_c = gates_x.contiguous(), keep_c = keep.contiguous();
  const at::Tensor h0_c = h0.contiguous();
  auto hs = at::empty({T, B, H}, opts);
  auto c_state = c0.clone(at::MemoryFormat::Contiguous);
  auto cs = at::empty({store ? T : 0, B, H}, opts);
  auto acts = at::empty({store ? T : 0, B, 4 * H}, opts);
  const auto w_hh_t = packed_transpose(w_hh);  // [H, 4H], for every step's product
  const bool own = dense_products_on();
  AT_DISPATCH_FLOATING_TYPES(gates_x.scalar_type(), "lstm_forward", [&] {
    using T_ = scalar_t;
    const BelowAutograd below_autograd;
    const T_* keep_all = keep_c.data_ptr<T_>();
    const T_* gx_all = gates_x_c.data_ptr<T_>();
    const T_* w_t = w_hh_t.data_ptr<T_>();
    T_* c_all = c_state.data_ptr<T_>();
    const T_* h0_all = h0_c.data_ptr<T_>();
    T_* h_all = hs.data_ptr<T_>();
    T_* cs_all = store ? cs.data_ptr<T_>() : nullptr;
    T_* acts_all = store ? acts.data_ptr<T_>() : nullptr;
    const int64_t step_gates = B * 4 * H, step_states = B * H;
    // Rows [b0, b1) of every step: within a step a part's rows are contiguous.
    for_each_part(B, parts, [&](int64_t, int64_t b0, int64_t b1) {
      const int64_t n = b1 - b0;
      std::vector<T_> h_in(n * H), gates(store ? 0 : n * 4 * H);
      T_* u = h_in.data();
      T_* c_p = c_all + b0 * H;
      const T_* h_prev = h0_all + b0 * H;
      for (int64_t t = 0; t < T; ++t) {
        const T_* keep_t = keep_all + t * B + b0;
        kept_rows(u, h_prev, keep_t, n, H);
        kept_rows(c_p, c_p, keep_t, n, H);
        T_* out = store ? acts_all + t * step_gates + b0 * 4 * H : gates.data();
        const T_* gx = gx_all + t * step_gates + b0 * 4 * H;
        std::copy(gx, gx + n * 4 * H, out);
        product_raw(out, u, w_t, n, H, 4 * H, /*accumulate=*/true, own);
        // The activations in place, then the cell (elementwise.h).
        T_* h_p = h_all + t * step_states + b0 * H;
        for (int64_t b = 0; b < n; ++b) lstm_cell_row(out + b * 4 * H, c_p + b * H, h_p + b * H, H);
        if (store) std::copy(c_p, c_p + n * H, cs_all + t * step_states + b0 * H);
        h_prev = h_p;
      }
    });
  });
  return {hs, c_state, cs, acts};
}

// Backward over a sequence from the gradients of hs [T, B, H] and of the final c [B, H] (an
// empty tensor is zero), with what lstm_forward stored. Returns the gradients of gates_x, h0, c0
// and w_hh. The batch runs in `parts` parts, one thread each; w_hh's gradient is one product
// over the whole batch after them.
std::vector<at::Tensor> lstm_backward(const at::Tensor& g_hs, const at::Tensor& g_c_final,
                                      const at::Tensor& keep, const at::Tensor& h0,
                                      const at::Tensor& c0, const at::Tensor& w_hh,
                                      const at::Tensor& hs, const at::Tensor& cs,
                                      const at::Tensor& acts, int64_t parts) {
  const int64_t T = hs.size(0), B = hs.size(1), H = hs.size(2);
  TORCH_CHECK(parts >= 1 && parts <= std::max<int64_t>(B, 1), "lstm_backward: parts must be in ",
              "[1, batch size]");
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
    const T_* keep_all = keep.data_ptr<T_>();
    const T_* g_hs_p = loss_grads<T_>(g_hs);
    const T_* acts_all = acts.data_ptr<T_>();
    const T_* cs_all = cs.data_ptr<T_>();
    const T_* c0_all = c0_c.data_ptr<T_>();
    const T_* w = w_hh_c.data_ptr<T_>();
    T_* dh_all = dh.data_ptr<T_>();
    T_* dc_all = dc.data_ptr<T_>();
    T_* g_all = g_gates.data_ptr<T_>();
    const int64_t step_gates = B * 4 * H, step_states = B * H;
    for_each_part(B, parts, [&](int64_t, int64_t b0, int64_t b1) {
      const int64_t n = b1 - b0;
      std::vector<T_> tanh_c_buffer(n * H), dh_total(n * H);
      T_* tanh_c = tanh_c_buffer.data();
      const T_* dht = dh_total.data();
      T_* dh_p = dh_all + b0 * H;
      T_* dc_p = dc_all + b0 * H;
      for (int64_t t = T - 1; t >= 0; --t) {
        output_grad(dh_total.data(), dh_p,
                    g_hs_p == nullptr ? nullptr : g_hs_p + t * step_states + b0 * H, n * H);
        const T_* a_p = acts_all + t * step_gates + b0 * 4 * H;
        const T_* c_p = cs_all + t * step_states + b0 * H;
        const T_* c_prev = t == 0 ? c0_all + b0 * H : cs_all + (t - 1) * step_states + b0 * H;
        const T_* keep_t = keep_all + t * B + b0;
        T_* gg = g_all + t * step_gates + b0 * 4 * H;
        for (int64_t x = 0; x < n * H; ++x) tanh_c[x] = tanh_(c_p[x]);  // a loop it vectorises
        for (int64_t b = 0; b < n; ++b) {
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
        product_raw(dh_p, gg, w, n, 4 * H, H, /*accumulate=*/false, own);
        kept_rows(dh_p, dh_p, keep_t, n, H);
      }
    });
  });
  // The recurrent weight's gradient, once over all steps: sum_t g_gates[t]^T (keep[t] h_{t-1}),
  // its rows in parts (parts.h's product_parts).
  const auto h_prev = entering_states(h0, hs, keep).reshape({T * B, H});
  const auto g_w_hh = product_parts(g_gates.reshape({T * B, 4 * H}).t(), h_prev, parts);
  return {g_gates, dh, dc, g_w_hh};
}

}  // namespace mnm_rl
