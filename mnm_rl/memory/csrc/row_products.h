// Products of a batch of D x D fast-weight matrices with a few rows, hand-written.
//
// The MNM kernel multiplies each sequence's D x D weights by H or 2H rows (the heads' keys, or
// their gradients) and adds rank-H outer products to them, for every layer and step. With so
// few rows, MKL's batched GEMM spends about a third of its time packing the D x D operand into
// its own layout before using it once (benchmarks/update_profile.py, PPO updates at 4 heads x
// 3 layers: 14% of the samples in packing against 27% in the multiplications). The two forms
// below read each row of the matrix once, straight from where it lies, and keep what they
// accumulate in registers:
//
//   rows_times:  out[r, :] (+)= sum_i x[r, i] M[i, :]          (out = x M, rows x of [m, D])
//   rank_update: out[i, :] = M[i, :] + alpha sum_h s[h, i] z[h, :]   (out = M + alpha s^T z)
//
// (matrix_times is rows_times for one matrix of any shape, [K, N].) Both walk M row by row
// and vectorise along the row (j): GCC's vector extension, one 64-byte vector (16 floats,
// 8 doubles; two AVX2 registers where AVX-512 is absent), up to four vectors per pass, and
// plain loops for the last N % lanes columns. They sum over i (or h) in the natural order, so
// results differ from MKL's only in rounding. The third form, x M^T (dot products of M's
// rows), needs a horizontal sum per output or a transpose of M, which is what MKL's packing
// does: the kernel's forward pass avoids it by holding its weights transposed (N = M^T, so
// x M^T = x N), and the backward pass's one use of it (the weights' gradient times the write
// keys) transposes each matrix in registers first (rows_times_transposed: 1.04-1.05x a training
// pass against at::bmm, benchmarks/kernel_pairs.py, docs/benchmark_runs/
// kernel_pairs_gz_32.txt).
// tests/test_fused.py checks the kernel against the PyTorch code at widths with and without a
// remainder (D = 4, 20 in float64; 20, 64 in float32).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace mnm_rl {
namespace {

template <typename T> struct Vectors {
  typedef T Vec __attribute__((vector_size(64)));
  static constexpr int64_t kLanes = 64 / sizeof(T);
  static Vec load(const T* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
  }
  static void store(T* p, const Vec& v) { std::memcpy(p, &v, sizeof(Vec)); }
};

// v, as it is, in a vector register (an empty asm that takes it there): where AVX-512 holds a
// whole 64-byte vector in one register, GCC otherwise folds the load of a row of M into each of
// the R multiply-adds that use it, R loads of each row instead of one.
template <typename Vec> inline void in_register(Vec& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// Columns [c0, c0 + NV * lanes) of rows 0..R-1 of out = x M (+ out with accumulate): x [R, K],
// M [K, N] and out [R, N], each contiguous.
template <typename T, int R, int NV>
inline void rows_times_tile(const T* x, const T* M, T* out, int64_t K, int64_t N, int64_t c0,
                            bool accumulate) {
  using V = Vectors<T>;
  typename V::Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? V::load(out + r * N + c0 + v * V::kLanes) : typename V::Vec{};
  for (int64_t i = 0; i < K; ++i) {
    typename V::Vec row[NV];
    for (int v = 0; v < NV; ++v) {
      row[v] = V::load(M + i * N + c0 + v * V::kLanes);
      in_register(row[v]);
    }
    for (int r = 0; r < R; ++r) {
      const T a = x[r * K + i];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * row[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) V::store(out + r * N + c0 + v * V::kLanes, acc[r][v]);
}

template <typename T, int R>
inline void rows_times_rows(const T* x, const T* M, T* out, int64_t K, int64_t N,
                            bool accumulate) {
  constexpr int64_t W = Vectors<T>::kLanes;
  int64_t c = 0;
  for (; c + 4 * W <= N; c += 4 * W) rows_times_tile<T, R, 4>(x, M, out, K, N, c, accumulate);
  switch ((N - c) / W) {
    case 3: rows_times_tile<T, R, 3>(x, M, out, K, N, c, accumulate); break;
    case 2: rows_times_tile<T, R, 2>(x, M, out, K, N, c, accumulate); break;
    case 1: rows_times_tile<T, R, 1>(x, M, out, K, N, c, accumulate); break;
    default: break;
  }
  for (c += (N - c) / W * W; c < N; ++c)  // the columns a whole vector does not cover
    for (int r = 0; r < R; ++r) {
      T acc = accumulate ? out[r * N + c] : T(0);
      for (int64_t i = 0; i < K; ++i) acc += x[r * K + i] * M[i * N + c];
      out[r * N + c] = acc;
    }
}

// out (+)= x M for one matrix: x [m, K], M [K, N] and out [m, N], each contiguous.
template <typename T>
void matrix_times(const T* x, const T* M, T* out, int64_t m, int64_t K, int64_t N,
                  bool accumulate) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4)
    rows_times_rows<T, 4>(x + r * K, M, out + r * N, K, N, accumulate);
  switch (m - r) {
    case 3: rows_times_rows<T, 3>(x + r * K, M, out + r * N, K, N, accumulate); break;
    case 2: rows_times_rows<T, 2>(x + r * K, M, out + r * N, K, N, accumulate); break;
    case 1: rows_times_rows<T, 1>(x + r * K, M, out + r * N, K, N, accumulate); break;
    default: break;
  }
}

// out[b] (+)= x[b] M[b] for each b of the batch: x, out [B, m, D] contiguous, M's matrices
// D x D contiguous, m_stride elements apart.
template <typename T>
void rows_times(const T* x, const T* M, int64_t m_stride, T* out, int64_t B, int64_t m,
                int64_t D, bool accumulate) {
  for (int64_t b = 0; b < B; ++b)
    matrix_times(x + b * m * D, M + b * m_stride, out + b * m * D, m, D, D, accumulate);
}

// A lanes x lanes block, one vector per row, transposed in registers: at each scale b (1, 2,
// 4, ... lanes / 2), rows r and r + b (r without the bit b) swap their off-diagonal b-wide
// pieces, two two-source shuffles per pair of rows; the scales commute, and after all of them
// row k holds what was column k. The shuffles' lane indices are made once (static), and the
// loops are unrolled so that the rows stay in registers.
template <typename T, int b> struct BlockStage {
  using V = Vectors<T>;
  static constexpr int W = static_cast<int>(V::kLanes);
  using Index = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef Index Lanes __attribute__((vector_size(64)));
  // Which lane of (row r, row r + b) each lane of the new row r (high: r + b) takes.
  static Lanes lanes(bool high) {
    Lanes m{};
    for (int lane = 0; lane < W; ++lane)
      m[lane] = (lane & b) == 0 ? lane + (high ? b : 0) : W + lane - (high ? 0 : b);
    return m;
  }
  static void apply(typename V::Vec* rows) {
    static const Lanes low = lanes(false), high = lanes(true);
#pragma GCC unroll 16
    for (int r = 0; r < W; ++r)
      if ((r & b) == 0) {
        const typename V::Vec x = rows[r], y = rows[r + b];
        rows[r] = __builtin_shuffle(x, y, low);
        rows[r + b] = __builtin_shuffle(x, y, high);
      }
  }
};

template <typename T> inline void transpose_block(typename Vectors<T>::Vec* rows) {
  BlockStage<T, 1>::apply(rows);
  BlockStage<T, 2>::apply(rows);
  BlockStage<T, 4>::apply(rows);
  if constexpr (Vectors<T>::kLanes == 16) BlockStage<T, 8>::apply(rows);
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols: lanes x lanes blocks in
// registers, and plain loops for the last rows % lanes rows and cols % lanes columns.
template <typename T>
void transpose_strided(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst,
                       int64_t ld_dst) {
  using V = Vectors<T>;
  constexpr int64_t W = V::kLanes;
  const int64_t whole_rows = rows / W * W, whole_cols = cols / W * W;
  for (int64_t i0 = 0; i0 < whole_rows; i0 += W)
    for (int64_t j0 = 0; j0 < whole_cols; j0 += W) {
      typename V::Vec block[W];
#pragma GCC unroll 16
      for (int64_t k = 0; k < W; ++k) block[k] = V::load(src + (i0 + k) * ld_src + j0);
      transpose_block<T>(block);
#pragma GCC unroll 16
      for (int64_t k = 0; k < W; ++k) V::store(dst + (j0 + k) * ld_dst + i0, block[k]);
    }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = i < whole_rows ? whole_cols : 0; j < cols; ++j)
      dst[j * ld_dst + i] = src[i * ld_src + j];
}

// dst = src^T for one D x D matrix, both contiguous.
template <typename T> void transpose_into(const T* src, T* dst, int64_t D) {
  transpose_strided(src, D, D, D, dst, D);
}

// out[b] = x[b] M[b]^T for each b of the batch (x, out [B, m, D] contiguous, M's matrices D x D
// contiguous, m_stride elements apart): each matrix transposed in registers into scratch [D, D]
// (transpose_into), then rows_times' form. For the backward pass's G z, where MKL's bmm spent
// about as long packing each matrix and being called as multiplying with it.
template <typename T>
void rows_times_transposed(const T* x, const T* M, int64_t m_stride, T* out, int64_t B,
                           int64_t m, int64_t D, T* scratch) {
  for (int64_t b = 0; b < B; ++b) {
    transpose_into(M + b * m_stride, scratch, D);
    matrix_times(x + b * m * D, scratch, out + b * m * D, m, D, D, false);
  }
}

// Columns [c0, c0 + NV * lanes) of every row of out = M + alpha s^T z, for one matrix; with
// kSquares, the squares of what it writes are added to sq (lane by lane). With kM > 0 (m known
// when compiled, m == kM) the m rows of z for these columns are loaded once and held in
// registers for every row of M, instead of loaded again for each: half the loads of a rank-4
// update, where loads and stores, not multiply-adds, bound it. Same arithmetic either way.
template <typename T, int NV, bool kSquares, int kM>
inline void rank_update_tile(const T* M, const T* s, const T* z, T alpha, T* out, int64_t m,
                             int64_t D, int64_t c0, typename Vectors<T>::Vec& sq) {
  using V = Vectors<T>;
  typename V::Vec held[kM > 0 ? kM : 1][NV];
  if constexpr (kM > 0)
    for (int h = 0; h < kM; ++h)
      for (int v = 0; v < NV; ++v) {
        held[h][v] = V::load(z + h * D + c0 + v * V::kLanes);
        in_register(held[h][v]);
      }
  typename V::Vec squares[NV] = {};
  for (int64_t i = 0; i < D; ++i) {
    typename V::Vec acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = V::load(M + i * D + c0 + v * V::kLanes);
    if constexpr (kM > 0) {
      for (int h = 0; h < kM; ++h) {
        const T a = alpha * s[h * D + i];
        for (int v = 0; v < NV; ++v) acc[v] += a * held[h][v];
      }
    } else {
      for (int64_t h = 0; h < m; ++h) {
        const T a = alpha * s[h * D + i];
        for (int v = 0; v < NV; ++v) acc[v] += a * V::load(z + h * D + c0 + v * V::kLanes);
      }
    }
    for (int v = 0; v < NV; ++v) {
      V::store(out + i * D + c0 + v * V::kLanes, acc[v]);
      if constexpr (kSquares) squares[v] += acc[v] * acc[v];
    }
  }
  if constexpr (kSquares)
    for (int v = 0; v < NV; ++v) sq += squares[v];
}

// One matrix of rank_update: out = M + alpha s^T z; with kSquares, returns the sum of out's
// squared entries (else 0). kM as rank_update_tile's: its tiles are at most 16 / kM vectors
// wide, so that the held rows of z take at most 16 of the 32 vector registers.
template <typename T, bool kSquares, int kM = 0>
T rank_update_matrix(const T* M, const T* s, const T* z, T alpha, T* out, int64_t m, int64_t D) {
  using V = Vectors<T>;
  constexpr int64_t W = V::kLanes;
  constexpr int kWide = kM > 4 ? 16 / kM : 4;  // vectors per tile
  static_assert(kWide >= 1 && kWide <= 4, "rank_update_matrix: kM must be 0 or 1..16");
  typename V::Vec sq{};
  int64_t c = 0;
  for (; c + kWide * W <= D; c += kWide * W)
    rank_update_tile<T, kWide, kSquares, kM>(M, s, z, alpha, out, m, D, c, sq);
  switch ((D - c) / W) {
    case 3: rank_update_tile<T, 3, kSquares, kM>(M, s, z, alpha, out, m, D, c, sq); break;
    case 2: rank_update_tile<T, 2, kSquares, kM>(M, s, z, alpha, out, m, D, c, sq); break;
    case 1: rank_update_tile<T, 1, kSquares, kM>(M, s, z, alpha, out, m, D, c, sq); break;
    default: break;
  }
  T total = 0;
  for (int64_t c2 = c + (D - c) / W * W; c2 < D; ++c2)  // the columns a vector does not cover
    for (int64_t i = 0; i < D; ++i) {
      T acc = M[i * D + c2];
      for (int64_t h = 0; h < m; ++h) acc += alpha * s[h * D + i] * z[h * D + c2];
      out[i * D + c2] = acc;
      if constexpr (kSquares) total += acc * acc;
    }
  if constexpr (kSquares)
    for (int64_t k = 0; k < W; ++k) total += sq[k];
  return total;
}

// rank_update_matrix for m as it comes: the held-z forms for the ranks the kernel uses (H and
// 2H for 1, 2 and 4 heads), the general one for any other.
template <typename T, bool kSquares>
T rank_update_any(const T* M, const T* s, const T* z, T alpha, T* out, int64_t m, int64_t D) {
  switch (m) {
    case 1: return rank_update_matrix<T, kSquares, 1>(M, s, z, alpha, out, m, D);
    case 2: return rank_update_matrix<T, kSquares, 2>(M, s, z, alpha, out, m, D);
    case 4: return rank_update_matrix<T, kSquares, 4>(M, s, z, alpha, out, m, D);
    case 8: return rank_update_matrix<T, kSquares, 8>(M, s, z, alpha, out, m, D);
    default: return rank_update_matrix<T, kSquares>(M, s, z, alpha, out, m, D);
  }
}

// out[b] = M[b] + alpha s[b]^T z[b] for each b: s, z [B, m, D] contiguous; M's and out's
// matrices D x D contiguous, m_stride and out_stride elements apart; out may be M. With
// squares (else nullptr), squares[b] += the sum of out[b]'s squared entries: the write of the
// forward pass gets the norm of the new weights in the same pass over them.
template <typename T>
void rank_update(const T* M, int64_t m_stride, const T* s, const T* z, T alpha, T* out,
                 int64_t out_stride, int64_t B, int64_t m, int64_t D, T* squares = nullptr) {
  for (int64_t b = 0; b < B; ++b) {
    const T* Mb = M + b * m_stride;
    const T* sb = s + b * m * D;
    const T* zb = z + b * m * D;
    T* ob = out + b * out_stride;
    if (squares)
      squares[b] += rank_update_any<T, true>(Mb, sb, zb, alpha, ob, m, D);
    else
      rank_update_any<T, false>(Mb, sb, zb, alpha, ob, m, D);
  }
}

}  // namespace
}  // namespace mnm_rl
