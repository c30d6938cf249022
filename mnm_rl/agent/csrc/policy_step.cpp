// One rollout step of the whole policy as one call (mnm_rl/agent/policy_step.py): the features
// extractor, the core (LSTM, GRU, the memoryless MLP, or MNM through its own kernel, whose
// source this extension compiles too) and the heads with the actions' draw, for a batch of B
// envs and no gradients. The same step runs as about forty PyTorch
// operators and a dozen Python functions otherwise, each a few microseconds at B = 8, which
// together cost several times the arithmetic (about 150 us for an LSTM policy on MiniGrid).
//
// It computes what RecurrentMemoryPolicy.act computes, in the same order and with the same
// operators where there are operators:
//
//   x        = the observation's inputs in the extractor's column order: a symbol grid (at most
//              one) through its embeddings, Discrete inputs one-hot, Box inputs flattened
//   features = relu(W_enc x + b_enc)     the grid's part through P, grid_linear.cpp's projected
//                                        table, which the caller keeps between steps (it only
//                                        changes with W_enc and the embeddings)
//   core     LSTM:  (h, c) = keep * (h, c);  gates = W_ih features + b_ih + b_hh + W_hh h;
//                   the cell as in lstm_sequence.cpp (keep = 0 where an episode starts)
//            GRU:   h = keep * h;  the cell as in gru_sequence.cpp
//            MLP:   tanh(W_2 tanh(W_1 features + b_1) + b_2), no state
//            MNM:   its kernel's step from W_in features + b_in, then W_out [h ; read] + b_out
//   heads    heads.h's heads_step: the logits and values, the actions drawn from torch's
//            default generator as RecurrentMemoryPolicy.sample draws them.
//
// tests/test_policy_step.py checks it against the policy's PyTorch step: actions, log-probs,
// values and state, for every core, grid and non-grid observations, float32 and float64.

#include <torch/extension.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "../../memory/csrc/dense_products.h"
#include "../../memory/csrc/elementwise.h"
#include "../../memory/csrc/kernels.h"  // the MNM kernel, compiled into this extension too
#include "../../memory/csrc/rnn_common.h"  // kept_rows
#include "grid_projection.h"
#include "heads.h"

namespace {

using mnm_rl::sigmoid;
using mnm_rl::tanh_;

// The cores this step runs (mnm_rl/agent/policy_step.py: CORE_KINDS).
enum CoreKind : int64_t { kMLPCore = 0, kLSTMCore = 1, kGRUCore = 2, kMNMCore = 3 };

// The MNM core's options for its kernel (mnm_rl/memory/fused.py: kernel_options), and into how
// many parts the kernel splits the batch (fused.batch_parts).
struct MNMOptions {
  int64_t n_heads;
  bool gradient_rule, tanh_act;
  double eps;
  int64_t parts;
};

// The grid's part of the extractor's layer: which columns of W_enc, and its channels.
struct GridSpec {
  Channels channels;
  Columns columns;
  int64_t cells;
};

GridSpec grid_spec(const at::Tensor& weight, int64_t slots, int64_t E, int64_t grid_column,
                   int64_t pool_column, const std::vector<int64_t>& dense_columns,
                   const std::vector<int64_t>& sizes) {
  Channels channels(sizes);
  const int64_t C = channels.count();
  TORCH_CHECK(slots % C == 0, "policy_step: ", slots, " grid slots are not cells x ", C,
              " channels");
  Columns columns = columns_of(grid_column, pool_column, dense_columns, weight.size(1), slots * E,
                               C * E);
  return {std::move(channels), std::move(columns), slots / C};
}

// P [cells * R, O], the grid's projected table (grid_linear.cpp), for the caller to keep.
at::Tensor project_grid(const at::Tensor& table, const at::Tensor& weight, int64_t slots,
                        int64_t grid_column, int64_t pool_column,
                        const std::vector<int64_t>& dense_columns,
                        const std::vector<int64_t>& sizes) {
  TORCH_CHECK(table.dim() == 2 && weight.dim() == 2 && table.is_cpu() && weight.is_cpu() &&
                  table.scalar_type() == weight.scalar_type(),
              "policy_step: table [R, E] and weight [O, in], CPU tensors of one dtype");
  const int64_t E = table.size(1), O = weight.size(0);
  const GridSpec g = grid_spec(weight, slots, E, grid_column, pool_column, dense_columns, sizes);
  TORCH_CHECK(table.size(0) == g.channels.rows(), "policy_step: the table has ", table.size(0),
              " rows, the channels ", g.channels.rows());
  const int64_t C = g.channels.count(), R = g.channels.rows();
  TORCH_CHECK(g.cells * R < INT32_MAX, "policy_step: ", g.cells, " cells x ", R, " rows: too many");
  const at::Tensor table_c = table.contiguous(), weight_c = weight.contiguous();
  at::Tensor u = at::empty({slots * E, O}, table.options());
  at::Tensor projected = at::empty({g.cells * R, O}, table.options());
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "project_grid", [&] {
    effective_weight(weight_c.data_ptr<scalar_t>(), weight.size(1), O, g.columns, g.cells, C * E,
                     u.data_ptr<scalar_t>());
    project(table_c.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), g.channels, g.cells, E, O,
            projected.data_ptr<scalar_t>());
  });
  return projected;
}

// The non-grid inputs as the layer's dense columns [B, D], in order: input k one-hot over
// kinds[k] columns where kinds[k] > 0 (a Discrete space), else flattened and cast (a Box).
at::Tensor dense_inputs(const std::vector<at::Tensor>& inputs, const std::vector<int64_t>& kinds,
                        int64_t B, const at::TensorOptions& options) {
  TORCH_CHECK(inputs.size() == kinds.size(), "policy_step: ", inputs.size(), " inputs, ",
              kinds.size(), " kinds");
  int64_t width = 0;
  std::vector<int64_t> widths;
  for (size_t k = 0; k < inputs.size(); ++k) {
    TORCH_CHECK(inputs[k].dim() >= 1 && inputs[k].size(0) == B, "policy_step: input ", k,
                " must have ", B, " rows, got ", inputs[k].sizes());
    widths.push_back(kinds[k] > 0 ? kinds[k] : inputs[k].numel() / B);
    width += widths.back();
  }
  at::Tensor dense = at::empty({B, width}, options);  // zeroed below: no fill_ dispatch
  AT_DISPATCH_FLOATING_TYPES(dense.scalar_type(), "policy_step_zeros", [&] {
    std::fill_n(dense.data_ptr<scalar_t>(), B * width, scalar_t(0));
  });
  int64_t column = 0;
  for (size_t k = 0; k < inputs.size(); ++k) {
    if (kinds[k] > 0) {
      TORCH_CHECK(inputs[k].numel() == B, "policy_step: Discrete input ", k, " must be [", B,
                  "], got ", inputs[k].sizes());
      const at::Tensor index = inputs[k].contiguous();
      AT_DISPATCH_ALL_TYPES(index.scalar_type(), "policy_step_one_hot", [&] {
        using in_t = scalar_t;
        const in_t* idx = index.data_ptr<in_t>();
        AT_DISPATCH_FLOATING_TYPES(dense.scalar_type(), "policy_step_dense", [&] {
          using out_t = scalar_t;
          out_t* out = dense.data_ptr<out_t>();
          for (int64_t b = 0; b < B; ++b) {
            const auto v = static_cast<int64_t>(idx[b]);
            TORCH_CHECK(v >= 0 && v < kinds[k] && static_cast<in_t>(v) == idx[b],
                        "policy_step: Discrete input ", k, " is ", idx[b], ", not in [0, ",
                        kinds[k], ")");
            out[b * width + column + v] = out_t(1);
          }
        });
      });
    } else {
      dense.narrow(1, column, widths[k]).copy_(inputs[k].reshape({B, widths[k]}));
    }
    column += widths[k];
  }
  return dense;
}

// features [B, O] = relu(W_enc x + b_enc): through P where there is a grid (grid defined), else
// one product over the dense inputs, which are then all of x.
at::Tensor encode(const c10::optional<at::Tensor>& grid, const c10::optional<at::Tensor>& projected,
                  const at::Tensor& dense, const at::Tensor& weight, const at::Tensor& bias,
                  int64_t embedding_dim, int64_t grid_column, int64_t pool_column,
                  const std::vector<int64_t>& dense_columns, const std::vector<int64_t>& sizes) {
  const int64_t B = dense.size(0), O = weight.size(0), in = weight.size(1);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == O, "policy_step: the extractor's bias must be [",
              O, "]");
  if (!grid.has_value() || !grid->defined()) {
    TORCH_CHECK(dense.size(1) == in, "policy_step: ", dense.size(1),
                " input columns for an extractor layer of ", in);
    // as MemoryFeaturesExtractor computes it: products.linear, then nn.ReLU
    return mnm_rl::linear_out(dense, weight, bias, /*cache_transpose=*/true).relu_();
  }
  TORCH_CHECK(projected.has_value() && projected->defined(),
              "policy_step: a grid input needs its projected table");
  const at::Tensor grid_c = grid->contiguous();
  TORCH_CHECK(grid_c.dim() >= 1 && grid_c.size(0) == B, "policy_step: the grid must have ", B,
              " rows, got ", grid_c.sizes());
  const int64_t slots = B > 0 ? grid_c.numel() / B : 0;
  const GridSpec g =
      grid_spec(weight, slots, embedding_dim, grid_column, pool_column, dense_columns, sizes);
  TORCH_CHECK(projected->dim() == 2 && projected->size(0) == g.cells * g.channels.rows() &&
                  projected->size(1) == O && projected->is_contiguous(),
              "policy_step: the projected table must be [", g.cells * g.channels.rows(), ", ", O,
              "], contiguous");
  TORCH_CHECK(dense.size(1) == static_cast<int64_t>(dense_columns.size()), "policy_step: ",
              dense.size(1), " dense inputs for ", dense_columns.size(), " dense columns");
  at::Tensor rows = at::empty({B, slots}, grid_c.options().dtype(at::kInt));
  AT_DISPATCH_ALL_TYPES(grid_c.scalar_type(), "policy_step_rows", [&] {
    slot_rows(grid_c.data_ptr<scalar_t>(), B, g.cells, g.channels, rows.data_ptr<int32_t>());
  });
  const at::Tensor weight_c = weight.contiguous(), bias_c = bias.contiguous();
  at::Tensor out = at::empty({B, O}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "policy_step_encode", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    sum_rows(projected->data_ptr<scalar_t>(), rows.data_ptr<int32_t>(), B, slots,
             bias_c.data_ptr<scalar_t>(), dense.data_ptr<scalar_t>(),
             weight_c.data_ptr<scalar_t>(), in, g.columns, O, o);
    for (int64_t i = 0; i < B * O; ++i) o[i] = o[i] > scalar_t(0) ? o[i] : scalar_t(0);  // ReLU
  });
  return out;
}

// keep [1, B] in the dtype of options: 0 where an episode starts (episode_starts [B], of any
// dtype, nonzero), else 1, as episode_starts.eq(0) gives it: one loop instead of three
// dispatched operators (eq, to, reshape).
at::Tensor keep_rows(const at::Tensor& episode_starts, const at::TensorOptions& options) {
  const at::Tensor starts = episode_starts.contiguous();
  const int64_t B = starts.size(0);
  at::Tensor keep = at::empty({1, B}, options);
  AT_DISPATCH_ALL_TYPES_AND(at::kBool, starts.scalar_type(), "policy_step_starts", [&] {
    using in_t = scalar_t;
    const in_t* in = starts.data_ptr<in_t>();
    AT_DISPATCH_FLOATING_TYPES(keep.scalar_type(), "policy_step_keep", [&] {
      scalar_t* out = keep.data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b) out[b] = in[b] == in_t(0) ? scalar_t(1) : scalar_t(0);
    });
  });
  return keep;
}

// A copy of a state tensor [B, ...] with the rows of sequences whose episode starts (keep [1, B]
// is 0) set to zero: set, not multiplied, so a state that holds inf or NaN still starts from zero
// (rnn_common.h's kept_rows, as the sequence kernels reset theirs).
at::Tensor kept_state(const at::Tensor& state, const at::Tensor& keep) {
  const at::Tensor in = state.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  const int64_t B = in.size(0), n = B > 0 ? in.numel() / B : 0;
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "policy_step_kept_state", [&] {
    mnm_rl::kept_rows(out.data_ptr<scalar_t>(), in.data_ptr<scalar_t>(),
                      keep.data_ptr<scalar_t>(), B, n);
  });
  return out;
}

// The LSTM's step from x [B, F] and (h, c) [B, H]: (h', c'), new tensors. layers: W_ih, W_hh,
// b_ih, b_hh (nn.LSTM's, gate order i, f, g, o).
std::vector<at::Tensor> lstm_step(const at::Tensor& x, const std::vector<at::Tensor>& state,
                                  const at::Tensor& keep,
                                  const std::vector<at::Tensor>& layers) {
  TORCH_CHECK(layers.size() == 4 && state.size() == 2,
              "policy_step: an LSTM takes W_ih, W_hh, b_ih, b_hh and the state h, c");
  const int64_t B = x.size(0), H = layers[1].size(1);
  TORCH_CHECK(state[0].sizes() == at::IntArrayRef({B, H}) &&
                  state[1].sizes() == at::IntArrayRef({B, H}),
              "policy_step: the LSTM's state must be [", B, ", ", H, "]");
  // gates_x as run_lstm computes it (products.linear), then the recurrent product added as
  // lstm_forward adds it: the same products (dense_products.h), so the same rounding
  at::Tensor bias = at::empty({4 * H}, x.options());  // b_ih + b_hh, as one add computes it
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "policy_step_lstm_bias", [&] {
    const at::Tensor b_ih = layers[2].contiguous(), b_hh = layers[3].contiguous();
    const scalar_t *a = b_ih.data_ptr<scalar_t>(), *b = b_hh.data_ptr<scalar_t>();
    scalar_t* out = bias.data_ptr<scalar_t>();
    for (int64_t i = 0; i < 4 * H; ++i) out[i] = a[i] + b[i];
  });
  at::Tensor gates = mnm_rl::linear_out(x, layers[0], bias, true);
  at::Tensor h = kept_state(state[0], keep), c = kept_state(state[1], keep);
  mnm_rl::product_into(gates, h, mnm_rl::cached_packed_transpose(layers[1]), true);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "policy_step_lstm", [&] {
    for (int64_t b = 0; b < B; ++b)
      mnm_rl::lstm_cell_row(gates.data_ptr<scalar_t>() + b * 4 * H, c.data_ptr<scalar_t>() + b * H,
                            h.data_ptr<scalar_t>() + b * H, H);
  });
  return {h, c};
}

// The GRU's step from x [B, F] and h [B, H]: h', a new tensor. layers: W_ih, W_hh, b_ih, b_hh
// (nn.GRU's, gate order r, z, n).
std::vector<at::Tensor> gru_step(const at::Tensor& x, const std::vector<at::Tensor>& state,
                                 const at::Tensor& keep,
                                 const std::vector<at::Tensor>& layers) {
  TORCH_CHECK(layers.size() == 4 && state.size() == 1,
              "policy_step: a GRU takes W_ih, W_hh, b_ih, b_hh and the state h");
  const int64_t B = x.size(0), H = layers[1].size(1);
  TORCH_CHECK(state[0].sizes() == at::IntArrayRef({B, H}), "policy_step: the GRU's state must be [",
              B, ", ", H, "]");
  // as run_gru and gru_forward compute them
  const at::Tensor gx = mnm_rl::linear_out(x, layers[0], layers[2], true);
  const at::Tensor h_in = kept_state(state[0], keep);
  const at::Tensor gh = mnm_rl::linear_out(h_in, layers[1], layers[3], true);
  at::Tensor h = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "policy_step_gru", [&] {
    using T = scalar_t;
    for (int64_t b = 0; b < B; ++b) {
      const T* __restrict__ gxb = gx.data_ptr<T>() + b * 3 * H;
      const T* __restrict__ g = gh.data_ptr<T>() + b * 3 * H;
      const T* __restrict__ ub = h_in.data_ptr<T>() + b * H;
      T* __restrict__ hb = h.data_ptr<T>() + b * H;
      for (int64_t i = 0; i < H; ++i) {
        const T r = sigmoid(gxb[i] + g[i]);
        const T z = sigmoid(gxb[H + i] + g[H + i]);
        const T n = tanh_(gxb[2 * H + i] + r * g[2 * H + i]);
        hb[i] = (T(1) - z) * n + z * ub[i];
      }
    }
  });
  return {h};
}

// The MNM core's step from x [B, F] and its state (h, c, read, fast weights), through the MNM
// kernel (memory/csrc/mnm_sequence.cpp) as MNMCore's forward runs it (fused.run_sequence):
// returns (output [B, O], h', c', read', fast weights'). layers: the input gates' W, b, the
// output layer's W, b, then the kernel's slow weights (fused.kernel_weights).
std::vector<at::Tensor> mnm_step(const at::Tensor& x, const std::vector<at::Tensor>& state,
                                 const at::Tensor& keep,
                                 const std::vector<at::Tensor>& layers, const MNMOptions& o) {
  TORCH_CHECK(layers.size() == 12 && state.size() == 4,
              "policy_step: an MNM core takes 12 weights and the state h, c, read, fast weights");
  // the input gates and the output layer as MNMCore's forward computes them (products.linear)
  const at::Tensor gates_x = mnm_rl::linear_out(x, layers[0], layers[1], true).unsqueeze(0);
  at::Tensor weights = state[3];
  const bool as_is = weights.stride(3) == 1 && weights.stride(2) == weights.size(3);
  const bool transposed = weights.stride(2) == 1 && weights.stride(3) == weights.size(2);
  if (!as_is && !transposed) weights = weights.contiguous();
  const std::vector<at::Tensor>& w = layers;
  // With parts > 1 the parts' threads take this thread's thread-local state, whose copy may
  // need the GIL (see memory/csrc/module.cpp): policy_step is bound to run without it.
  std::vector<at::Tensor> out;
  if (o.parts > 1)
    out = mnm_rl::mnm_forward_parts(gates_x, keep, state[0].contiguous(), state[1].contiguous(),
                                    state[2].contiguous(), weights, w[4], w[5], w[6], w[7], w[8],
                                    w[9], w[10], w[11], o.n_heads, o.gradient_rule, o.tanh_act,
                                    o.eps, false, false, o.parts);
  else
    out = mnm_rl::mnm_forward(gates_x, keep, state[0].contiguous(), state[1].contiguous(),
                              state[2].contiguous(), weights, w[4], w[5], w[6], w[7], w[8], w[9],
                              w[10], w[11], o.n_heads, o.gradient_rule, o.tanh_act, o.eps, false,
                              false);
  const at::Tensor h = out[0][0], read = out[1][0];
  const at::Tensor y = mnm_rl::linear_out(at::cat({h, read}, 1), layers[2], layers[3], true);
  return {y, h, out[7], read, out[8]};
}

// (actions [B] int64, log_probs [B], values [B], every logit finite, the core's state after the
// step) for one step of B envs. grid [B, ...] (or None) with its projected table from
// project_grid; inputs/kinds: the other inputs (see dense_inputs); encoder: W_enc, b_enc;
// core_kind: CoreKind, core: its parameters (LSTM, GRU: W_ih, W_hh, b_ih, b_hh; MLP: W_1, b_1,
// W_2, b_2; MNM: see mnm_step), state: its state tensors ([B, H] each: LSTM h, c; GRU h; MLP
// none; MNM h, c, read and the fast weights [B, L, D, D]); episode_starts [B]: nonzero where an
// episode starts (the state is reset first); actor, critic, activation: the heads, as for
// heads_step; mnm_*: an MNM core's kernel options (MNMOptions; ignored by the other cores);
// races: the draw's, drawn ahead (heads.h's draw_races), or None: drawn in the step.
using StepResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, bool, std::vector<at::Tensor>>;

StepResult policy_step(
    const c10::optional<at::Tensor>& grid, const c10::optional<at::Tensor>& projected,
    const std::vector<at::Tensor>& inputs, const std::vector<int64_t>& kinds,
    const at::Tensor& encoder_weight, const at::Tensor& encoder_bias, int64_t embedding_dim,
    int64_t grid_column, int64_t pool_column, const std::vector<int64_t>& dense_columns,
    const std::vector<int64_t>& sizes, int64_t core_kind, const std::vector<at::Tensor>& core,
    const std::vector<at::Tensor>& state, const at::Tensor& episode_starts,
    const std::vector<at::Tensor>& actor, const std::vector<at::Tensor>& critic,
    int64_t activation, bool deterministic, int64_t mnm_heads, bool mnm_gradient_rule,
    bool mnm_tanh, double mnm_eps, int64_t mnm_parts, const c10::optional<at::Tensor>& races) {
  TORCH_CHECK(encoder_weight.is_cpu() && encoder_weight.dim() == 2,
              "policy_step: a CPU kernel; the extractor's weight must be [O, in]");
  TORCH_CHECK(episode_starts.dim() == 1, "policy_step: episode_starts must be [B]");
  const int64_t B = episode_starts.size(0);
  const at::TensorOptions options = encoder_weight.options();
  const at::Tensor dense = dense_inputs(inputs, kinds, B, options);
  const at::Tensor features =
      encode(grid, projected, dense, encoder_weight, encoder_bias, embedding_dim, grid_column,
             pool_column, dense_columns, sizes);
  // keep [1, B]: 0 where an episode starts (the state is reset first), else 1; every core's
  // step takes it (the MNM kernel as its keep [T, B])
  const at::Tensor keep = keep_rows(episode_starts, options);
  std::vector<at::Tensor> new_state;
  at::Tensor latent;
  switch (core_kind) {
    case kLSTMCore:
      new_state = lstm_step(features, state, keep, core);
      latent = new_state[0];
      break;
    case kGRUCore:
      new_state = gru_step(features, state, keep, core);
      latent = new_state[0];
      break;
    case kMNMCore: {
      std::vector<at::Tensor> out =
          mnm_step(features, state, keep, core,
                   {mnm_heads, mnm_gradient_rule, mnm_tanh, mnm_eps, mnm_parts});
      latent = out[0];
      new_state.assign(out.begin() + 1, out.end());
      break;
    }
    case kMLPCore:
      TORCH_CHECK(state.empty(), "policy_step: the MLP core has no state");
      // torch's tanh, as MLPCore's forward (PyTorch) computes it in training
      latent = run_head(features, core, kTanh, /*activate_last=*/true, /*torch_tanh=*/true);
      break;
    default:
      TORCH_CHECK(false, "policy_step: unknown core kind ", core_kind);
  }
  auto [actions, log_probs, values, finite] =
      heads_step(latent, latent, actor, critic, activation, deterministic,
                 races.value_or(at::Tensor()));
  return {actions, log_probs, values, finite, new_state};
}

// A thread of its own that runs policy steps one at a time, for a rollout to overlap a step
// with its own Python (mnm_rl/agent/policy_step.py: StepThread): launch() hands it the
// arguments of one policy_step call and returns at once; wait() returns that call's result,
// or rethrows its error. The step runs in inference mode, as the rollout's own steps do, and
// the thread never touches Python, so the caller keeps the GIL while the step runs. Its draw's
// races are drawn by launch() on the caller's thread (heads.h's draw_races), so that torch's
// default generator is drawn from in the caller's order: the same actions as policy_step.
//
// Handing a step over costs a few microseconds when the thread is awake: it watches its job
// counter, giving up its core at every look (sched_yield), for kSpin after each step before it
// sleeps on a condition variable (the rollout launches a step every 0.1-0.3 ms; between
// rollouts it sleeps). wait() watches the done counter the same way, with the GIL released.
class StepThread {
 public:
  StepThread() : thread_([this] { run(); }) {}

  ~StepThread() {
    {
      const std::lock_guard<std::mutex> hold(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    thread_.join();  // after the step under way, if any
  }

  StepThread(const StepThread&) = delete;
  StepThread& operator=(const StepThread&) = delete;

  void launch(std::function<StepResult()> job) {
    TORCH_CHECK(launched_ == waited_, "StepThread.launch: the last step has not been waited for");
    {
      const std::lock_guard<std::mutex> hold(mutex_);
      job_ = std::move(job);
      ++launched_;
      posted_.store(launched_, std::memory_order_release);
    }
    wake_.notify_one();
  }

  StepResult wait() {
    TORCH_CHECK(launched_ > waited_, "StepThread.wait: no step was launched");
    if (!watch([&] { return done_.load(std::memory_order_acquire) == launched_; })) {
      std::unique_lock<std::mutex> lock(mutex_);
      finished_.wait(lock, [&] { return done_.load(std::memory_order_acquire) == launched_; });
    }
    waited_ = launched_;
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    return std::exchange(result_, StepResult{});
  }

  // Drop the last waited-for job's arguments (with the GIL held: see run()).
  void drop_arguments() {
    const std::lock_guard<std::mutex> hold(mutex_);
    ran_ = nullptr;
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(500);

  // Look at ready() until it holds (true) or kSpin has passed (false), yielding the core
  // between looks.
  template <typename F> static bool watch(const F& ready) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    while (!ready()) {
      if (std::chrono::steady_clock::now() > until) return false;
      sched_yield();
    }
    return true;
  }

  void run() {
    uint64_t done = 0;
    for (;;) {
      std::function<StepResult()> job;
      {
        const auto posted = [&] { return posted_.load(std::memory_order_acquire) > done; };
        const bool awake = watch(posted);
        std::unique_lock<std::mutex> lock(mutex_);
        if (!awake) wake_.wait(lock, [&] { return stop_ || posted(); });
        if (!posted()) return;  // stopped, nothing left to run
        job = std::move(job_);
      }
      try {
        const c10::InferenceMode inference;
        result_ = job();
      } catch (...) {
        error_ = std::current_exception();
      }
      {
        const std::lock_guard<std::mutex> hold(mutex_);
        // The job's copies of the caller's tensors go back to the caller to drop: dropping the
        // last C++ reference to a tensor that has a Python object takes the GIL.
        ran_ = std::move(job);
        done_.store(++done, std::memory_order_release);
      }
      finished_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  std::function<StepResult()> job_, ran_;
  StepResult result_;
  std::exception_ptr error_;
  bool stop_ = false;
  uint64_t launched_ = 0, waited_ = 0;  // the caller's counts
  std::atomic<uint64_t> posted_{0}, done_{0};
  std::thread thread_;  // last: started once the members it uses are
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "One rollout step of the whole policy (extractor, baseline core, heads) as one call";
  m.def("project_grid", &project_grid,
        "(table [R, E], weight [O, in], slots, grid_column, pool_column, dense_columns, channel "
        "sizes) -> the projected table P [cells * R, O]");
  // Without the GIL: an MNM core's split step (mnm_parts > 1) needs it free (see mnm_step).
  m.def("policy_step", &policy_step,
        "(grid, P, inputs, kinds, W_enc, b_enc, embedding_dim, grid_column, pool_column, "
        "dense_columns, channel sizes, core_kind, core, state, episode_starts, actor, critic, "
        "activation, deterministic, mnm_heads, mnm_gradient_rule, mnm_tanh, mnm_eps, mnm_parts, "
        "races or None) -> (actions, log_probs, values, finite, state)",
        py::call_guard<py::gil_scoped_release>());
  py::class_<StepThread>(m, "StepThread",
                         "A thread that runs policy_step calls one at a time: launch(), then "
                         "wait() for the result")
      .def(py::init<>())
      .def(
          "launch",
          [](StepThread& self, const c10::optional<at::Tensor>& grid,
             const c10::optional<at::Tensor>& projected, const std::vector<at::Tensor>& inputs,
             const std::vector<int64_t>& kinds, const at::Tensor& encoder_weight,
             const at::Tensor& encoder_bias, int64_t embedding_dim, int64_t grid_column,
             int64_t pool_column, const std::vector<int64_t>& dense_columns,
             const std::vector<int64_t>& sizes, int64_t core_kind,
             const std::vector<at::Tensor>& core, const std::vector<at::Tensor>& state,
             const at::Tensor& episode_starts, const std::vector<at::Tensor>& actor,
             const std::vector<at::Tensor>& critic, int64_t activation, bool deterministic,
             int64_t mnm_heads, bool mnm_gradient_rule, bool mnm_tanh, double mnm_eps,
             int64_t mnm_parts) {
            // a split MNM step's threads would need the GIL, which the caller keeps
            TORCH_CHECK(mnm_parts == 1, "StepThread.launch: a step in one part only");
            TORCH_CHECK(!actor.empty() && episode_starts.dim() == 1,
                        "StepThread.launch: no actor head, or episode_starts not [B]");
            // drawn here, in the caller's order of draws, not on the step's thread
            const c10::optional<at::Tensor> races =
                deterministic ? c10::optional<at::Tensor>()
                              : draw_races(episode_starts.size(0), actor.back().size(0),
                                           encoder_weight.options());
            self.launch([=] {
              return policy_step(grid, projected, inputs, kinds, encoder_weight, encoder_bias,
                                 embedding_dim, grid_column, pool_column, dense_columns, sizes,
                                 core_kind, core, state, episode_starts, actor, critic,
                                 activation, deterministic, mnm_heads, mnm_gradient_rule,
                                 mnm_tanh, mnm_eps, mnm_parts, races);
            });
          },
          "policy_step's arguments (mnm_parts 1): begin the step on the thread")
      .def(
          "wait",
          [](StepThread& self) {
            StepResult result;
            std::exception_ptr error;
            {
              const py::gil_scoped_release no_gil;  // while the step runs
              try {
                result = self.wait();
              } catch (...) {
                error = std::current_exception();
              }
            }
            self.drop_arguments();
            if (error) std::rethrow_exception(error);
            return result;
          },
          "the launched step's result, as policy_step's");
}
