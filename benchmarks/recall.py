"""Associative recall: store K key->value pairs, then answer queries of the stored keys.

A supervised stand-in for the paper's dictionary-inference task, used to check that the memory
cores actually memorise. Each sequence has ``K`` store steps followed by ``Q`` query steps:

* store step: input ``[onehot(key) ; onehot(value) ; 1 ; 0]``, keys distinct within a sequence;
* query step: input ``[onehot(key) ; 0 ; 0 ; 1]`` for one of the stored keys;
* target at a query step: the value stored under that key (cross-entropy over ``n_values``
  symbols); store steps carry no loss.

Every core (``mnm-p``, ``mnm-g``, ``lstm``, ``gru``) gets a linear classifier on its features and is
trained with Adam on fresh random sequences; MNM cores also minimise
``mem_coef * aux["recon_after"].mean()``, the paper's post-write reconstruction meta-loss. Held-out
accuracy is measured on fresh sequences. The last line printed is a JSON summary.

    python benchmarks/recall.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnm_rl.memory import make_core

ALL_CORES = ("mnm-p", "mnm-g", "lstm", "gru")


@dataclass
class TaskConfig:
    """Shape of the recall task."""

    K: int = 8
    Q: int = 8
    n_keys: int = 16
    n_values: int = 8

    @property
    def input_size(self) -> int:
        return self.n_keys + self.n_values + 2

    @property
    def length(self) -> int:
        return self.K + self.Q


def make_batch(cfg: TaskConfig, batch: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random sequences: inputs ``[T, B, F]`` and targets ``[T, B]`` (``-100`` at store steps)."""
    if cfg.K > cfg.n_keys:
        raise ValueError(f"K={cfg.K} distinct keys need n_keys >= K, got {cfg.n_keys}")
    keys = torch.rand(batch, cfg.n_keys, generator=gen).argsort(dim=1)[:, : cfg.K]  # distinct
    values = torch.randint(cfg.n_values, (batch, cfg.K), generator=gen)
    asked = torch.randint(cfg.K, (batch, cfg.Q), generator=gen)
    query_keys = keys.gather(1, asked)
    answers = values.gather(1, asked)

    x = torch.zeros(cfg.length, batch, cfg.input_size)
    b = torch.arange(batch)
    for t in range(cfg.K):
        x[t, b, keys[:, t]] = 1.0
        x[t, b, cfg.n_keys + values[:, t]] = 1.0
        x[t, :, -2] = 1.0
    for q in range(cfg.Q):
        x[cfg.K + q, b, query_keys[:, q]] = 1.0
        x[cfg.K + q, :, -1] = 1.0
    targets = torch.full((cfg.length, batch), -100, dtype=torch.long)
    targets[cfg.K :] = answers.T
    return x, targets


class RecallModel(nn.Module):
    """A recurrent core followed by a linear classifier over the value symbols."""

    def __init__(self, kind: str, cfg: TaskConfig, **core_kwargs):
        super().__init__()
        self.core = make_core(kind, cfg.input_size, **core_kwargs)
        self.head = nn.Linear(self.core.output_size, cfg.n_values)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        starts = torch.zeros(x.shape[:2], dtype=torch.bool)
        starts[0] = True
        features, _, aux = self.core(x, self.core.initial_state(x.shape[1]), starts)
        return self.head(features), aux


def core_kwargs(kind: str, args: argparse.Namespace) -> dict:
    """Constructor arguments for ``kind``; hidden sizes chosen for similar parameter counts."""
    if kind.startswith("mnm"):
        return {
            "hidden_size": args.mnm_hidden,
            "n_heads": args.heads,
            "n_layers": args.layers,
        }
    return {"hidden_size": args.lstm_hidden if kind == "lstm" else args.gru_hidden}


def n_params(module: nn.Module) -> int:
    """Number of trainable parameters, classifier head included."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def evaluate(model: RecallModel, cfg: TaskConfig, n_seqs: int, seed: int) -> float:
    """Accuracy at query steps over ``n_seqs`` fresh sequences (fixed ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    correct = total = 0
    for start in range(0, n_seqs, 256):
        x, targets = make_batch(cfg, min(256, n_seqs - start), gen)
        logits, _ = model(x)
        mask = targets >= 0
        correct += int((logits.argmax(-1)[mask] == targets[mask]).sum())
        total += int(mask.sum())
    model.train()
    return correct / total


def train_one(kind: str, cfg: TaskConfig, args: argparse.Namespace) -> dict:
    """Train one core and return its figures."""
    torch.manual_seed(args.seed)
    model = RecallModel(kind, cfg, **core_kwargs(kind, args))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    uses_memory_loss = getattr(model.core, "has_memory_loss", False)
    start = time.perf_counter()
    log_every = max(1, args.steps // 5)
    running = None
    for step in range(1, args.steps + 1):
        x, targets = make_batch(cfg, args.batch, gen)
        logits, aux = model(x)
        task_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss = task_loss
        if uses_memory_loss and args.mem_coef > 0:
            loss = loss + args.mem_coef * aux["recon_after"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        running = task_loss.item() if running is None else 0.95 * running + 0.05 * task_loss.item()
        if step % log_every == 0 or step == args.steps:
            extra = ""
            if uses_memory_loss:
                extra = (
                    f" recon_after {aux['recon_after'].mean().item():.4f}"
                    f" beta {aux['beta'].mean().item():.3f}"
                    f" |M| {aux['fast_weight_norm'][-1].mean().item():.3f}"
                )
            print(
                f"  [{kind}] step {step:5d} loss {running:.4f}{extra}"
                f" ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, cfg, args.eval_seqs, seed=args.seed + 10_000)
    return {"accuracy": accuracy, "params": n_params(model), "seconds": seconds}


@torch.no_grad()
def write_gain(args: argparse.Namespace, n: int = 512) -> None:
    """Print ``recon_after / recon_before`` of one write at initialisation, per rule, H and beta.

    Random keys, values ``tanh(N(0, 1))``, memory width ``--mnm-hidden``, ``--layers`` layers. A
    ratio of 0 means the write stores the pair exactly; above 1, it overshoots.
    """
    from mnm_rl.memory import FastWeightMemory

    dim, betas = args.mnm_hidden, (0.3, 0.6, 1.0)
    print(f"write gain at init: recon_after / recon_before (D={dim}, L={args.layers}, n={n})")
    print(f"{'rule':6s} {'H':>2s} " + " ".join(f"beta={b:<4}" for b in betas))
    for rule in ("mnm-p", "mnm-g"):
        for heads in sorted({1, args.heads}):
            torch.manual_seed(args.seed)
            memory = FastWeightMemory(dim, args.layers, rule)
            keys = torch.randn(n, heads, dim)
            values = torch.tanh(torch.randn(n, heads, dim))
            ratios = []
            for beta in betas:
                weights, before = memory.write(
                    memory.initial(n), keys, values, torch.full((n,), beta)
                )
                after = memory.read(weights, keys)
                ratio = memory.reconstruction_loss(after, values).mean() / (
                    memory.reconstruction_loss(before, values).mean()
                )
                ratios.append(f"{ratio.item():9.3f}")
            print(f"{rule:6s} {heads:2d} " + " ".join(ratios))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--K", type=int, default=8, help="key->value pairs stored per sequence")
    p.add_argument("--Q", type=int, default=None, help="queries per sequence (default K)")
    p.add_argument("--n-keys", type=int, default=None, help="key symbols (default 2K)")
    p.add_argument("--n-values", type=int, default=8, help="value symbols (chance = 1/n_values)")
    p.add_argument("--steps", type=int, default=None, help="Adam steps per core")
    p.add_argument("--quick", action="store_true", help="short run: under 4 minutes on 2 CPUs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cores", default=",".join(ALL_CORES), help="comma-separated core kinds")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 1 is fastest for these small matmuls on a shared machine",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--mem-coef", type=float, default=1.0, help="weight of recon_after (MNM)")
    p.add_argument("--mnm-hidden", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--lstm-hidden", type=int, default=76)
    p.add_argument("--gru-hidden", type=int, default=88)
    p.add_argument("--eval-seqs", type=int, default=2048)
    p.add_argument(
        "--write-gain", action="store_true", help="only print the one-write gain table and exit"
    )
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 800 if args.quick else 3000
    args.Q = args.Q or args.K
    args.n_keys = args.n_keys or 2 * args.K
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train and evaluate every requested core; return (and print last) the JSON summary."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.write_gain:
        write_gain(args)
        return {}
    cfg = TaskConfig(K=args.K, Q=args.Q, n_keys=args.n_keys, n_values=args.n_values)
    kinds = [k.strip() for k in args.cores.split(",") if k.strip()]
    chance = 1.0 / cfg.n_values
    print(
        f"recall: K={cfg.K} Q={cfg.Q} n_keys={cfg.n_keys} n_values={cfg.n_values} "
        f"steps={args.steps} batch={args.batch} lr={args.lr} mem_coef={args.mem_coef} "
        f"seed={args.seed} threads={args.threads}",
        flush=True,
    )
    params = {k: n_params(RecallModel(k, cfg, **core_kwargs(k, args))) for k in kinds}
    print("parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()), flush=True)
    if len(params) > 1 and max(params.values()) > 1.25 * min(params.values()):
        print("warning: parameter counts differ by more than 25%", flush=True)

    results = {}
    total = time.perf_counter()
    for kind in kinds:
        results[kind] = train_one(kind, cfg, args)
    total = time.perf_counter() - total

    print()
    print(f"{'core':8s} {'params':>8s} {'accuracy':>9s} {'seconds':>8s}")
    for kind, r in results.items():
        print(f"{kind:8s} {r['params']:8d} {r['accuracy']:9.3f} {r['seconds']:8.1f}")
    print(f"{'chance':8s} {'':8s} {chance:9.3f}")
    summary = {
        "task": "associative-recall",
        "K": cfg.K,
        "Q": cfg.Q,
        "n_keys": cfg.n_keys,
        "n_values": cfg.n_values,
        "steps": args.steps,
        "seed": args.seed,
        "chance": chance,
        "accuracy": {k: round(r["accuracy"], 4) for k, r in results.items()},
        "params": {k: r["params"] for k, r in results.items()},
        "seconds": {k: round(r["seconds"], 1) for k, r in results.items()},
        "total_seconds": round(total, 1),
        "machine": f"{platform.machine()}, {args.threads} threads",
    }
    if not all(math.isfinite(v) for v in summary["accuracy"].values()):
        raise RuntimeError("non-finite accuracy")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
