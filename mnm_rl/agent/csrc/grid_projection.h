// The forward half of grid_linear.cpp's projected-table trick, shared with policy_step.cpp (a
// rollout step of the whole policy, which keeps P between steps): the grid's channels and columns,
// the rows of P each sample reads, U and P, and the sum of P's rows. See grid_linear.cpp for the
// equations.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

// The memory kernels' vector helpers: Vectors (64-byte vectors), transpose_strided (through
// lanes x lanes blocks in registers) and matrix_times (x M with M's rows read once, accumulating
// in registers).
#include "../../memory/csrc/row_products.h"

// Internal linkage, as for the memory kernels' headers: each extension compiles its own copy.
namespace {

using mnm_rl::matrix_times;
using mnm_rl::transpose_strided;
using mnm_rl::Vectors;

// The grid's channels: each one's symbol count and first table row, and each row's channel.
struct Channels {
  std::vector<int64_t> first_row, size, of_row;

  explicit Channels(const std::vector<int64_t>& sizes) : size(sizes) {
    TORCH_CHECK(!sizes.empty(), "grid_linear: the grid has no channels");
    int64_t row = 0;
    for (size_t c = 0; c < sizes.size(); ++c) {
      TORCH_CHECK(sizes[c] > 0, "grid_linear: channel ", c, " has no symbols");
      first_row.push_back(row);
      for (int64_t v = 0; v < sizes[c]; ++v) of_row.push_back(static_cast<int64_t>(c));
      row += sizes[c];
    }
  }
  int64_t count() const { return static_cast<int64_t>(size.size()); }
  int64_t rows() const { return static_cast<int64_t>(of_row.size()); }
};

// Where the grid's (and the pooled sums') columns are in W, and the dense inputs' columns.
struct Columns {
  int64_t grid, pool;  // pool < 0: no pooled columns
  std::vector<int64_t> dense;
  std::vector<int64_t> others;  // every column outside the grid's and the pooled blocks
};

// The rows of P each slot of each sample reads (cell * R + first_c + symbol), checking symbols.
// Sample by sample, one flag for the whole row of slots, so that the loop vectorises (a check
// and a branch per symbol took a third of the forward pass); the message names the first bad one.
template <typename grid_t>
void slot_rows(const grid_t* grid, int64_t n, int64_t cells, const Channels& channels,
               int32_t* rows) {
  const int64_t C = channels.count(), R = channels.rows(), S = cells * C;
  std::vector<int32_t> base(static_cast<size_t>(S));  // the slot's first row of P
  std::vector<int64_t> size(static_cast<size_t>(S));  // its channel's symbol count
  for (int64_t cell = 0; cell < cells; ++cell)
    for (int64_t c = 0; c < C; ++c) {
      base[cell * C + c] = static_cast<int32_t>(cell * R + channels.first_row[c]);
      size[cell * C + c] = channels.size[c];
    }
  for (int64_t i = 0; i < n; ++i) {
    const grid_t* g = grid + i * S;
    int32_t* out = rows + i * S;
    int64_t bad = 0;
#pragma omp simd reduction(| : bad)
    for (int64_t s = 0; s < S; ++s) {
      const auto symbol = static_cast<int64_t>(g[s]);
      // one unsigned comparison: a negative symbol is a huge unsigned one
      bad |= static_cast<uint64_t>(symbol) >= static_cast<uint64_t>(size[s]);
      out[s] = base[s] + static_cast<int32_t>(symbol);
    }
    if (bad == 0) continue;
    for (int64_t s = 0; s < S; ++s) {
      const auto symbol = static_cast<int64_t>(g[s]);
      TORCH_CHECK(symbol >= 0 && symbol < size[s], "grid_linear: symbol ", symbol,
                  " of channel ", s % C, " is outside [0, ", size[s], ")");
    }
  }
}

// U [S * E, O], the grid slots' effective weights (see the top of grid_linear.cpp).
template <typename scalar_t>
void effective_weight(const scalar_t* weight, int64_t in, int64_t O, const Columns& columns,
                      int64_t cells, int64_t CE, scalar_t* u) {
  transpose_strided(weight + columns.grid, O, cells * CE, in, u, O);
  if (columns.pool < 0) return;
  std::vector<scalar_t> pool(static_cast<size_t>(CE * O));
  transpose_strided(weight + columns.pool, O, CE, in, pool.data(), O);
  for (int64_t cell = 0; cell < cells; ++cell) {
    scalar_t* u_cell = u + cell * CE * O;
#pragma omp simd
    for (int64_t k = 0; k < CE * O; ++k) u_cell[k] += pool[k];
  }
}

// P [cells * R, O] from the table and U: for each cell and channel, the channel's rows of the
// table [size_c, E] times the slot's block of U [E, O].
template <typename scalar_t>
void project(const scalar_t* table, const scalar_t* u, const Channels& channels, int64_t cells,
             int64_t E, int64_t O, scalar_t* projected) {
  const int64_t C = channels.count(), R = channels.rows();
  for (int64_t cell = 0; cell < cells; ++cell)
    for (int64_t c = 0; c < C; ++c)
      matrix_times(table + channels.first_row[c] * E, u + (cell * C + c) * E * O,
                   projected + (cell * R + channels.first_row[c]) * O, channels.size[c], E, O,
                   false);
}

// Columns summed at once: 64 of them, held in registers (four AVX-512 registers of floats)
// rather than stored and reloaded at every addition.
constexpr int64_t kBlock = 64;

// kBlock values in registers, as 64-byte vectors.
template <typename scalar_t>
struct Block {
  using V = Vectors<scalar_t>;
  static constexpr int64_t count = kBlock / V::kLanes;
  typename V::Vec v[count] = {};

  void add(const scalar_t* src) {
    for (int64_t k = 0; k < count; ++k) v[k] += V::load(src + k * V::kLanes);
  }
  void add_to(scalar_t* dst) const {
    for (int64_t k = 0; k < count; ++k) V::store(dst + k * V::kLanes, V::load(dst + k * V::kLanes) + v[k]);
  }
};

// out [N, O] = bias + the rows of P each sample's slots read + its dense inputs through W.
template <typename scalar_t>
void sum_rows(const scalar_t* projected, const int32_t* rows, int64_t n, int64_t slots,
              const scalar_t* bias, const scalar_t* dense, const scalar_t* weight, int64_t in,
              const Columns& columns, int64_t O, scalar_t* out) {
  const auto D = static_cast<int64_t>(columns.dense.size());
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* row = rows + i * slots;
    scalar_t* dst = out + i * O;
    for (int64_t o = 0; o < O; ++o) dst[o] = bias != nullptr ? bias[o] : 0;
    int64_t o0 = 0;
    for (; o0 + kBlock <= O; o0 += kBlock) {
      Block<scalar_t> acc;
      for (int64_t s = 0; s < slots; ++s) acc.add(projected + static_cast<int64_t>(row[s]) * O + o0);
      acc.add_to(dst + o0);
    }
    for (int64_t s = 0; o0 < O && s < slots; ++s) {  // the last O % kBlock columns
      const scalar_t* p = projected + static_cast<int64_t>(row[s]) * O;
      for (int64_t o = o0; o < O; ++o) dst[o] += p[o];
    }
    for (int64_t j = 0; j < D; ++j) {
      const scalar_t x = dense[i * D + j];
      if (x == 0) continue;  // one-hot inputs are mostly zeros
      const scalar_t* w = weight + columns.dense[j];
      for (int64_t o = 0; o < O; ++o) out[i * O + o] += x * w[o * in];
    }
  }
}

Columns columns_of(int64_t grid_column, int64_t pool_column, const std::vector<int64_t>& dense,
                   int64_t in, int64_t grid_width, int64_t pool_width) {
  TORCH_CHECK(grid_column >= 0 && grid_column + grid_width <= in,
              "grid_linear: the grid's columns [", grid_column, ", ", grid_column + grid_width,
              ") are outside the weight's ", in);
  TORCH_CHECK(pool_column < 0 || pool_column + pool_width <= in,
              "grid_linear: the pooled columns are outside the weight's ", in);
  Columns columns{grid_column, pool_column, dense, {}};
  std::vector<char> in_block(static_cast<size_t>(in), 0);
  std::fill(in_block.begin() + grid_column, in_block.begin() + grid_column + grid_width, 1);
  if (pool_column >= 0)
    std::fill(in_block.begin() + pool_column, in_block.begin() + pool_column + pool_width, 1);
  for (int64_t column = 0; column < in; ++column)
    if (!in_block[column]) columns.others.push_back(column);
  for (const int64_t column : dense)
    TORCH_CHECK(column >= 0 && column < in && !in_block[column], "grid_linear: dense column ",
                column, " is outside the weight's ", in, " or inside the grid's columns");
  return columns;
}


}  // namespace
