"""Where does a MiniGrid-Memory agent keep the cue? Linear probes on its recurrent state.

Runs a trained run's policy (most likely action) on held-out episodes and records, at every
step, the controller's hidden state ``h`` and, for MNM cores, the memory's read vector. The
label is the cue: the object (key or ball) in the start room. A logistic-regression probe, fitted
on half of the episodes and scored on the other half, asks how well the cue can be read off each
vector at the agent's last step, the decision at the junction, counting only episodes in which
the agent has seen the cue. Chance is 0.5.

    python benchmarks/probe_cue.py runs/s9/mnm-p-seed1 runs/s9/lstm-seed2 --episodes 400
    python benchmarks/probe_cue.py runs/s9/mnm-g-seed2/checkpoints/step_*.zip   # over training

A run folder means its latest model; a checkpoint file, that checkpoint.

Prints one line per run and, as the last line, a JSON object
``{run: {"success": float, "saw_cue": float, "probe_h": float, "probe_read": float | null}}``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from minigrid.core.constants import OBJECT_TO_IDX

from mnm_rl.agent import MemoryPPO
from mnm_rl.env_factory import make_env
from mnm_rl.runs import load_config, resolve_model


def cue_of(env) -> int:
    """1 if the start room holds a key, 0 for a ball."""
    grid = env.unwrapped.grid
    return int(grid.get(1, env.unwrapped.height // 2 - 1).type == "key")


def sees_cue(env, cue: int) -> bool:
    """Whether the agent's 3x3 view shows the start room's object (the cue)."""
    kind = OBJECT_TO_IDX["key" if cue else "ball"]
    image = env.unwrapped.gen_obs()["image"]
    x = env.unwrapped.agent_pos[0]
    # only near the start room: the key and ball at the junction are not the cue
    return x <= 4 and bool((image[..., 0] == kind).any())


class CueWatch:
    """A ``play_episode`` watch: the episode's cue and the first step whose view shows it."""

    def __init__(self, env):
        self.env, self.cue, self.first_seen = env, 0, None

    def __call__(self, step: int) -> None:
        if step == 0:  # a fresh episode: its cue is set
            self.cue, self.first_seen = cue_of(self.env), None
        if self.first_seen is None and sees_cue(self.env, self.cue):
            self.first_seen = step


def play_episode(
    policy, env, seed: int, deterministic: bool = True, watch: Callable[[int], None] | None = None
) -> tuple[float, int, dict]:
    """Play one episode of ``env`` from ``reset(seed=seed)`` with ``policy``, one step at a time.

    ``watch(step)`` is called before each action, while ``env`` shows that step. Returns the
    last reward, the episode length and the core state after the last step."""
    obs, _ = env.reset(seed=seed)
    state, done, reward, step = policy.initial_state(1), False, 0.0, 0
    while not done:
        if watch is not None:
            watch(step)
        batch = {k: torch.as_tensor(np.asarray(v))[None, None] for k, v in obs.items()}
        with torch.inference_mode():
            logits, _, state, _ = policy.forward_sequence(
                batch, state, torch.tensor([[float(step == 0)]])
            )
            action, _ = policy.sample(logits[0], deterministic=deterministic)
        obs, reward, terminated, truncated, _ = env.step(int(action[0]))
        done = terminated or truncated
        step += 1
    return float(reward), step, state


def run_episodes(run: Path, episodes: int) -> dict[str, np.ndarray]:
    model_path, run_dir = resolve_model(run)
    if run_dir is None:
        raise SystemExit(f"probe_cue.py: {run} is not in a run folder (no config.yaml)")
    config = load_config(run_dir)
    policy = MemoryPPO.load(model_path, device="cpu").policy
    env = make_env(config.env)
    start = config.env.eval_seeds.start
    rows: dict[str, list] = {"h": [], "read": [], "cue": [], "saw": [], "success": []}
    watch = CueWatch(env)
    for episode in range(episodes):
        reward, _, state = play_episode(policy, env, start + episode, watch=watch)
        rows["h"].append(state["h"][0].numpy().copy())
        rows["read"].append(state["read"][0].numpy().copy() if "read" in state else None)
        rows["cue"].append(watch.cue)
        rows["saw"].append(watch.first_seen is not None)
        rows["success"].append(reward > 0)
    return {k: np.array(v) for k, v in rows.items()}


def fit_probe(x: np.ndarray, y: np.ndarray):
    """A logistic regression of ``y`` on ``x`` (plain LBFGS on standardised inputs, L2 1e-3);
    returns a function that predicts 0/1 labels for new rows."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = torch.as_tensor((x - mean) / std, dtype=torch.float64)
    ys = torch.as_tensor(y, dtype=torch.float64)
    w = torch.zeros(xs.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, ys)
        loss = loss + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def predict(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = torch.as_tensor((rows - mean) / std, dtype=torch.float64)
            return ((z @ w + b) > 0).numpy().astype(int)

    return predict


def probe_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of a linear probe (:func:`fit_probe`) fitted on the first half."""
    half = len(y) // 2
    return float((fit_probe(x[:half], y[:half])(x[half:]) == y[half:]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--episodes", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    print(f"{'run':40s} success saw_cue probe(h) probe(read)  (episodes that saw the cue)")
    for run_dir in args.runs:
        data = run_episodes(run_dir, args.episodes)
        saw = data["saw"]
        cue = data["cue"][saw]
        probe_h = probe_accuracy(data["h"][saw], cue)
        has_read = data["read"][0] is not None
        probe_read = probe_accuracy(np.stack(data["read"][saw]), cue) if has_read else None
        results[str(run_dir)] = {
            "success": float(data["success"].mean()),
            "saw_cue": float(saw.mean()),
            "success_saw": float(data["success"][saw].mean()),
            "probe_h": probe_h,
            "probe_read": probe_read,
        }
        r = results[str(run_dir)]
        read_text = "-" if probe_read is None else f"{probe_read:.3f}"
        print(
            f"{str(run_dir):40s} {r['success']:.3f}   {r['saw_cue']:.3f}   {probe_h:.3f}    "
            f"{read_text}   (success when seen {r['success_saw']:.3f})"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
