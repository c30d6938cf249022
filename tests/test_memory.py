"""Behaviour of the memory cores: write rules, resets, state handling, stability."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor

from mnm_rl.memory import CORE_KINDS, CoreState, FastWeightMemory, MNMCore, make_core

INPUT = 6
HIDDEN = 16


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return make_core(kind, INPUT, hidden_size=HIDDEN)


def sequence(steps: int = 12, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, INPUT, generator=g)
    starts = torch.zeros(steps, batch)
    starts[0] = 1
    starts[4, 1] = 1  # env 1 restarts in the first half
    starts[9, 2] = 1  # env 2 restarts in the second half
    starts[6, 0] = 1  # env 0 restarts exactly at the split point
    return x, starts


@pytest.mark.parametrize("rule", ["mnm-p", "mnm-g"])
def test_write_then_read_is_closer_to_value(rule):
    torch.manual_seed(0)
    memory = FastWeightMemory(16, n_layers=3, write_rule=rule)
    weights = memory.initial(5)
    keys = torch.randn(5, 2, 16)
    values = torch.tanh(torch.randn(5, 2, 16))
    new_weights, before = memory.write(weights, keys, values, beta=torch.full((5,), 0.99))
    loss_before = memory.reconstruction_loss(before, values)
    loss_after = memory.reconstruction_loss(memory.read(new_weights, keys), values)
    assert torch.allclose(before, memory.read(weights, keys))
    assert (loss_after < loss_before).all(), (loss_before, loss_after)
    # beta = 0 switches writing off
    unchanged, _ = memory.write(weights, keys, values, beta=torch.zeros(5))
    assert torch.equal(unchanged, weights)


def test_mnm_g_analytic_gradient_matches_autograd():
    torch.manual_seed(0)
    for activation in ("tanh", "sigmoid"):
        memory = FastWeightMemory(8, n_layers=3, write_rule="mnm-g", activation=activation)
        weights = (memory.initial(4) + 0.1 * torch.randn(4, 3, 8, 8)).detach().requires_grad_()
        keys, values = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
        loss = (memory.read(weights, keys) - values).pow(2).sum(-1).mean(-1)  # mean over heads
        (expected,) = torch.autograd.grad(loss.sum(), weights)
        analytic = memory.reconstruction_grad(weights, keys, values)
        torch.testing.assert_close(analytic, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_split_sequence_equals_whole(kind):
    core = build(kind)
    x, starts = sequence()
    state = core.initial_state(3)
    whole, final, aux = core(x, state, starts)
    first, mid, aux1 = core(x[:6], state, starts[:6])
    second, final2, aux2 = core(x[6:], mid, starts[6:])
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-6)
    assert set(final) == set(final2)
    for key in final:
        torch.testing.assert_close(final2[key], final[key], rtol=1e-5, atol=1e-6)
    for key in aux:
        torch.testing.assert_close(torch.cat([aux1[key], aux2[key]]), aux[key])
    assert whole.shape == (12, 3, core.output_size)


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_environments_are_independent_and_reset(kind):
    core = build(kind)
    x, starts = sequence()
    state = core.initial_state(3)
    out, _, _ = core(x, state, starts)
    changed = x.clone()
    changed[:, 1] += 5.0
    out_changed, _, _ = core(changed, state, starts)
    assert torch.equal(out_changed[:, 0], out[:, 0]) and torch.equal(out_changed[:, 2], out[:, 2])
    if kind != "mlp":
        assert not torch.allclose(out_changed[:, 1], out[:, 1])
    # env 2 restarts at step 9: its outputs from then on equal a fresh run from step 9
    fresh, _, _ = core(x[9:, 2:3], core.initial_state(1), starts[9:, 2:3])
    torch.testing.assert_close(out[9:, 2:3], fresh, rtol=1e-5, atol=1e-6)
    # a reset ignores whatever state came before it (here: garbage)
    garbage = CoreState({k: v + 3.0 for k, v in state.items()}, batch_size=3)
    out_garbage, _, _ = core(x, garbage, starts)
    torch.testing.assert_close(out_garbage, out)


@pytest.mark.parametrize("rule", ["mnm-p", "mnm-g"])
def test_gradients_flow_through_writes(rule):
    core = build(rule)
    x, starts = sequence()
    out, _, aux = core(x, core.initial_state(3), starts)
    # read out only the memory's late answers: the write path must carry gradient there
    (out[-1].sum() + aux["recon_after"].sum()).backward()
    names = [
        "interaction.weight",
        "beta_gate.weight",
        "recurrent_gates.weight",
        "input_gates.weight",
        "memory.initial_weights",
    ]
    if rule == "mnm-p":
        names.append("memory.feedback.weight")
    params = dict(core.named_parameters())
    for name in names:
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_feedback_functions_are_trained_by_later_reads():
    """The BFPF gets gradient from a read at a *later* step, i.e. through the stored weights."""
    core = build("mnm-p")
    x = torch.randn(3, 2, INPUT)
    state = core.initial_state(2)
    _, state, _ = core(x[:2], state, torch.zeros(2, 2))
    # the last step's read only sees the first two writes through the fast weights in `state`
    (grad,) = torch.autograd.grad(state["fast_weights"].sum(), core.memory.feedback.weight)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_state_dict_round_trip(kind):
    core = build(kind, seed=0)
    if isinstance(core, MNMCore):
        with torch.no_grad():
            core.memory.initial_weights.add_(0.5)  # as if meta-learned
        assert "memory.initial_weights" in core.state_dict()
    buffer = io.BytesIO()
    torch.save(core.state_dict(), buffer)
    buffer.seek(0)
    other = build(kind, seed=123)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    for (name, p), (_, q) in zip(core.named_parameters(), other.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    x, starts = sequence()
    a, _, _ = core(x, core.initial_state(3), starts)
    b, _, _ = other(x, other.initial_state(3), starts)
    assert torch.equal(a, b)


def test_core_state_operations():
    core = build("mnm-p")
    state = core.initial_state(4)
    assert state["fast_weights"].shape == (4, 3, HIDDEN, HIDDEN)
    assert state.index([1, 3]).batch_size == 2
    assert torch.equal(state.index(2)["h"], state["h"][2:3])
    varied = CoreState({k: torch.randn_like(v) for k, v in state.items()}, batch_size=4)
    for idx in (torch.tensor([3, 0, 3]), torch.tensor([True, False, False, True])):
        picked = varied.index(idx)  # long tensors by index_select, masks by indexing
        assert picked.batch_size == len(varied["h"][idx])
        assert all(torch.equal(picked[k], varied[k][idx]) for k in varied)
    joined = CoreState.cat([state.index(slice(0, 1)), state.index(slice(1, 4))])
    assert all(torch.equal(joined[k], state[k]) for k in state)
    moved = state.to("cpu").detach()
    assert not moved["fast_weights"].requires_grad and state["fast_weights"].requires_grad
    with pytest.raises(ValueError, match="different keys"):
        CoreState.cat([state, build("lstm").initial_state(1)])
    empty = build("mlp").initial_state(5)
    assert empty.batch_size == 5 and empty.index([0, 1]).batch_size == 2
    with pytest.raises(ValueError, match="x must be"):
        core(torch.zeros(2, 4, INPUT + 1), state, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown core"):
        make_core("transformer", 3)


@pytest.mark.parametrize("rule", ["mnm-p", "mnm-g"])
def test_long_episode_stays_finite_and_bounded(rule):
    """5,000 steps of random input in one episode (MemoryS17Random runs up to 1,445)."""
    torch.manual_seed(0)
    core = make_core(rule, INPUT, hidden_size=32)
    with torch.no_grad():
        # a controller that always writes hard, the worst case for growth
        core.beta_gate.bias.fill_(5.0)
        state = core.initial_state(4)
        norms, outputs = [], []
        for _ in range(50):
            x = 3.0 * torch.randn(100, 4, INPUT)
            out, state, aux = core(x, state, torch.zeros(100, 4))
            norms.append(aux["fast_weight_norm"].max().item())
            outputs.append(out.abs().max().item())
    assert all(torch.isfinite(torch.tensor(norms + outputs)))
    assert max(norms) < 20.0 and max(outputs) < 50.0, (max(norms), max(outputs))
    # bounded, not growing: the last thousand steps are no larger than twice the first thousand
    assert max(norms[-10:]) < 2.0 * max(norms[:10])


def _recording_writes(core: MNMCore) -> list[tuple[Tensor, Tensor, list[Tensor]]]:
    """Make ``core.memory.write`` record ``(keys, values, new layers)`` of every call."""
    calls = []
    write = core.memory.write

    def recording(weights, keys, values, beta, normalized=False):
        new_layers, before = write(weights, keys, values, beta, normalized)
        calls.append((keys.detach(), values.detach(), [w.detach() for w in new_layers]))
        return new_layers, before

    core.memory.write = recording
    return calls


def test_retention_loss_recalls_the_pair_written_lag_steps_before():
    lag = 3
    torch.manual_seed(0)
    core = MNMCore(INPUT, hidden_size=HIDDEN, retention_lag=lag)
    torch.manual_seed(0)
    plain = MNMCore(INPUT, hidden_size=HIDDEN)
    x, starts = sequence()
    out, final, aux = core(x, core.initial_state(3), starts)
    ref_out, ref_final, ref_aux = plain(x, plain.initial_state(3), starts)
    # the lag only adds a loss: outputs, states and the other diagnostics are unchanged
    torch.testing.assert_close(out, ref_out)
    for key in ref_final:
        torch.testing.assert_close(final[key], ref_final[key])
    for key in ("recon_after", "recon_before", "beta"):
        torch.testing.assert_close(aux[key], ref_aux[key])
    assert torch.equal(ref_aux["recon_retained"], torch.zeros(12, 3))

    calls = _recording_writes(core)
    with torch.no_grad():
        core(x, core.initial_state(3), starts)
    retained = aux["recon_retained"].detach()
    assert torch.equal(retained[:lag], torch.zeros(lag, 3))
    for t in range(lag, 12):
        keys, values, _ = calls[t - lag]
        layers = calls[t][2]  # the fast weights after the write at step t
        expected = core.memory.reconstruction_loss(
            core.memory.read(layers, keys, normalized=True), values
        )
        # an episode start in (t - lag, t] reset the memory: that pair is not asked for
        same_episode = starts[t - lag + 1 : t + 1].sum(dim=0) == 0
        torch.testing.assert_close(retained[t], expected * same_episode)
    assert retained[4:7, 1].eq(0).all()  # env 1 restarts at step 4
    assert retained[lag:, 0][:3].gt(0).all()  # env 0 has no start in steps 1..5


def test_retention_loss_trains_the_write_strength():
    """The retention term reaches beta through the writes after the recalled one."""
    torch.manual_seed(0)
    core = MNMCore(INPUT, hidden_size=HIDDEN, retention_lag=2)
    x, starts = sequence()
    _, _, aux = core(x, core.initial_state(3), starts)
    (grad,) = torch.autograd.grad(aux["recon_retained"].sum(), core.beta_gate.bias)
    assert grad.abs().item() > 0
    with pytest.raises(ValueError, match="retention_lag must be >= 0"):
        MNMCore(INPUT, retention_lag=-1)


def test_read_before_write_reads_the_memory_of_earlier_steps():
    torch.manual_seed(0)
    core = MNMCore(INPUT, hidden_size=HIDDEN, read_before_write=True)
    torch.manual_seed(0)
    plain = MNMCore(INPUT, hidden_size=HIDDEN)
    x, starts = sequence()
    state = core.initial_state(3)
    _, final, aux = core(x, state, starts)
    _, ref_final, ref_aux = plain(x, state, starts)
    # the first step's read (h, c are from the same controller) sees only the initial weights
    _, first, _ = core(x[:1], state, starts[:1])
    heads = core.n_heads
    keys = core.interaction(first["h"]).tanh()[:, : heads * HIDDEN].view(3, heads, HIDDEN)
    expected = core.memory.read(state["fast_weights"], keys).mean(dim=1)
    torch.testing.assert_close(first["read"], expected)
    # the order changes what is read, not how the memory is written
    assert not torch.allclose(final["read"], ref_final["read"])
    assert torch.isfinite(aux["recon_after"]).all() and set(aux) == set(ref_aux)


@pytest.mark.parametrize("use_kernel", ["0", "1"])
def test_interaction_input_writes_an_observation_the_same_whatever_came_before(
    use_kernel, monkeypatch
):
    """With the interaction reading the input and its controller weights zeroed, what is written
    depends on the observations alone: two different controller states before the same inputs
    end in the same fast weights. Without the input path they do not."""
    monkeypatch.setenv("MNM_RL_FUSED", use_kernel)
    torch.manual_seed(0)
    core = MNMCore(INPUT, hidden_size=HIDDEN, n_heads=2, n_layers=2, interaction_input=True)
    assert core.interaction_input and core.input_interaction.weight.shape == (
        3 * 2 * HIDDEN + HIDDEN,
        INPUT,
    )
    x = torch.randn(5, 2, INPUT)
    no_starts = torch.zeros(5, 2)
    start = core.initial_state(2)
    other = CoreState({**start, "h": torch.randn(2, HIDDEN), "c": torch.randn(2, HIDDEN)})

    def final_weights(model: MNMCore, state: CoreState) -> Tensor:
        with torch.no_grad():
            return model(x, state, no_starts)[1]["fast_weights"]

    with torch.no_grad():
        core.interaction.weight.zero_()
    torch.testing.assert_close(final_weights(core, start), final_weights(core, other))
    plain = MNMCore(INPUT, hidden_size=HIDDEN, n_heads=2, n_layers=2)
    assert not torch.allclose(final_weights(plain, start), final_weights(plain, other))
    # one step at a time needs U x_t: without it the step would silently drop the input path
    gates = core.input_gates(x[0])
    with pytest.raises(ValueError, match="interaction_x"):
        core.step(gates, start)
    with pytest.raises(ValueError, match="interaction_x"):
        plain.step(plain.input_gates(x[0]), start, core.input_interaction(x[0]))
    with torch.no_grad():
        y_step, _, _ = core.step(gates, start, core.input_interaction(x[0]))
        y_seq, _, _ = core(x[:1], start, no_starts[:1])
    torch.testing.assert_close(y_step, y_seq[0])
    # and the input path is trained: it gets a gradient
    with torch.no_grad():
        core.interaction.weight.normal_(0, 0.1)
    y, _, aux = core(x, start, no_starts)
    (y.sum() + aux["recon_after"].sum()).backward()
    assert core.input_interaction.weight.grad.abs().sum().item() > 0


def test_diagnostics_are_computed_once_on_first_read():
    """An MNM core's diagnostics cost nothing until read (a rollout step never reads them):
    their keys, length and truth come without computing them, the first read computes all of
    them once, later reads reuse them."""
    from mnm_rl.memory.base import AUX_KEYS, LazyDiagnostics

    calls = []

    def compute():
        calls.append(1)
        return {key: torch.full((2, 3), float(i)) for i, key in enumerate(AUX_KEYS)}

    aux = LazyDiagnostics(compute)
    assert aux and len(aux) == len(AUX_KEYS) and list(aux) == list(AUX_KEYS)
    assert "beta" in aux and not calls
    assert aux["beta"][0, 0].item() == AUX_KEYS.index("beta")
    assert float(aux["recon_after"].sum()) == 0.0 and dict(aux).keys() == set(AUX_KEYS)
    assert calls == [1]


def test_diagnostics_are_computed_in_the_autograd_mode_they_were_made_in():
    """Read outside the mode a core ran in, the diagnostics are what they would have been had
    they been computed at once: differentiable from a training pass even when read under
    no_grad, plain tensors from a pass under no_grad even when read with grad on."""
    core = build("mnm-p")
    x, starts = sequence()
    _, _, aux = core(x, core.initial_state(3), starts)
    with torch.no_grad():
        recon = aux["recon_after"]
    assert recon.requires_grad
    recon.mean().backward()
    assert core.interaction.weight.grad.abs().sum() > 0
    with torch.no_grad():
        _, _, quiet = core(x, core.initial_state(3), starts)
    assert not quiet["recon_after"].requires_grad
    torch.testing.assert_close(quiet["recon_after"], aux["recon_after"].detach())


@pytest.mark.parametrize("compiled", [True, False], ids=["kernel", "torch"])
def test_diagnostics_summary_reads_every_mean_and_the_largest_norm_at_once(compiled, monkeypatch):
    """What PPO logs of an MNM core's diagnostics: each key's mean, the memory loss
    (``memory_loss``'s value) and the largest fast-weight norm, as floats, without gradients,
    by the compiled kernels' one call or by PyTorch; a NaN norm makes the largest NaN."""
    from mnm_rl.memory import fused
    from mnm_rl.memory.base import AUX_KEYS, diagnostics_summary, memory_loss

    if not compiled:
        monkeypatch.setattr(fused, "load_extension", lambda: None)
    elif fused.load_extension() is None:
        pytest.skip("the compiled kernels are not built here")
    core = MNMCore(6, hidden_size=8, memory_size=8, n_heads=2, n_layers=2)
    x = torch.randn(5, 3, 6)
    starts = torch.zeros(5, 3)
    starts[2, 1] = 1.0
    _, _, aux = core(x, core.initial_state(3, x.device), starts)
    aux = dict(aux)
    aux["recon_retained"] = torch.rand(5, 3)  # zero without a retention lag: make it count
    assert aux["recon_after"].requires_grad
    summary = diagnostics_summary(aux)
    assert set(summary) == {*AUX_KEYS, "memory_loss", "max_fast_weight_norm"}
    assert all(type(value) is float for value in summary.values())
    for key in AUX_KEYS:
        assert summary[key] == pytest.approx(aux[key].mean().item(), rel=1e-6), key
    assert summary["memory_loss"] == pytest.approx(memory_loss(aux).item(), rel=1e-6)
    assert summary["max_fast_weight_norm"] == aux["fast_weight_norm"].max().item()
    assert summary["recon_retained"] > 0 and summary["max_fast_weight_norm"] > 0
    norm = aux["fast_weight_norm"].detach().clone()
    norm[3, 2] = float("nan")
    with_nan = diagnostics_summary({**aux, "fast_weight_norm": norm})
    assert math.isnan(with_nan["max_fast_weight_norm"])
