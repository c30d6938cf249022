// Work split into parts, one thread per part: a batch of independent sequences (the MNM kernel,
// mnm_sequence.cpp, and the LSTM kernel, lstm_sequence.cpp), the rows of a product (the LSTM's
// weight gradient, the input projections of linear.cpp), two independent pieces (the actor and
// critic heads, agent/csrc/action_heads.cpp): what runs a training batch on more than one core.
#pragma once

#include <torch/extension.h>

#include <ATen/ThreadLocalState.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dense_products.h"

namespace mnm_rl {
namespace parts_detail {

// The threads the parts run on: the caller runs part 0, helper k part k. A helper that has run
// its part watches for the next call for kSpin, yielding its core between looks, and then
// sleeps until woken. OpenMP's team did this job before: its worker spun for milliseconds after
// the update's last parallel region (GCC's default spin count), on one of the two cores the
// rollout that follows needs for its own thread and an MNM policy's step thread (the rollout
// ran measurably slower right after an update than after a pause; docs/benchmarks.md,
// forty-first session). An update's regions come fractions of a millisecond apart, so a short
// watch keeps the helper awake through one.
//
// One pool per extension (each compiles this header; its inline functions' statics are shared
// by the extension's sources, hence the named namespace); a pool is never destroyed (its helpers
// may be asleep in it at exit). A call from a second thread while the pool runs another
// thread's parts runs its parts one after the other on its own thread: the same parts, so the
// same results. After fork() a child starts a pool of its own (the parent's helpers are not
// there): the fork handler, registered when the extension is loaded, forgets the parent's pool.
// The pool is made without a lock (two threads' first calls may each make one; one is kept,
// and a pool starts its helpers only when it first runs), so that a child forked while another
// thread was making it inherits no lock held by a thread the child does not have.
class PartPool {
 public:
  static PartPool& instance() {
    std::atomic<PartPool*>& pool = current();
    PartPool* made = pool.load(std::memory_order_acquire);
    if (made != nullptr) return *made;
    PartPool* mine = new PartPool();
    if (pool.compare_exchange_strong(made, mine, std::memory_order_acq_rel)) return *mine;
    delete mine;  // another thread's came first (made now holds it); this one never ran
    return *made;
  }

  // The fork handler (see above): a child's first call makes a pool of its own.
  static void forget_in_child() { current().store(nullptr, std::memory_order_relaxed); }

  // task(k) for every k of [0, parts): k = 0 here, the others on helpers; returns when all have
  // returned.
  void run(int64_t parts, const std::function<void(int64_t)>& task) {
    std::unique_lock<std::mutex> running(run_mutex_, std::try_to_lock);
    if (!running.owns_lock()) {  // another thread's parts are under way
      for (int64_t k = 0; k < parts; ++k) task(k);
      return;
    }
    while (static_cast<int64_t>(helpers_.size()) < parts - 1) {
      const int64_t k = static_cast<int64_t>(helpers_.size()) + 1;
      helpers_.emplace_back([this, k] { help(k); });
      helpers_.back().detach();
    }
    {
      const std::lock_guard<std::mutex> hold(mutex_);
      task_ = &task;
      parts_ = parts;
      left_.store(parts - 1, std::memory_order_relaxed);
      posted_.fetch_add(1, std::memory_order_release);
    }
    if (asleep_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    task(0);
    while (left_.load(std::memory_order_acquire) > 0) sched_yield();
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(300);

  PartPool() = default;

  static std::atomic<PartPool*>& current() {
    static std::atomic<PartPool*> pool{nullptr};
    return pool;
  }

  void help(int64_t k) {
    // ATen and BLAS inside a part run on the part's thread, as inside OpenMP's region before
    omp_set_num_threads(1);
    uint64_t seen = 0;
    for (;;) {
      const auto posted = [&] { return posted_.load(std::memory_order_acquire) != seen; };
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (!posted() && std::chrono::steady_clock::now() < until) sched_yield();
      const std::function<void(int64_t)>* task;
      int64_t parts;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        if (!posted()) {
          asleep_.fetch_add(1, std::memory_order_acq_rel);
          wake_.wait(lock, posted);
          asleep_.fetch_sub(1, std::memory_order_acq_rel);
        }
        seen = posted_.load(std::memory_order_acquire);
        task = task_;
        parts = parts_;
      }
      if (k < parts) {
        (*task)(k);
        left_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex run_mutex_;  // held by the thread whose parts run
  std::mutex mutex_;
  std::condition_variable wake_;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t parts_ = 0;
  std::atomic<uint64_t> posted_{0};
  std::atomic<int64_t> left_{0};
  std::atomic<int> asleep_{0};
  std::vector<std::thread> helpers_;
};

// Registered once per extension, when it is loaded (before any of its threads exist).
inline const bool fork_handler_registered =
    pthread_atfork(nullptr, nullptr, &PartPool::forget_in_child) == 0;

// Whether the parts run on the PartPool (not under MNM_RL_PART_POOL=0 in the environment when
// the extension first splits: then on OpenMP's threads, as before the forty-first session).
inline bool pool_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("MNM_RL_PART_POOL");
    return value == nullptr || std::string(value) != "0";
  }();
  return enabled;
}

}  // namespace parts_detail

namespace {

// Row b of `parts` equal parts of [0, B): parts first get B / parts rows, the first B % parts
// one more.
inline int64_t part_start(int64_t B, int64_t parts, int64_t i) {
  return i * (B / parts) + std::min(i, B % parts);
}

// Run body(i, b0, b1) for every part, one thread per part (PartPool), each with the caller's
// thread-local state (no autograd, inference mode in the rollout). The thread count is the
// number of parts, whatever torch's intra-op setting (torch.set_num_threads), so the rest of
// the model can stay on one thread; inside a part ATen and BLAS run on the part's thread.
// An exception in a part is rethrown here, after every part has ended. One part runs on the
// calling thread alone. Bind a kernel that calls it with the GIL released (module.cpp):
// copying the caller's thread-local state may take the GIL.
template <typename F>
void for_each_part(int64_t B, int64_t parts, const F& body) {
  if (parts == 1) {
    body(0, 0, B);
    return;
  }
  const at::ThreadLocalState caller;
  std::vector<std::exception_ptr> errors(parts);
  const auto run_part = [&](int64_t i) {
    try {
      at::ThreadLocalStateGuard guard(caller);
      body(i, part_start(B, parts, i), part_start(B, parts, i + 1));
    } catch (...) {
      errors[i] = std::current_exception();
    }
  };
  if (parts_detail::pool_enabled()) {
    static_cast<void>(parts_detail::fork_handler_registered);  // registered at load (above)
    const int caller_threads = omp_get_max_threads();
    omp_set_num_threads(1);  // ATen inside the caller's part on the caller alone, as in a region
    parts_detail::PartPool::instance().run(parts, run_part);
    omp_set_num_threads(caller_threads);
  } else {  // MNM_RL_PART_POOL=0: OpenMP's threads, as before
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int64_t i = 0; i < parts; ++i) run_part(i);
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
