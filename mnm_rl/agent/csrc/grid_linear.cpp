// The features extractor's Linear layer over a symbol grid's embeddings, without the embeddings.
//
// MemoryFeaturesExtractor (mnm_rl/agent/extractors.py) embeds a grid of symbols g [N, S]
// (S = cells x C channels, slot s = cell * C + c; channel c's symbol v is row first_c + v of the
// concatenated tables, table [R, E]), flattens, concatenates the other, dense, inputs, and applies
// one Linear layer, W [O, in], b [O]. Its grid columns are
//     x[n, grid_column + s * E + e] = table[row(n, s), e],
// and, with pooling, the cells' sums
//     x[n, pool_column + c * E + e] = sum_cell table[row(n, cell * C + c), e].
// Those are 2 * N * (S + C) * E * O flops, and a backward pass that scatters x's gradient
// (N * S rows of E) back into the table.
//
// Each output is linear in one table row per slot, so it is also a sum of precomputed rows. With
// the effective weight of slot (cell, c), U[(cell * C + c) * E + e, o] = W[o, grid_column +
// (cell * C + c) * E + e] (+ W[o, pool_column + c * E + e] with pooling), the projected table
//     P[cell * R + r, o] = sum_e table[r, e] * U[(cell * C + c(r)) * E + e, o]
// ([cells * R, O], c(r) the channel of row r) gives
//     out[n, o] = b[o] + sum_s P[cell(s) * R + row(n, s), o] + sum_j dense[n, j] W[o, column_j]:
// cells * R * E * O multiply-adds for P and N * S * O additions, instead of N * S * E * O
// multiply-adds (MiniGrid's 7 x 7 view, a minibatch of 256, O = 64: 0.5 M and 2.4 M against
// 19 M). The backward pass sums the output's gradient into the rows of P that were read, and
// takes the table's and W's gradients from P's, again without the per-sample embeddings.
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "grid_projection.h"

namespace {

// The gradients of P (zeroed before), of the table (zeroed before) and of U (written whole),
// from the output's.
template <typename scalar_t>
void backward_projected(const scalar_t* grad_out, const int32_t* rows, const scalar_t* table,
                        const scalar_t* u, const Channels& channels, int64_t n, int64_t slots,
                        int64_t E, int64_t O, scalar_t* grad_projected, scalar_t* grad_table,
                        scalar_t* grad_u) {
  const int64_t C = channels.count(), R = channels.rows(), cells = slots / C;
  // Which rows of P some sample read.
  std::vector<char> used(static_cast<size_t>(cells * R), 0);
  for (int64_t x = 0; x < n * slots; ++x) used[rows[x]] = 1;
  // Slot by slot. Consecutive samples often see the same symbol in a slot (walls, the floor),
  // so the gradient is summed in registers while the row stays the same and added to P's row
  // when it changes, instead of every sample's load and store of the same row.
  for (int64_t s = 0; s < slots; ++s) {
    int64_t o0 = 0;
    for (; o0 + kBlock <= O; o0 += kBlock) {
      Block<scalar_t> run;
      int32_t current = n > 0 ? rows[s] : 0;
      for (int64_t i = 0; i < n; ++i) {
        const int32_t r = rows[i * slots + s];
        if (r != current) {
          run.add_to(grad_projected + static_cast<int64_t>(current) * O + o0);
          run = Block<scalar_t>();
          current = r;
        }
        run.add(grad_out + i * O + o0);
      }
      if (n > 0) run.add_to(grad_projected + static_cast<int64_t>(current) * O + o0);
    }
    for (int64_t i = 0; o0 < O && i < n; ++i) {  // the last O % kBlock columns
      scalar_t* gp = grad_projected + static_cast<int64_t>(rows[i * slots + s]) * O;
      for (int64_t o = o0; o < O; ++o) gp[o] += grad_out[i * O + o];
    }
  }
  // The table's gradient: each row of P a sample read, its gradient against U's rows.
  for (int64_t cell = 0; cell < cells; ++cell) {
    for (int64_t r = 0; r < R; ++r) {
      if (!used[cell * R + r]) continue;
      const scalar_t* gp = grad_projected + (cell * R + r) * O;
      const scalar_t* u_slot = u + (cell * C + channels.of_row[r]) * E * O;
      for (int64_t e = 0; e < E; ++e) {
        const scalar_t* u_e = u_slot + e * O;
        scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t o = 0; o < O; ++o) dot += gp[o] * u_e[o];
        grad_table[r * E + e] += dot;
      }
    }
  }
  // U's gradient: for each cell and channel, the channel's table rows transposed [E, size_c]
  // times their rows of P's gradient [size_c, O].
  std::vector<scalar_t> table_t(static_cast<size_t>(R * E));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t v = 0; v < channels.size[c]; ++v)
      for (int64_t e = 0; e < E; ++e)
        table_t[channels.first_row[c] * E + e * channels.size[c] + v] =
            table[(channels.first_row[c] + v) * E + e];
  for (int64_t cell = 0; cell < cells; ++cell)
    for (int64_t c = 0; c < C; ++c)
      matrix_times(table_t.data() + channels.first_row[c] * E,
                   grad_projected + (cell * R + channels.first_row[c]) * O,
                   grad_u + (cell * C + c) * E * O, E, channels.size[c], O, false);
}

// grad_weight [O, in] (written whole): U's gradient into the grid's block (and its sum over
// the cells into the pooled block), the dense inputs' columns from the output's gradient, zero
// in any other column.
template <typename scalar_t>
void weight_gradient(const scalar_t* grad_u, const scalar_t* grad_out, const scalar_t* dense,
                     int64_t n, int64_t in, int64_t O, const Columns& columns, int64_t cells,
                     int64_t CE, scalar_t* grad_weight) {
  transpose_strided(grad_u, cells * CE, O, O, grad_weight + columns.grid, in);
  if (columns.pool >= 0) {
    for (int64_t o = 0; o < O; ++o) {
      scalar_t* gw = grad_weight + o * in;
      for (int64_t k = 0; k < CE; ++k) {
        scalar_t sum = 0;
        for (int64_t cell = 0; cell < cells; ++cell) sum += gw[columns.grid + cell * CE + k];
        gw[columns.pool + k] = sum;
      }
    }
  }
  const auto D = static_cast<int64_t>(columns.dense.size());
  std::vector<scalar_t> dense_grad(static_cast<size_t>(D * O), 0);  // [D, O]
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* g = grad_out + i * O;
    for (int64_t j = 0; j < D; ++j) {
      const scalar_t x = dense[i * D + j];
      if (x == 0) continue;  // one-hot inputs are mostly zeros
      scalar_t* gd = dense_grad.data() + j * O;
#pragma omp simd
      for (int64_t o = 0; o < O; ++o) gd[o] += x * g[o];
    }
  }
  for (int64_t o = 0; o < O; ++o) {
    scalar_t* gw = grad_weight + o * in;
    for (const int64_t column : columns.others) gw[column] = 0;
    for (int64_t j = 0; j < D; ++j) gw[columns.dense[j]] = dense_grad[j * O + o];
  }
}

std::vector<at::Tensor> grid_linear_forward(const at::Tensor& grid, const at::Tensor& table,
                                            const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            const at::Tensor& dense,
                                            const std::vector<int64_t>& dense_columns,
                                            int64_t grid_column, int64_t pool_column,
                                            const std::vector<int64_t>& sizes) {
  const Channels channels(sizes);
  const int64_t C = channels.count(), R = channels.rows();
  TORCH_CHECK(grid.dim() == 2, "grid_linear: grid must be [N, slots], got ", grid.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(0) == R, "grid_linear: table must be [", R,
              ", E], got ", table.sizes());
  TORCH_CHECK(weight.dim() == 2, "grid_linear: weight must be [O, in], got ", weight.sizes());
  TORCH_CHECK(grid.is_cpu() && table.is_cpu() && weight.is_cpu() && dense.is_cpu(),
              "grid_linear: a CPU kernel, got tensors on another device");
  TORCH_CHECK(weight.scalar_type() == table.scalar_type() &&
                  dense.scalar_type() == table.scalar_type(),
              "grid_linear: table, weight and dense inputs must have one dtype");
  const int64_t n = grid.size(0), slots = grid.size(1), E = table.size(1);
  const int64_t O = weight.size(0), in = weight.size(1);
  TORCH_CHECK(slots % C == 0, "grid_linear: ", slots, " slots are not cells x ", C, " channels");
  const int64_t cells = slots / C;
  TORCH_CHECK(cells * R < INT32_MAX, "grid_linear: ", cells, " cells x ", R, " rows: too many");
  const auto D = static_cast<int64_t>(dense_columns.size());
  TORCH_CHECK(dense.dim() == 2 && dense.size(0) == n && dense.size(1) == D,
              "grid_linear: dense inputs must be [", n, ", ", D, "], got ", dense.sizes());
  const Columns columns =
      columns_of(grid_column, pool_column, dense_columns, in, slots * E, C * E);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == O && bias->scalar_type() == table.scalar_type(),
                "grid_linear: bias must be [", O, "]");

  const at::Tensor grid_c = grid.contiguous(), table_c = table.contiguous();
  const at::Tensor weight_c = weight.contiguous(), dense_c = dense.contiguous();
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor rows = at::empty({n, slots}, grid.options().dtype(at::kInt));
  AT_DISPATCH_ALL_TYPES(grid_c.scalar_type(), "grid_linear_rows", [&] {
    slot_rows(grid_c.data_ptr<scalar_t>(), n, cells, channels, rows.data_ptr<int32_t>());
  });
  at::Tensor u = at::empty({slots * E, O}, table.options());
  at::Tensor projected = at::empty({cells * R, O}, table.options());
  at::Tensor out = at::empty({n, O}, table.options());
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "grid_linear_forward", [&] {
    effective_weight(weight_c.data_ptr<scalar_t>(), in, O, columns, cells, C * E,
                     u.data_ptr<scalar_t>());
    project(table_c.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), channels, cells, E, O,
            projected.data_ptr<scalar_t>());
    sum_rows(projected.data_ptr<scalar_t>(), rows.data_ptr<int32_t>(), n, slots,
             has_bias ? bias_c.data_ptr<scalar_t>() : nullptr, dense_c.data_ptr<scalar_t>(),
             weight_c.data_ptr<scalar_t>(), in, columns, O, out.data_ptr<scalar_t>());
  });
  return {out, rows, u};
}

// Gradients of the table [R, E], W [O, in], b [O] and the dense inputs [N, D] (undefined unless
// dense_grad) from the output's [N, O], given the forward pass's rows and U.
std::vector<at::Tensor> grid_linear_backward(const at::Tensor& grad_out, const at::Tensor& rows,
                                             const at::Tensor& table, const at::Tensor& u,
                                             const at::Tensor& weight, const at::Tensor& dense,
                                             const std::vector<int64_t>& dense_columns,
                                             int64_t grid_column, int64_t pool_column,
                                             const std::vector<int64_t>& sizes, bool dense_grad) {
  const Channels channels(sizes);
  const int64_t n = rows.size(0), slots = rows.size(1), C = channels.count(), R = channels.rows();
  const int64_t cells = slots / C, E = table.size(1), O = weight.size(0), in = weight.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == n && grad_out.size(1) == O,
              "grid_linear: gradient must be [", n, ", ", O, "], got ", grad_out.sizes());
  const Columns columns =
      columns_of(grid_column, pool_column, dense_columns, in, slots * E, C * E);
  const at::Tensor grad_c = grad_out.contiguous().to(table.scalar_type());
  const at::Tensor table_c = table.contiguous(), dense_c = dense.contiguous();
  at::Tensor grad_projected = at::zeros({cells * R, O}, table.options());
  at::Tensor grad_table = at::zeros({R, E}, table.options());
  at::Tensor grad_u = at::empty({slots * E, O}, table.options());
  at::Tensor grad_weight = at::empty({O, in}, table.options());
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "grid_linear_backward", [&] {
    backward_projected(grad_c.data_ptr<scalar_t>(), rows.data_ptr<int32_t>(),
                       table_c.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), channels, n, slots,
                       E, O, grad_projected.data_ptr<scalar_t>(),
                       grad_table.data_ptr<scalar_t>(), grad_u.data_ptr<scalar_t>());
    weight_gradient(grad_u.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(),
                    dense_c.data_ptr<scalar_t>(), n, in, O, columns, cells, C * E,
                    grad_weight.data_ptr<scalar_t>());
  });
  const at::Tensor columns_index = at::tensor(dense_columns, at::kLong);
  at::Tensor grad_dense = dense_grad ? grad_c.mm(weight.index_select(1, columns_index))
                                     : at::Tensor();
  return {grad_table, grad_weight, grad_c.sum(0), grad_dense};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The features extractor's Linear layer over a symbol grid, via projected tables";
  m.def("grid_linear_forward", &grid_linear_forward,
        "(grid [N, S], table [R, E], weight [O, in], bias [O] or None, dense [N, D], "
        "dense_columns, grid_column, pool_column, channel sizes) -> (out [N, O], rows, U)");
  m.def("grid_linear_backward", &grid_linear_backward,
        "(grad_out, rows, table, U, weight, dense, dense_columns, grid_column, pool_column, "
        "channel sizes, dense_grad) -> (grad_table, grad_weight, grad_bias, grad_dense)");
}
