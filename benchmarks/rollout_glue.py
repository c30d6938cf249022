"""What a rollout step's bookkeeping costs: storing one step of 8 envs in the rollout buffer.

Times, in one process and interleaved (rounds of ``--steps`` steps, each way once per round,
the order alternating), the per-step work between the policy and the env that
``MemoryPPO.collect_rollouts`` does besides them, for MiniGrid-sized observations (a
``[8, 3, 3, 3]`` uint8 image and ``[8]`` directions) and an LSTM state of width 64:

* ``buffer``: ``ChunkRolloutBuffer.add`` as the rollout calls it, which writes the step's
  outputs, rewards and the next step's inputs into the buffer's rows through numpy views and
  returns the next inputs as views of the buffer (nothing converted per step);
* ``tensors``: the same data stored as the rollout stored it before the thirty-third session:
  the env's arrays converted to tensors (``obs_as_tensor``, ``torch.from_numpy`` of float32
  copies of the rewards and dones) and each field written with a tensor index assignment.

And the single operations the two are made of (``index assignment``, ``row copy_``, ``numpy
row write``, ``obs_as_tensor``). Prints a table of medians (us per step or per operation) and,
as its last line, a JSON object ``{"steps", "rounds", "us": {name: median}}``.

    python benchmarks/rollout_glue.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import timeit

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.utils import obs_as_tensor

from mnm_rl.agent.buffer import ChunkRolloutBuffer
from mnm_rl.memory import CoreState

N_ENVS = 8


def step_data(steps: int) -> dict:
    """One step's worth of everything the rollout stores, as the env and the policy give it."""
    obs = {
        "image": np.zeros((N_ENVS, 3, 3, 3), np.uint8),
        "direction": np.zeros((N_ENVS,), np.int64),
    }
    with torch.inference_mode():  # the policy's outputs are inference tensors
        outputs = (torch.zeros(N_ENVS, dtype=torch.long), torch.zeros(N_ENVS),
                   torch.zeros(N_ENVS))  # fmt: skip
    state = CoreState({"h": torch.zeros(N_ENVS, 64), "c": torch.zeros(N_ENVS, 64)},
                      batch_size=N_ENVS)  # fmt: skip
    return {"obs": obs, "rewards": np.zeros(N_ENVS, np.float32), "dones": np.zeros(N_ENVS, bool),
            "outputs": outputs, "state": state, "steps": steps}  # fmt: skip


def through_buffer(buffer: ChunkRolloutBuffer, d: dict) -> None:
    actions, values, log_probs = d["outputs"]
    buffer.reset()
    buffer.start(d["obs"], d["dones"])
    for _ in range(d["steps"]):
        buffer.add(actions, d["rewards"], values, log_probs, d["state"], d["obs"], d["dones"])


def through_tensors(store: dict, d: dict) -> None:
    actions, values, log_probs = d["outputs"]
    obs = obs_as_tensor(d["obs"], torch.device("cpu"))
    starts = torch.from_numpy(np.array(d["dones"], dtype=np.float32))
    for t in range(d["steps"]):
        for key, value in obs.items():
            store[key][t] = value
        if t % 16 == 0:
            d["state"].detach().clone()
        rewards = torch.from_numpy(np.array(d["rewards"], dtype=np.float32))
        for name, value in (("actions", actions), ("rewards", rewards), ("starts", starts),
                            ("values", values), ("log_probs", log_probs)):  # fmt: skip
            store[name][t] = value
        obs = obs_as_tensor(d["obs"], torch.device("cpu"))
        starts = torch.from_numpy(np.array(d["dones"], dtype=np.float32))


def operations() -> dict[str, float]:
    """us per call of the single operations."""
    rows = torch.zeros(128, N_ENVS)
    views, arrays, value = rows.unbind(), list(rows.numpy()), torch.ones(N_ENVS)
    numbers = value.numpy()
    obs = step_data(1)["obs"]

    def numpy_write() -> None:
        arrays[3][...] = numbers

    cases = {
        "index assignment": lambda: rows.__setitem__(3, value),
        "row copy_": lambda: views[3].copy_(value),
        "numpy row write": numpy_write,
        "obs_as_tensor": lambda: obs_as_tensor(obs, torch.device("cpu")),
    }
    return {name: timeit.timeit(fn, number=20000) / 20000 * 1e6 for name, fn in cases.items()}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=128, help="steps per round (a rollout's)")
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    d = step_data(args.steps)
    space = spaces.Dict(
        {"image": spaces.Box(0, 255, (3, 3, 3), np.uint8), "direction": spaces.Discrete(4)}
    )
    buffer = ChunkRolloutBuffer(args.steps, N_ENVS, space, 16, torch.device("cpu"))
    store = {name: torch.zeros(args.steps, N_ENVS) for name in
             ("rewards", "starts", "values", "log_probs")}  # fmt: skip
    store["actions"] = torch.zeros(args.steps, N_ENVS, dtype=torch.long)
    store.update({k: torch.zeros(args.steps, *v.shape, dtype=torch.from_numpy(v).dtype)
                  for k, v in d["obs"].items()})  # fmt: skip
    ways = {
        "buffer": lambda: through_buffer(buffer, d),
        "tensors": lambda: through_tensors(store, d),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(args.rounds):
        for name, fn in ways.items() if round_ % 2 == 0 else reversed(ways.items()):
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / args.steps * 1e6)
    us = {f"{name} (per step)": statistics.median(t) for name, t in times.items()}
    us.update(operations())
    print(f"{N_ENVS} envs, {args.steps} steps a round, medians of {args.rounds} rounds")
    for name, value in us.items():
        print(f"{name:24s} {value:7.2f} us")
    out = {"steps": args.steps, "rounds": args.rounds, "us": us}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
