"""The MNM controller cell: an LSTM that writes to and reads from a fast-weight memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mnm_rl.memory import fused, products
from mnm_rl.memory.base import CoreBackward, LazyDiagnostics, RecurrentCore
from mnm_rl.memory.fast_weights import (
    Activation,
    FastWeightMemory,
    WriteRule,
    fast_weight_norm,
    rms_normalize,
)
from mnm_rl.memory.state import CoreState


class MNMCore(RecurrentCore):
    """Metalearned Neural Memory (Munkhdalai et al., 2019) as a recurrent core.

    At every step ``t``, for each sequence in the batch::

        h_t, c_t  = LSTM([x_t ; v^r_{t-1}], (h_{t-1}, c_{t-1}))
        [k^r_{1..H} ; k^w_{1..H} ; v^w_{1..H} ; beta'] = tanh(W_v h_t + b_v)   # + U x_t: see below
        beta_t    = sigmoid(W_beta beta' + b_beta)
        M_t       = write(M_{t-1}, k^w, v^w, beta_t)        # mnm-p or mnm-g
        v^r_t     = mean_i f_{M_t}(k^r_i)                   # f_{M_{t-1}} if read_before_write
        y_t       = W_y [h_t ; v^r_t]

    State: ``h, c, read`` ``[B, D]`` and ``fast_weights`` ``[B, L, D, D]``.

    Args:
        input_size: features per step ``F``.
        hidden_size: controller width; also the memory width ``D`` unless ``memory_size`` is set.
        memory_size: width ``D`` of the fast-weight MLP, keys and values.
        n_heads: read and write heads ``H``.
        n_layers: layers ``L`` of the fast-weight MLP.
        write_rule: ``"mnm-p"`` (local, learned targets) or ``"mnm-g"`` (inner gradient step).
        activation: hidden activation of the fast-weight MLP.
        output_size: width of ``y_t`` (default ``hidden_size``).
        retention_lag: ``K > 0`` adds a retention term to the memory loss: after the write at
            step ``t``, the memory must still answer the pair written at step ``t - K`` (same
            episode, same sequence), ``aux["recon_retained"]``. The paper's post-write loss alone
            rewards overwriting (``beta -> 1``); this term makes the write rule pay for it.
        read_before_write: read ``v^r_t`` from ``M_{t-1}``, before this step's write, instead
            of from ``M_t`` (the paper's order). The read then carries only what earlier steps
            stored; the current input reaches the output through ``h_t`` alone, so a full write
            (``beta = 1``) no longer pays off as a copy of the present.
        interaction_input: the keys, values and write strength also see the step's input
            directly: ``tanh(W_v h_t + U x_t + b_v)``. Without it they are functions of the
            controller state alone, so the same observation is written under a different key
            and value depending on what came before it; ``U x_t`` gives the memory a code for an
            observation that does not depend on when it was seen.
    """

    has_memory_loss = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        memory_size: int | None = None,
        n_heads: int = 4,
        n_layers: int = 3,
        write_rule: WriteRule = "mnm-p",
        activation: Activation = "tanh",
        output_size: int | None = None,
        retention_lag: int = 0,
        read_before_write: bool = False,
        interaction_input: bool = False,
    ):
        super().__init__()
        if retention_lag < 0:
            raise ValueError(f"retention_lag must be >= 0, got {retention_lag}")
        self.retention_lag = retention_lag
        self.read_before_write = read_before_write
        memory_size = memory_size or hidden_size
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.memory_size = memory_size
        self.n_heads = n_heads
        self.output_size = output_size or hidden_size
        # LSTM controller, written out so the input projection of a whole sequence is one matmul.
        self.input_gates = nn.Linear(input_size, 4 * hidden_size)
        self.recurrent_gates = nn.Linear(hidden_size + memory_size, 4 * hidden_size, bias=False)
        with torch.no_grad():  # forget-gate bias 1: remember by default
            self.input_gates.bias[hidden_size : 2 * hidden_size].fill_(1.0)
        self.interaction = nn.Linear(hidden_size, 3 * n_heads * memory_size + memory_size)
        # U x_t of the interaction, for a whole sequence at once (its bias is b_v's).
        self.input_interaction = (
            nn.Linear(input_size, self.interaction.out_features, bias=False)
            if interaction_input
            else None
        )
        self.beta_gate = nn.Linear(memory_size, 1)
        self.memory = FastWeightMemory(memory_size, n_layers, write_rule, activation)
        self.output = nn.Linear(hidden_size + memory_size, self.output_size)

    @property
    def write_rule(self) -> str:
        return self.memory.write_rule

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> CoreState:
        weights = self.memory.initial_weights
        device = device or weights.device
        zeros = torch.zeros(batch_size, self.hidden_size, device=device, dtype=weights.dtype)
        return CoreState(
            {
                "h": zeros,
                "c": zeros.clone(),
                "read": zeros.new_zeros(batch_size, self.memory_size),
                "fast_weights": self.memory.initial(batch_size).to(device),
            }
        )

    def memory_parameters(self) -> list[nn.Parameter]:
        """The interaction (keys, values, write strength: ``W_v``, ``U``, ``W_beta``) and the
        fast-weight memory's own parameters (initial weights, learned targets)."""
        modules = [self.interaction, self.input_interaction, self.beta_gate, self.memory]
        return [p for m in modules if m is not None for p in m.parameters()]

    @property
    def interaction_input(self) -> bool:
        return self.input_interaction is not None

    def step(
        self, gates_x: Tensor, state: CoreState, interaction_x: Tensor | None = None
    ) -> tuple[Tensor, CoreState, Mapping[str, Tensor]]:
        """One step from the precomputed input gates ``gates_x [B, 4 * hidden]`` (and, with
        ``interaction_input``, ``interaction_x = U x_t [B, E]``)."""
        if (interaction_x is None) != (self.input_interaction is None):
            raise ValueError(
                "interaction_x (U x_t, from core.input_interaction) must be given exactly when "
                f"the core has interaction_input (it has: {self.interaction_input})"
            )
        (h, c, read, layers), parts = self._step(
            gates_x,
            state["h"],
            state["c"],
            state["read"],
            state["fast_weights"].unbind(1),
            interaction_x=interaction_x,
        )
        new_state = CoreState(
            {"h": h, "c": c, "read": read, "fast_weights": torch.stack(layers, dim=1)}
        )
        return self.output(torch.cat([h, read], dim=-1)), new_state, self._aux(parts)

    def _step(
        self,
        gates_x: Tensor,
        h: Tensor,
        c: Tensor,
        read: Tensor,
        layers: Sequence[Tensor],
        recall_keys: Tensor | None = None,
        interaction_x: Tensor | None = None,
    ) -> tuple[tuple[Tensor, Tensor, Tensor, list[Tensor]], dict[str, Tensor]]:
        """The recurrent part of :meth:`step` on the state's tensors, with the fast weights as
        ``L`` layers ``[B, D, D]``: the loop in :meth:`forward` carries the layers from step to
        step and stacks them into ``[B, L, D, D]`` once, at the end. What does not feed back
        into the recurrence is left to the caller, to do once for a whole sequence: the output
        ``y_t = W_y [h_t ; v^r_t]``, and the reconstruction losses (:meth:`_aux`), whose inputs
        are returned instead. ``recall_keys [B, H, D]`` (RMS-normalised write keys of an earlier
        step) are read after the write too, for the retention loss: ``parts["answer_recalled"]``.
        ``interaction_x [B, E]`` is ``U x_t`` (``interaction_input``), added before the tanh."""
        # gates_x + W_rec [h ; read] as one addmm; sigmoid once over all four gate blocks (the
        # g block's sigmoid is unused): fewer, larger kernels than one call per gate.
        gates = torch.addmm(gates_x, torch.cat([h, read], dim=-1), self.recurrent_gates.weight.t())
        i, f, _, o = torch.sigmoid(gates).chunk(4, dim=-1)
        g = torch.tanh(gates[:, 2 * self.hidden_size : 3 * self.hidden_size])
        c = torch.addcmul(f * c, i, g)  # f * c + i * g
        h = o * torch.tanh(c)

        batch, heads, dim = h.shape[0], self.n_heads, self.memory_size
        interaction = self.interaction(h)
        if interaction_x is not None:
            interaction = interaction + interaction_x
        interaction = torch.tanh(interaction)
        kvs, beta_pre = interaction.split([3 * heads * dim, dim], dim=-1)
        keys, write_values = kvs.view(batch, 3 * heads, dim).split([2 * heads, heads], dim=1)
        beta = torch.sigmoid(self.beta_gate(beta_pre)).squeeze(-1)

        memory = self.memory
        # [read keys ; write keys], RMS-normalised once for both passes through the memory.
        keys = rms_normalize(keys)
        if self.read_before_write:
            read = memory.read(layers, keys[:, :heads], normalized=True).mean(dim=1)
        layers, answer_before = memory.write(
            list(layers), keys[:, heads:], write_values, beta, normalized=True
        )
        # The read keys (unless read already), the write keys (for the post-write loss) and the
        # recalled keys if any, in one pass through the written memory.
        after = keys[:, heads:] if self.read_before_write else keys
        if recall_keys is not None:  # concatenate only then: a one-tensor cat is still a copy
            after = torch.cat([after, recall_keys], dim=1)
        answers = list(memory.read(layers, after, normalized=True).split(heads, 1))
        if not self.read_before_write:
            read = answers.pop(0).mean(dim=1)
        write_answers = answers[0]

        with torch.no_grad():  # a diagnostic: no gradient
            norm = fast_weight_norm(layers)
        parts = {
            "answer_after": write_answers,
            "answer_before": answer_before,
            "values": write_values,
            "beta": beta,
            "fast_weight_norm": norm,
            "write_keys": keys[:, heads : 2 * heads],
        }
        if recall_keys is not None:
            parts["answer_recalled"] = answers[1]
        return (h, c, read, layers), parts

    def _aux(self, parts: dict[str, Tensor], retained: Tensor | None = None) -> LazyDiagnostics:
        """The diagnostics of :data:`AUX_KEYS` from :meth:`_step`'s parts (one step or stacked),
        computed when first read; ``retained`` is the retention loss (zeros when not given)."""
        loss = self.memory.reconstruction_loss

        def compute() -> dict[str, Tensor]:
            return {
                "recon_after": loss(parts["answer_after"], parts["values"]),
                "recon_before": loss(parts["answer_before"], parts["values"]),
                "recon_retained": torch.zeros_like(parts["beta"]) if retained is None else retained,
                "beta": parts["beta"],
                "fast_weight_norm": parts["fast_weight_norm"],
            }

        return LazyDiagnostics(compute)

    def _retention_loss(
        self, steps: list[dict[str, Tensor]], values: Tensor, episode_starts: Tensor
    ) -> Tensor:
        """``[T, B]``: the error, after the write at step ``t``, of the memory's answer to the pair
        written at ``t - K``; zero where that pair lies before the sequence or in an earlier
        episode (its memory was reset). ``values``: the write values, ``[T, B, H, D]``."""
        lag = self.retention_lag
        retained = values.new_zeros(values.shape[:2])
        if lag == 0 or len(steps) <= lag:
            return retained
        answers = _stack([p["answer_recalled"] for p in steps[lag:]])
        # Episode starts counted up to each step: equal at t - K and t when none lies in between.
        started = (episode_starts != 0).cumsum(dim=0)
        same_episode = (started[lag:] == started[:-lag]).to(values.dtype)
        errors = self.memory.reconstruction_loss(answers, values[:-lag]) * same_episode
        return torch.cat([retained[:lag], errors])

    def _fused_kernel(self, x: Tensor):
        """The compiled kernel if it applies here (:mod:`mnm_rl.memory.fused`), else ``None``."""
        if (
            x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.float64)
            or self.retention_lag
            or self.read_before_write
        ):
            return None
        return fused.load_extension()

    @property
    def has_explicit_backward(self) -> bool:  # type: ignore[override]
        """Whether :meth:`explicit_forward` can give a pass: not with an interaction input or a
        retention lag, which the kernel's explicit pass does not run."""
        return (
            self.input_interaction is None and not self.retention_lag and not self.read_before_write
        )

    def explicit_forward(
        self, x: Tensor, state: CoreState, episode_starts: Tensor, memory_weight: float = 0.0
    ) -> tuple[Tensor, Mapping[str, Tensor], CoreBackward] | None:
        """By the compiled kernel (:func:`~mnm_rl.memory.fused.explicit_sequence`) where it
        applies and :attr:`has_explicit_backward`, else ``None``."""
        self._check_inputs(x, state, episode_starts)
        kernel = self._fused_kernel(x) if self.has_explicit_backward else None
        if kernel is None:
            return None
        return fused.explicit_sequence(self, x, episode_starts, state, kernel, memory_weight)

    def _forward_fused(
        self, x: Tensor, state: CoreState, episode_starts: Tensor, kernel
    ) -> tuple[Tensor, CoreState, Mapping[str, Tensor]]:
        """:meth:`forward` by the compiled kernel: the same equations, one call per sequence."""
        interaction_x = self.input_interaction(x) if self.input_interaction is not None else None
        gates_x = products.linear(x, self.input_gates.weight, self.input_gates.bias)
        hs, reads, after, before, values, beta, norm, c, weights = fused.run_sequence(
            self, gates_x, episode_starts, state, kernel, interaction_x
        )
        y = products.linear(torch.cat([hs, reads], dim=-1), self.output.weight, self.output.bias)
        parts = {
            "answer_after": after,
            "answer_before": before,
            "values": values,
            "beta": beta,
            "fast_weight_norm": norm,
        }
        final = CoreState({"h": hs[-1], "c": c, "read": reads[-1], "fast_weights": weights})
        return y, final, self._aux(parts)

    def forward(
        self, x: Tensor, state: CoreState, episode_starts: Tensor
    ) -> tuple[Tensor, CoreState, Mapping[str, Tensor]]:
        self._check_inputs(x, state, episode_starts)
        kernel = self._fused_kernel(x)
        if kernel is not None:
            return self._forward_fused(x, state, episode_starts, kernel)
        # [T, B, 4 * hidden], one matmul for the whole sequence; unbind, not gates_x[t]: one
        # gradient node instead of a zero-filled [T, B, 4 * hidden] gradient per step.
        gates_x = self.input_gates(x).unbind(0)
        interaction_x: Sequence[Tensor | None] = (
            self.input_interaction(x).unbind(0)
            if self.input_interaction is not None
            else [None] * x.shape[0]
        )
        h, c, read = state["h"], state["c"], state["read"]
        layers = state["fast_weights"].unbind(1)
        # One host read of the steps where some environment starts an episode: only those steps
        # pay for the masked reset (the result is the same as resetting at every step).
        resets = episode_starts.any(dim=1).tolist()
        initial = None
        hs, reads, steps = [], [], []
        lag = self.retention_lag
        for t in range(x.shape[0]):
            if resets[t]:
                if initial is None:
                    initial = self.initial_state(x.shape[1], x.device)
                    initial_layers = initial["fast_weights"].unbind(1)
                keep = (episode_starts[t] == 0).view(-1, 1)
                h, c, read = (
                    torch.where(keep, v, initial[k])
                    for k, v in (("h", h), ("c", c), ("read", read))
                )
                keep = keep.view(-1, 1, 1)
                layers = [
                    torch.where(keep, w, w0) for w, w0 in zip(layers, initial_layers, strict=True)
                ]
            recall = steps[t - lag]["write_keys"] if lag and t >= lag else None
            (h, c, read, layers), parts = self._step(
                gates_x[t], h, c, read, layers, recall, interaction_x[t]
            )
            hs.append(h)
            reads.append(read)
            steps.append(parts)
        y = self.output(torch.cat([_stack(hs), _stack(reads)], dim=-1))  # all steps at once
        stacked = {k: _stack([p[k] for p in steps]) for k in _STEP_PARTS}
        aux = self._aux(stacked, self._retention_loss(steps, stacked["values"], episode_starts))
        state = CoreState(
            {"h": h, "c": c, "read": read, "fast_weights": torch.stack(layers, dim=1)}
        )
        return y, state, aux


#: The parts of :meth:`MNMCore._step` that :meth:`MNMCore._aux` reads, stacked over a sequence.
_STEP_PARTS = ("answer_after", "answer_before", "values", "beta", "fast_weight_norm")


def _stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack(tensors)``; a view, not a copy, for a single tensor (a rollout step)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
