// A GRU over a whole sequence with episode resets inside it, forward and backward, as one CPU
// kernel each: the baseline GRU core's training pass (mnm_rl/memory/rnn_kernels.py). The
// companion of lstm_sequence.cpp (see there for why).
//
// It computes what torch.nn.GRU computes, in PyTorch's gate order (r, z, n), except that before
// step t the state of every sequence b with keep[t, b] == 0 is set to zero:
//
//   h'  = keep[t] * h
//   gh  = W_hh h' + b_hh                    (gates_x = W_ih x + b_ih, computed outside)
//   r   = sigmoid(gates_x_r + gh_r),  z = sigmoid(gates_x_z + gh_z)
//   n   = tanh(gates_x_n + r * gh_n)
//   h   = (1 - z) n + z h'

#include <torch/extension.h>

#include <vector>

#include "dense_products.h"
#include "elementwise.h"
#include "kernels.h"
#include "rnn_common.h"

namespace mnm_rl {

// Forward over a sequence. gates_x [T, B, 3H], keep [T, B], h0 [B, H], w_hh [3H, H], b_hh [3H].
// Returns [hs [T, B, H], acts [T, B, 4H]: every step's r, z, n and gh_n (empty without store)].
std::vector<at::Tensor> gru_forward(const at::Tensor& gates_x, const at::Tensor& keep,
                                    const at::Tensor& h0, const at::Tensor& w_hh,
                                    const at::Tensor& b_hh, bool store) {
  const int64_t H = check_rnn_inputs(gates_x, keep, {h0}, 3, "gru_forward");
  const int64_t T = gates_x.size(0), B = gates_x.size(1);
  const auto opts = gates_x.options();
  const at::Tensor gates_x_c = gates_x.contiguous(), keep_c = keep.contiguous();
  const at::Tensor h0_c = h0.contiguous(), b_hh_c = b_hh.contiguous();
  auto hs = at::empty({T, B, H}, opts);
  auto acts = at::empty({store ? T : 0, B, 4 * H}, opts);
  auto h_in = at::empty({B, H}, opts);
  auto gh = at::empty({B, 3 * H}, opts);
  const auto w_hh_t = packed_transpose(w_hh);  // [H, 3H], for every step's product
  const bool own = dense_products_on();
  AT_DISPATCH_FLOATING_TYPES(gates_x.scalar_type(), "gru_forward", [&] {
    using T_ = scalar_t;
    const BelowAutograd below_autograd;
    const T_* keep_p = keep_c.data_ptr<T_>();
    T_* u = h_in.data_ptr<T_>();
    T_* gh_p = gh.data_ptr<T_>();
    const T_* h_prev = h0_c.data_ptr<T_>();
    const T_* gx_all = gates_x_c.data_ptr<T_>();
    const T_* bias = b_hh_c.data_ptr<T_>();
    const T_* w_t = w_hh_t.data_ptr<T_>();
    T_* h_all = hs.data_ptr<T_>();
    for (int64_t t = 0; t < T; ++t) {
      kept_rows(u, h_prev, keep_p + t * B, B, H);
      for (int64_t b = 0; b < B; ++b) std::copy(bias, bias + 3 * H, gh_p + b * 3 * H);
      product_raw(gh_p, u, w_t, B, H, 3 * H, /*accumulate=*/true, own);
      T_* h_p = h_all + t * B * H;
      for (int64_t b = 0; b < B; ++b) {
        const T_* __restrict__ gx = gx_all + (t * B + b) * 3 * H;
        const T_* __restrict__ g = gh_p + b * 3 * H;
        const T_* __restrict__ ub = u + b * H;
        T_* __restrict__ hb = h_p + b * H;
        T_* __restrict__ a = store ? acts.data_ptr<T_>() + (t * B + b) * 4 * H : nullptr;
        for (int64_t i = 0; i < H; ++i) {
          const T_ r = sigmoid(gx[i] + g[i]);
          const T_ z = sigmoid(gx[H + i] + g[H + i]);
          const T_ n = tanh_(gx[2 * H + i] + r * g[2 * H + i]);
          hb[i] = (T_(1) - z) * n + z * ub[i];
          if (store) a[i] = r, a[H + i] = z, a[2 * H + i] = n, a[3 * H + i] = g[2 * H + i];
        }
      }
      h_prev = h_p;
    }
  });
  return {hs, acts};
}

// Backward over a sequence from the gradient of hs [T, B, H] (an empty tensor is zero), with
// what gru_forward stored. Returns the gradients of gates_x, h0, w_hh and b_hh.
std::vector<at::Tensor> gru_backward(const at::Tensor& g_hs, const at::Tensor& keep,
                                     const at::Tensor& h0, const at::Tensor& w_hh,
                                     const at::Tensor& hs, const at::Tensor& acts) {
  const int64_t T = hs.size(0), B = hs.size(1), H = hs.size(2);
  const auto opts = hs.options();
  const at::Tensor w_hh_c = w_hh.contiguous();
  auto g_gates_x = at::empty({T, B, 3 * H}, opts);
  auto g_gh = at::empty({T, B, 3 * H}, opts);  // grad of W_hh h' + b_hh
  auto dh = at::zeros({B, H}, opts);           // grad of the state entering step t + 1
  // h' of every step: keep[t] * h_{t-1}.
  auto h_prev = entering_states(h0, hs, keep);
  const bool own = dense_products_on();
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "gru_backward", [&] {
    using T_ = scalar_t;
    const BelowAutograd below_autograd;
    const T_* keep_p = keep.data_ptr<T_>();
    const T_* g_hs_p = loss_grads<T_>(g_hs);
    const T_* u_all = h_prev.data_ptr<T_>();
    const T_* acts_p = acts.data_ptr<T_>();
    const T_* w = w_hh_c.data_ptr<T_>();
    T_* g_x_all = g_gates_x.data_ptr<T_>();
    T_* g_gh_all = g_gh.data_ptr<T_>();
    T_* dh_p = dh.data_ptr<T_>();
    std::vector<T_> dh_total(B * H);
    const T_* dht = dh_total.data();
    for (int64_t t = T - 1; t >= 0; --t) {
      output_grad(dh_total.data(), dh_p, g_hs_p == nullptr ? nullptr : g_hs_p + t * B * H,
                  B * H);
      for (int64_t b = 0; b < B; ++b) {
        const T_* __restrict__ a = acts_p + (t * B + b) * 4 * H;
        const T_* __restrict__ ub = u_all + (t * B + b) * H;
        T_* __restrict__ gx = g_x_all + (t * B + b) * 3 * H;
        T_* __restrict__ gg = g_gh_all + (t * B + b) * 3 * H;
        for (int64_t i = 0; i < H; ++i) {
          const T_ r = a[i], z = a[H + i], n = a[2 * H + i], ghn = a[3 * H + i];
          const T_ d = dht[b * H + i];
          const T_ dn = d * (T_(1) - z) * (T_(1) - n * n);  // into n's pre-activation
          const T_ dr = dn * ghn * r * (T_(1) - r);
          const T_ dz = d * (ub[i] - n) * z * (T_(1) - z);
          gx[i] = gg[i] = dr;
          gx[H + i] = gg[H + i] = dz;
          gx[2 * H + i] = dn;
          gg[2 * H + i] = dn * r;
          dh_p[b * H + i] = d * z;  // h's direct path, z h'; the gates' path is added below
        }
      }
      product_raw(dh_p, g_gh_all + t * B * 3 * H, w, B, 3 * H, H, /*accumulate=*/true, own);
      kept_rows(dh_p, dh_p, keep_p + t * B, B, H);
    }
  });
  // The recurrent weight's and bias's gradients, once over all steps.
  auto flat = g_gh.reshape({T * B, 3 * H});
  auto g_w_hh = product(flat.t(), h_prev.reshape({T * B, H}));
  return {g_gates_x, dh, g_w_hh, flat.sum(0)};
}

}  // namespace mnm_rl
