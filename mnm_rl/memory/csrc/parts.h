// Work split into parts, one thread per part: a batch of independent sequences (the MNM kernel,
// mnm_sequence.cpp, and the LSTM kernel, lstm_sequence.cpp), the rows of a product (the LSTM's
// weight gradient, the input projections of linear.cpp), two independent pieces (the actor and
// critic heads, agent/csrc/action_heads.cpp): what runs a training batch on more than one core.
#pragma once

#include <torch/extension.h>

#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <vector>

#include "dense_products.h"

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

// first() and second() on a thread each (parallel), or one after the other on this thread.
template <typename F0, typename F1>
void run_both(bool parallel, const F0& first, const F1& second) {
  for_each_part(2, parallel ? 2 : 1, [&](int64_t, int64_t i0, int64_t i1) {
    if (i0 == 0) first();
    if (i1 == 2) second();
  });
}

// product_into(out, a, b, accumulate) with out's rows (and a's) split into `parts` parts, one
// thread each: the same results bit for bit, as each row's sums run in the same order whatever
// part holds it. Where the hand-written products do not take the tensors (products_apply),
// one product_into.
inline void product_into_parts(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                               bool accumulate, int64_t parts) {
  const int64_t M = out.size(0);
  parts = std::min(parts, std::max<int64_t>(M, 1));
  if (parts <= 1 || !products_apply(out, a, b) || a.size(0) != M || a.size(1) != b.size(0) ||
      out.size(1) != b.size(1)) {
    product_into(out, a, b, accumulate);  // which checks the shapes
    return;
  }
  const int64_t N = b.size(1), K = a.size(1);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "product_into_parts", [&] {
    using T = scalar_t;
    const T* a_p = a.data_ptr<T>();
    const T* b_p = b.data_ptr<T>();
    T* o_p = out.data_ptr<T>();
    for_each_part(M, parts, [&](int64_t, int64_t r0, int64_t r1) {
      dense_product<T>(a_p + r0 * a.stride(0), a.stride(0), a.stride(1), b_p, b.stride(0),
                       o_p + r0 * out.stride(0), out.stride(0), r1 - r0, N, K, accumulate);
    });
  });
}

// a [M, K] b [K, N] as a new tensor, its rows in `parts` parts (product_into_parts).
inline at::Tensor product_parts(const at::Tensor& a, const at::Tensor& b, int64_t parts) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  product_into_parts(out, a, b, false, parts);
  return out;
}

}  // namespace
}  // namespace mnm_rl
