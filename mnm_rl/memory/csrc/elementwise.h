// Elementwise math shared by the fused CPU kernels (mnm_sequence.cpp, lstm_sequence.cpp).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

namespace mnm_rl {
// Internal linkage, as when these lived in the MNM kernel's own file (see the note at the top
// of mnm_sequence.cpp on what the split into files cost before that).
namespace {

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
// out = (sign * grad) * act_grad(z) over arrays (sign 1 or -1: exact), the activation's choice
// outside the loop (inside it, GCC left the loop scalar).
template <typename T>
inline void times_act_grad(bool tanh_act, const T* __restrict__ z, const T* __restrict__ grad,
                           T* __restrict__ out, int64_t n, T sign = T(1)) {
  if (tanh_act)
    for (int64_t i = 0; i < n; ++i) out[i] = sign * grad[i] * (T(1) - z[i] * z[i]);
  else
    for (int64_t i = 0; i < n; ++i) out[i] = sign * grad[i] * (z[i] * (T(1) - z[i]));
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

// The LSTM cell's gate activations from its pre-activations g (4 blocks of n).
template <typename T> struct LstmGates {
  T i, f, c, o;
  LstmGates(const T* g, int64_t n, int64_t k)
      : i(sigmoid(g[k])), f(sigmoid(g[n + k])), c(tanh_(g[2 * n + k])),
        o(sigmoid(g[3 * n + k])) {}
};

// One LSTM step for one row from its gates' pre-activations g [4H] (left as they are): c [H],
// the cell state, gets the new one, h [H] the output. The rows' pointers are restrict-qualified
// so that the loop is vectorised (with the batch's pointers GCC left it scalar).
template <typename T>
inline void lstm_cell_from_gates(const T* __restrict__ g, T* __restrict__ c, T* __restrict__ h,
                                 int64_t H) {
  for (int64_t i = 0; i < H; ++i) {
    const LstmGates<T> a(g, H, i);
    const T cell = a.f * c[i] + a.i * a.c;
    c[i] = cell;
    h[i] = a.o * tanh_(cell);
  }
}

// lstm_cell_from_gates' backward for one row, from the gates' pre-activations g [4H], the cell
// state it started from c_prev [H] and the grad of its output dh [H]: dc [H], the grad of the
// new cell state, becomes that of c_prev; dg [4H] gets the grad of the pre-activations. The
// activations go first, block by block, into scratch [5H] (the gates', then tanh of the new
// cell), so that every loop vectorises: with them inside the gradients' loop GCC left it
// scalar.
template <typename T>
inline void lstm_cell_backward_row(const T* __restrict__ g, const T* __restrict__ c_prev,
                                   const T* __restrict__ dh, T* __restrict__ dc,
                                   T* __restrict__ dg, T* __restrict__ scratch, int64_t H) {
  T* __restrict__ a = scratch;  // i, f, c, o, then tanh of the new cell
  for (int64_t k = 0; k < 2 * H; ++k) a[k] = sigmoid(g[k]);
  for (int64_t k = 2 * H; k < 3 * H; ++k) a[k] = tanh_(g[k]);
  for (int64_t k = 3 * H; k < 4 * H; ++k) a[k] = sigmoid(g[k]);
  for (int64_t k = 0; k < H; ++k)
    a[4 * H + k] = tanh_(a[H + k] * c_prev[k] + a[k] * a[2 * H + k]);
  for (int64_t k = 0; k < H; ++k) {
    const T ig = a[k], fg = a[H + k], cg = a[2 * H + k], og = a[3 * H + k], tc = a[4 * H + k];
    const T dcell = dc[k] + dh[k] * og * (T(1) - tc * tc);
    dg[k] = dcell * cg * ig * (T(1) - ig);
    dg[H + k] = dcell * c_prev[k] * fg * (T(1) - fg);
    dg[2 * H + k] = dcell * ig * (T(1) - cg * cg);
    dg[3 * H + k] = dh[k] * tc * og * (T(1) - og);
    dc[k] = dcell * fg;
  }
}

// One LSTM step for one row, in place: a [4H] holds the gates' pre-activations (PyTorch's order
// i, f, g, o) and gets their activations, block by block (simple loops over contiguous values,
// which the compiler vectorises); c [H], the cell state, gets the new one; h [H] the output.
template <typename T>
inline void lstm_cell_row(T* __restrict__ a, T* __restrict__ c, T* __restrict__ h, int64_t H) {
  for (int64_t i = 0; i < 2 * H; ++i) a[i] = sigmoid(a[i]);
  for (int64_t i = 2 * H; i < 3 * H; ++i) a[i] = tanh_(a[i]);
  for (int64_t i = 3 * H; i < 4 * H; ++i) a[i] = sigmoid(a[i]);
  for (int64_t i = 0; i < H; ++i) {
    const T cell = a[H + i] * c[i] + a[i] * a[2 * H + i];
    c[i] = cell;
    h[i] = a[3 * H + i] * tanh_(cell);
  }
}

}  // namespace
}  // namespace mnm_rl
