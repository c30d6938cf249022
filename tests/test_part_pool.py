"""The threads that run the kernels' parts (``mnm_rl/memory/csrc/parts.h``'s ``PartPool``):
the parts' results whatever thread runs them, two callers at once, a forked child, and helpers
that stop using the CPU soon after a call."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import torch
from compiled import built

from mnm_rl.memory import fused


@pytest.fixture(scope="module")
def kernel():
    return built(fused.EXTENSION)


def _inputs(seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 48, generator=gen)
    w = torch.randn(96, 48, generator=gen)
    b = torch.randn(96, generator=gen)
    grad = torch.randn(200, 96, generator=gen)
    return x, w, b, grad


def _passes(kernel, x, w, b, grad, parts):
    return [kernel.linear_forward(x, w, b, parts),
            *kernel.linear_backward(grad, x, w, True, True, True, parts)]  # fmt: skip


def test_two_threads_splitting_at_once_get_the_results_of_one(kernel):
    """Two threads call split products at the same time, over and over (the bindings release
    the GIL): the pool runs one caller's parts and the other's one after the other on its own
    thread; every result equals the single-part one, and neither waits for ever."""
    x, w, b, grad = _inputs()
    expected = _passes(kernel, x, w, b, grad, 1)
    failures: list[str] = []

    def caller(parts: int) -> None:
        for _ in range(300):
            for want, got in zip(expected, _passes(kernel, x, w, b, grad, parts), strict=True):
                if not torch.equal(want, got):
                    failures.append(f"{parts} parts differ")
                    return

    threads = [threading.Thread(target=caller, args=(parts,)) for parts in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a caller never returned"
    assert failures == []


def _split_in_child(queue) -> None:
    kernel = fused.load_extension()
    x, w, b, grad = _inputs()
    queue.put(_passes(kernel, x, w, b, grad, 2)[0].tolist())  # a list: the child may exit first


def test_a_forked_child_splits_with_helpers_of_its_own(kernel):
    """A child forked after the parent's helpers exist (as ``ParallelVecEnv``'s workers are)
    starts a pool of its own: its split products finish and equal the parent's."""
    x, w, b, grad = _inputs()
    parent = _passes(kernel, x, w, b, grad, 2)[0]  # the parent's pool and helper exist
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_split_in_child, args=(queue,))
    child.start()
    try:
        result = queue.get(timeout=120)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert torch.equal(torch.tensor(result), parent)


def test_the_helpers_stop_using_the_cpu_soon_after_a_call(kernel):
    """After a split call the helpers watch for the next one only briefly, then sleep: over the
    next 50 ms, while this thread sleeps, the process uses almost no CPU (OpenMP's worker, which
    ran the parts before, kept a core busy for milliseconds after each region)."""
    x, w, b, grad = _inputs()
    for _ in range(20):
        _passes(kernel, x, w, b, grad, 2)
    start = time.process_time()
    time.sleep(0.05)
    used = time.process_time() - start
    assert used < 0.003, f"{used * 1e3:.1f} ms of CPU while idle"
