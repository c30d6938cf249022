"""Keep the memory the fused kernel frees in the process, instead of handing it back to the OS.

Each call of the kernel allocates its per-call buffers afresh (the fast weights, their gradient,
what the backward pass keeps: megabytes per minibatch at 4 heads x 3 layers). glibc serves such
blocks with ``mmap`` and returns them with ``munmap``, or trims them off the heap, so every call
touches new pages and pays a page fault per 4 KB: about 7,600 per PPO update of the throughput
benchmark's mnm-p:2x2 when the kernel still kept every step's weights, 4% of the update's time
(``benchmarks/update_faults.py``); since it undoes its writes instead (sixteenth session), 2 x 2's
buffers mostly stay on the heap anyway. At 4 x 3 how often an update faults depends on glibc's
own adjustment of its threshold, and so on the order of earlier frees: 81 to 13,854 times per
update in three runs at 7d492bc, 70,000-74,000 with glibc's default thresholds pinned, 4-125 with
them raised here (``tests/test_allocator.py``). Raising glibc's mmap and trim thresholds
keeps those blocks on the heap for reuse. The same memory is allocated and freed and the peak is
the same; what changes is that the process keeps its freed heap (up to the trim threshold)
instead of shrinking between calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 512 * 2**20


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); ``False`` where this is not
    glibc, or where ``MNM_RL_RETAIN_MEMORY=0`` is set in the environment."""
    if os.environ.get("MNM_RL_RETAIN_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # no libc found, or not glibc (musl, macOS)
        return False
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
