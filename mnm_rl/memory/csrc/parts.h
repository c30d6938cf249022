// A batch of independent sequences split into parts, one thread per part: what the MNM kernel
// (mnm_sequence.cpp) and the LSTM kernel (lstm_sequence.cpp) share to run a training batch on
// more than one core.
#pragma once

#include <torch/extension.h>

#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <vector>

namespace mnm_rl {
namespace {

// Row b of `parts` equal parts of [0, B): parts first get B / parts rows, the first B % parts
// one more.
inline int64_t part_start(int64_t B, int64_t parts, int64_t i) {
  return i * (B / parts) + std::min(i, B % parts);
}

// Run body(i, b0, b1) for every part, one OpenMP thread per part, each with the caller's
// thread-local state (no autograd, inference mode in the rollout). The thread count is the
// number of parts, whatever torch's intra-op setting (torch.set_num_threads), so the rest of
// the model can stay on one thread; inside the region ATen and BLAS run on the calling thread.
// An exception in a part is rethrown here, after the region. One part runs on the calling
// thread, without a parallel region. Bind a kernel that calls it with the GIL released
// (module.cpp): copying the caller's thread-local state may take the GIL.
template <typename F>
void for_each_part(int64_t B, int64_t parts, const F& body) {
  if (parts == 1) {
    body(0, 0, B);
    return;
  }
  const at::ThreadLocalState caller;
  std::vector<std::exception_ptr> errors(parts);
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int64_t i = 0; i < parts; ++i) {
    try {
      at::ThreadLocalStateGuard guard(caller);
      body(i, part_start(B, parts, i), part_start(B, parts, i + 1));
    } catch (...) {
      errors[i] = std::current_exception();
    }
  }
  for (const auto& error : errors)
    if (error) std::rethrow_exception(error);
}

}  // namespace
}  // namespace mnm_rl
