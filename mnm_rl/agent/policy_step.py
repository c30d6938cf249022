"""A rollout step of the whole policy (features extractor, core, heads and the actions' draw) as
one compiled call (``csrc/policy_step.cpp``).

:meth:`~mnm_rl.agent.policy.RecurrentMemoryPolicy.act` runs once per rollout step for a batch of
a few envs. Through PyTorch that is about forty small operators and a dozen Python functions
(the observation's preprocessing, the extractor, the core with its state bookkeeping, the heads,
the draw), each a few microseconds whatever its size: about 150 us for an LSTM policy on 8
MiniGrid envs, several times the arithmetic. This module runs the same step as one call; an MNM
core's step inside it is the MNM kernel's (``mnm_rl/memory/csrc/mnm_sequence.cpp``, compiled
into this extension too). It also keeps, between steps, the grid encoder's projected table
(:mod:`mnm_rl.agent.grid_linear`), which depends only on the extractor's weights: it is rebuilt
when any of them changes (an optimizer step, ``load_state_dict``), as their version counters
tell. A rollout gathers the step's constant arguments once (:class:`StepPlan`,
:func:`rollout_steps`), and runs an MNM policy's steps on a thread of their own
(:func:`step_thread`).

It applies on the CPU, without gradients, to policies whose core (``lstm``, ``gru``, ``mlp``,
``mnm-p``, ``mnm-g``) is shared by actor and critic, whose heads' activation is ``nn.Tanh`` or
``nn.ReLU``, and whose observations are a symbol grid (at most one), Discrete and Box inputs;
for an MNM core, not with a retention loss, reads before the write or an interaction that sees
the input. Elsewhere (a separate critic core, CUDA, ...) the PyTorch step runs, as it does with
``MNM_RL_COMPILED_STEP=0`` in the environment (only this step) or ``MNM_RL_FUSED=0`` (every
compiled kernel). It draws the actions from torch's default generator as
:meth:`~mnm_rl.agent.policy.RecurrentMemoryPolicy.sample` does, so the same seed gives the same
actions; ``tests/test_policy_step.py`` compares it with the PyTorch step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from gymnasium import spaces
from torch import Tensor, nn

from mnm_rl import native
from mnm_rl.agent import action_heads
from mnm_rl.agent.extractors import MemoryFeaturesExtractor, SymbolicGridEncoder
from mnm_rl.memory import CoreState, fused
from mnm_rl.memory.baselines import GRUCore, LSTMCore, MLPCore
from mnm_rl.memory.mnm import MNMCore

if TYPE_CHECKING:
    from mnm_rl.agent.policy import RecurrentMemoryPolicy

#: The kernel's C++ source, built into its own extension with the MNM kernel's (which it calls
#: for the MNM cores).
SOURCES = [
    Path(__file__).with_name("csrc") / "policy_step.cpp",
    Path(fused.__file__).with_name("csrc") / "mnm_sequence.cpp",
]
#: The extension, built on first use.
EXTENSION = native.LazyExtension("mnm_rl_policy_step", SOURCES, "the compiled policy step")
#: Environment variable: ``0`` runs the policy's rollout step in PyTorch, whatever the other
#: kernels do.
SWITCH_VARIABLE = "MNM_RL_COMPILED_STEP"
#: The cores the kernel runs, and its code for each (``csrc/policy_step.cpp``: ``CoreKind``).
CORE_KINDS: dict[type[nn.Module], int] = {MLPCore: 0, LSTMCore: 1, GRUCore: 2, MNMCore: 3}
#: Each core's state, in the kernel's order.
STATE_KEYS: dict[type[nn.Module], tuple[str, ...]] = {
    MLPCore: (),
    LSTMCore: ("h", "c"),
    GRUCore: ("h",),
    MNMCore: ("h", "c", "read", "fast_weights"),
}


def load_extension() -> ModuleType | None:
    """The compiled step, built on first use; ``None`` (with one warning) if it cannot be built,
    and ``None`` without building it under ``MNM_RL_COMPILED_STEP=0`` or ``MNM_RL_FUSED=0``."""
    if os.environ.get(SWITCH_VARIABLE, "1") == "0":
        return None
    return EXTENSION.load()


@dataclass(frozen=True)
class StepLayout:
    """How a policy's observation reaches the kernel: whether it has a symbol grid, the grid's
    key with its encoder's column layout, and every other input's key and kind (``n`` for a
    Discrete space of ``n`` values, one-hot; ``0`` for a Box or MultiBinary, flattened), in the
    extractor's column order. A key is ``None`` for an observation that is not a dict."""

    has_grid: bool
    grid_key: str | None
    other_keys: tuple[str | None, ...]
    kinds: tuple[int, ...]
    embedding_dim: int
    grid_column: int
    pool_column: int
    dense_columns: tuple[int, ...]
    sizes: tuple[int, ...]


def _name(key: str | None) -> str:
    """The extractor's name for an observation's key (``"obs"`` for one that is not a dict)."""
    return "obs" if key is None else str(key)


def step_layout(policy: RecurrentMemoryPolicy) -> StepLayout | None:
    """The policy's :class:`StepLayout`, or ``None`` where the kernel does not apply to it (see
    the module's docstring)."""
    extractor, core = policy.features_extractor, policy.core
    if isinstance(core, MNMCore) and (
        core.retention_lag or core.read_before_write or core.interaction_input
    ):
        return None  # what the MNM kernel does not run, or not in one step (its input part)
    if (
        type(core) not in CORE_KINDS
        or policy.critic_core is not None
        or policy.activation_fn not in action_heads.ACTIVATION_CODES
        or not isinstance(extractor, MemoryFeaturesExtractor)
    ):
        return None
    space = policy.observation_space
    subspaces = dict(space.spaces) if isinstance(space, spaces.Dict) else {None: space}
    grids = [
        k for k in extractor.keys if isinstance(extractor.encoders[_name(k)], SymbolicGridEncoder)
    ]
    if len(grids) > 1:
        return None
    other_keys, kinds = [], []
    for key in extractor.keys:
        if key in grids:
            continue
        subspace = subspaces[key]
        if isinstance(subspace, spaces.Discrete):
            if subspace.start != 0:
                return None
            kinds.append(int(subspace.n))
        elif isinstance(subspace, spaces.Box | spaces.MultiBinary):
            kinds.append(0)
        else:
            return None
        other_keys.append(key)
    if not grids:
        return StepLayout(False, None, tuple(other_keys), tuple(kinds), 0, 0, -1, (), ())
    _, layout = extractor.grid_layout
    grid: SymbolicGridEncoder = extractor.encoders[_name(grids[0])]
    return StepLayout(
        True,
        grids[0],
        tuple(other_keys),
        tuple(kinds),
        grid.cell_dim // len(grid.sizes),
        layout.grid_column,
        layout.pool_column,
        layout.dense_columns,
        layout.sizes,
    )


# The step reads the policy's modules and parameters through their ``_modules`` and
# ``_parameters`` dicts: ``nn.Module.__getattr__`` took about 0.6 us per name, 20 us of a step.
# Read anew for every plan (each rollout, each single step), so that replaced modules or
# parameters (``load_state_dict`` with ``assign=True``, say) are what the kernel gets.


def _linear_tensors(layers: nn.Module | list[nn.Module]) -> list[Tensor]:
    """``[W_0, b_0, W_1, b_1, ...]`` of a ``Sequential``'s (or a list's) ``Linear`` layers, as
    :func:`~mnm_rl.agent.action_heads.layer_tensors` gives them."""
    tensors = []
    for layer in layers._modules.values() if isinstance(layers, nn.Module) else layers:
        if isinstance(layer, nn.Linear):
            params = layer._parameters
            tensors += (params["weight"], params["bias"])
    return tensors


def _core_tensors(core: nn.Module) -> list[Tensor]:
    if type(core) is MLPCore:
        return _linear_tensors(core._modules["net"])
    if type(core) is MNMCore:
        modules = core._modules
        return [
            *_linear_tensors([modules["input_gates"], modules["output"]]),
            *fused.kernel_weights(core),
        ]
    params = core._modules["rnn"]._parameters
    return [params["weight_ih_l0"], params["weight_hh_l0"], params["bias_ih_l0"],
            params["bias_hh_l0"]]  # fmt: skip


class ProjectedTable:
    """The grid encoder's projected table, kept between steps and rebuilt when the weights it
    is made from change (their storage, or their version counter: every in-place update)."""

    def __init__(self) -> None:
        self.key: tuple[tuple[int, int], ...] | None = None
        self.table: Tensor | None = None

    def get(self, kernel: ModuleType, layout: StepLayout, slots: int,
            grid: SymbolicGridEncoder, weight: Tensor,
            sources: list[Tensor] | None = None) -> Tensor:  # fmt: skip
        """``P`` for the current weights (``slots``: the grid's symbols per observation);
        ``sources``: :func:`table_sources` of ``grid`` and ``weight``, where kept."""
        sources = table_sources(grid, weight) if sources is None else sources
        key = (slots, *((t.data_ptr(), t._version) for t in sources))
        if key != self.key or self.table is None:
            self.table = kernel.project_grid(
                grid.table(), weight, slots, layout.grid_column, layout.pool_column,
                list(layout.dense_columns), list(layout.sizes),
            )  # fmt: skip
            self.key = key
        return self.table


def table_sources(grid: SymbolicGridEncoder, weight: Tensor) -> list[Tensor]:
    """The tensors the projected table is made from: the grid's embeddings and ``weight``."""
    return [emb._parameters["weight"] for emb in grid.embeddings] + [weight]


def policy_step(
    kernel: ModuleType,
    policy: RecurrentMemoryPolicy,
    layout: StepLayout,
    projected: ProjectedTable,
    obs: Tensor | dict[str, Tensor],
    state: CoreState,
    episode_starts: Tensor,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor, CoreState, bool] | None:
    """One step of ``policy`` for ``B`` envs through the kernel (:func:`load_extension`), for a
    policy that has a ``layout`` (:func:`step_layout`); ``None`` where the kernel does not
    apply now (gradients wanted, tensors not on the CPU or not float32/64, no envs, a core it
    does not run), for the caller to take the PyTorch step.

    Args:
        obs: observations ``[B, ...]`` (tensor or dict of tensors).
        state: the core's state before the step.
        episode_starts: ``[B]``; the state of env ``b`` is reset first where it is nonzero.
        projected: where the grid's projected table is kept between calls.

    Returns:
        ``(actions [B], log_probs [B], values [B], state after the step, finite)``, as
        :meth:`~mnm_rl.agent.policy.RecurrentMemoryPolicy.act` gives them.
    """
    plan = step_plan(kernel, policy, layout, projected)
    call = None if plan is None else plan.call(obs, state, episode_starts)
    return None if call is None else run_call(call, deterministic)


def run_call(
    call: _KernelCall, deterministic: bool = False
) -> tuple[Tensor, Tensor, Tensor, CoreState, bool]:
    """The kernel's step for ``call`` (:meth:`StepPlan.call`), here; what :func:`policy_step`
    gives."""
    # races None: the kernel draws the actions' random numbers itself
    result = call.kernel.policy_step(*call.arguments, deterministic, *call.mnm, None)
    return _step_result(result, call)


#: Environment variable: ``0`` runs every rollout step on the rollout's own thread
#: (:func:`step_thread` gives ``None``).
THREAD_VARIABLE = "MNM_RL_STEP_THREAD"


def step_thread(policy: RecurrentMemoryPolicy) -> Any | None:
    """A thread for ``policy``'s rollout steps (:func:`launch_call`; the kernel's
    ``StepThread``, which runs one step at a time and stops when it is garbage), where it pays:
    for an MNM core, whose step's arithmetic outlasts handing the step over (``learn()`` of
    ``throughput.py``'s mnm-p/k2 1.02-1.03x, of its lstm 0.96x with a thread:
    ``docs/benchmarks.md``).
    ``None`` for the other cores, where the kernel is not built or is switched off, and under
    ``MNM_RL_STEP_THREAD=0``."""
    if os.environ.get(THREAD_VARIABLE, "1") == "0" or type(policy.core) is not MNMCore:
        return None
    kernel = load_extension()
    return None if kernel is None else kernel.StepThread()


def launch_call(
    thread: Any, call: _KernelCall, deterministic: bool = False
) -> Callable[[], tuple[Tensor, Tensor, Tensor, CoreState, bool]] | None:
    """The kernel's step for ``call`` (:meth:`StepPlan.call`), begun on ``thread``
    (:func:`step_thread`): returns at once a function that waits for the step and gives what
    :func:`run_call` gives; ``None`` where an MNM core's step would be split between the
    kernel's threads (:func:`~mnm_rl.memory.fused.batch_parts`: 16 envs or more a thread), for
    the caller to run it here. The action draw's random numbers are drawn now, so that torch's
    generator is drawn from in the order :func:`run_call` draws from it. Wait for each step
    (call the function) before launching the next, and before changing anything the step reads
    (the inputs, the state, the parameters)."""
    if call.mnm[-1] != 1:
        return None
    thread.launch(*call.arguments, deterministic, *call.mnm)
    return lambda: _step_result(thread.wait(), call)


@dataclass(frozen=True)
class _KernelCall:
    """A kernel step's arguments: those before ``deterministic``, and the MNM options and batch
    parts after it; with the kernel, the state's keys and the batch size, to run it and read
    its result."""

    kernel: ModuleType
    arguments: tuple
    mnm: tuple[int, bool, bool, float, int]
    keys: tuple[str, ...]
    batch: int


class StepPlan:
    """The kernel step's arguments that stay the same from one step of a rollout to the next
    (the parameters, the layout, the core's options), gathered once (:func:`step_plan`), so that
    each step adds only its observations, state and resets (:meth:`call`). Gathered at every
    step they were a large part of a rollout step's Python inside ``learn()``; gathered once,
    lstm's ``learn()`` ran 1.10x as fast, mnm-p's 1.03x (``docs/benchmarks.md``, forty-first
    session).

    A plan holds the parameters themselves: their in-place changes (an optimizer step,
    ``load_state_dict``) reach the kernel, and the grid's projected table is checked against
    their version counters at every step. Parameters or modules replaced by new ones
    (``load_state_dict(assign=True)``, a move to another device or dtype) do not: make a new
    plan, as every rollout (:func:`rollout_steps`) and every :func:`policy_step` does."""

    def __init__(self, kernel: ModuleType, policy: RecurrentMemoryPolicy, layout: StepLayout,
                 projected: ProjectedTable, kind: int) -> None:  # fmt: skip
        modules = policy._modules
        core = modules["core"]
        extractor = modules["features_extractor"]._modules
        linear = extractor["linear"]._modules["0"]
        weight = linear._parameters["weight"]
        self.kernel, self.layout, self.projected = kernel, layout, projected
        self.keys = STATE_KEYS[type(core)]
        self.grid: SymbolicGridEncoder | None = None
        self.weight, self.sources = weight, []
        if layout.has_grid:
            self.grid = extractor["encoders"]._modules[_name(layout.grid_key)]
            self.sources = table_sources(self.grid, weight)
        # the arguments between the other inputs and the state, and those after the resets
        self.middle = (
            layout.kinds, weight, linear._parameters["bias"], layout.embedding_dim,
            layout.grid_column, layout.pool_column, layout.dense_columns, layout.sizes, kind,
            _core_tensors(core),
        )  # fmt: skip
        self.last = (
            _linear_tensors(modules["action_net"]), _linear_tensors(modules["value_net"]),
            action_heads.ACTIVATION_CODES[policy.activation_fn],
        )  # fmt: skip
        # an MNM core's kernel options (fused.run_sequence's); unused by the other cores
        self.options = fused.kernel_options(core) if type(core) is MNMCore else None
        self.parts: dict[int, int] = {}  # batch parts by batch size

    def call(
        self, obs: Tensor | dict[str, Tensor], state: CoreState, episode_starts: Tensor
    ) -> _KernelCall | None:
        """The kernel step's arguments for these inputs (see :func:`policy_step`), or ``None``
        where it does not apply now."""
        if (
            torch.is_grad_enabled()
            or episode_starts.device.type != "cpu"
            or episode_starts.dim() != 1
            or episode_starts.shape[0] == 0
        ):
            return None
        batch = episode_starts.shape[0]
        if state.batch_size != batch:
            raise ValueError(f"state has batch size {state.batch_size}, episode_starts has {batch}")
        layout = self.layout
        named = obs if isinstance(obs, dict) else {None: obs}
        grid = table = None
        if self.grid is not None:
            grid = named[layout.grid_key]
            table = self.projected.get(self.kernel, layout, grid.numel() // batch, self.grid,
                                       self.weight, self.sources)  # fmt: skip
        arguments = (
            grid, table, [named[k] for k in layout.other_keys], *self.middle,
            [state[k] for k in self.keys], episode_starts, *self.last,
        )  # fmt: skip
        mnm = (0, False, False, 0.0, 1)
        if self.options is not None:
            parts = self.parts.get(batch)
            if parts is None:
                parts = self.parts[batch] = fused.batch_parts(1, batch)
            mnm = (*self.options, parts)
        return _KernelCall(self.kernel, arguments, mnm, self.keys, batch)


def step_plan(
    kernel: ModuleType, policy: RecurrentMemoryPolicy, layout: StepLayout,
    projected: ProjectedTable,
) -> StepPlan | None:  # fmt: skip
    """``policy``'s :class:`StepPlan` (a policy that has a ``layout``: :func:`step_layout`), or
    ``None`` where the kernel does not apply to it now (a core it does not run, a separate
    critic core, parameters not on the CPU or not float32/64)."""
    modules = policy._modules
    kind = CORE_KINDS.get(type(modules["core"]))
    linear = modules["features_extractor"]._modules["linear"]._modules["0"]
    weight = linear._parameters["weight"]
    if (
        kind is None
        or modules.get("critic_core") is not None
        or weight.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.float64)
    ):
        return None
    return StepPlan(kernel, policy, layout, projected, kind)


@dataclass(frozen=True)
class RolloutSteps:
    """What the compiled steps of one rollout share: their :class:`StepPlan`, and the thread
    they run on (:func:`step_thread`; ``None``: the rollout's own)."""

    plan: StepPlan
    thread: Any | None


#: :func:`rollout_steps`' default thread: :func:`step_thread`'s.
_STEP_THREAD: Any = object()


def rollout_steps(policy: RecurrentMemoryPolicy, thread: Any = _STEP_THREAD) -> RolloutSteps | None:
    """For one rollout of ``policy`` (:meth:`~mnm_rl.agent.policy.RecurrentMemoryPolicy.
    act_later`): its steps' plan and ``thread`` (by default :func:`step_thread`'s); ``None``
    where the compiled step does not apply (the PyTorch step runs)."""
    layout = getattr(policy, "_step_layout", None)
    kernel = load_extension() if layout is not None else None
    plan = None if kernel is None else step_plan(kernel, policy, layout, policy._projected_table)
    if plan is None:
        return None
    return RolloutSteps(plan, step_thread(policy) if thread is _STEP_THREAD else thread)


def _step_result(
    result: tuple, call: _KernelCall
) -> tuple[Tensor, Tensor, Tensor, CoreState, bool]:
    """The kernel's result as :func:`policy_step` gives it."""
    actions, log_probs, values, finite, new_state = result
    new = CoreState(dict(zip(call.keys, new_state, strict=True)), batch_size=call.batch)
    return actions, log_probs, values, new, finite
