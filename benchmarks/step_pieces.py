"""Pieces of a PPO update and of a rollout step, compiled against PyTorch, in one process.

Times, per call and in interleaved rounds (the medians are printed):

* ``ppo loss``: PPO's loss of a minibatch of ``--seq-len`` x ``--chunks`` steps and its backward
  pass into leaf logits and values, with the logged statistics read to the host, through
  ``mnm_rl.agent.ppo_loss.ppo_loss`` (the compiled kernel) and ``ppo_loss_torch``;
* ``lstm step``, ``gru step``: one rollout step of the lstm and gru cores for ``--envs`` envs,
  one of which starts an episode, without gradients: through the compiled sequence kernel, and
  with ``MNM_RL_FUSED=0`` through the cell op (``torch.lstm_cell``/``gru_cell``) after the resets.

Prints a table and, last, a JSON object ``{"rounds", "calls", "pieces": {piece: {"compiled_us",
"pytorch_us", "speedup"}}}``.

    python benchmarks/step_pieces.py
    python benchmarks/step_pieces.py --rounds 11 --calls 5000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from mnm_rl import native
from mnm_rl.agent import ppo_loss
from mnm_rl.memory import fused
from mnm_rl.memory.baselines import GRUCore, LSTMCore

SETTINGS = ppo_loss.LossSettings(0.2, None, 0.01, 0.5, True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=2000, help="calls per timing")
    p.add_argument("--envs", type=int, default=8, help="envs of a rollout step")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--chunks", type=int, default=16, help="chunks of a minibatch")
    p.add_argument("--actions", type=int, default=7)
    p.add_argument("--hidden", type=int, default=64)
    args = p.parse_args(argv)
    for name in ("rounds", "calls", "envs", "seq_len", "chunks", "actions", "hidden"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def loss_pieces(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """The compiled and the PyTorch loss of one minibatch, forward and backward."""
    gen = torch.Generator().manual_seed(0)
    shape = (args.seq_len, args.chunks)
    logits = torch.randn(*shape, args.actions, generator=gen).requires_grad_()
    values = torch.randn(*shape, generator=gen).requires_grad_()
    actions = torch.randint(0, args.actions, shape, generator=gen)
    with torch.no_grad():
        log_probs = torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    steps = ppo_loss.RolloutSteps(
        actions, log_probs + 0.1 * torch.randn(*shape, generator=gen),
        torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen), values.detach(),
    )  # fmt: skip

    def run(loss_fn) -> Callable[[], None]:
        def call() -> None:
            loss, stats = loss_fn(logits, values, steps, SETTINGS)
            loss.backward()
            stats.tolist()

        return call

    return {"compiled": run(ppo_loss.ppo_loss), "pytorch": run(ppo_loss.ppo_loss_torch)}


def core_step(core_class, args: argparse.Namespace) -> Callable[[], None]:
    """One rollout step of a core for ``args.envs`` envs, the second of which starts an episode."""
    torch.manual_seed(0)
    core = core_class(args.hidden, hidden_size=args.hidden)
    state = core.initial_state(args.envs)
    x = torch.randn(1, args.envs, args.hidden)
    starts = torch.zeros(1, args.envs)
    starts[0, min(1, args.envs - 1)] = 1

    def call() -> None:
        with torch.inference_mode():
            core(x, state, starts)

    return call


def time_calls(call: Callable[[], None], calls: int, fused_switch: str | None) -> float:
    """Microseconds per call, with ``MNM_RL_FUSED`` set to ``fused_switch`` meanwhile."""
    before = os.environ.get(native.SWITCH_VARIABLE)
    if fused_switch is not None:
        os.environ[native.SWITCH_VARIABLE] = fused_switch
    try:
        call()  # warm
        start = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - start) / calls * 1e6
    finally:
        if before is None:
            os.environ.pop(native.SWITCH_VARIABLE, None)
        else:
            os.environ[native.SWITCH_VARIABLE] = before


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if ppo_loss.load_extension() is None or fused.load_extension() is None:
        raise SystemExit("step_pieces.py: the compiled kernels are not available")
    loss = loss_pieces(args)
    # (piece, compiled call and its MNM_RL_FUSED, PyTorch call and its MNM_RL_FUSED)
    pieces = [("ppo loss", loss["compiled"], None, loss["pytorch"], None)]
    for name, core_class in (("lstm step", LSTMCore), ("gru step", GRUCore)):
        step = core_step(core_class, args)
        pieces.append((name, step, "1", step, "0"))
    times: dict[str, dict[str, list[float]]] = {
        p[0]: {"compiled": [], "pytorch": []} for p in pieces
    }
    for round_ in range(args.rounds):
        for name, compiled, on, pytorch, off in pieces:
            runs = [("compiled", compiled, on), ("pytorch", pytorch, off)]
            for kind, call, switch in runs if round_ % 2 == 0 else runs[::-1]:
                times[name][kind].append(time_calls(call, args.calls, switch))
    out = {"rounds": args.rounds, "calls": args.calls, "pieces": {}}
    print(f"medians of {args.rounds} rounds of {args.calls} calls, us per call")
    print(f"{'piece':12s} {'compiled':>10s} {'pytorch':>10s} {'speedup':>8s}")
    for name, by_kind in times.items():
        compiled, pytorch = (statistics.median(by_kind[k]) for k in ("compiled", "pytorch"))
        out["pieces"][name] = {
            "compiled_us": compiled, "pytorch_us": pytorch, "speedup": pytorch / compiled,
        }  # fmt: skip
        print(f"{name:12s} {compiled:10.1f} {pytorch:10.1f} {pytorch / compiled:7.2f}x")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
