"""Does a MiniGrid-Memory policy use a cue it sees after a detour? A forced-detour probe.

On MiniGrid-MemoryS9 (3x3 view) the agent starts facing away from the start room at a corridor
cell ``x = 1..6``; only from ``x = 1`` is the cue (the start room's object) in view. A policy on
the plateau uses the cue when it starts there and guesses otherwise. This probe takes the held-out
episodes that start at ``x >= 2`` and plays them twice with the run's policy (most likely action,
recurrent state threaded through every step):

* **alone**: the policy acts from the first step;
* **forced detour**: the first actions are scripted (turn left twice, then forward until the cue
  is in view: the detour a solved policy makes), then the policy acts. The policy sees every
  scripted step, so its memory can store the cue.

and, for reference, the held-out episodes that start at ``x = 1`` (the cue in view at the first
step) with the policy alone (**cue at start**; half as many episodes).

If the policy is right after the forced detour whenever it reaches the junction, it can use a
cue seen mid-episode and only fails to go and look (an exploration problem). If it is at chance
there, it cannot use such a cue (a memory or representation problem).

    python benchmarks/probe_detour.py runs/s9/RUN runs/s9/RUN/checkpoints/step_500000.zip

Prints one line per run and mode: success, wrong choices and timeouts, success among the
episodes that reached a choice, and the held-out accuracy of a linear probe (as in
``probe_cue.py``: fitted on half of the episodes, scored on the other half; chance 0.5) that reads
the cue off the recurrent state (``h`` and, for MNM, the memory read) at the last step; for the
forced detours also ``transfer``: the accuracy there of a probe fitted on the cue-at-start
episodes (is the cue coded as when it is seen at the start?). The last line is JSON; it also
holds the forced detours' success per start cell ``x``, and for every mode where in the view
the cue was when the agent first saw it (its direction and the cue's cell, ``cue_first_seen``).
For MNM cores the cue-at-start episodes are also played with the memory read cut from the
core's output (``y = W_y [h ; read]`` with the read's columns of ``W_y`` zeroed; the read still
feeds the controller): does the policy take the cue from the memory?
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from minigrid.core.actions import Actions
from minigrid.core.constants import OBJECT_TO_IDX
from probe_cue import cue_of, fit_probe, probe_accuracy, sees_cue

from mnm_rl.agent import MemoryPPO
from mnm_rl.env_factory import make_env
from mnm_rl.runs import load_config, resolve_model


def cue_view(env, cue: int) -> str:
    """Where the cue is in the agent's view: ``"dir D cell (i, j)"``, the agent's direction
    (0 east, 2 west) and the cue's cell in the symbolic image (``i`` left to right, ``j`` far
    to near; the agent stands at ``(1, 2)``)."""
    kind = OBJECT_TO_IDX["key" if cue else "ball"]
    i, j = np.argwhere(env.unwrapped.gen_obs()["image"][..., 0] == kind)[0]
    return f"dir {env.unwrapped.agent_dir} cell ({i}, {j})"


def play(policy, env, seed: int, forced: bool) -> tuple[str, int, np.ndarray, str | None]:
    """One episode: its outcome, ``"success"``, ``"wrong"`` (the other object) or
    ``"timeout"``; the cue; the recurrent state (``h``, then the memory read if any) at the
    last step; and where the cue was in view when first seen (:func:`cue_view`; ``None`` if
    never)."""
    obs, _ = env.reset(seed=seed)
    cue = cue_of(env)
    script = [Actions.left, Actions.left] if forced else []
    state, first, seen = policy.initial_state(1), True, None
    while True:
        if seen is None and sees_cue(env, cue):
            seen = cue_view(env, cue)
        batch = {k: torch.as_tensor(np.asarray(v))[None, None] for k, v in obs.items()}
        with torch.inference_mode():
            logits, _, state, _ = policy.forward_sequence(
                batch, state, torch.tensor([[float(first)]])
            )
        first = False
        last = np.concatenate([state[k][0].numpy() for k in ("h", "read") if k in state])
        if script:
            action = int(script.pop(0))
        elif forced and not sees_cue(env, cue) and env.unwrapped.agent_dir == 2:
            action = int(Actions.forward)  # walk back (facing west) until the cue is in view
        else:
            forced = False  # the detour is over: the policy acts from here on
            action = int(logits[0, 0].argmax())
        obs, reward, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            outcome = "success" if reward > 0 else ("wrong" if terminated else "timeout")
            return outcome, cue, last, seen


def probe(run: Path, episodes: int) -> dict[str, dict[str, float]]:
    model_path, run_dir = resolve_model(run)
    if run_dir is None:
        raise SystemExit(f"probe_detour.py: {run} is not in a run folder (no config.yaml)")
    config = load_config(run_dir)
    policy = MemoryPPO.load(model_path, device="cpu").policy
    env = make_env(config.env)
    far, near = [], []  # held-out episodes whose start does not / does show the cue
    start_cell = {}
    seed = config.env.eval_seeds.start
    while len(far) < episodes or len(near) < episodes // 2:
        env.reset(seed=seed)
        start_cell[seed] = int(env.unwrapped.agent_pos[0])
        (near if start_cell[seed] == 1 else far).append(seed)
        seed += 1
    result, data = {}, {}
    modes = (("cue at start", near[: episodes // 2], False), ("alone", far[:episodes], False))
    for mode, seeds, forced in (*modes, ("forced", far[:episodes], True)):
        played = [play(policy, env, s, forced) for s in seeds]
        outcomes = [outcome for outcome, *_ in played]
        counts = {k: outcomes.count(k) / len(outcomes) for k in ("success", "wrong", "timeout")}
        chose = counts["success"] + counts["wrong"]
        counts["success_when_chose"] = counts["success"] / chose if chose else float("nan")
        # can a linear probe read the cue off the state at the last step?
        states, cues = np.stack([p[2] for p in played]), np.array([p[1] for p in played])
        views = [p[3] for p in played if p[3] is not None]  # where the cue was first seen
        counts["cue_first_seen"] = {v: views.count(v) for v in sorted(set(views))}
        counts["probe_state"] = probe_accuracy(states, cues)
        if forced:  # success per start cell x: how far back the detour went
            by_start = defaultdict(list)
            for s, outcome in zip(seeds, outcomes, strict=True):
                by_start[start_cell[s]].append(outcome == "success")
            counts["success_by_start"] = {x: float(np.mean(v)) for x, v in sorted(by_start.items())}
        result[mode], data[mode] = counts, (states, cues)
    core = policy.core
    if hasattr(core, "memory"):  # MNM: does the policy take the cue from the memory read?
        cut = copy.deepcopy(policy)
        with torch.no_grad():  # y = W_y [h ; read]: zero the read's columns
            cut.core.output.weight[:, core.hidden_size :] = 0
        outcomes = [play(cut, env, s, False)[0] for s in near[: episodes // 2]]
        result["cue at start"]["success_read_cut"] = outcomes.count("success") / len(outcomes)
    # Is the cue coded the same way after a detour as when seen at the start? A probe fitted on
    # the cue-at-start episodes, scored on the forced-detour ones.
    predict = fit_probe(*data["cue at start"])
    states, cues = data["forced"]
    result["forced"]["probe_transfer"] = float((predict(states) == cues).mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--episodes", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    columns = "success wrong timeout  success when it chose  probe(state)  transfer"
    print(f"{'run':60s} {'mode':12s} {columns}")
    for run in args.runs:
        results[str(run)] = probe(run, args.episodes)
        for mode, r in results[str(run)].items():
            transfer = f"{r['probe_transfer']:.3f}" if "probe_transfer" in r else "-"
            if "success_read_cut" in r:
                transfer += (
                    f"   (success with the read cut from the output: {r['success_read_cut']:.3f})"
                )
            print(
                f"{str(run):60s} {mode:12s} {r['success']:.3f}   {r['wrong']:.3f} "
                f"{r['timeout']:.3f}    {r['success_when_chose']:.3f}                  "
                f"{r['probe_state']:.3f}         {transfer}"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
