"""The throughput optimisations compute exactly what the plain formulations compute.

Each test runs a straightforward reference (the code as first written: per-layer loops, a masked
reset at every step, one op per gate, one embedding per channel, a torch GAE loop) next to the
optimised implementation, on the same parameters, and compares outputs, states and gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch import Tensor
from torch.distributions import Categorical

from mnm_rl.agent.buffer import ChunkRolloutBuffer
from mnm_rl.agent.extractors import SymbolicGridEncoder
from mnm_rl.agent.policy import RecurrentMemoryPolicy
from mnm_rl.memory import CoreState, MNMCore
from mnm_rl.memory.fast_weights import _activation_derivative


# ------------------------------------------------------------------------ reference MNM core
def _ref_activations(memory, weights: Tensor, keys: Tensor) -> list[Tensor]:
    zs = [keys * torch.rsqrt(keys.pow(2).mean(-1, keepdim=True) + 1e-6)]
    for layer in range(memory.n_layers):
        a = torch.matmul(zs[-1], weights[:, layer].transpose(-1, -2))
        zs.append(a if layer == memory.n_layers - 1 else memory._act(a))
    return zs


def _ref_write(memory, weights, keys, values, beta):
    zs = _ref_activations(memory, weights, keys)
    if memory.write_rule == "mnm-p":
        raw = memory.feedback(values).split(memory.dim, dim=-1)
        targets = [t if i == memory.n_layers - 1 else memory._act(t) for i, t in enumerate(raw)]
        deltas = [zs[i + 1] - targets[i] for i in range(memory.n_layers)]
    else:
        delta = zs[-1] - values
        deltas = [delta]
        for layer in range(memory.n_layers - 1, 0, -1):
            delta = torch.matmul(delta, weights[:, layer]) * _activation_derivative(
                memory.activation, zs[layer]
            )
            deltas.append(delta)
        deltas = deltas[::-1]
    steps = []
    for layer, delta in enumerate(deltas):
        z_in = zs[layer]
        energy = z_in.pow(2).sum(dim=(1, 2)) + memory.eps
        scale = (beta / energy).view(-1, 1, 1)
        steps.append(scale * torch.matmul(delta.transpose(-1, -2), z_in))
    return weights - torch.stack(steps, dim=1), zs[-1]


def _ref_step(core: MNMCore, gates_x: Tensor, state: CoreState):
    h, c, read, weights = state["h"], state["c"], state["read"], state["fast_weights"]
    gates = gates_x + core.recurrent_gates(torch.cat([h, read], dim=-1))
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    batch, heads, dim = h.shape[0], core.n_heads, core.memory_size
    interaction = torch.tanh(core.interaction(h))
    kvs, beta_pre = interaction.split([3 * heads * dim, dim], dim=-1)
    read_keys, write_keys, write_values = kvs.view(batch, 3, heads, dim).unbind(1)
    beta = torch.sigmoid(core.beta_gate(beta_pre)).squeeze(-1)
    memory = core.memory
    weights, before = _ref_write(memory, weights, write_keys, write_values, beta)
    answers = _ref_activations(memory, weights, torch.cat([read_keys, write_keys], dim=1))[-1]
    read = answers[:, :heads].mean(dim=1)
    y = core.output(torch.cat([h, read], dim=-1))
    aux = {
        "recon_after": (answers[:, heads:] - write_values).pow(2).mean(dim=(1, 2)),
        "recon_before": (before - write_values).pow(2).mean(dim=(1, 2)),
        "beta": beta,
        "fast_weight_norm": weights.pow(2).sum(dim=(1, 2, 3)).sqrt()
        / (weights.shape[1] * weights.shape[2]) ** 0.5,
    }
    return y, CoreState({"h": h, "c": c, "read": read, "fast_weights": weights}), aux


def _ref_forward(core: MNMCore, x: Tensor, state: CoreState, starts: Tensor):
    initial = core.initial_state(x.shape[1])
    gates_x = core.input_gates(x)
    outputs, auxes = [], []
    for t in range(x.shape[0]):
        state = state.reset_where(starts[t], initial)
        y, state, aux = _ref_step(core, gates_x[t], state)
        outputs.append(y)
        auxes.append(aux)
    return torch.stack(outputs), state, {k: torch.stack([a[k] for a in auxes]) for k in auxes[0]}


@pytest.mark.parametrize("rule", ["mnm-p", "mnm-g"])
def test_mnm_core_matches_reference_formulation(rule):
    torch.manual_seed(0)
    core = MNMCore(6, hidden_size=16, n_heads=3, write_rule=rule)
    steps, batch = 10, 4
    x = torch.randn(steps, batch, 6)
    starts = torch.zeros(steps, batch)
    starts[0, :2] = 1
    starts[3, 1] = 1
    starts[7, 3] = 1
    # a non-initial start state, as a stored rollout state would be
    with torch.no_grad():
        _, state, _ = core(torch.randn(5, batch, 6), core.initial_state(batch), starts[:5] * 0)
    results = []
    for forward in (core.forward, lambda *a: _ref_forward(core, *a)):
        core.zero_grad()
        out, final, aux = forward(x, state, starts)
        loss = out.pow(2).sum() + aux["recon_after"].sum() + final["fast_weights"].sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in core.named_parameters()}
        results.append((out, final, aux, grads))
    (out, final, aux, grads), (ref_out, ref_final, ref_aux, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for key in ref_final:
        torch.testing.assert_close(final[key], ref_final[key], rtol=1e-5, atol=1e-6)
    for key in ref_aux:
        torch.testing.assert_close(aux[key], ref_aux[key], rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_mnm_step_api_matches_forward():
    torch.manual_seed(0)
    core = MNMCore(6, hidden_size=16)
    x = torch.randn(3, 2, 6)
    state = core.initial_state(2)
    out, final, _ = core(x, state, torch.zeros(3, 2))
    gates = core.input_gates(x)
    for t in range(3):
        y, state, _ = core.step(gates[t], state)
        torch.testing.assert_close(y, out[t])
    for key in final:
        torch.testing.assert_close(state[key], final[key])


# ----------------------------------------------------------------------------------- agent
def test_grid_encoder_matches_per_channel_embeddings():
    torch.manual_seed(0)
    space = spaces.Box(0, np.array([10, 5, 2]) * np.ones((3, 3, 3), dtype=np.int64), dtype=np.int64)
    encoder = SymbolicGridEncoder(space, embedding_dim=4)
    grid = torch.stack([torch.randint(h + 1, (7, 3, 3)) for h in (10, 5, 2)], dim=-1)
    reference = torch.cat(
        [emb(grid[..., i]) for i, emb in enumerate(encoder.embeddings)], dim=-1
    ).flatten(1)
    out = encoder(grid.float())
    assert torch.equal(out, reference)
    out.pow(2).sum().backward()
    grads = [emb.weight.grad.clone() for emb in encoder.embeddings]
    encoder.zero_grad()
    reference.pow(2).sum().backward()
    for grad, emb in zip(grads, encoder.embeddings, strict=True):
        torch.testing.assert_close(grad, emb.weight.grad)


def test_gae_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    n_steps, n_envs = 32, 5
    buffer = ChunkRolloutBuffer(n_steps, n_envs, spaces.Discrete(2), 8, torch.device("cpu"))
    buffer.rewards = torch.rand(n_steps, n_envs, generator=g)
    buffer.values = torch.rand(n_steps, n_envs, generator=g)
    buffer.episode_starts = (torch.rand(n_steps, n_envs, generator=g) < 0.2).float()
    last_values, dones = torch.rand(n_envs, generator=g), torch.tensor([1.0, 0, 0, 1, 0])
    buffer.compute_returns_and_advantage(last_values, dones)
    last_gae = torch.zeros(n_envs)
    expected = torch.zeros(n_steps, n_envs)
    for t in reversed(range(n_steps)):
        if t == n_steps - 1:
            non_terminal, next_values = 1.0 - dones, last_values
        else:
            non_terminal, next_values = 1.0 - buffer.episode_starts[t + 1], buffer.values[t + 1]
        delta = buffer.rewards[t] + buffer.gamma * next_values * non_terminal - buffer.values[t]
        last_gae = delta + buffer.gamma * buffer.gae_lambda * non_terminal * last_gae
        expected[t] = last_gae
    torch.testing.assert_close(buffer.advantages, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(buffer.returns, expected + buffer.values, rtol=1e-6, atol=1e-6)


def test_sample_matches_categorical():
    torch.manual_seed(0)
    logits = torch.randn(64, 5)
    actions, log_probs = RecurrentMemoryPolicy.sample(logits)
    torch.testing.assert_close(log_probs, Categorical(logits=logits).log_prob(actions))
    mode, _ = RecurrentMemoryPolicy.sample(logits, deterministic=True)
    assert torch.equal(mode, logits.argmax(-1))
    # the same law: empirical frequencies over many draws
    many = torch.stack([RecurrentMemoryPolicy.sample(logits[:1])[0] for _ in range(4000)])
    freq = torch.bincount(many.flatten(), minlength=5).float() / many.numel()
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)


def test_sample_never_draws_an_impossible_action():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, float("-inf"), 2.0, float("-inf")]]).expand(20000, 4)
    actions, log_probs = RecurrentMemoryPolicy.sample(logits)
    assert set(actions.tolist()) == {0, 2}
    assert torch.isfinite(log_probs).all()
    share = (actions == 2).float().mean().item()  # e^2 / (1 + e^2) = 0.881
    assert abs(share - 0.8808) < 0.01


@pytest.mark.parametrize("kind", ["mnm-p", "mnm-g", "lstm", "gru", "mlp"])
def test_one_step_at_a_time_equals_whole_sequence(kind):
    """The rollout runs cores with T=1 (the LSTM and GRU through their compiled kernels' single
    step), training replays whole chunks (the LSTM through the fused nn.LSTM over reset-free
    spans): same outputs and state."""
    from mnm_rl.memory import make_core

    torch.manual_seed(0)
    core = make_core(kind, 6, hidden_size=16)
    x = torch.randn(9, 3, 6)
    starts = torch.zeros(9, 3)
    starts[0] = 1
    starts[4, 1] = 1
    starts[6, 0] = 1
    with torch.no_grad():
        whole, final, _ = core(x, core.initial_state(3), starts)
        state, outs = core.initial_state(3), []
        for t in range(9):
            out, state, _ = core(x[t : t + 1], state, starts[t : t + 1])
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs), whole, rtol=1e-5, atol=1e-6)
    for key in final:
        torch.testing.assert_close(state[key], final[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("compiled", ["1", "0"])
def test_a_rollout_step_equals_the_module(monkeypatch, kind, compiled):
    """A single step goes through the compiled kernel or, without it (``MNM_RL_FUSED=0``),
    ``torch.lstm_cell``/``gru_cell`` with the module's weights: what the ``nn.LSTM``/``nn.GRU``
    call gives, with a reset for one env."""
    from mnm_rl.memory import make_core

    monkeypatch.setenv("MNM_RL_FUSED", compiled)
    torch.manual_seed(0)
    core = make_core(kind, 6, hidden_size=16)
    x = torch.randn(1, 3, 6)
    state = CoreState({k: torch.randn(3, 16) for k in core.initial_state(3)})
    starts = torch.tensor([[0.0, 1.0, 0.0]])
    with torch.no_grad():
        out, final, _ = core(x, state, starts)
        keep = (starts[0] == 0).unsqueeze(-1)
        hidden = tuple((v * keep).unsqueeze(0) for v in state.values())
        expected, new = core.rnn(x, hidden if kind == "lstm" else hidden[0])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    new = new if isinstance(new, tuple) else (new,)
    for key, value in zip(final, new, strict=True):
        torch.testing.assert_close(final[key], value[0], rtol=1e-6, atol=1e-7)


def test_grid_pooling_adds_what_is_in_view_wherever_it_is():
    torch.manual_seed(0)
    space = spaces.Box(0, np.array([10, 5, 2]) * np.ones((3, 3, 3), dtype=np.int64), dtype=np.int64)
    encoder = SymbolicGridEncoder(space, embedding_dim=4, pooling=True)
    assert encoder.output_dim == (9 + 1) * 3 * 4
    walls = torch.tensor([2, 5, 0]).expand(3, 3, 3).clone()
    left, right = walls.clone(), walls.clone()
    left[0, 2] = torch.tensor([6, 1, 0])  # a ball in one cell of the view
    right[2, 0] = torch.tensor([6, 1, 0])  # the same ball in another
    out = encoder(torch.stack([left, right]).float())
    flat, pooled = out[:, : 9 * 12], out[:, 9 * 12 :]
    torch.testing.assert_close(pooled[0], pooled[1])  # the same objects in view
    assert not torch.allclose(flat[0], flat[1])  # in different places
    plain = SymbolicGridEncoder(space, embedding_dim=4)
    plain.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(plain(torch.stack([left, right]).float()), flat)
