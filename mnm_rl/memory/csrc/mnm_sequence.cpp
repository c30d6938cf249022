// The MNM recurrence over a whole sequence, forward and backward, as one CPU kernel.
//
// It computes exactly what mnm_rl/memory/mnm.py (MNMCore._step) and fast_weights.py compute, in
// the same order, for the paper's step order (write, then read) without the retention loss:
//
//   gates  = gates_x[t] + W_rec [h ; r]                 LSTM controller (input part precomputed)
//   c, h   = LSTM cell
//   e      = tanh(W_int h + b_int) = [k^r (H x D) ; k^w (H x D) ; v^w (H x D) ; beta' (D)]
//            b_int is a bias [E], or per step [T, B, E] (the bias plus U x_t, for a core whose
//            interaction also reads its input: MNMCore's interaction_input)
//   beta   = sigmoid(w_beta . beta' + b_beta)
//   k^     = rms_norm(k)                                 all 2H keys
//   z^0 = k^w, z^l = act(M^l z^{l-1}), z^L = M^L z^{L-1}  pre-write pass (write keys)
//   delta^l = z^l - target^l    (mnm-p: target = BFPF(v^w); mnm-g: backpropagated error)
//   M^l    <- M^l - beta / (sum_h |z^{l-1}_h|^2 + eps) * sum_h delta^l_h (z^{l-1}_h)^T
//   zr     = the same MLP on all 2H keys under the new weights; read = mean of the read heads
//
// Eager PyTorch runs this as about 200 small operators per step, each costing microseconds of
// dispatch, autograd bookkeeping and allocation whatever its size. Here one call does a whole
// sequence. Every matrix product is one call per step and layer for the whole batch (the fast
// weights are kept layer-major, [L, B, D, D], so that each layer is one contiguous batch of
// matrices): dense_products.h's for the controller's (MKL ran its AVX2 code on our AMD CPUs at
// less than half their speed), the hand-written loops of row_products.h for the
// memory's (the passes through its layers, x M^T, on weights the forward pass holds
// transposed; x M, and the rank-H updates of the write and of the weights' gradient), where MKL
// spent much of its time repacking each small matrix; everything elementwise is plain loops on
// preallocated buffers;
// the weight gradients of the controller and of the BFPF are large products over all steps at
// the end.
// The backward pass recomputes the keys, values and errors of each step from what the forward
// pass kept (the step's inputs h, c, read, the controller's gates, the interaction's output,
// mnm-p's BFPF outputs, and the activations of the passes through the layers, [B, H, D] and
// [B, 2H, D] per layer, all of which the forward pass writes straight into the buffers it
// keeps). It does not keep every step's fast weights
// ([L, B, D, D] per step, most of the memory autograd kept): it starts from the last step's and
// undoes the writes one step at a time, M = M' + (beta / energy) sum_h delta_h z_h^T, from the
// factors the forward pass kept; where an episode starts, the write began from the initial weights,
// so the weights before the reset are kept instead. Undoing a write in float32 rounds the way doing
// it did: the error grows with the sequence's length as the forward pass's own does
// (tests/test_fused.py checks 128 steps).
// tests/test_fused.py checks it against the PyTorch implementation: outputs, final state and
// every gradient.

// torch/extension.h, and the helpers of elementwise.h with internal linkage, as when this file
// was the whole kernel: the split into files with ATen/ATen.h and external helpers ran 10-20%
// slower (benchmarks/kernel_pairs.py --against b67e963), restoring both brought it back to
// parity; which of the two mattered was not isolated.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <utility>
#include <vector>

#include "dense_products.h"
#include "elementwise.h"
#include "kernels.h"
#include "parts.h"
#include "row_products.h"

namespace mnm_rl {
namespace {

struct Dims {
  int64_t B, hidden, D, H, L;
  bool gradient_rule;  // mnm-g; otherwise mnm-p
  bool tanh_act;       // tanh; otherwise sigmoid
  double eps;          // the write's energy epsilon (FastWeightMemory.eps)
  int64_t E() const { return 3 * H * D + D; }
};

// at::bmm_out into a view (a layer or a step of a larger buffer): the products x M^T that are
// left (mnm-g's error passes, on weights held transposed in the forward pass), which MKL does
// well (see row_products.h for the other forms).
inline void bmm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  at::bmm_out(out, a, b);
}

// Layer l of layer-major weights [L, B, D, D] whose matrices are each contiguous (the batch may
// be strided, or expanded: stride 0): its first matrix, and the distance between matrices.
template <typename T> struct Layers {
  T* data;
  int64_t layer_stride, batch_stride;
  explicit Layers(const at::Tensor& w)
      : data(w.data_ptr<T>()), layer_stride(w.stride(0)), batch_stride(w.stride(1)) {}
  T* operator[](int64_t l) const { return data + l * layer_stride; }
};

// The slow weights the memory step reads, for one call.
struct Weights {
  at::Tensor w_beta, b_beta, w_fb, b_fb, m_init;  // m_init [L, D, D]
  at::Tensor m_init_t;  // the forward pass's: m_init with each matrix transposed
  at::Tensor w_fb_t;    // the forward pass's (mnm-p): w_fb^T, packed for dense_products.h
  bool own_products = dense_products_on();  // read once per call, not once per product
};

// Every matrix of weights w [L, B, D, D] (each matrix contiguous, layer and batch strided),
// transposed into out [L, B, D, D] (contiguous).
template <typename T> void transpose_layers(const at::Tensor& w, const at::Tensor& out) {
  const Layers<T> in(w);
  const int64_t L = w.size(0), B = w.size(1), D = w.size(2);
  T* o = out.data_ptr<T>();
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < B; ++b)
      transpose_into(in[l] + b * in.batch_stride, o + (l * B + b) * D * D, D);
}

// One step's activations for the whole batch (recomputed in the backward pass), as pointers
// into tensors of this struct's own or, for what the backward pass keeps, into the caller's
// stores. The step loops reach every buffer by pointer arithmetic: a tensor per step and buffer
// (x[t], a select, or a copy_ through ATen, each a microsecond or more of dispatch and
// allocation) had made a training pass of 8 sequences 1.12x slower (benchmarks/kernel_pairs.py,
// docs/benchmark_runs/kernel_pairs_pointers_32.txt).
template <typename T> struct StepBuffers {
  at::Tensor owned;  // the storage of those of the buffers below that are its own
  T* khat;                        // [B, 2H, D] RMS-normalised keys (read heads first): zr^0
  T* kscale;                      // [B, 2H] their rsqrt factors
  T* values;                      // [B, H, D] write values
  T* beta;                        // [B]
  T* raw;                         // [B * H, L * D] mnm-p: BFPF outputs before the activation
  T* target;                      // [L, B, H, D] mnm-p's targets
  at::Tensor delta_tensor;        // [L, B, H, D] errors per layer (mnm-g's products take it)
  T* delta;
  T* energy;                      // [B, L]
  T* squares;  // [B] the sum of the post-write weights' squared entries (the write's)
  at::Tensor pre;  // [L, B, D, D] pre-write weights of a step where a sequence starts
  // What the backward pass keeps of a step. Buffers of their own in the rollout; in training
  // the caller points them at step t of its stores (write_acts[t], ...) before each step, so
  // the forward pass writes them in place and the backward pass reads them there, uncopied.
  T* z = nullptr;       // [L + 1, B, H, D] pre-write activations of the write keys, z^0..z^L
  T* scaled = nullptr;  // [L, B, H, D] delta * beta / energy, the write's left factors
  T* zr = nullptr;      // [L, B, 2H, D] post-write activations of every key, zr^1..zr^L

  StepBuffers(const Dims& d, const at::TensorOptions& o, bool own_kept)
      : delta_tensor(at::empty({d.L, d.B, d.H, d.D}, o)), pre(at::empty({d.L, d.B, d.D, d.D}, o)) {
    const int64_t B = d.B, H = d.H, D = d.D, L = d.L;
    // Sizes of the buffers of its own, carved out of one allocation in this order, each
    // starting on a 64-byte boundary.
    const int64_t sizes[] = {B * 2 * H * D, B * 2 * H, B * H * D, B, B * H * L * D,
                             L * B * H * D, B * L, B,
                             (L + 1) * B * H * D, L * B * H * D, L * B * 2 * H * D};
    T** into[] = {&khat, &kscale, &values, &beta, &raw, &target, &energy, &squares,
                  &z, &scaled, &zr};
    const int n = own_kept ? 11 : 8;
    constexpr int64_t align = 64 / sizeof(T);
    int64_t total = 0;
    for (int i = 0; i < n; ++i) total += (sizes[i] + align - 1) / align * align;
    owned = at::empty({total + align}, o);
    T* next = owned.data_ptr<T>();
    next += (align - reinterpret_cast<uintptr_t>(next) / sizeof(T) % align) % align;
    for (int i = 0; i < n; ++i) {
      *into[i] = next;
      next += (sizes[i] + align - 1) / align * align;
    }
    delta = delta_tensor.data_ptr<T>();
  }
};

// The memory's step for the whole batch: from e [B, E] (the interaction output) and the
// previous post-write weights prev [L, B, D, D], fill s and, with write, write the new weights
// into post and the sum of their squares into s.squares. With write (the forward pass) the
// weights are held transposed, each matrix as N = M^T (see mnm_forward), and the initial
// weights taken from w.m_init_t; without, as M. Without write (the backward pass's
// recomputation), post already holds them and is only read, and the passes through the layers
// are not recomputed: s.z and s.zr already hold what the forward pass computed, and s.raw
// (mnm-p) the BFPF's outputs. Returns the pre-write weights: prev, where some sequence starts
// (keep == 0) with the initial weights in its place: written into prev itself where
// prev_is_scratch (a buffer of the caller's whose old contents it no longer needs), else into
// s.pre, a copy of prev. Without answers (a rollout step, which uses only the read) the
// post-write pass takes the read keys alone past the first layer, and s.zr's rows of the write
// keys hold the first layer's answers only (see mnm_forward's `answers`).
template <typename T>
at::Tensor memory_forward(const Dims& d, const Weights& w, const T* e_p, const at::Tensor& prev,
                          bool prev_is_scratch, const T* keep, const at::Tensor& post, bool write,
                          bool answers, StepBuffers<T>& s) {
  const int64_t B = d.B, D = d.D, H = d.H, L = d.L, HD = H * D, E = d.E(), DD = D * D;
  const int64_t J = 2 * H;
  at::Tensor pre = prev;
  if (std::find(keep, keep + B, T(0)) != keep + B) {
    // Some sequence starts: its pre-write weights are the initial ones. Where prev may not be
    // written, the step's pre-write weights are put together in s.pre matrix by matrix (prev is
    // often a strided view, the start weights [B, L, D, D] as [L, B, D, D], whose copy by ATen
    // took about 330 us at 16 x 3 matrices).
    const T* init = (write ? w.m_init_t : w.m_init).data_ptr<T>();
    const Layers<T> from(prev);
    if (!prev_is_scratch) pre = s.pre;
    const Layers<T> target(pre);
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < B; ++b) {
        T* out = target[l] + b * target.batch_stride;
        if (keep[b] == T(0))
          std::copy(init + l * DD, init + (l + 1) * DD, out);
        else if (!prev_is_scratch)  // s.pre: the sequence's own weights go in as well
          std::copy(from[l] + b * from.batch_stride, from[l] + b * from.batch_stride + DD, out);
      }
  }
  const Layers<T> pre_l(pre);
  // beta, the keys, the values.
  const T* w_beta = w.w_beta.data_ptr<T>();
  const T b_beta = *w.b_beta.data_ptr<T>();
  T* khat = s.khat;
  T* kscale = s.kscale;
  T* values = s.values;
  T* beta = s.beta;
  T* z = s.z;
  for (int64_t b = 0; b < B; ++b) {
    const T* eb = e_p + b * E;
    beta[b] = sigmoid(dot(w_beta, eb + 3 * HD, D) + b_beta);
    for (int64_t j = 0; j < J; ++j) {
      const T* k = eb + j * D;
      const T scale = T(1) / std::sqrt(dot(k, k, D) / T(D) + T(1e-6));
      kscale[b * J + j] = scale;
      for (int64_t i = 0; i < D; ++i) khat[(b * J + j) * D + i] = k[i] * scale;
    }
    if (write) std::copy(khat + (b * J + H) * D, khat + (b + 1) * J * D, z + b * HD);
    std::copy(eb + 2 * HD, eb + 3 * HD, values + b * HD);
  }
  // Pre-write pass of the write keys: z^{l+1} = act(M^l z^l), rows z M^T = z N, one
  // rows_times per layer. The first layer takes every key, P = khat M^T [B, 2H, D] in zr^1's
  // buffer: its write-key rows are z^1 before the activation, and the post-write pass's first
  // layer is P corrected for the write (below), with no product of its own.
  if (write) {
    T* P = s.zr;
    rows_times(khat, pre_l[0], pre_l.batch_stride, P, B, J, D, false);
    for (int64_t b = 0; b < B; ++b)
      std::copy(P + (b * J + H) * D, P + (b + 1) * J * D, z + (B + b) * HD);
    if (L > 1) apply_act(d.tanh_act, z + B * HD, B * HD);
    for (int64_t l = 1; l < L; ++l) {
      rows_times(z + l * B * HD, pre_l[l], pre_l.batch_stride, z + (l + 1) * B * HD, B, H, D,
                 false);
      if (l < L - 1) apply_act(d.tanh_act, z + (l + 1) * B * HD, B * HD);
    }
  }
  // Errors per layer.
  T* delta = s.delta;
  if (!d.gradient_rule) {
    if (write)
      biased_product_raw<T>(s.raw, w.b_fb.data_ptr<T>(), 0, values, w.w_fb_t.data_ptr<T>(),
                            B * H, D, L * D, w.own_products);
    const T* raw = s.raw;
    T* target = s.target;
    for (int64_t l = 0; l < L; ++l)
      for (int64_t bh = 0; bh < B * H; ++bh) {
        // Row by row, the activation's branch outside the loops, so that they vectorise.
        const int64_t x = (l * B * H + bh) * D;
        std::copy(raw + bh * L * D + l * D, raw + bh * L * D + (l + 1) * D, target + x);
        if (l < L - 1) apply_act(d.tanh_act, target + x, D);
        const T* zl = z + (l + 1) * B * HD + bh * D;
        for (int64_t i = 0; i < D; ++i) delta[x + i] = zl[i] - target[x + i];
      }
  } else {
    for (int64_t x = 0; x < B * HD; ++x) delta[(L - 1) * B * HD + x] = z[L * B * HD + x] - values[x];
    for (int64_t l = L - 2; l >= 0; --l) {
      // rows (M^T delta)^T = delta M, which is delta N^T where the weights are transposed
      if (write)
        bmm_into(s.delta_tensor[l], s.delta_tensor[l + 1], pre[l + 1].transpose(1, 2));
      else
        rows_times(delta + (l + 1) * B * HD, pre_l[l + 1], pre_l.batch_stride,
                   delta + l * B * HD, B, H, D, false);
      for (int64_t x = 0; x < B * HD; ++x)
        delta[l * B * HD + x] *= act_grad(d.tanh_act, z[(l + 1) * B * HD + x]);
    }
  }
  // The write: M' = M - beta / energy * sum_h delta_h z_h^T, a rank-H update per layer; on the
  // transposed weights N' = N - sum_h z_h (scaled_h)^T, the same update with the factors swapped.
  T* energy = s.energy;
  T* scaled = write ? s.scaled : nullptr;
  T* squares = s.squares;
  if (write) std::fill(squares, squares + B, T(0));
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t b = 0; b < B; ++b) {
      const T* zin = z + (l * B + b) * HD;
      energy[b * L + l] = T(d.eps) + dot(zin, zin, HD);
      if (!write) continue;
      const T step = beta[b] / energy[b * L + l];
      for (int64_t x = 0; x < HD; ++x)
        scaled[(l * B + b) * HD + x] = step * delta[(l * B + b) * HD + x];
    }
    if (write)
      rank_update(pre_l[l], pre_l.batch_stride, z + l * B * HD, scaled + l * B * HD, T(-1),
                  post.data_ptr<T>() + l * post.stride(0), DD, B, H, D, squares);
  }
  // Post-write pass of every key: zr^{l+1} = act(M'^l zr^l) from zr^0 = khat. In the first
  // layer M' = M - scaled^T z^0, so khat M'^T = P - (khat z^0^T) scaled: per key j, P_j minus
  // sum_h (khat_j . z^0_h) scaled_h, a few dot products instead of a pass over the weights.
  if (write) {
    T* zr1 = s.zr;
    const int64_t post_keys = answers ? J : H;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < post_keys; ++j) {
        const T* kj = khat + (b * J + j) * D;
        T* out = zr1 + (b * J + j) * D;
        for (int64_t h = 0; h < H; ++h) {
          const T c = dot(kj, z + b * HD + h * D, D);
          const T* sc = scaled + b * HD + h * D;
          for (int64_t i = 0; i < D; ++i) out[i] -= c * sc[i];
        }
      }
    T* zr = s.zr;  // [L, B, 2H, D]
    for (int64_t l = 0; l < L; ++l) {
      if (answers) {
        if (l > 0)  // rows zr M'^T = zr N'
          rows_times(zr + (l - 1) * B * J * D, post.data_ptr<T>() + l * post.stride(0), DD,
                     zr + l * B * J * D, B, J, D, false);
        if (l < L - 1) apply_act(d.tanh_act, zr + l * B * J * D, B * J * D);
        continue;
      }
      // The read keys only, the first H of each sequence's 2H rows: each row's sums are the
      // same as in the pass of every key (rows_times sums each row on its own).
      for (int64_t b = 0; b < B; ++b) {
        T* rows = zr + (l * B + b) * J * D;
        if (l > 0)
          matrix_times(rows - B * J * D, post.data_ptr<T>() + l * post.stride(0) + b * DD, rows,
                       H, D, D, false);
        if (l < L - 1) apply_act(d.tanh_act, rows, HD);
      }
    }
  }
  return pre;
}

// How many sequences' episodes end before a step t >= 1 (keep [T, B] is 0 at t): the forward
// pass keeps those sequences' weights for the backward pass, in step order, then batch order.
int64_t ended_count(const at::Tensor& keep) {
  return keep.size(0) < 2 ? 0 : keep.narrow(0, 1, keep.size(0) - 1).eq(0).sum().item<int64_t>();
}

// An absent gradient (an output the loss does not use) arrives as an empty tensor.
inline bool present(const at::Tensor& g) { return g.defined() && g.numel() > 0; }

// Step t of a [T, ...] tensor whose steps are each contiguous, by pointer arithmetic instead of
// a select (see StepBuffers); nullptr for an empty tensor (an absent gradient, a store that is
// not kept).
template <typename T> inline T* step_at(const at::Tensor& x, int64_t t) {
  return present(x) ? x.data_ptr<T>() + t * x.stride(0) : nullptr;
}

// Whether each D x D matrix of fast weights [B, L, D, D] is contiguous (the batch and layers
// may be strided), or contiguous as its transpose (what mnm_forward returns).
inline bool stored_as_is(const at::Tensor& w) {
  return w.stride(3) == 1 && w.stride(2) == w.size(3);
}
inline bool stored_transposed(const at::Tensor& w) {
  return w.stride(2) == 1 && w.stride(3) == w.size(2);
}

// Whether each step x[t] of a [T, ...] tensor is contiguous, as step_at needs (the steps
// themselves may lie any distance apart: a part's rows of a whole batch, x.narrow(1, b0, n)).
inline bool steps_contiguous(const at::Tensor& x) {
  int64_t expected = 1;
  for (int64_t dim = x.dim() - 1; dim >= 1; --dim) {
    if (x.size(dim) != 1 && x.stride(dim) != expected) return false;
    expected *= x.size(dim);
  }
  return true;
}

// x as it lies where its steps are each contiguous, else a contiguous copy.
inline at::Tensor with_contiguous_steps(const at::Tensor& x) {
  return steps_contiguous(x) ? x : x.contiguous();
}

// Where a part of a split batch (mnm_forward_parts) writes its outputs: its rows of the whole
// batch's [T, B, ...] tensors (views whose steps are each contiguous), of the final c [B, ...],
// and of the two layer-major buffers [L, B, D, D] the post-write weights take turns in (each
// part's matrices D x D apart, the layers B matrices apart), so that nothing needs joining.
struct StepOutputs {
  at::Tensor hs, reads, after, before, values, beta, fw_norm, c, post0, post1;
};

// Where a part of a split batch (mnm_backward_parts) writes the gates' gradient and its running
// gradients (those of h, c and the read, and G, of the weights), which end as the start
// state's: its rows of the whole batch's.
struct GradientOutputs {
  at::Tensor g_gates, dh, dc, dr, G;
};

struct Checked {
  Dims dims;
  int64_t T;
};

Checked check(const at::Tensor& gates_x, const at::Tensor& m0, int64_t n_heads,
              bool gradient_rule, bool tanh_act, double eps) {
  TORCH_CHECK(gates_x.dim() == 3, "gates_x must be [T, B, 4 * hidden]");
  TORCH_CHECK(m0.dim() == 4, "fast weights must be [B, L, D, D]");
  TORCH_CHECK(stored_as_is(m0) || stored_transposed(m0),
              "each fast-weight matrix must be contiguous, or contiguous transposed");
  TORCH_CHECK(gates_x.device().is_cpu(), "the fused MNM kernel runs on the CPU only");
  Dims d{gates_x.size(1), gates_x.size(2) / 4, m0.size(2), n_heads, m0.size(1),
         gradient_rule, tanh_act, eps};
  return {d, gates_x.size(0)};
}

}  // namespace

// Forward over a sequence; the weights ping-pong in two buffers. With store=true it keeps what
// the backward pass needs: the step inputs, the activations of the passes through the layers,
// the writes' factors and the weights of sequences whose episodes end. Returns [hs, reads,
// after, before, values, beta, fw_norm, c_final, weights_final, last_post, u_in, c_in,
// write_acts, write_scaled, read_acts, ended, gates, e, raw]; last_post the final weights
// layer-major [L, B, D, D], each matrix transposed (N = M^T), weights_final a [B, L, D, D]
// view of it whose values are M, u_in [T, B, hidden + D] the controller's recurrent inputs
// [h ; read] after the resets, write_acts [T, L + 1, B, H, D] (z^0..z^L), write_scaled
// [T, L, B, H, D], read_acts [T, L, B, 2H, D] (zr^1..zr^L), ended [n, L, D, D], gates
// [T, B, 4 * hidden] the controller's gates before their activations, e [T, B, E] the
// interaction's output (after its tanh), raw [T, B * H, L * D] mnm-p's BFPF outputs before
// their activations (mnm-g: an empty tensor). Without store, everything after weights_final
// but last_post is one empty tensor. Without answers (a rollout step's call: only the read,
// the new state and the final weights are used) `after` is [T, B, 0, D] and the post-write pass
// skips the write keys past its first layer, about a tenth of the step's arithmetic at 4 heads
// x 3 layers; the other outputs are the same, bit for bit. store needs answers.
namespace {

// mnm_forward, writing its outputs (the per-step ones, the final c and the post-write weights'
// buffers) into `into` where given, else into tensors of its own.
std::vector<at::Tensor> forward_into(const at::Tensor& gates_x, const at::Tensor& keep,
                                     const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& r0, const at::Tensor& m0,
                                     const at::Tensor& w_rec, const at::Tensor& w_int,
                                     const at::Tensor& b_int, const at::Tensor& w_beta,
                                     const at::Tensor& b_beta, const at::Tensor& w_fb,
                                     const at::Tensor& b_fb, const at::Tensor& m_init,
                                     int64_t n_heads, bool gradient_rule, bool tanh_act,
                                     double eps, bool store, bool answers,
                                     const StepOutputs* into) {
  auto [d, T] = check(gates_x, m0, n_heads, gradient_rule, tanh_act, eps);
  TORCH_CHECK(answers || !store, "mnm_forward: the backward pass (store) needs the answers");
  const int64_t B = d.B, Hd = d.hidden, D = d.D, H = d.H, L = d.L, HD = H * D, E = d.E();
  const int64_t DD = D * D;
  TORCH_CHECK(b_int.dim() == 1 || (b_int.dim() == 3 && b_int.size(0) == T && b_int.size(1) == B),
              "b_int must be [E] or [T, B, E]");
  auto opts = gates_x.options();
  const auto output = [&](const at::Tensor StepOutputs::*field, at::IntArrayRef sizes) {
    return into != nullptr ? into->*field : at::empty(sizes, opts);
  };
  auto hs = output(&StepOutputs::hs, {T, B, Hd});
  auto reads = output(&StepOutputs::reads, {T, B, D});
  auto after = output(&StepOutputs::after, {T, B, answers ? H : 0, D});
  auto before = output(&StepOutputs::before, {T, B, H, D});
  auto values = output(&StepOutputs::values, {T, B, H, D});
  auto beta = output(&StepOutputs::beta, {T, B});
  auto fw_norm = output(&StepOutputs::fw_norm, {T, B});
  at::Tensor c_state = into != nullptr ? into->c.copy_(c0) : c0.clone();
  // The post-write weights ping-pong between two buffers, each its own allocation, so that
  // what the backward pass keeps of them (the last step's) holds only one.
  const at::Tensor post[2] = {
      into != nullptr ? into->post0 : at::empty({L, B, D, D}, opts),
      T > 1 ? (into != nullptr ? into->post1 : at::empty({L, B, D, D}, opts)) : at::Tensor()};
  // What is only kept for the backward pass is one empty tensor without it (the rollout).
  const auto none = at::empty({0}, opts);
  auto u_in = store ? at::empty({T, B, Hd + D}, opts) : none;
  auto c_in = store ? at::empty({T, B, Hd}, opts) : none;
  // The passes' activations (the write keys' before the write, every key's after it), the
  // writes' factors (M' = M - scaled^T z per layer) and the weights of every sequence whose
  // episode ends before a step t >= 1: from them and the final weights the backward pass
  // undoes the writes step by step (see mnm_backward), without recomputing the passes.
  auto write_acts = store ? at::empty({T, L + 1, B, H, D}, opts) : none;
  auto write_scaled = store ? at::empty({T, L, B, H, D}, opts) : none;
  auto read_acts = store ? at::empty({T, L, B, 2 * H, D}, opts) : none;
  auto ended = store ? at::empty({ended_count(keep), L, D, D}, opts) : none;
  // The controller's gates, the interaction's output and mnm-p's BFPF outputs of every step,
  // kept as the forward pass computes them (1.9 MB for 16 sequences of 16 steps at 4 heads x 3
  // layers): recomputing them in the backward pass, one product each for all steps, took about
  // as long as the rest of its products with the slow weights.
  auto gates_kept = store ? at::empty({T, B, 4 * Hd}, opts) : none;
  auto e_kept = store ? at::empty({T, B, E}, opts) : none;
  auto raw_kept = store && !gradient_rule ? at::empty({T, B * H, L * D}, opts) : none;
  const auto u_scratch = store ? none : at::empty({B, Hd + D}, opts);
  const auto gates_scratch = store ? none : at::empty({B, 4 * Hd}, opts);
  const auto e_scratch = store ? none : at::empty({B, E}, opts);
  // The slow weights transposed and packed once, for every step's products (dense_products.h);
  // without a backward pass to come (a rollout step: one call per step) kept between calls.
  const auto pack = [store](const at::Tensor& w) {
    return store ? packed_transpose(w) : cached_packed_transpose(w);
  };
  const auto w_rec_t = pack(w_rec);
  const auto w_int_t = pack(w_int);
  // The forward pass holds every fast-weight matrix transposed, N = M^T, so that the passes
  // through the layers, x M^T, are x N: the hand-written form of row_products.h, where MKL's
  // bmm for x M^T spent about as long packing each small matrix as multiplying with it. The
  // write's rank-H update keeps its form (its factors swap), and the final weights go back as
  // a view whose values are M (each matrix stored transposed), which the next call, a rollout
  // step's, takes back without a copy. Start weights stored as M are transposed once per call
  // into a buffer of this call's own ([L, B, D, D], layer-major), as are the initial weights.
  const bool start_transposed = stored_transposed(m0);
  const at::Tensor start =
      start_transposed ? m0.permute({1, 0, 3, 2}) : at::empty({L, B, D, D}, opts);
  const at::Tensor m_init_c = m_init.contiguous(), m_init_t = at::empty_like(m_init_c);
  const bool per_step_int = b_int.dim() == 3;
  const Weights weights{w_beta, b_beta, w_fb, b_fb.contiguous(), m_init, m_init_t,
                        gradient_rule ? at::Tensor() : pack(w_fb)};
  // The step's operands as raw pointers: see StepBuffers. Each step contiguous (a part's rows
  // of a whole batch need no copy).
  const at::Tensor gates_x_c = with_contiguous_steps(gates_x);
  const at::Tensor b_int_c = per_step_int ? with_contiguous_steps(b_int) : b_int.contiguous();

  AT_DISPATCH_FLOATING_TYPES(gates_x.scalar_type(), "mnm_forward", [&] {
    using T_ = scalar_t;
    const BelowAutograd below_autograd;
    StepBuffers<T_> s(d, opts, !store);
    const bool own = weights.own_products;
    if (!start_transposed) transpose_layers<T_>(m0.transpose(0, 1), start);
    const T_* keep_p = keep.data_ptr<T_>();
    // The initial weights transposed, for sequences that start in this call: in a rollout step
    // (one call per step) most calls have none.
    if (std::find(keep_p, keep_p + T * B, T_(0)) != keep_p + T * B)
      for (int64_t l = 0; l < L; ++l)  // in registers: ATen's copy of a transposed view is slower
        transpose_into(m_init_c.data_ptr<T_>() + l * DD, m_init_t.data_ptr<T_>() + l * DD, D);
    int64_t n_ended = 0;
    const T_ norm_scale = T_(1) / std::sqrt(T_(L * D));
    for (int64_t t = 0; t < T; ++t) {
      const T_* h_prev = t == 0 ? h0.data_ptr<T_>() : step_at<T_>(hs, t - 1);
      const T_* r_prev = t == 0 ? r0.data_ptr<T_>() : step_at<T_>(reads, t - 1);
      T_* c_p = c_state.data_ptr<T_>();
      // Reset, then [h ; read] for the controller, straight into what the backward pass keeps.
      T_* u_p = store ? step_at<T_>(u_in, t) : u_scratch.data_ptr<T_>();
      for (int64_t b = 0; b < B; ++b) {
        const bool k = keep_p[t * B + b] != T_(0);
        for (int64_t i = 0; i < Hd; ++i) u_p[b * (Hd + D) + i] = k ? h_prev[b * Hd + i] : T_(0);
        for (int64_t i = 0; i < D; ++i) u_p[b * (Hd + D) + Hd + i] = k ? r_prev[b * D + i] : T_(0);
        if (!k) std::fill(c_p + b * Hd, c_p + (b + 1) * Hd, T_(0));
      }
      if (store) std::copy(c_p, c_p + B * Hd, step_at<T_>(c_in, t));
      T_* g = store ? step_at<T_>(gates_kept, t) : gates_scratch.data_ptr<T_>();
      biased_product_raw<T_>(g, step_at<T_>(gates_x_c, t), 4 * Hd, u_p, w_rec_t.data_ptr<T_>(), B,
                             Hd + D, 4 * Hd, own);
      T_* h_p = step_at<T_>(hs, t);
      for (int64_t b = 0; b < B; ++b)
        lstm_cell_from_gates(g + b * 4 * Hd, c_p + b * Hd, h_p + b * Hd, Hd);
      T_* e = store ? step_at<T_>(e_kept, t) : e_scratch.data_ptr<T_>();
      if (per_step_int)
        biased_product_raw<T_>(e, step_at<T_>(b_int_c, t), E, h_p, w_int_t.data_ptr<T_>(), B, Hd, E,
                               own);
      else
        biased_product_raw<T_>(e, b_int_c.data_ptr<T_>(), 0, h_p, w_int_t.data_ptr<T_>(), B, Hd,
                               E, own);
      // The interaction's tanh with the kernel's own vectorised tanh_ (elementwise.h): ATen's
      // e.tanh_() took about 45 us for [16, 832], 3% of a training pass at 4 heads x 3 layers.
      apply_act(true, e, B * E);
      const at::Tensor prev = t == 0 ? start : post[(t - 1) % 2];
      const at::Tensor post_t = post[t % 2];
      if (store && t > 0) {  // kept as M, the form the backward pass works in
        const T_* prev_p = prev.data_ptr<T_>();
        for (int64_t b = 0; b < B; ++b)
          if (keep_p[t * B + b] == T_(0)) {
            T_* out = ended.data_ptr<T_>() + n_ended++ * L * DD;
            for (int64_t l = 0; l < L; ++l)
              transpose_into(prev_p + l * prev.stride(0) + b * prev.stride(1), out + l * DD, D);
          }
      }
      if (store) {  // the step's activations straight into what the backward pass keeps
        s.z = step_at<T_>(write_acts, t);
        s.scaled = step_at<T_>(write_scaled, t);
        s.zr = step_at<T_>(read_acts, t);
        if (!gradient_rule) s.raw = step_at<T_>(raw_kept, t);
      }
      // prev is scratch after step 0 (the ended sequences' weights are copied out above), and
      // at step 0 where it is this call's own copy of the start weights
      memory_forward<T_>(d, weights, e, prev, t > 0 || !start_transposed, keep_p + t * B, post_t,
                         true, answers, s);
      // Outputs.
      const T_* zr_out = s.zr + (L - 1) * B * 2 * HD;  // [B, 2H, D]
      T_* read_p = step_at<T_>(reads, t);
      T_* after_p = step_at<T_>(after, t);
      T_* norm_p = step_at<T_>(fw_norm, t);
      const T_* squares = s.squares;
      for (int64_t b = 0; b < B; ++b) {
        const T_* ans = zr_out + b * 2 * HD;
        for (int64_t i = 0; i < D; ++i) {
          T_ acc = 0;
          for (int64_t j = 0; j < H; ++j) acc += ans[j * D + i];
          read_p[b * D + i] = acc / T_(H);
        }
        if (answers) std::copy(ans + HD, ans + 2 * HD, after_p + b * HD);
        norm_p[b] = std::sqrt(squares[b]) * norm_scale;
      }
      std::copy(s.z + L * B * HD, s.z + (L + 1) * B * HD, step_at<T_>(before, t));
      std::copy(s.values, s.values + B * HD, step_at<T_>(values, t));
      std::copy(s.beta, s.beta + B, step_at<T_>(beta, t));
    }
  });
  const auto last_post = post[(T - 1) % 2];
  // [B, L, D, D], M, as a view of the layer-major buffer of N's, not a copy: the next call (the
  // rollout's every step) takes it back as it is.
  auto final_weights = last_post.permute({1, 0, 3, 2});
  return {hs, reads, after, before, values, beta, fw_norm, c_state, final_weights,
          last_post, u_in, c_in, write_acts, write_scaled, read_acts, ended,
          gates_kept, e_kept, raw_kept};
}

}  // namespace

std::vector<at::Tensor> mnm_forward(const at::Tensor& gates_x, const at::Tensor& keep,
                                    const at::Tensor& h0, const at::Tensor& c0,
                                    const at::Tensor& r0, const at::Tensor& m0,
                                    const at::Tensor& w_rec, const at::Tensor& w_int,
                                    const at::Tensor& b_int, const at::Tensor& w_beta,
                                    const at::Tensor& b_beta, const at::Tensor& w_fb,
                                    const at::Tensor& b_fb, const at::Tensor& m_init,
                                    int64_t n_heads, bool gradient_rule, bool tanh_act,
                                    double eps, bool store, bool answers) {
  return forward_into(gates_x, keep, h0, c0, r0, m0, w_rec, w_int, b_int, w_beta, b_beta, w_fb,
                      b_fb, m_init, n_heads, gradient_rule, tanh_act, eps, store, answers,
                      nullptr);
}

// Backward over a sequence from the gradients of the forward's outputs (hs, reads, after,
// before, values, beta, the final c and the final weights; an empty tensor is zero), plus,
// where recon_scale is not zero, the gradient of recon_scale / 2 * sum((after - values)^2): a
// reconstruction loss's, recon_scale (after - values) added to after's gradient and taken from
// the values', from the activations the forward pass kept (so that the caller need not
// compute it: 2 w / after.numel() for w * mean((after - values)^2)). The gradients of hs and
// reads need only each row contiguous (rows any stride apart: the halves of [h ; read]'s).
// Returns the gradients of gates_x, h0, c0, r0, m0, w_rec, w_int, b_int, w_beta, b_beta, w_fb,
// b_fb and m_init. Of gates_x only the shape and type are read (the gates are the kept ones).
namespace {

// mnm_backward, writing the gates' gradient and the running gradients of h, c, the read and the
// weights (G) into `into` where given (a part's rows of the whole batch's), else into tensors of
// its own.
std::vector<at::Tensor> backward_into(
    const at::Tensor& g_hs, const at::Tensor& g_reads, const at::Tensor& g_after,
    const at::Tensor& g_before, const at::Tensor& g_values, const at::Tensor& g_beta,
    const at::Tensor& g_c_final, const at::Tensor& g_m_final, const at::Tensor& gates_x,
    const at::Tensor& keep, const at::Tensor& m0, const at::Tensor& last_post,
    const at::Tensor& u_in, const at::Tensor& c_in, const at::Tensor& write_acts,
    const at::Tensor& write_scaled, const at::Tensor& read_acts, const at::Tensor& ended,
    const at::Tensor& gates_all, const at::Tensor& e_all, const at::Tensor& raw_all,
    const at::Tensor& hs, const at::Tensor& w_rec, const at::Tensor& w_int,
    const at::Tensor& b_int, const at::Tensor& w_beta, const at::Tensor& b_beta,
    const at::Tensor& w_fb, const at::Tensor& b_fb, const at::Tensor& m_init, int64_t n_heads,
    bool gradient_rule, bool tanh_act, double eps, double recon_scale,
    const GradientOutputs* into) {
  auto [d, T] = check(gates_x, m0, n_heads, gradient_rule, tanh_act, eps);
  const int64_t B = d.B, Hd = d.hidden, D = d.D, H = d.H, L = d.L, E = d.E();
  const int64_t DD = D * D, HD = H * D, J = 2 * H;
  auto opts = gates_x.options();
  // = grad of gates_x
  auto g_gates = into != nullptr ? into->g_gates : at::empty({T, B, 4 * Hd}, opts);
  auto g_pre_e = at::empty({T, B, E}, opts);       // grad of W_int h + b_int
  // running grads into step t's inputs (each row contiguous)
  const auto zeroed = [&](const at::Tensor GradientOutputs::*field, at::IntArrayRef sizes) {
    return into != nullptr ? (into->*field).zero_() : at::zeros(sizes, opts);
  };
  auto dh = zeroed(&GradientOutputs::dh, {B, Hd});
  auto dc = present(g_c_final) ? (into != nullptr ? into->dc.copy_(g_c_final) : g_c_final.clone())
                               : zeroed(&GradientOutputs::dc, {B, Hd});
  auto dr = zeroed(&GradientOutputs::dr, {B, D});
  // Running grad of the weights, layer-major [L, B, D, D]: of the post-write weights of the
  // step being processed, then of its pre-write weights.
  // (each matrix contiguous, the batch's matrices one after another, the layers GL apart)
  at::Tensor G;
  if (into != nullptr)
    G = present(g_m_final) ? into->G.copy_(g_m_final.transpose(0, 1)) : into->G.zero_();
  else
    G = present(g_m_final) ? g_m_final.transpose(0, 1).contiguous()
                           : at::zeros({L, B, D, D}, opts);
  const int64_t GL = G.stride(0);
  auto g_w_beta = at::zeros_like(w_beta);
  auto g_m_init = at::zeros_like(m_init);
  // The post-write weights of the step being processed, and its pre-write weights (both
  // layer-major [L, B, D, D], as M); the pre-write weights become the previous step's
  // post-write ones. Two buffers of this call's own, taking turns; the first holds the forward
  // pass's last weights, which it kept transposed (and which a second backward pass reads
  // again), transposed back.
  at::Tensor post_w = at::empty_like(last_post);
  at::Tensor pre_w = at::empty_like(last_post);
  auto g_raw = at::empty({gradient_rule ? 0 : T, B * H, L * D}, opts);  // mnm-p BFPF outputs
  auto dh_total = at::empty({B, Hd}, opts);
  auto dzr = at::empty({L + 1, B, J, D}, opts);
  auto dz = at::empty({L + 1, B, H, D}, opts);
  auto ddelta = at::empty({L, B, H, D}, opts);
  auto da = at::empty({B, J, D}, opts);
  auto da_w = at::empty({B, H, D}, opts);
  auto gw = at::empty({B, H, D}, opts);
  auto gq = at::empty({B, H, D}, opts);
  auto dv = at::empty({B * H, D}, opts);
  auto du = at::empty({B, Hd + D}, opts);  // grad of [h ; read], the controller's input
  // The per-step products with the slow weights, g W (the grad of x W^T), are rows_times' form
  // on W as it lies: the hand-written loops, where MKL packed W (up to E x hidden) every step.
  const at::Tensor w_rec_c = w_rec.contiguous(), w_int_c = w_int.contiguous();
  const at::Tensor w_fb_c = w_fb.contiguous();
  // [L, B, D, D], each matrix as M (start weights that came stored transposed, copied)
  auto m0_layers = (stored_as_is(m0) ? m0 : m0.contiguous()).transpose(0, 1);
  const bool per_step_int = b_int.dim() == 3;
  const Weights weights{w_beta, b_beta, w_fb, b_fb, m_init, at::Tensor(), at::Tensor()};
  // The outputs' gradients, each step's contiguous for the step loop's pointers; those of hs
  // and reads only each row (the halves of the output layer's input gradient, [h ; read], as
  // they lie), read a row stride apart.
  const auto grads = [](const at::Tensor& g) { return present(g) ? with_contiguous_steps(g) : g; };
  const auto row_grads = [](const at::Tensor& g) {
    return !present(g) || (g.dim() == 3 && g.stride(2) == 1) ? g : g.contiguous();
  };
  const at::Tensor g_hs_c = row_grads(g_hs), g_reads_c = row_grads(g_reads),
                   g_after_c = grads(g_after), g_before_c = grads(g_before),
                   g_values_c = grads(g_values), g_beta_c = grads(g_beta);
  const int64_t g_hs_row = present(g_hs_c) ? g_hs_c.stride(1) : 0;
  const int64_t g_reads_row = present(g_reads_c) ? g_reads_c.stride(1) : 0;
  double g_b_beta_value = 0;
  const bool kept_mnm_p = raw_all.dim() == 3 && raw_all.size(0) == T;
  TORCH_CHECK(gates_all.dim() == 3 && gates_all.size(0) == T && e_all.dim() == 3 &&
                  e_all.size(0) == T && (gradient_rule || kept_mnm_p),
              "the backward pass needs the gates, interaction and BFPF outputs the forward "
              "pass kept");
  at::Tensor values_all;  // mnm-p: [T * B * H, D]
  const auto u_all = u_in.view({T * B, Hd + D});

  AT_DISPATCH_FLOATING_TYPES(gates_x.scalar_type(), "mnm_backward", [&] {
    using T_ = scalar_t;
    const BelowAutograd below_autograd;
    StepBuffers<T_> s(d, opts, false);
    std::vector<T_> g_transposed(DD);  // rows_times_transposed's scratch
    std::vector<T_> cell_scratch(5 * Hd);  // lstm_cell_backward_row's
    transpose_layers<T_>(last_post, post_w);
    const T_* keep_p = keep.data_ptr<T_>();
    const T_* w_beta_p = w_beta.data_ptr<T_>();
    T_* gw_beta = g_w_beta.data_ptr<T_>();
    T_* gm_init = g_m_init.data_ptr<T_>();
    T_* G_p = G.data_ptr<T_>();
    T_ gb_beta = 0;
    const T_ recon = static_cast<T_>(recon_scale);
    std::vector<T_> dbeta(B);  // per step: the grad of each sequence's beta
    // Where step t's kept weights start in `ended` (the forward pass's order: by step, then
    // by sequence, for steps t >= 1).
    std::vector<int64_t> ended_from(T + 1, 0);
    for (int64_t t = 1; t < T; ++t)
      ended_from[t + 1] =
          ended_from[t] + std::count(keep_p + t * B, keep_p + (t + 1) * B, T_(0));
    TORCH_CHECK(ended_from[T] == ended.size(0), "ended must hold the weights of every reset");
    // mnm-p: the write values of every step, for the BFPF's weight gradient
    if (!d.gradient_rule) values_all = e_all.narrow(2, 2 * HD, HD).reshape({T * B * H, D});
    for (int64_t t = T - 1; t >= 0; --t) {
      // Recompute step t's memory (its controller's outputs are the kept gates_all and e_all).
      const T_* e_p = step_at<T_>(e_all, t);
      const T_* g = step_at<T_>(gates_all, t);
      const T_* keep_t = keep_p + t * B;
      // The step's weights: post_t holds its post-write weights; its pre-write weights are the
      // start weights at t = 0, else the write undone, M = M' + scaled^T z per layer, from the
      // factors the forward pass kept (where a sequence starts, memory_forward puts the
      // initial weights in instead).
      const at::Tensor post_t = post_w;
      if (t > 0)
        for (int64_t l = 0; l < L; ++l)
          rank_update(post_t.data_ptr<T_>() + l * B * DD, DD,
                      write_scaled.data_ptr<T_>() + (t * L + l) * B * HD,
                      write_acts.data_ptr<T_>() + (t * (L + 1) + l) * B * HD, T_(1),
                      pre_w.data_ptr<T_>() + l * B * DD, DD, B, H, D);
      const at::Tensor prev = t == 0 ? m0_layers : pre_w;
      s.z = step_at<T_>(write_acts, t);  // the passes' activations as the forward pass kept them
      s.zr = step_at<T_>(read_acts, t);
      if (!d.gradient_rule) s.raw = step_at<T_>(raw_all, t);
      // pre_w is scratch: where a sequence starts, the kept weights replace it below
      const at::Tensor pre =
          memory_forward<T_>(d, weights, e_p, prev, t > 0, keep_t, post_t, false, true, s);
      const Layers<T_> pre_l(pre);
      const T_* z = s.z;
      // zr^l, the input of layer l of the post-write pass: the keys, then the kept activations.
      const T_* khat = s.khat;
      const T_* zr_kept = s.zr;
      auto zr = [&](int64_t l) { return l == 0 ? khat : zr_kept + (l - 1) * B * J * D; };
      const T_* delta = s.delta;
      const T_* beta = s.beta;
      const T_* energy = s.energy;
      const T_* gr = step_at<T_>(g_reads_c, t);
      const T_* ga = step_at<T_>(g_after_c, t);
      const T_* gbf = step_at<T_>(g_before_c, t);
      const T_* gv = step_at<T_>(g_values_c, t);
      const T_* gbeta = step_at<T_>(g_beta_c, t);
      const T_* dr_p = dr.data_ptr<T_>();
      T_* dzr_p = dzr.data_ptr<T_>();
      T_* dz_p = dz.data_ptr<T_>();
      T_* ddelta_p = ddelta.data_ptr<T_>();
      T_* da_p = da.data_ptr<T_>();
      T_* daw_p = da_w.data_ptr<T_>();
      T_* dv_p = dv.data_ptr<T_>();
      // The read of every key under the new weights; G collects the new weights' grad.
      // Row by row, the branches outside the loops: each read head gets the read's grad over
      // H, each answer its own (or none).
      for (int64_t b = 0; b < B; ++b) {
        T_* row = dzr_p + (L * B + b) * J * D;
        const T_* dr_b = dr_p + b * D;
        if (gr)
          for (int64_t i = 0; i < D; ++i) row[i] = (dr_b[i] + gr[b * g_reads_row + i]) / T_(H);
        else
          for (int64_t i = 0; i < D; ++i) row[i] = dr_b[i] / T_(H);
        for (int64_t j = 1; j < H; ++j) std::copy(row, row + D, row + j * D);
        T_* row_after = row + HD;
        if (ga)
          std::copy(ga + b * HD, ga + (b + 1) * HD, row_after);
        else
          std::fill(row_after, row_after + HD, T_(0));
        if (recon) {  // the reconstruction loss's, recon (after - values)
          const T_* after_b = zr(L) + b * J * D + HD;
          const T_* values_b = e_p + b * E + 2 * HD;
          for (int64_t x = 0; x < HD; ++x) row_after[x] += (after_b[x] - values_b[x]) * recon;
        }
      }
      for (int64_t l = L - 1; l >= 0; --l) {
        const T_* out = zr(l + 1);
        const T_* gout = dzr_p + (l + 1) * B * J * D;
        // the grad of the layer's pre-activation (the last layer has no activation)
        const T_* pre_grad = gout;
        if (l < L - 1) {
          times_act_grad(d.tanh_act, out, gout, da_p, B * J * D);
          pre_grad = da_p;
        }
        rank_update(G_p + l * GL, DD, pre_grad, zr(l), T_(1), G_p + l * GL, DD, B, J, D);
        // rows (M'^T da)^T
        rows_times(pre_grad, post_t.data_ptr<T_>() + l * B * DD, DD, dzr_p + l * B * J * D, B, J,
                   D, false);
      }
      // The write M' = M - beta / energy * sum_h delta_h z_h^T.
      std::fill(dz_p, dz_p + (L + 1) * B * HD, T_(0));
      if (gbf) std::copy(gbf, gbf + B * HD, dz_p + L * B * HD);
      for (int64_t b = 0; b < B; ++b) dbeta[b] = gbeta ? gbeta[b] : T_(0);
      for (int64_t l = 0; l < L; ++l) {
        // rows (G z_h)^T
        rows_times_transposed(z + l * B * HD, G_p + l * GL, DD, gw.data_ptr<T_>(), B, H, D,
                              g_transposed.data());
        // rows (G^T delta_h)^T
        rows_times(delta + l * B * HD, G_p + l * GL, DD, gq.data_ptr<T_>(), B, H, D, false);
        const T_* w_p = gw.data_ptr<T_>();
        const T_* q_p = gq.data_ptr<T_>();
        for (int64_t b = 0; b < B; ++b) {
          const T_ en = energy[b * L + l], step = beta[b] / en;
          const int64_t off = (l * B + b) * HD;
          const T_ dstep = -dot(delta + off, w_p + b * HD, HD);
          dbeta[b] += dstep / en;
          const T_ denergy = -dstep * beta[b] / (en * en);
          for (int64_t x = 0; x < HD; ++x) {
            ddelta_p[off + x] = -step * w_p[b * HD + x];
            dz_p[off + x] += T_(2) * denergy * z[off + x] - step * q_p[b * HD + x];
          }
        }
      }
      // From here on G is the grad of the pre-write weights: the identity path of the write,
      // plus the error and pre-write-pass paths below.
      if (!d.gradient_rule) {
        const T_* target = s.target;
        T_* graw = step_at<T_>(g_raw, t);
        for (int64_t l = 0; l < L; ++l)
          for (int64_t bh = 0; bh < B * H; ++bh) {  // row by row, as the targets were made
            const int64_t x = (l * B * H + bh) * D;
            const T_* dd = ddelta_p + x;
            const T_* tg = target + x;
            T_* dzl = dz_p + (l + 1) * B * HD + bh * D;
            T_* gr_row = graw + bh * L * D + l * D;
            for (int64_t i = 0; i < D; ++i) dzl[i] += dd[i];
            if (l < L - 1)
              times_act_grad(d.tanh_act, tg, dd, gr_row, D, T_(-1));  // -dd * act_grad(tg)
            else
              for (int64_t i = 0; i < D; ++i) gr_row[i] = -dd[i];
          }
        matrix_times(graw, w_fb_c.data_ptr<T_>(), dv_p, B * H, L * D, D, false);
      } else {
        for (int64_t l = 0; l < L - 1; ++l) {
          // rows (M^T delta^{l+1})^T
          rows_times(delta + (l + 1) * B * HD, pre_l[l + 1], pre_l.batch_stride,
                     gq.data_ptr<T_>(), B, H, D, false);
          const T_* q_p = gq.data_ptr<T_>();
          for (int64_t x = 0; x < B * HD; ++x) {
            const T_ dd = ddelta_p[l * B * HD + x];
            const T_ zl = z[(l + 1) * B * HD + x];
            daw_p[x] = dd * act_grad(d.tanh_act, zl);
            dz_p[(l + 1) * B * HD + x] += dd * q_p[x] * act_grad_grad(d.tanh_act, zl);
          }
          rank_update(G_p + (l + 1) * GL, DD, delta + (l + 1) * B * HD, daw_p, T_(1),
                      G_p + (l + 1) * GL, DD, B, H, D);
          ddelta[l + 1].baddbmm_(da_w, pre[l + 1].transpose(1, 2));  // rows (M dq)^T
        }
        for (int64_t x = 0; x < B * HD; ++x) {
          const T_ dd = ddelta_p[(L - 1) * B * HD + x];
          dz_p[L * B * HD + x] += dd;
          dv_p[x] = -dd;
        }
      }
      // The pre-write pass of the write keys.
      for (int64_t l = L - 1; l >= 0; --l) {
        const T_* out = z + (l + 1) * B * HD;
        const T_* gout = dz_p + (l + 1) * B * HD;
        const T_* pre_grad = gout;
        if (l < L - 1) {
          times_act_grad(d.tanh_act, out, gout, daw_p, B * HD);
          pre_grad = daw_p;
        }
        rank_update(G_p + l * GL, DD, pre_grad, z + l * B * HD, T_(1), G_p + l * GL, DD,
                    B, H, D);
        // rows (M^T da)^T
        rows_times(pre_grad, pre_l[l], pre_l.batch_stride, dz_p + l * B * HD, B, H, D, true);
      }
      // Into e = tanh(pre_e): keys through rms_norm, values, beta.
      const T_* kscale = s.kscale;
      T_* gpe = step_at<T_>(g_pre_e, t);
      for (int64_t b = 0; b < B; ++b) {
        const T_* eb = e_p + b * E;
        T_* ge = gpe + b * E;
        for (int64_t j = 0; j < J; ++j) {
          T_* dk = da_p + j * D;  // scratch: d khat_j
          for (int64_t i = 0; i < D; ++i)
            dk[i] = dzr_p[(b * J + j) * D + i] + (j >= H ? dz_p[(b * H + j - H) * D + i] : T_(0));
          const T_* kj = eb + j * D;
          const T_ r = kscale[b * J + j];
          const T_ proj = dot(dk, kj, D) * r * r * r / T_(D);
          for (int64_t i = 0; i < D; ++i) ge[j * D + i] = r * dk[i] - proj * kj[i];
        }
        for (int64_t x = 0; x < HD; ++x)
          ge[2 * HD + x] = dv_p[b * HD + x] + (gv ? gv[b * HD + x] : T_(0));
        if (recon) {  // and minus it for the values
          const T_* after_b = zr(L) + b * J * D + HD;
          for (int64_t x = 0; x < HD; ++x)
            ge[2 * HD + x] -= (after_b[x] - eb[2 * HD + x]) * recon;
        }
        const T_ dpre = dbeta[b] * beta[b] * (T_(1) - beta[b]);
        const T_* beta_in = eb + 3 * HD;
        gb_beta += dpre;
        for (int64_t i = 0; i < D; ++i) {
          gw_beta[i] += dpre * beta_in[i];
          ge[3 * HD + i] = dpre * w_beta_p[i];
        }
        for (int64_t i = 0; i < E; ++i) ge[i] *= T_(1) - eb[i] * eb[i];
      }
      // The controller: h gets the grad of hs[t], of the next step, and of the interaction.
      T_* dh_p = dh.data_ptr<T_>();
      T_* dht = dh_total.data_ptr<T_>();
      const T_* ghs = step_at<T_>(g_hs_c, t);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < Hd; ++i)
          dht[b * Hd + i] = ghs ? dh_p[b * Hd + i] + ghs[b * g_hs_row + i] : dh_p[b * Hd + i];
      matrix_times(gpe, w_int_c.data_ptr<T_>(), dht, B, E, Hd, true);
      const T_* ci = step_at<T_>(c_in, t);
      T_* dc_p = dc.data_ptr<T_>();
      T_* gg = step_at<T_>(g_gates, t);
      for (int64_t b = 0; b < B; ++b)
        lstm_cell_backward_row(g + b * 4 * Hd, ci + b * Hd, dht + b * Hd, dc_p + b * Hd,
                               gg + b * 4 * Hd, cell_scratch.data(), Hd);
      T_* du_p = du.data_ptr<T_>();
      matrix_times(gg, w_rec_c.data_ptr<T_>(), du_p, B, 4 * Hd, Hd + D, false);
      T_* drw_p = dr.data_ptr<T_>();
      for (int64_t b = 0; b < B; ++b) {  // [h ; read]'s grad into h's and read's
        std::copy(du_p + b * (Hd + D), du_p + b * (Hd + D) + Hd, dh_p + b * Hd);
        std::copy(du_p + b * (Hd + D) + Hd, du_p + (b + 1) * (Hd + D), drw_p + b * D);
      }
      // A sequence that starts at step t passes no gradient to the previous step's state; the
      // grad of its pre-write weights goes to the initial weights.
      for (int64_t b = 0; b < B; ++b)
        if (keep_t[b] == T_(0)) {
          std::fill(dh_p + b * Hd, dh_p + (b + 1) * Hd, T_(0));
          std::fill(dc_p + b * Hd, dc_p + (b + 1) * Hd, T_(0));
          std::fill(drw_p + b * D, drw_p + (b + 1) * D, T_(0));
          for (int64_t l = 0; l < L; ++l) {
            T_* gl = G_p + l * GL + b * DD;
            for (int64_t x = 0; x < DD; ++x) gm_init[l * DD + x] += gl[x];
            std::fill(gl, gl + DD, T_(0));
          }
        }
      // Step t - 1's post-write weights: the undone write, except for a sequence that starts at
      // step t, whose weights before the reset the forward pass kept.
      if (t > 0) {
        std::swap(post_w, pre_w);
        T_* w_p = post_w.data_ptr<T_>();
        int64_t k = ended_from[t];
        for (int64_t b = 0; b < B; ++b)
          if (keep_t[b] == T_(0)) {
            const T_* kept = ended.data_ptr<T_>() + k++ * L * DD;
            for (int64_t l = 0; l < L; ++l)
              std::copy(kept + l * DD, kept + (l + 1) * DD, w_p + (l * B + b) * DD);
          }
      }
    }
    g_b_beta_value = gb_beta;
  });
  auto g_b_beta = at::full_like(b_beta, g_b_beta_value);
  // The controller's and the BFPF's weight gradients, once over all steps.
  auto flat_gates = g_gates.reshape({T * B, 4 * Hd});
  auto flat_pre_e = g_pre_e.reshape({T * B, E});
  auto g_w_rec = product(flat_gates.t(), u_all);
  auto g_w_int = product(flat_pre_e.t(), hs.reshape({T * B, Hd}));
  auto g_b_int = per_step_int ? g_pre_e : flat_pre_e.sum(0);
  at::Tensor g_w_fb, g_b_fb;
  if (gradient_rule) {
    g_w_fb = at::zeros_like(w_fb);
    g_b_fb = at::zeros_like(b_fb);
  } else {
    auto flat_raw = g_raw.reshape({T * B * H, L * D});
    g_w_fb = product(flat_raw.t(), values_all);
    g_b_fb = flat_raw.sum(0);
  }
  auto g_m0 = G.transpose(0, 1);  // a view: not copied where the start weights need no grad
  return {g_gates, dh, dc, dr, g_m0, g_w_rec, g_w_int, g_b_int,
          g_w_beta, g_b_beta, g_w_fb, g_b_fb, g_m_init};
}

}  // namespace

std::vector<at::Tensor> mnm_backward(
    const at::Tensor& g_hs, const at::Tensor& g_reads, const at::Tensor& g_after,
    const at::Tensor& g_before, const at::Tensor& g_values, const at::Tensor& g_beta,
    const at::Tensor& g_c_final, const at::Tensor& g_m_final, const at::Tensor& gates_x,
    const at::Tensor& keep, const at::Tensor& m0, const at::Tensor& last_post,
    const at::Tensor& u_in, const at::Tensor& c_in, const at::Tensor& write_acts,
    const at::Tensor& write_scaled, const at::Tensor& read_acts, const at::Tensor& ended,
    const at::Tensor& gates_all, const at::Tensor& e_all, const at::Tensor& raw_all,
    const at::Tensor& hs, const at::Tensor& w_rec, const at::Tensor& w_int,
    const at::Tensor& b_int, const at::Tensor& w_beta, const at::Tensor& b_beta,
    const at::Tensor& w_fb, const at::Tensor& b_fb, const at::Tensor& m_init, int64_t n_heads,
    bool gradient_rule, bool tanh_act, double eps, double recon_scale) {
  return backward_into(g_hs, g_reads, g_after, g_before, g_values, g_beta, g_c_final, g_m_final,
                       gates_x, keep, m0, last_post, u_in, c_in, write_acts, write_scaled,
                       read_acts, ended, gates_all, e_all, raw_all, hs, w_rec, w_int, b_int,
                       w_beta, b_beta, w_fb, b_fb, m_init, n_heads, gradient_rule, tanh_act, eps,
                       recon_scale, nullptr);
}

// ----------------------------------------------------------------------------------------------
// The same over a batch split into parts, one per thread. The sequences of a batch are
// independent in the recurrence: only the slow weights' gradients sum over them. So each part
// runs mnm_forward / mnm_backward above on its own rows, in parallel, and writes its outputs
// straight into its rows of the whole batch's tensors: the per-step outputs and the gates'
// gradient (the step loops only need each step's rows contiguous, which a part's rows of a
// [T, B, ...] tensor are), the final c and the start state's gradients (rows of [B, ...]), the
// post-write weights and their gradient (layer-major [L, B, D, D]: a part's matrices, D x D
// apart, its layers B matrices apart). The per-step inputs are read where they lie. Only the
// weight gradients are summed after the parts. What the backward pass needs (every step's
// activations and inputs) stays per part. (Until the thirty-ninth session every output was
// joined after the parts, on the calling thread alone, and each part's rows of the inputs were
// copied: without that, mnm-p/k2's learn() 1.028x, docs/benchmarks.md.)

namespace {

// What mnm_forward returns for the backward pass, after its nine outputs.
constexpr int64_t kSavedPerPart = 10;

// Rows [b0, b1) of x along dim, contiguous (an empty tensor stays empty: an absent gradient).
at::Tensor rows(const at::Tensor& x, int64_t dim, int64_t b0, int64_t b1) {
  if (!present(x)) return x;
  return x.narrow(dim, b0, b1 - b0).contiguous();
}

// Rows [b0, b1) of x along dim where they lie (an empty tensor stays empty).
at::Tensor rows_view(const at::Tensor& x, int64_t dim, int64_t b0, int64_t b1) {
  return present(x) ? x.narrow(dim, b0, b1 - b0) : x;
}

// Output k of every part, concatenated along dim (a per-step interaction bias's gradient, which
// is per sequence).
at::Tensor join(const std::vector<std::vector<at::Tensor>>& outs, size_t k, int64_t dim) {
  std::vector<at::Tensor> xs;
  xs.reserve(outs.size());
  for (const auto& o : outs) xs.push_back(o[k]);
  return at::cat(xs, dim);
}

// Output k of every part, summed into the first part's (a tensor of the part's own, which
// nothing else holds).
at::Tensor total(const std::vector<std::vector<at::Tensor>>& outs, size_t k) {
  at::Tensor sum = outs[0][k];
  for (size_t i = 1; i < outs.size(); ++i) sum.add_(outs[i][k]);
  return sum;
}

}  // namespace

// mnm_forward over `parts` parts of the batch. Returns mnm_forward's first nine outputs for the
// whole batch, then, per part, what the backward pass takes: last_post, u_in, c_in,
// write_acts, write_scaled, read_acts, ended, gates, e, raw (kSavedPerPart * parts).
std::vector<at::Tensor> mnm_forward_parts(const at::Tensor& gates_x, const at::Tensor& keep,
                                          const at::Tensor& h0, const at::Tensor& c0,
                                          const at::Tensor& r0, const at::Tensor& m0,
                                          const at::Tensor& w_rec, const at::Tensor& w_int,
                                          const at::Tensor& b_int, const at::Tensor& w_beta,
                                          const at::Tensor& b_beta, const at::Tensor& w_fb,
                                          const at::Tensor& b_fb, const at::Tensor& m_init,
                                          int64_t n_heads, bool gradient_rule, bool tanh_act,
                                          double eps, bool store, bool answers,
                                          int64_t parts) {
  TORCH_CHECK(gates_x.dim() == 3 && m0.dim() == 4 && c0.dim() == 2,
              "gates_x must be [T, B, 4 * hidden], c0 [B, hidden], the fast weights [B, L, D, D]");
  const int64_t T = gates_x.size(0), B = gates_x.size(1), Hd = c0.size(1);
  const int64_t L = m0.size(1), D = m0.size(2), H = n_heads;
  TORCH_CHECK(parts >= 1 && parts <= B, "parts must be in [1, batch size]");
  const bool per_step_int = b_int.dim() == 3;
  const auto opts = gates_x.options();
  const StepOutputs whole{at::empty({T, B, Hd}, opts),
                          at::empty({T, B, D}, opts),
                          at::empty({T, B, answers ? H : 0, D}, opts),
                          at::empty({T, B, H, D}, opts),
                          at::empty({T, B, H, D}, opts),
                          at::empty({T, B}, opts),
                          at::empty({T, B}, opts),
                          at::empty({B, Hd}, opts),
                          at::empty({L, B, D, D}, opts),
                          T > 1 ? at::empty({L, B, D, D}, opts) : at::Tensor()};
  std::vector<std::vector<at::Tensor>> outs(parts);
  for_each_part(B, parts, [&](int64_t i, int64_t b0, int64_t b1) {
    // the part's rows of dim 1, the batch of [T, B, ...] and of layer-major [L, B, D, D]
    const auto batch_rows = [&](const at::Tensor& x) { return rows_view(x, 1, b0, b1); };
    const StepOutputs into{batch_rows(whole.hs),     batch_rows(whole.reads),
                           batch_rows(whole.after),  batch_rows(whole.before),
                           batch_rows(whole.values), batch_rows(whole.beta),
                           batch_rows(whole.fw_norm), rows_view(whole.c, 0, b0, b1),
                           batch_rows(whole.post0),  batch_rows(whole.post1)};
    outs[i] = forward_into(batch_rows(gates_x), rows(keep, 1, b0, b1), rows(h0, 0, b0, b1),
                           rows(c0, 0, b0, b1), rows(r0, 0, b0, b1), rows_view(m0, 0, b0, b1),
                           w_rec, w_int, per_step_int ? batch_rows(b_int) : b_int, w_beta, b_beta,
                           w_fb, b_fb, m_init, n_heads, gradient_rule, tanh_act, eps, store,
                           answers, &into);
  });
  // The final weights as mnm_forward gives them: a [B, L, D, D] view of the layer-major N's.
  const at::Tensor last_post = T > 1 && (T - 1) % 2 == 1 ? whole.post1 : whole.post0;
  std::vector<at::Tensor> result{whole.hs,     whole.reads, whole.after,   whole.before,
                                 whole.values, whole.beta,  whole.fw_norm, whole.c,
                                 last_post.permute({1, 0, 3, 2})};
  for (const auto& o : outs) result.insert(result.end(), o.begin() + 9, o.end());
  return result;
}

// mnm_backward over the parts of mnm_forward_parts. `saved` is what mnm_forward_parts returned
// after its first nine outputs (kSavedPerPart per part). Returns what mnm_backward returns, for
// the whole batch.
std::vector<at::Tensor> mnm_backward_parts(
    const at::Tensor& g_hs, const at::Tensor& g_reads, const at::Tensor& g_after,
    const at::Tensor& g_before, const at::Tensor& g_values, const at::Tensor& g_beta,
    const at::Tensor& g_c_final, const at::Tensor& g_m_final, const at::Tensor& gates_x,
    const at::Tensor& keep, const at::Tensor& m0, const std::vector<at::Tensor>& saved,
    const at::Tensor& hs, const at::Tensor& w_rec, const at::Tensor& w_int,
    const at::Tensor& b_int, const at::Tensor& w_beta, const at::Tensor& b_beta,
    const at::Tensor& w_fb, const at::Tensor& b_fb, const at::Tensor& m_init, int64_t n_heads,
    bool gradient_rule, bool tanh_act, double eps, double recon_scale) {
  TORCH_CHECK(gates_x.dim() == 3 && m0.dim() == 4,
              "gates_x must be [T, B, 4 * hidden] and the fast weights [B, L, D, D]");
  const int64_t B = gates_x.size(1), Hd = gates_x.size(2) / 4;
  const int64_t L = m0.size(1), D = m0.size(2);
  const int64_t parts = static_cast<int64_t>(saved.size()) / kSavedPerPart;
  TORCH_CHECK(parts >= 1 && static_cast<int64_t>(saved.size()) == kSavedPerPart * parts &&
                  parts <= B,
              "saved must hold what mnm_forward keeps for the backward pass, for every part");
  const bool per_step_int = b_int.dim() == 3;
  const auto opts = gates_x.options();
  const GradientOutputs whole{at::empty(gates_x.sizes(), opts), at::empty({B, Hd}, opts),
                              at::empty({B, Hd}, opts), at::empty({B, D}, opts),
                              at::empty({L, B, D, D}, opts)};
  std::vector<std::vector<at::Tensor>> outs(parts);
  for_each_part(B, parts, [&](int64_t i, int64_t b0, int64_t b1) {
    // the part's rows of dim 1, the batch of [T, B, ...] and of layer-major [L, B, D, D]
    const auto batch_rows = [&](const at::Tensor& x) { return rows_view(x, 1, b0, b1); };
    const GradientOutputs into{batch_rows(whole.g_gates), rows_view(whole.dh, 0, b0, b1),
                               rows_view(whole.dc, 0, b0, b1), rows_view(whole.dr, 0, b0, b1),
                               batch_rows(whole.G)};
    outs[i] = backward_into(
        batch_rows(g_hs), batch_rows(g_reads), batch_rows(g_after), batch_rows(g_before),
        batch_rows(g_values), batch_rows(g_beta), rows(g_c_final, 0, b0, b1),
        rows(g_m_final, 0, b0, b1),
        gates_x.narrow(1, b0, b1 - b0),  // only its shape and type are read: not copied
        rows(keep, 1, b0, b1), rows_view(m0, 0, b0, b1), saved[kSavedPerPart * i],
        saved[kSavedPerPart * i + 1], saved[kSavedPerPart * i + 2], saved[kSavedPerPart * i + 3],
        saved[kSavedPerPart * i + 4], saved[kSavedPerPart * i + 5], saved[kSavedPerPart * i + 6],
        saved[kSavedPerPart * i + 7], saved[kSavedPerPart * i + 8], saved[kSavedPerPart * i + 9],
        rows(hs, 1, b0, b1), w_rec, w_int, per_step_int ? rows(b_int, 1, b0, b1) : b_int, w_beta,
        b_beta, w_fb, b_fb, m_init, n_heads, gradient_rule, tanh_act, eps, recon_scale, &into);
  });
  // g_gates [T, B, ...]; dh, dc, dr, g_m0 [B, ...]; the weights' gradients summed, except a
  // per-step b_int's, which is per sequence.
  std::vector<at::Tensor> result{whole.g_gates, whole.dh, whole.dc, whole.dr,
                                 whole.G.transpose(0, 1)};
  for (size_t k = 5; k < 13; ++k)
    result.push_back(k == 7 && per_step_int ? join(outs, k, 1) : total(outs, k));
  return result;
}

}  // namespace mnm_rl
