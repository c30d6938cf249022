// The MNM recurrence over a whole sequence, forward and backward, as one CPU kernel.
//
// It computes exactly what mnm_rl/memory/mnm.py (MNMCore._step) and fast_weights.py compute, in
// the same order, for the paper's step order (write, then read) without the retention loss:
//
//   gates  = gates_x[t] + W_rec [h ; r]                 LSTM controller (input part precomputed)
//   c, h   = LSTM cell
//   e      = tanh(W_int h + b_int) = [k^r (H x D) ; k^w (H x D) ; v^w (H x D) ; beta' (D)]
//   beta   = sigmoid(w_beta . beta' + b_beta)
//   k^     = rms_norm(k)                                 all 2H keys
//   z^0 = k^w, z^l = act(M^l z^{l-1}), z^L = M^L z^{L-1}  pre-write pass (write keys)
//   delta^l = z^l - target^l    (mnm-p: target = BFPF(v^w); mnm-g: backpropagated error)
//   M^l    <- M^l - beta / (sum_h |z^{l-1}_h|^2 + eps) * sum_h delta^l_h (z^{l-1}_h)^T
//   zr     = the same MLP on all 2H keys under the new weights; read = mean of the read heads
//
// Eager PyTorch runs this as about 200 small operators per step, each costing microseconds of
// dispatch and allocation whatever its size. Here one call does a whole sequence: the matrix
// products of the controller go to BLAS once per step for the whole batch, everything else
// is plain loops per sequence on preallocated buffers, and the weight gradients of the
// controller are two large products over all steps. The backward pass recomputes each step's
// activations from the stored step inputs (h, c, read and the post-write fast weights of the
// previous step) rather than storing them. tests/test_fused.py checks it against the PyTorch
// implementation: outputs, final state and every gradient.

#include <torch/extension.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Dims {
  int64_t B, hidden, D, H, L;
  bool gradient_rule;  // mnm-g; otherwise mnm-p
  bool tanh_act;       // tanh; otherwise sigmoid
  double eps;          // the write's energy epsilon (FastWeightMemory.eps)
  int64_t E() const { return 3 * H * D + D; }
  int64_t layer_size() const { return D * D; }
  int64_t weights_size() const { return L * D * D; }
};

// Elementwise math. In double (what the tests compare) the standard library's functions; in
// float branch-free versions that the compiler vectorises: glibc's scalar tanhf and expf
// were a fifth of the kernel's time. Their error is a few float ulps.

// exp(y) for y <= 0: Cephes' expf polynomial after range reduction, scaled by 2^n through
// the exponent bits. Below -87 (where expf leaves the normal range) it returns exp(-87).
inline float exp_nonpositive(float y) {
  y = std::max(y, -87.0f);
  const float n = std::floor(y * 1.44269504088896341f + 0.5f);
  float r = y - n * 0.693359375f;
  r -= n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}
inline float tanh_(float x) {
  const float ax = std::fabs(x), x2 = x * x;
  const float t = exp_nonpositive(-2.0f * ax);
  const float far = (1.0f - t) / (1.0f + t);
  // Near zero 1 - t cancels; the odd Taylor series to x^9 is exact to float there.
  const float near =
      ax * (1.0f + x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315 + x2 * (62.0f / 2835)))));
  return std::copysign(ax < 0.3f ? near : far, x);
}
inline float sigmoid(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}
inline double tanh_(double x) { return std::tanh(x); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <typename T> inline T act(bool tanh_act, T a) { return tanh_act ? tanh_(a) : sigmoid(a); }
// The hidden activation over an array, in place.
template <typename T> inline void apply_act(bool tanh_act, T* x, int64_t n) {
  if (tanh_act)
    for (int64_t i = 0; i < n; ++i) x[i] = tanh_(x[i]);
  else
    for (int64_t i = 0; i < n; ++i) x[i] = sigmoid(x[i]);
}
// The activation's derivative written through its output z.
template <typename T> inline T act_grad(bool tanh_act, T z) {
  return tanh_act ? T(1) - z * z : z * (T(1) - z);
}
// d act_grad(z) / dz (mnm-g's backpropagated error depends on act_grad of the activations).
template <typename T> inline T act_grad_grad(bool tanh_act, T z) {
  return tanh_act ? T(-2) * z : T(1) - T(2) * z;
}

// x . y with kLanes independent partial sums, so that the compiler vectorises the loop (a
// single running sum is a serial dependency it may not reorder).
constexpr int64_t kLanes = 16;
template <typename T> inline T dot(const T* x, const T* y, int64_t n) {
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += x[i + k] * y[i + k];
  T s = 0;
  for (; i < n; ++i) s += x[i] * y[i];
  for (int64_t k = 0; k < kLanes; ++k) s += lanes[k];
  return s;
}
// y = A x, A [m, n] row-major.
template <typename T> inline void matvec(const T* A, const T* x, T* y, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) y[i] = dot(A + i * n, x, n);
}
// y += A^T x, A [m, n] row-major.
template <typename T>
inline void matvec_t_add(const T* A, const T* x, T* y, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    const T xi = x[i];
    const T* row = A + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] += xi * row[j];
  }
}
// A += alpha u v^T, A [m, n] row-major.
template <typename T>
inline void rank1_add(T* A, T alpha, const T* u, const T* v, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    const T ui = alpha * u[i];
    T* row = A + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] += ui * v[j];
  }
}

// Activations of one sequence's memory at one step (recomputed in the backward pass).
template <typename T> struct MemoryStep {
  std::vector<T> khat, kscale;  // [2H, D], [2H]: normalised keys and their rsqrt factors
  std::vector<T> z;             // [L + 1, H, D]: pre-write activations of the write keys
  std::vector<T> target;        // [L, H, D]: mnm-p's targets (post-activation)
  std::vector<T> delta;         // [L, H, D]
  std::vector<T> energy;        // [L]
  std::vector<T> zr;            // [L + 1, 2H, D]: post-write activations of all keys
  T beta = 0;

  explicit MemoryStep(const Dims& d)
      : khat(2 * d.H * d.D), kscale(2 * d.H), z((d.L + 1) * d.H * d.D),
        target(d.L * d.H * d.D), delta(d.L * d.H * d.D), energy(d.L),
        zr((d.L + 1) * 2 * d.H * d.D) {}
};

template <typename T> struct Params {
  const T* w_beta;  // [D]
  T b_beta;
  const T* w_fb;    // [L * D, D] (mnm-p)
  const T* b_fb;    // [L * D]
  const T* m_init;  // [L, D, D]
};

template <typename T>
Params<T> make_params(const at::Tensor& w_beta, const at::Tensor& b_beta, const at::Tensor& w_fb,
                      const at::Tensor& b_fb, const at::Tensor& m_init, bool gradient_rule) {
  return {w_beta.data_ptr<T>(), b_beta.item<T>(), gradient_rule ? nullptr : w_fb.data_ptr<T>(),
          gradient_rule ? nullptr : b_fb.data_ptr<T>(), m_init.data_ptr<T>()};
}

// One sequence's memory step: from e (the interaction output) and the pre-write weights
// m_pre, fill s and write the post-write weights into m_post.
template <typename T>
void memory_forward(const Dims& d, const Params<T>& p, const T* e, const T* m_pre, T* m_post,
                    MemoryStep<T>& s) {
  const int64_t D = d.D, H = d.H, L = d.L, HD = H * D, DD = D * D;
  const T* values = e + 2 * HD;
  const T* beta_in = e + 3 * HD;
  s.beta = sigmoid(dot(p.w_beta, beta_in, D) + p.b_beta);
  for (int64_t j = 0; j < 2 * H; ++j) {
    const T* k = e + j * D;
    const T scale = T(1) / std::sqrt(dot(k, k, D) / T(D) + T(1e-6));
    s.kscale[j] = scale;
    for (int64_t i = 0; i < D; ++i) s.khat[j * D + i] = k[i] * scale;
  }
  // Pre-write pass of the write keys.
  std::copy(s.khat.begin() + HD, s.khat.end(), s.z.begin());
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t h = 0; h < H; ++h) {
      T* out = &s.z[((l + 1) * H + h) * D];
      matvec(m_pre + l * DD, &s.z[(l * H + h) * D], out, D, D);
      if (l < L - 1) apply_act(d.tanh_act, out, D);
    }
  }
  // Errors per layer.
  if (!d.gradient_rule) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t l = 0; l < L; ++l) {
        T* t = &s.target[(l * H + h) * D];
        matvec(p.w_fb + l * DD, values + h * D, t, D, D);
        for (int64_t i = 0; i < D; ++i) t[i] += p.b_fb[l * D + i];
        if (l < L - 1) apply_act(d.tanh_act, t, D);
        for (int64_t i = 0; i < D; ++i)
          s.delta[(l * H + h) * D + i] = s.z[((l + 1) * H + h) * D + i] - t[i];
      }
    }
  } else {
    for (int64_t h = 0; h < H; ++h) {
      T* top = &s.delta[((L - 1) * H + h) * D];
      for (int64_t i = 0; i < D; ++i) top[i] = s.z[(L * H + h) * D + i] - values[h * D + i];
      for (int64_t l = L - 2; l >= 0; --l) {
        T* dl = &s.delta[(l * H + h) * D];
        std::fill(dl, dl + D, T(0));
        matvec_t_add(m_pre + (l + 1) * DD, &s.delta[((l + 1) * H + h) * D], dl, D, D);
        const T* zl = &s.z[((l + 1) * H + h) * D];
        for (int64_t i = 0; i < D; ++i) dl[i] *= act_grad(d.tanh_act, zl[i]);
      }
    }
  }
  // The write.
  for (int64_t l = 0; l < L; ++l) {
    T energy = T(d.eps);
    for (int64_t h = 0; h < H; ++h) {
      const T* zin = &s.z[(l * H + h) * D];
      energy += dot(zin, zin, D);
    }
    s.energy[l] = energy;
    const T step = s.beta / energy;
    std::copy(m_pre + l * DD, m_pre + (l + 1) * DD, m_post + l * DD);
    for (int64_t h = 0; h < H; ++h)
      rank1_add(m_post + l * DD, -step, &s.delta[(l * H + h) * D], &s.z[(l * H + h) * D], D, D);
  }
  // Post-write pass of every key.
  const int64_t J = 2 * H;
  std::copy(s.khat.begin(), s.khat.end(), s.zr.begin());
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t j = 0; j < J; ++j) {
      T* out = &s.zr[((l + 1) * J + j) * D];
      matvec(m_post + l * DD, &s.zr[(l * J + j) * D], out, D, D);
      if (l < L - 1) apply_act(d.tanh_act, out, D);
    }
  }
}

// An absent gradient (an output the loss does not use) arrives as an empty tensor.
inline bool present(const at::Tensor& g) { return g.defined() && g.numel() > 0; }

struct Checked {
  Dims dims;
  int64_t T;
};

Checked check(const at::Tensor& gates_x, const at::Tensor& m0, int64_t n_heads,
              bool gradient_rule, bool tanh_act, double eps) {
  TORCH_CHECK(gates_x.dim() == 3, "gates_x must be [T, B, 4 * hidden]");
  TORCH_CHECK(m0.dim() == 4, "fast weights must be [B, L, D, D]");
  TORCH_CHECK(gates_x.device().is_cpu(), "the fused MNM kernel runs on the CPU only");
  Dims d{gates_x.size(1), gates_x.size(2) / 4, m0.size(2), n_heads, m0.size(1),
         gradient_rule, tanh_act, eps};
  return {d, gates_x.size(0)};
}

}  // namespace

// Forward over a sequence. With store=true it keeps what the backward pass needs (the step
// inputs and every step's post-write weights); otherwise the weights ping-pong in two buffers.
// Returns [hs, reads, after, before, values, beta, fw_norm, c_final, post, h_in, c_in, r_in]:
// post [T or 2, B, L, D, D], the final weights are post[(T - 1) % post.size(0)].
std::vector<at::Tensor> mnm_forward(const at::Tensor& gates_x, const at::Tensor& keep,
                                    const at::Tensor& h0, const at::Tensor& c0,
                                    const at::Tensor& r0, const at::Tensor& m0,
                                    const at::Tensor& w_rec, const at::Tensor& w_int,
                                    const at::Tensor& b_int, const at::Tensor& w_beta,
                                    const at::Tensor& b_beta, const at::Tensor& w_fb,
                                    const at::Tensor& b_fb, const at::Tensor& m_init,
                                    int64_t n_heads, bool gradient_rule, bool tanh_act,
                                    double eps, bool store) {
  auto [d, T] = check(gates_x, m0, n_heads, gradient_rule, tanh_act, eps);
  const int64_t B = d.B, Hd = d.hidden, D = d.D, H = d.H, E = d.E(), W = d.weights_size();
  const int64_t HD = H * D;
  auto opts = gates_x.options();
  auto hs = at::empty({T, B, Hd}, opts);
  auto reads = at::empty({T, B, D}, opts);
  auto after = at::empty({T, B, H, D}, opts);
  auto before = at::empty({T, B, H, D}, opts);
  auto values = at::empty({T, B, H, D}, opts);
  auto beta = at::empty({T, B}, opts);
  auto fw_norm = at::empty({T, B}, opts);
  auto c_state = c0.clone();
  auto post = at::empty({store ? T : std::min<int64_t>(T, 2), B, d.L, D, D}, opts);
  auto h_in = at::empty({store ? T : 0, B, Hd}, opts);
  auto c_in = at::empty({store ? T : 0, B, Hd}, opts);
  auto r_in = at::empty({store ? T : 0, B, D}, opts);
  auto u = at::empty({B, Hd + D}, opts);
  auto gates = at::empty({B, 4 * Hd}, opts);
  auto e = at::empty({B, E}, opts);
  auto w_rec_t = w_rec.t();
  auto w_int_t = w_int.t();

  AT_DISPATCH_FLOATING_TYPES(gates_x.scalar_type(), "mnm_forward", [&] {
    using T_ = scalar_t;
    const auto p = make_params<T_>(w_beta, b_beta, w_fb, b_fb, m_init, gradient_rule);
    MemoryStep<T_> s(d);
    const T_* keep_p = keep.data_ptr<T_>();
    const T_ norm_scale = T_(1) / std::sqrt(T_(d.L * D));
    for (int64_t t = 0; t < T; ++t) {
      const T_* h_prev = t == 0 ? h0.data_ptr<T_>() : hs[t - 1].data_ptr<T_>();
      const T_* r_prev = t == 0 ? r0.data_ptr<T_>() : reads[t - 1].data_ptr<T_>();
      const T_* m_prev = t == 0 ? m0.data_ptr<T_>() : post[(t - 1) % post.size(0)].data_ptr<T_>();
      T_* m_next = post[t % post.size(0)].data_ptr<T_>();
      T_* c_p = c_state.data_ptr<T_>();
      T_* u_p = u.data_ptr<T_>();
      // Reset, then [h ; read] for the controller.
      for (int64_t b = 0; b < B; ++b) {
        const bool k = keep_p[t * B + b] != T_(0);
        for (int64_t i = 0; i < Hd; ++i) u_p[b * (Hd + D) + i] = k ? h_prev[b * Hd + i] : T_(0);
        for (int64_t i = 0; i < D; ++i) u_p[b * (Hd + D) + Hd + i] = k ? r_prev[b * D + i] : T_(0);
        if (!k) std::fill(c_p + b * Hd, c_p + (b + 1) * Hd, T_(0));
      }
      if (store) {
        h_in[t].copy_(u.narrow(1, 0, Hd));
        r_in[t].copy_(u.narrow(1, Hd, D));
        c_in[t].copy_(c_state);
      }
      at::addmm_out(gates, gates_x[t], u, w_rec_t);
      const T_* g = gates.data_ptr<T_>();
      T_* h_p = hs[t].data_ptr<T_>();
      for (int64_t b = 0; b < B; ++b) {
        const T_* gb = g + b * 4 * Hd;
        for (int64_t i = 0; i < Hd; ++i) {
          const T_ ig = sigmoid(gb[i]), fg = sigmoid(gb[Hd + i]);
          const T_ cg = tanh_(gb[2 * Hd + i]), og = sigmoid(gb[3 * Hd + i]);
          const T_ c = fg * c_p[b * Hd + i] + ig * cg;
          c_p[b * Hd + i] = c;
          h_p[b * Hd + i] = og * tanh_(c);
        }
      }
      at::addmm_out(e, b_int, hs[t], w_int_t);
      e.tanh_();
      const T_* e_p = e.data_ptr<T_>();
      T_* read_p = reads.data_ptr<T_>() + t * B * D;
      T_* after_p = after.data_ptr<T_>() + t * B * HD;
      T_* before_p = before.data_ptr<T_>() + t * B * HD;
      T_* values_p = values.data_ptr<T_>() + t * B * HD;
      T_* beta_p = beta.data_ptr<T_>() + t * B;
      T_* norm_p = fw_norm.data_ptr<T_>() + t * B;
      const T_* zr_out = &s.zr[d.L * 2 * H * D];  // the last layer's answers, [2H, D]
      for (int64_t b = 0; b < B; ++b) {
        const bool k = keep_p[t * B + b] != T_(0);
        const T_* m_pre = k ? m_prev + b * W : p.m_init;
        T_* m_post = m_next + b * W;
        memory_forward(d, p, e_p + b * E, m_pre, m_post, s);
        for (int64_t i = 0; i < D; ++i) {
          T_ acc = 0;
          for (int64_t j = 0; j < H; ++j) acc += zr_out[j * D + i];
          read_p[b * D + i] = acc / T_(H);
        }
        std::copy(zr_out + HD, zr_out + 2 * HD, after_p + b * HD);
        std::copy(&s.z[d.L * HD], &s.z[(d.L + 1) * HD], before_p + b * HD);
        std::copy(e_p + b * E + 2 * HD, e_p + b * E + 3 * HD, values_p + b * HD);
        beta_p[b] = s.beta;
        norm_p[b] = std::sqrt(dot(m_post, m_post, W)) * norm_scale;
      }
    }
  });
  return {hs, reads, after, before, values, beta, fw_norm, c_state, post, h_in, c_in, r_in};
}

// Backward over a sequence from the gradients of the forward's outputs (hs, reads, after,
// before, values, beta, the final c and the final weights; an empty tensor is zero).
// Returns the gradients of gates_x, h0, c0, r0, m0, w_rec, w_int, b_int, w_beta, b_beta, w_fb,
// b_fb and m_init.
std::vector<at::Tensor> mnm_backward(
    const at::Tensor& g_hs, const at::Tensor& g_reads, const at::Tensor& g_after,
    const at::Tensor& g_before, const at::Tensor& g_values, const at::Tensor& g_beta,
    const at::Tensor& g_c_final, const at::Tensor& g_m_final, const at::Tensor& gates_x,
    const at::Tensor& keep, const at::Tensor& m0, const at::Tensor& post,
    const at::Tensor& h_in, const at::Tensor& c_in, const at::Tensor& r_in,
    const at::Tensor& hs, const at::Tensor& w_rec, const at::Tensor& w_int,
    const at::Tensor& b_int, const at::Tensor& w_beta, const at::Tensor& b_beta,
    const at::Tensor& w_fb, const at::Tensor& b_fb, const at::Tensor& m_init, int64_t n_heads,
    bool gradient_rule, bool tanh_act, double eps) {
  auto [d, T] = check(gates_x, m0, n_heads, gradient_rule, tanh_act, eps);
  const int64_t B = d.B, Hd = d.hidden, D = d.D, H = d.H, L = d.L, E = d.E();
  const int64_t W = d.weights_size(), DD = D * D, HD = H * D, J = 2 * H;
  auto opts = gates_x.options();
  auto g_gates = at::empty({T, B, 4 * Hd}, opts);  // = grad of gates_x
  auto g_pre_e = at::empty({T, B, E}, opts);       // grad of W_int h + b_int
  auto dh = at::zeros({B, Hd}, opts);              // running grads into step t's inputs
  auto dc = present(g_c_final) ? g_c_final.clone() : at::zeros({B, Hd}, opts);
  auto dr = at::zeros({B, D}, opts);
  auto dm = present(g_m_final) ? g_m_final.clone() : at::zeros({B, L, D, D}, opts);
  auto g_w_beta = at::zeros_like(w_beta);
  auto g_b_beta = at::zeros_like(b_beta);
  auto g_w_fb = at::zeros_like(w_fb);
  auto g_b_fb = at::zeros_like(b_fb);
  auto g_m_init = at::zeros_like(m_init);
  auto u = at::empty({B, Hd + D}, opts);
  auto gates = at::empty({B, 4 * Hd}, opts);
  auto e = at::empty({B, E}, opts);
  auto dh_total = at::empty({B, Hd}, opts);
  auto w_rec_t = w_rec.t();
  auto w_int_t = w_int.t();

  AT_DISPATCH_FLOATING_TYPES(gates_x.scalar_type(), "mnm_backward", [&] {
    using T_ = scalar_t;
    const auto p = make_params<T_>(w_beta, b_beta, w_fb, b_fb, m_init, gradient_rule);
    MemoryStep<T_> s(d);
    std::vector<T_> m_post_unused(W);
    std::vector<T_> dzr((L + 1) * J * D), dz((L + 1) * HD), ddelta(L * HD), dv(HD), w(D),
        dq(D), q(D), da(D), dkhat(J * D);
    const T_* keep_p = keep.data_ptr<T_>();
    T_* gw_beta = g_w_beta.data_ptr<T_>();
    T_* gw_fb = gradient_rule ? nullptr : g_w_fb.data_ptr<T_>();
    T_* gb_fb = gradient_rule ? nullptr : g_b_fb.data_ptr<T_>();
    T_* gm_init = g_m_init.data_ptr<T_>();
    T_ gb_beta = 0;
    auto grad_at = [](const at::Tensor& g, int64_t t) -> const T_* {
      return present(g) ? g[t].data_ptr<T_>() : nullptr;
    };
    for (int64_t t = T - 1; t >= 0; --t) {
      // Recompute the controller part of step t.
      u.narrow(1, 0, Hd).copy_(h_in[t]);
      u.narrow(1, Hd, D).copy_(r_in[t]);
      at::addmm_out(gates, gates_x[t], u, w_rec_t);
      at::addmm_out(e, b_int, hs[t], w_int_t);
      e.tanh_();
      const T_* e_p = e.data_ptr<T_>();
      const T_* m_prev = t == 0 ? m0.data_ptr<T_>() : post[t - 1].data_ptr<T_>();
      const T_* m_next = post[t].data_ptr<T_>();
      const T_* gr = grad_at(g_reads, t);
      const T_* ga = grad_at(g_after, t);
      const T_* gbf = grad_at(g_before, t);
      const T_* gv = grad_at(g_values, t);
      const T_* gbeta = grad_at(g_beta, t);
      T_* dr_p = dr.data_ptr<T_>();
      T_* dm_p = dm.data_ptr<T_>();
      T_* gpe = g_pre_e[t].data_ptr<T_>();
      for (int64_t b = 0; b < B; ++b) {
        const bool k = keep_p[t * B + b] != T_(0);
        const T_* m_pre = k ? m_prev + b * W : p.m_init;
        const T_* m_post = m_next + b * W;
        memory_forward(d, p, e_p + b * E, m_pre, m_post_unused.data(), s);
        T_* G = dm_p + b * W;  // grad of the post-write weights; becomes that of the pre-write
        // The read of every key under the new weights.
        for (int64_t j = 0; j < J; ++j)
          for (int64_t i = 0; i < D; ++i) {
            T_ g = 0;
            if (j < H)
              g = (dr_p[b * D + i] + (gr ? gr[b * D + i] : T_(0))) / T_(H);
            else if (ga)
              g = ga[(b * H + j - H) * D + i];
            dzr[(L * J + j) * D + i] = g;
          }
        for (int64_t l = L - 1; l >= 0; --l)
          for (int64_t j = 0; j < J; ++j) {
            const T_* out = &s.zr[((l + 1) * J + j) * D];
            const T_* gout = &dzr[((l + 1) * J + j) * D];
            for (int64_t i = 0; i < D; ++i)
              da[i] = l < L - 1 ? gout[i] * act_grad(d.tanh_act, out[i]) : gout[i];
            rank1_add(G + l * DD, T_(1), da.data(), &s.zr[(l * J + j) * D], D, D);
            T_* gin = &dzr[(l * J + j) * D];
            std::fill(gin, gin + D, T_(0));
            matvec_t_add(m_post + l * DD, da.data(), gin, D, D);
          }
        std::copy(dzr.begin(), dzr.begin() + J * D, dkhat.begin());
        // The write M' = M - beta / energy * sum_h delta_h z_h^T.
        std::fill(dz.begin(), dz.end(), T_(0));
        if (gbf)
          for (int64_t i = 0; i < HD; ++i) dz[L * HD + i] = gbf[b * HD + i];
        T_ dbeta = gbeta ? gbeta[b] : T_(0);
        for (int64_t l = 0; l < L; ++l) {
          const T_ energy = s.energy[l], step = s.beta / energy;
          T_ dstep = 0;
          for (int64_t h = 0; h < H; ++h) {
            const T_* zin = &s.z[(l * H + h) * D];
            const T_* dl = &s.delta[(l * H + h) * D];
            matvec(G + l * DD, zin, w.data(), D, D);
            dstep -= dot(dl, w.data(), D);
            for (int64_t i = 0; i < D; ++i) ddelta[(l * H + h) * D + i] = -step * w[i];
            T_* dzin = &dz[(l * H + h) * D];
            std::fill(q.begin(), q.end(), T_(0));
            matvec_t_add(G + l * DD, dl, q.data(), D, D);
            for (int64_t i = 0; i < D; ++i) dzin[i] -= step * q[i];
          }
          dbeta += dstep / energy;
          const T_ denergy = -dstep * s.beta / (energy * energy);
          for (int64_t h = 0; h < H; ++h)
            for (int64_t i = 0; i < D; ++i)
              dz[(l * H + h) * D + i] += T_(2) * denergy * s.z[(l * H + h) * D + i];
        }
        // G stays the gradient of the pre-write weights from here on: the identity path of
        // the write, plus the error and pre-write-pass paths added below.
        std::fill(dv.begin(), dv.end(), T_(0));
        const T_* values = e_p + b * E + 2 * HD;
        if (!d.gradient_rule) {
          for (int64_t l = 0; l < L; ++l)
            for (int64_t h = 0; h < H; ++h) {
              const T_* dd = &ddelta[(l * H + h) * D];
              const T_* tg = &s.target[(l * H + h) * D];
              for (int64_t i = 0; i < D; ++i) {
                dz[((l + 1) * H + h) * D + i] += dd[i];
                da[i] = l < L - 1 ? -dd[i] * act_grad(d.tanh_act, tg[i]) : -dd[i];
                gb_fb[l * D + i] += da[i];
              }
              rank1_add(gw_fb + l * DD, T_(1), da.data(), values + h * D, D, D);
              matvec_t_add(p.w_fb + l * DD, da.data(), dv.data() + h * D, D, D);
            }
        } else {
          for (int64_t l = 0; l < L - 1; ++l)
            for (int64_t h = 0; h < H; ++h) {
              const T_* dd = &ddelta[(l * H + h) * D];
              const T_* zl = &s.z[((l + 1) * H + h) * D];
              const T_* upper = &s.delta[((l + 1) * H + h) * D];
              std::fill(q.begin(), q.end(), T_(0));
              matvec_t_add(m_pre + (l + 1) * DD, upper, q.data(), D, D);
              for (int64_t i = 0; i < D; ++i) {
                dq[i] = dd[i] * act_grad(d.tanh_act, zl[i]);
                dz[((l + 1) * H + h) * D + i] += dd[i] * q[i] * act_grad_grad(d.tanh_act, zl[i]);
              }
              rank1_add(G + (l + 1) * DD, T_(1), upper, dq.data(), D, D);
              matvec(m_pre + (l + 1) * DD, dq.data(), w.data(), D, D);
              for (int64_t i = 0; i < D; ++i) ddelta[((l + 1) * H + h) * D + i] += w[i];
            }
          for (int64_t h = 0; h < H; ++h)
            for (int64_t i = 0; i < D; ++i) {
              const T_ dd = ddelta[((L - 1) * H + h) * D + i];
              dz[(L * H + h) * D + i] += dd;
              dv[h * D + i] -= dd;
            }
        }
        // The pre-write pass of the write keys.
        for (int64_t l = L - 1; l >= 0; --l)
          for (int64_t h = 0; h < H; ++h) {
            const T_* out = &s.z[((l + 1) * H + h) * D];
            const T_* gout = &dz[((l + 1) * H + h) * D];
            for (int64_t i = 0; i < D; ++i)
              da[i] = l < L - 1 ? gout[i] * act_grad(d.tanh_act, out[i]) : gout[i];
            rank1_add(G + l * DD, T_(1), da.data(), &s.z[(l * H + h) * D], D, D);
            matvec_t_add(m_pre + l * DD, da.data(), &dz[(l * H + h) * D], D, D);
          }
        for (int64_t i = 0; i < HD; ++i) dkhat[HD + i] += dz[i];
        // Into e = tanh(pre_e): keys through rms_norm, values, beta.
        const T_* eb = e_p + b * E;
        T_* ge = gpe + b * E;
        for (int64_t j = 0; j < J; ++j) {
          const T_* kj = eb + j * D;
          const T_* dk = &dkhat[j * D];
          const T_ r = s.kscale[j];
          const T_ proj = dot(dk, kj, D) * r * r * r / T_(D);
          for (int64_t i = 0; i < D; ++i) ge[j * D + i] = r * dk[i] - proj * kj[i];
        }
        for (int64_t i = 0; i < HD; ++i) ge[2 * HD + i] = dv[i] + (gv ? gv[b * HD + i] : T_(0));
        const T_ dpre = dbeta * s.beta * (T_(1) - s.beta);
        const T_* beta_in = eb + 3 * HD;
        gb_beta += dpre;
        for (int64_t i = 0; i < D; ++i) {
          gw_beta[i] += dpre * beta_in[i];
          ge[3 * HD + i] = dpre * p.w_beta[i];
        }
        for (int64_t i = 0; i < E; ++i) ge[i] *= T_(1) - eb[i] * eb[i];
        if (!k) {  // this sequence started here: its weights came from m_init
          for (int64_t i = 0; i < W; ++i) gm_init[i] += G[i];
        }
      }
      // The controller: h gets the grad of hs[t], of the next step, and of the interaction.
      at::add_out(dh_total, dh, present(g_hs) ? g_hs[t] : at::zeros_like(dh));
      dh_total.addmm_(g_pre_e[t], w_int);
      const T_* g = gates.data_ptr<T_>();
      const T_* ci = c_in[t].data_ptr<T_>();
      const T_* dht = dh_total.data_ptr<T_>();
      T_* dc_p = dc.data_ptr<T_>();
      T_* gg = g_gates[t].data_ptr<T_>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < Hd; ++i) {
          const int64_t n = b * Hd, r = b * 4 * Hd;
          const T_ ig = sigmoid(g[r + i]), fg = sigmoid(g[r + Hd + i]);
          const T_ cg = tanh_(g[r + 2 * Hd + i]), og = sigmoid(g[r + 3 * Hd + i]);
          const T_ tc = tanh_(fg * ci[n + i] + ig * cg);
          const T_ dcell = dc_p[n + i] + dht[n + i] * og * (T_(1) - tc * tc);
          gg[r + i] = dcell * cg * ig * (T_(1) - ig);
          gg[r + Hd + i] = dcell * ci[n + i] * fg * (T_(1) - fg);
          gg[r + 2 * Hd + i] = dcell * ig * (T_(1) - cg * cg);
          gg[r + 3 * Hd + i] = dht[n + i] * tc * og * (T_(1) - og);
          dc_p[n + i] = dcell * fg;
        }
      auto du = at::mm(g_gates[t], w_rec);
      dh.copy_(du.narrow(1, 0, Hd));
      dr.copy_(du.narrow(1, Hd, D));
      // A sequence that started at step t passes no gradient to the previous step's state.
      T_* dh_p = dh.data_ptr<T_>();
      for (int64_t b = 0; b < B; ++b)
        if (keep_p[t * B + b] == T_(0)) {
          std::fill(dh_p + b * Hd, dh_p + (b + 1) * Hd, T_(0));
          std::fill(dc_p + b * Hd, dc_p + (b + 1) * Hd, T_(0));
          std::fill(dr_p + b * D, dr_p + (b + 1) * D, T_(0));
          std::fill(dm_p + b * W, dm_p + (b + 1) * W, T_(0));
        }
    }
    g_b_beta.fill_(gb_beta);
  });
  // The controller's weight gradients, once over all steps.
  auto flat_gates = g_gates.reshape({T * B, 4 * Hd});
  auto flat_pre_e = g_pre_e.reshape({T * B, E});
  auto g_w_rec = at::mm(flat_gates.t(), at::cat({h_in, r_in}, 2).reshape({T * B, Hd + D}));
  auto g_w_int = at::mm(flat_pre_e.t(), hs.reshape({T * B, Hd}));
  auto g_b_int = flat_pre_e.sum(0);
  return {g_gates, dh, dc, dr, dm, g_w_rec, g_w_int, g_b_int,
          g_w_beta, g_b_beta, g_w_fb, g_b_fb, g_m_init};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &mnm_forward, "MNM recurrence over a sequence (forward)");
  m.def("backward", &mnm_backward, "MNM recurrence over a sequence (backward)");
}
