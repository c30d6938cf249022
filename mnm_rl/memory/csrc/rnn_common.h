// What the baseline LSTM and GRU kernels (lstm_sequence.cpp, gru_sequence.cpp) share: their
// argument checks and the episode resets, which set a sequence's state to zero.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace mnm_rl {
namespace {

// Checks gates_x [T, B, gates * H] on the CPU, keep [T, B] and every state in `states` [B, H];
// returns H.
inline int64_t check_rnn_inputs(const at::Tensor& gates_x, const at::Tensor& keep,
                                std::initializer_list<at::Tensor> states, int64_t gates,
                                const char* name) {
  TORCH_CHECK(gates_x.dim() == 3 && gates_x.size(2) % gates == 0, name,
              ": gates_x must be [T, B, ", gates, " * H]");
  TORCH_CHECK(gates_x.device().is_cpu(), name, ": the fused kernel runs on the CPU only");
  const int64_t T = gates_x.size(0), B = gates_x.size(1), H = gates_x.size(2) / gates;
  TORCH_CHECK(keep.sizes() == at::IntArrayRef({T, B}), name, ": keep must be [T, B]");
  for (const auto& s : states)
    TORCH_CHECK(s.sizes() == at::IntArrayRef({B, H}), name, ": the start state must be [B, H]");
  return H;
}

// out [B, n] = the rows of in [B, n] whose keep[b] is nonzero, zero rows elsewhere (the state
// that enters a step where some episodes start). out may be in (rows are then only zeroed).
template <typename T>
inline void kept_rows(T* out, const T* in, const T* keep, int64_t B, int64_t n) {
  for (int64_t b = 0; b < B; ++b) {
    if (keep[b] == T(0))
      std::fill(out + b * n, out + (b + 1) * n, T(0));
    else if (out != in)
      std::copy(in + b * n, in + (b + 1) * n, out + b * n);
  }
}

// The loss's gradients of a kernel's outputs hs [T, B, H] as a pointer, or nullptr where the
// gradient is an empty tensor (zero). Made contiguous beforehand (rnn_kernels.py).
template <typename T>
inline const T* loss_grads(const at::Tensor& g_hs) {
  if (!g_hs.defined() || g_hs.numel() == 0) return nullptr;
  TORCH_CHECK(g_hs.is_contiguous(), "the sequence kernels take a contiguous gradient");
  return g_hs.data_ptr<T>();
}

// out [n] = the gradient of a step's outputs h (n values: some rows of the step): what the next
// step passed back (carried) plus the loss's own gradient of them, g (nullptr: none).
template <typename T>
inline void output_grad(T* out, const T* carried, const T* g, int64_t n) {
  if (g == nullptr) {
    std::copy(carried, carried + n, out);
    return;
  }
  for (int64_t x = 0; x < n; ++x) out[x] = carried[x] + g[x];
}

// The states that entered every step, keep[t] * h_{t-1} with h_{-1} = h0: [T, B, H].
inline at::Tensor entering_states(const at::Tensor& h0, const at::Tensor& hs,
                                  const at::Tensor& keep) {
  return at::cat({h0.unsqueeze(0), hs.narrow(0, 0, hs.size(0) - 1)}, 0) * keep.unsqueeze(-1);
}

}  // namespace
}  // namespace mnm_rl
