"""Pieces of a PPO update and of a rollout step, compiled against PyTorch, in one process.

Times, per call and in interleaved rounds (the medians are printed):

* ``ppo loss``: PPO's loss of a minibatch of ``--seq-len`` x ``--chunks`` steps and its backward
  pass into leaf logits and values, with the logged statistics read to the host, through
  ``mnm_rl.agent.ppo_loss.ppo_loss`` (the compiled kernel) and ``ppo_loss_torch``;
* ``lstm step``, ``gru step``: one rollout step of the lstm and gru cores for ``--envs`` envs,
  one of which starts an episode, without gradients: through the compiled sequence kernel, and
  with ``MNM_RL_FUSED=0`` through the cell op (``torch.lstm_cell``/``gru_cell``) after the resets;
* ``lstm policy``, ``gru policy``, ``mlp policy``, ``mnm-p policy`` (4 heads x 3 layers): one
  rollout step of a whole policy with that core (``RecurrentMemoryPolicy.act``: extractor,
  core, heads, draw) on MiniGrid's observation (a ``--view-size`` symbol grid and a direction)
  for ``--envs`` envs, one of which starts an episode: as one compiled call
  (``mnm_rl.agent.policy_step``), and with ``MNM_RL_COMPILED_STEP=0`` as before it (PyTorch
  operators around the compiled core step, grid encoder and heads);
* ``training heads``: the two heads (width ``--hidden``, one hidden layer, tanh) over a minibatch
  of ``--seq-len`` x ``--chunks`` steps, forward and backward into the latent and every
  parameter: through ``mnm_rl.agent.action_heads.train_heads``, and with
  ``MNM_RL_COMPILED_HEADS=0`` as the modules.

Prints a table and, last, a JSON object ``{"rounds", "calls", "pieces": {piece: {"compiled_us",
"pytorch_us", "speedup"}}}``.

    python benchmarks/step_pieces.py
    python benchmarks/step_pieces.py --rounds 11 --calls 5000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from gymnasium import spaces
from throughput import environment_variable

from mnm_rl import native
from mnm_rl.agent import action_heads, policy_step, ppo_loss
from mnm_rl.agent.policy import RecurrentMemoryPolicy, _mlp
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
    p.add_argument("--view-size", type=int, default=3, help="MiniGrid view of the policy steps")
    args = p.parse_args(argv)
    names = ("rounds", "calls", "envs", "seq_len", "chunks", "actions", "hidden", "view_size")
    for name in names:
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


def policy_act(core: str, args: argparse.Namespace) -> Callable[[], None]:
    """One rollout step of a policy with ``core`` on MiniGrid's observation (a symbol grid of
    ``args.view_size`` cells a side and a direction) for ``args.envs`` envs, the second of which
    starts an episode."""
    view = args.view_size
    space = spaces.Dict(
        {
            "direction": spaces.Discrete(4),
            "image": spaces.Box(0, np.broadcast_to([10, 5, 2], (view, view, 3)), dtype=np.int64),
        }
    )
    torch.manual_seed(0)
    policy = RecurrentMemoryPolicy(
        space, spaces.Discrete(args.actions), lambda _: 1e-3, core=core,
        features_dim=args.hidden, core_kwargs=dict(hidden_size=args.hidden),
    )  # fmt: skip
    space.seed(0)
    samples = [space.sample() for _ in range(args.envs)]
    obs = {k: torch.as_tensor(np.stack([s[k] for s in samples])) for k in space.spaces}
    state = policy.initial_state(args.envs)
    starts = torch.zeros(args.envs)
    starts[min(1, args.envs - 1)] = 1

    def call() -> None:
        with torch.inference_mode():
            policy.act(obs, state, starts)

    return call


def training_heads(args: argparse.Namespace) -> Callable[[], None]:
    """The heads' forward and backward over one minibatch, as ``forward_sequence`` runs them:
    through the compiled kernel, or the modules where ``MNM_RL_COMPILED_HEADS=0``."""
    torch.manual_seed(0)
    action_net = _mlp(args.hidden, (args.hidden,), args.actions, torch.nn.Tanh)
    value_net = _mlp(args.hidden, (args.hidden,), 1, torch.nn.Tanh)
    latent = torch.randn(args.seq_len, args.chunks, args.hidden, requires_grad=True)
    g_logits = torch.randn(args.seq_len, args.chunks, args.actions)
    g_values = torch.randn(args.seq_len, args.chunks)

    def call() -> None:
        kernel = action_heads.load_extension()
        if kernel is not None:
            logits, values = action_heads.train_heads(
                kernel, latent, latent, action_net, value_net, torch.nn.Tanh
            )
        else:
            logits, values = action_net(latent), value_net(latent).squeeze(-1)
        torch.autograd.backward([logits, values], [g_logits, g_values])

    return call


def time_calls(call: Callable[[], None], calls: int, switch: tuple[str, str] | None) -> float:
    """Microseconds per call, with the environment variable ``switch = (name, value)`` set
    meanwhile."""
    switched = environment_variable(*switch) if switch is not None else contextlib.nullcontext()
    with switched:
        call()  # warm
        start = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    kernels = (
        ppo_loss.load_extension(), fused.load_extension(), policy_step.load_extension(),
        action_heads.load_extension(),
    )  # fmt: skip
    if None in kernels:
        raise SystemExit("step_pieces.py: the compiled kernels are not available")
    loss = loss_pieces(args)
    # (piece, compiled call and its switch, PyTorch call and its switch)
    pieces = [("ppo loss", loss["compiled"], None, loss["pytorch"], None)]
    fused_on, fused_off = (native.SWITCH_VARIABLE, "1"), (native.SWITCH_VARIABLE, "0")
    for name, core_class in (("lstm step", LSTMCore), ("gru step", GRUCore)):
        step = core_step(core_class, args)
        pieces.append((name, step, fused_on, step, fused_off))
    step_on, step_off = (policy_step.SWITCH_VARIABLE, "1"), (policy_step.SWITCH_VARIABLE, "0")
    for core in ("lstm", "gru", "mlp", "mnm-p"):
        act = policy_act(core, args)
        pieces.append((f"{core} policy", act, step_on, act, step_off))
    heads = training_heads(args)
    heads_switch = action_heads.SWITCH_VARIABLE
    pieces.append(("training heads", heads, (heads_switch, "1"), heads, (heads_switch, "0")))
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
