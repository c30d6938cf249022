// Dense matrix products for the kernels, hand-written: C = A B and C += A B.
//
// The kernels' products are small (a step's 8-16 rows against a 64-256 wide weight; a
// minibatch's 256 rows; weight gradients summed over a few hundred rows). ATen sends float32
// products to MKL's sgemm, which on the AMD EPYC (Zen 5) of our machines runs its AVX2 code
// whatever the CPU offers: 70-95 GFLOP/s on one core at these shapes, and 95 on a 1024-cube.
// The tiles below use the CPU's 64-byte vectors (AVX-512 with -march=native; two AVX2
// registers where it is absent) and reach 210-230 GFLOP/s at the same shapes, 2.3-2.9x MKL
// (benchmarks/dense_products.py prints both). oneDNN, which does use AVX-512 here, is not
// reachable from an extension for float32 at full precision.
//
// The form is rows_times' (row_products.h) with a larger tile: R rows of A times a block of NV
// vectors of B's row-major columns, R * NV accumulators in registers, one pass over k. A may be
// strided either way (a transposed view is a weight gradient's g^T x); B's rows must be
// contiguous, so a product with a transposed weight, x W^T, takes W^T packed once (see
// packed_transpose), which a kernel does once per call for every step's product. Sums over k
// run in the natural order, so results differ from MKL's only in rounding.
// tests/test_dense_products.py checks every tile and remainder against torch.mm in float64.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <unordered_map>

#include "row_products.h"

namespace mnm_rl {
namespace {

// Rows [0, R) and columns [c0, c0 + NV * lanes) of C (+)= A B, where A's element (r, k) is
// a[r * a_rs + k * a_ks], B's (k, j) is b[k * ldb + j] and C's (r, j) is c[r * ldc + j].
template <typename T, int R, int NV>
inline void product_tile(const T* a, int64_t a_rs, int64_t a_ks, const T* b, int64_t ldb, T* c,
                         int64_t ldc, int64_t K, int64_t c0, bool accumulate) {
  using V = Vectors<T>;
  typename V::Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? V::load(c + r * ldc + c0 + v * V::kLanes) : typename V::Vec{};
  for (int64_t k = 0; k < K; ++k) {
    typename V::Vec row[NV];
    for (int v = 0; v < NV; ++v) row[v] = V::load(b + k * ldb + c0 + v * V::kLanes);
    for (int r = 0; r < R; ++r) {
      const T x = a[r * a_rs + k * a_ks];
      for (int v = 0; v < NV; ++v) acc[r][v] += x * row[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) V::store(c + r * ldc + c0 + v * V::kLanes, acc[r][v]);
}

// Rows [0, R) of C (+)= A B, every column: tiles of two vectors, one, then plain loops for the
// last N % lanes columns.
template <typename T, int R>
inline void product_rows(const T* a, int64_t a_rs, int64_t a_ks, const T* b, int64_t ldb, T* c,
                         int64_t ldc, int64_t K, int64_t N, bool accumulate) {
  constexpr int64_t W = Vectors<T>::kLanes;
  int64_t j = 0;
  for (; j + 2 * W <= N; j += 2 * W)
    product_tile<T, R, 2>(a, a_rs, a_ks, b, ldb, c, ldc, K, j, accumulate);
  if (j + W <= N) {
    product_tile<T, R, 1>(a, a_rs, a_ks, b, ldb, c, ldc, K, j, accumulate);
    j += W;
  }
  for (; j < N; ++j)
    for (int r = 0; r < R; ++r) {
      T sum = accumulate ? c[r * ldc + j] : T(0);
      for (int64_t k = 0; k < K; ++k) sum += a[r * a_rs + k * a_ks] * b[k * ldb + j];
      c[r * ldc + j] = sum;
    }
}

// C [M, N] (+)= A [M, K] B [K, N] on raw pointers (see product_tile for the layouts): eight rows
// at a time, then four, two and one for the last M % 8.
template <typename T>
void dense_product(const T* a, int64_t a_rs, int64_t a_ks, const T* b, int64_t ldb, T* c,
                   int64_t ldc, int64_t M, int64_t N, int64_t K, bool accumulate) {
  int64_t r = 0;
  for (; r + 8 <= M; r += 8)
    product_rows<T, 8>(a + r * a_rs, a_rs, a_ks, b, ldb, c + r * ldc, ldc, K, N, accumulate);
  if (r + 4 <= M) {
    product_rows<T, 4>(a + r * a_rs, a_rs, a_ks, b, ldb, c + r * ldc, ldc, K, N, accumulate);
    r += 4;
  }
  if (r + 2 <= M) {
    product_rows<T, 2>(a + r * a_rs, a_rs, a_ks, b, ldb, c + r * ldc, ldc, K, N, accumulate);
    r += 2;
  }
  if (r < M)
    product_rows<T, 1>(a + r * a_rs, a_rs, a_ks, b, ldb, c + r * ldc, ldc, K, N, accumulate);
}

// MNM_RL_DENSE_PRODUCTS=0 in the environment: ATen's products everywhere instead, for timings
// side by side (benchmarks/throughput.py's /atenmm configs; mnm_rl/memory/products.py reads it
// too). Read at every product: a few hundred nanoseconds against microseconds.
inline bool dense_products_on() {
  const char* value = std::getenv("MNM_RL_DENSE_PRODUCTS");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

// Whether the hand-written products take these tensors: float or double on the CPU, out's rows
// contiguous, b's rows contiguous (else, for another dtype, ATen's products run).
inline bool products_apply(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const auto type = out.scalar_type();
  return dense_products_on() && (type == at::kFloat || type == at::kDouble) &&
         a.scalar_type() == type && b.scalar_type() == type &&
         (out.size(1) <= 1 || out.stride(1) == 1) && (b.size(1) <= 1 || b.stride(1) == 1);
}

// out [M, N] = a [M, K] b [K, N], or out += a b with accumulate. a any strides; b's rows and
// out's rows contiguous (a transposed weight: packed_transpose first). Other dtypes or layouts:
// ATen's product.
inline void product_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                         bool accumulate = false) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) &&
                  out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "product_into: [", out.sizes(), "] = [", a.sizes(), "] x [", b.sizes(), "]");
  if (!products_apply(out, a, b)) {
    if (accumulate)
      out.addmm_(a, b);
    else
      at::mm_out(const_cast<at::Tensor&>(out), a, b);
    return;
  }
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "product_into", [&] {
    dense_product<scalar_t>(a.data_ptr<scalar_t>(), a.stride(0), a.stride(1),
                            b.data_ptr<scalar_t>(), b.stride(0), out.data_ptr<scalar_t>(),
                            out.stride(0), M, N, K, accumulate);
  });
}

// out [M, N] = bias: bias [N] broadcast over the rows, or [M, N]. Contiguous ones of out's dtype
// row by row with a loop: ATen's copy_ of an expanded view (three dispatched operators) cost more
// than the products of a rollout step's few rows.
inline void copy_bias(const at::Tensor& out, const at::Tensor& bias) {
  const int64_t M = out.size(0), N = out.size(1);
  const bool row = bias.dim() == 1 && bias.size(0) == N;
  if (!(row || bias.sizes() == out.sizes()) || !bias.is_contiguous() || !out.is_contiguous() ||
      bias.scalar_type() != out.scalar_type()) {
    out.copy_(bias.dim() == 1 ? bias.unsqueeze(0).expand_as(out) : bias);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "copy_bias", [&] {
    const scalar_t* src = bias.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < M; ++r) std::copy_n(src + (row ? 0 : r * N), N, dst + r * N);
  });
}

// out [M, N] = bias + a b: bias [N] broadcast over the rows, or [M, N]; see product_into.
inline void biased_product_into(const at::Tensor& out, const at::Tensor& bias,
                                const at::Tensor& a, const at::Tensor& b) {
  if (!products_apply(out, a, b)) {
    at::addmm_out(const_cast<at::Tensor&>(out), bias, a, b);
    return;
  }
  copy_bias(out, bias);
  product_into(out, a, b, true);
}

// c [M, N] (+)= a [M, K] b [K, N], every operand contiguous, on raw pointers: the products inside
// a kernel's step loop, without a tensor per operand and a dispatch per tensor operation (a
// sixteen-step LSTM call spent more on those than on its products). own: dense_products_on(),
// read once per kernel call; false runs ATen's product on views of the same memory.
template <typename T>
inline void product_raw(T* c, const T* a, const T* b, int64_t M, int64_t K, int64_t N,
                        bool accumulate, bool own) {
  if (own) {
    dense_product<T>(a, K, 1, b, N, c, N, M, N, K, accumulate);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor c_view = at::from_blob(c, {M, N}, opts);
  const at::Tensor a_view = at::from_blob(const_cast<T*>(a), {M, K}, opts);
  const at::Tensor b_view = at::from_blob(const_cast<T*>(b), {K, N}, opts);
  if (accumulate)
    c_view.addmm_(a_view, b_view);
  else
    at::mm_out(c_view, a_view, b_view);
}

// c [M, N] = bias + a [M, K] b [K, N] on raw pointers, every operand contiguous: bias a row
// [N] for every row of c (bias_rs 0) or a matrix [M, N] (bias_rs N). What biased_product_into
// computes, in the same order, without a tensor per operand (see product_raw).
template <typename T>
inline void biased_product_raw(T* c, const T* bias, int64_t bias_rs, const T* a, const T* b,
                               int64_t M, int64_t K, int64_t N, bool own) {
  for (int64_t r = 0; r < M; ++r) std::copy(bias + r * bias_rs, bias + r * bias_rs + N, c + r * N);
  product_raw<T>(c, a, b, M, K, N, true, own);
}

// a [M, K] b [K, N] as a new tensor.
inline at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  product_into(out, a, b);
  return out;
}

// w^T as a contiguous tensor ([in, out] from a Linear weight [out, in]): the right operand of
// x w^T for product_into, made once per kernel call and used by every step. Transposed in
// registers, block by block (row_products.h): ATen's copy of the transposed view took about as
// long as a rollout step's products with it.
inline at::Tensor packed_transpose(const at::Tensor& w) {
  const auto type = w.scalar_type();
  if (w.dim() != 2 || (type != at::kFloat && type != at::kDouble)) return w.t().contiguous();
  const at::Tensor src = w.stride(1) == 1 ? w : w.contiguous();
  at::Tensor out = at::empty({w.size(1), w.size(0)}, w.options());
  AT_DISPATCH_FLOATING_TYPES(type, "packed_transpose", [&] {
    transpose_strided(src.data_ptr<scalar_t>(), w.size(0), w.size(1), src.stride(0),
                      out.data_ptr<scalar_t>(), w.size(0));
  });
  return out;
}

// packed_transpose(w), kept from one call to the next while w is the same tensor with the same
// storage at the same version (every in-place update bumps it: an optimizer's step,
// load_state_dict's copy): a rollout step, one call per step, otherwise packed every weight it
// multiplies with anew (for an lstm policy about 60,000 floats a step, a fifth of the compiled
// step's own time; for mnm-p's kernel about 100,000). For calls without a backward pass only: a
// weight changed in place behind autograd's back (through .data) is not seen, as the grid
// encoder's projected table that the compiled step keeps (mnm_rl/agent/policy_step.py) is not.
inline at::Tensor cached_packed_transpose(const at::Tensor& w) {
  if (w.is_inference() || !w.is_cpu()) return packed_transpose(w);
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> source;
    const void* data;
    uint32_t version;
    at::Tensor packed;
  };
  // Keyed by the weight's TensorImpl, which the weak pointer keeps from being reused while
  // the entry lives; entries of weights that are gone are dropped at the next miss.
  static std::unordered_map<const c10::TensorImpl*, Entry> cache;
  static std::mutex guard;
  const std::lock_guard<std::mutex> hold(guard);
  const c10::TensorImpl* key = w.unsafeGetTensorImpl();
  const uint32_t version = w.unsafeGetTensorImpl()->version_counter().current_version();
  const auto found = cache.find(key);
  if (found != cache.end() && !found->second.source.expired() &&
      found->second.data == w.data_ptr() && found->second.version == version &&
      found->second.packed.size(0) == w.size(1) && found->second.packed.size(1) == w.size(0))
    return found->second.packed;
  for (auto it = cache.begin(); it != cache.end();)
    it = it->second.source.expired() ? cache.erase(it) : std::next(it);
  at::Tensor packed = packed_transpose(w);
  cache.insert_or_assign(
      key, Entry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                     w.getIntrusivePtr()),
                 w.data_ptr(), version, packed});
  return packed;
}

// A Linear layer's x [N, in] W^T (+ b) as a new tensor [N, out], from W [out, in] as it lies:
// what products.linear (linear.cpp) computes, so that the compiled steps and heads that mirror
// a module round exactly as it does. cache_transpose: W^T from cached_packed_transpose (calls
// without a backward pass).
inline at::Tensor linear_out(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& bias = at::Tensor(), bool cache_transpose = false) {
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  const at::Tensor weight_t =
      cache_transpose ? cached_packed_transpose(weight) : packed_transpose(weight);
  if (bias.defined())
    biased_product_into(out, bias, x, weight_t);
  else
    product_into(out, x, weight_t);
  return out;
}

}  // namespace
}  // namespace mnm_rl
