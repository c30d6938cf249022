"""mnm_rl.memory.allocator: the fused kernel's freed buffers are reused, not faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# One rollout and PPO update of MemoryPPO with an mnm-p core on the fused kernel as a warm-up,
# then five more updates on the same rollout; prints whether the kernel loaded and the median
# minor page faults of one update. The median, so that a one-off growth of the heap in one update
# (about 2,000 faults) does not decide the test: with the total over two whole rollouts and
# updates, a CI run once saw 6,326 faults released against 1,654 retained. 4 heads x 3 layers
# (throughput.py's mnm-p): since the kernel stopped keeping every step's fast weights (sixteenth
# session), 2 x 2's buffers are small enough that glibc keeps them on the heap anyway (this
# program at 2 x 2, run once by hand: 26 faults retained, 152 released), while 4 x 3's still
# take thousands of faults released.
#
# glibc raises its mmap threshold by itself after the first large block is freed, so with
# retention off, whether the kernel's buffers are mapped afresh depends on the order of earlier
# frees: 81, 13,854 and 1,626 faults per update in three runs of this program at 7d492bc (a CI run
# saw 197). Both processes therefore start from glibc's default thresholds pinned by environment
# (128 KiB, which also switches the adjustment off): the only difference left is the switch, whose
# mallopt call overrides them. Pinned, three runs at 7d492bc: 70,425-74,183 faults released,
# 4-125 retained.
PROGRAM = """
import resource, statistics, torch
from stable_baselines3.common.env_util import make_vec_env
import mnm_rl
from mnm_rl.agent import MemoryPPO
from mnm_rl.memory import fused
torch.set_num_threads(1)
env = make_vec_env("mnm_rl/DelayedCueRecall-v0", n_envs=8, seed=0)
model = MemoryPPO(
    env=env, core="mnm-p", n_steps=128, batch_size=256, seq_len=16, seed=0, device="cpu",
    policy_kwargs=dict(core_kwargs=dict(hidden_size=64, n_heads=4, n_layers=3)),
)
model.learn(1024)
print(fused.load_extension() is not None)
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model.train()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(statistics.median(faults)))
"""


GLIBC_DEFAULT_THRESHOLDS = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def faults(retain: str) -> tuple[str, int]:
    """(whether the kernel loaded, median minor page faults of one PPO update)"""
    env = {**os.environ, "MNM_RL_RETAIN_MEMORY": retain, **GLIBC_DEFAULT_THRESHOLDS}
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_kernels_freed_buffers_are_reused_unless_switched_off():
    loaded, retained = faults("1")
    if loaded != "True":
        pytest.skip("the fused kernel could not be built here")
    _, released = faults("0")
    # each update allocates megabytes of kernel buffers: mapped afresh, tens of thousands of 4 KB
    # faults per update; kept on the heap, a few
    assert released > 10_000, released
    assert retained < released / 10, (retained, released)
