"""The compiled symbol-grid encoder (mnm_rl/agent/grid_linear.py, csrc/grid_linear.cpp): the
same outputs and gradients as the plain PyTorch encoder, its errors, and when it is used."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from compiled import built
from gymnasium import spaces

from mnm_rl.agent import grid_linear
from mnm_rl.agent.extractors import COMPILED_MIN_ROWS, MemoryFeaturesExtractor

HIGH = (10, 5, 2)  # MiniGrid's object, colour and state symbols: 11 + 6 + 3 table rows


@pytest.fixture(scope="module")
def kernel():
    return built(grid_linear.EXTENSION)


def grid_space(view: int) -> spaces.Box:
    return spaces.Box(0, np.array(HIGH) * np.ones((view, view, 3), dtype=np.int64), dtype=np.int64)


def random_grids(n: int, view: int, runs: bool, generator: torch.Generator) -> torch.Tensor:
    """``n`` grids; with ``runs``, consecutive grids mostly repeat (a sequence's steps do), so
    the backward pass's runs of one symbol per slot are exercised as well as single samples."""
    grids = torch.stack(
        [torch.randint(h + 1, (n, view, view), generator=generator) for h in HIGH], dim=-1
    )
    if runs:
        keep = torch.rand(n, generator=generator) < 0.8
        for i in range(1, n):
            if keep[i]:
                grids[i] = grids[i - 1]
    return grids


def observations(space: spaces.Space, n: int, view: int, runs: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    grid = random_grids(n, view, runs, generator).double()
    if not isinstance(space, spaces.Dict):
        return grid
    direction = torch.nn.functional.one_hot(torch.randint(4, (n,), generator=generator), 4)
    obs = {"image": grid, "direction": direction.double()}
    if "extra" in space.spaces:
        obs["extra"] = torch.randn(n, 2, 3, generator=generator, dtype=torch.float64)
    return obs


def outputs_and_gradients(extractor, obs):
    extractor.zero_grad()
    out = extractor(obs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in extractor.named_parameters()}


CASES = {
    "minigrid 7x7 view, direction": (spaces.Dict(
        {"image": grid_space(7), "direction": spaces.Discrete(4)}), 64, False),
    "3x3 view, pooling": (spaces.Dict(
        {"image": grid_space(3), "direction": spaces.Discrete(4)}), 64, True),
    "grid alone, 70 features (a block and a remainder)": (grid_space(5), 70, False),
    "a Box input too, 16 features, pooling": (spaces.Dict({
        "image": grid_space(3), "direction": spaces.Discrete(4),
        "extra": spaces.Box(-1, 1, (2, 3))}), 16, True),
}  # fmt: skip


@pytest.mark.parametrize("runs", [False, True], ids=["random", "runs"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_the_plain_encoder(kernel, monkeypatch, case, runs):
    space, features, pooling = CASES[case]
    torch.manual_seed(0)
    extractor = MemoryFeaturesExtractor(space, features, embedding_dim=4, grid_pooling=pooling)
    extractor.double()
    view = (space["image"] if isinstance(space, spaces.Dict) else space).shape[0]
    obs = observations(space, 40, view, runs)
    calls = []
    monkeypatch.setattr(grid_linear, "_GridLinear", _counting(grid_linear._GridLinear, calls))
    out, grads = outputs_and_gradients(extractor, obs)
    assert calls, "the compiled path did not run"
    monkeypatch.setenv("MNM_RL_FUSED", "0")
    expected, expected_grads = outputs_and_gradients(extractor, obs)
    assert len(calls) == 1  # the plain path did not use it
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert set(grads) == set(expected_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-12, atol=1e-12, msg=name)


def _counting(function, calls):
    class Counting(function):
        @staticmethod
        def forward(ctx, *args):
            calls.append(1)
            return function.forward(ctx, *args)

    return Counting


def test_float32_matches_the_plain_encoder_closely(kernel, monkeypatch):
    torch.manual_seed(1)
    space = spaces.Dict({"image": grid_space(7), "direction": spaces.Discrete(4)})
    extractor = MemoryFeaturesExtractor(space, 64)
    obs = {k: v.float() for k, v in observations(space, 256, 7, runs=True).items()}
    out, grads = outputs_and_gradients(extractor, obs)
    monkeypatch.setenv("MNM_RL_FUSED", "0")
    expected, expected_grads = outputs_and_gradients(extractor, obs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-4, msg=name)


def test_symbols_outside_their_channel_raise(kernel):
    space = spaces.Dict({"image": grid_space(3), "direction": spaces.Discrete(4)})
    extractor = MemoryFeaturesExtractor(space, 8)
    obs = {"image": torch.zeros(30, 3, 3, 3), "direction": torch.zeros(30, 4)}
    obs["image"][4, 1, 2, 1] = 6  # colour symbols are 0..5
    with pytest.raises(RuntimeError, match="symbol 6 of channel 1 is outside \\[0, 6\\)"):
        extractor(obs)
    obs["image"][4, 1, 2, 1] = -1
    with pytest.raises(RuntimeError, match="symbol -1 of channel 1"):
        extractor(obs)


def test_kernel_checks_its_layout(kernel):
    grid = torch.zeros(2, 9)
    table, weight = torch.zeros(20, 4), torch.zeros(8, 36)
    with pytest.raises(RuntimeError, match="table must be \\[20, E\\]"):
        kernel.grid_linear_forward(grid, table[:19], weight, None, grid.new_empty(2, 0),
                                   [], 0, -1, list(np.array(HIGH) + 1))  # fmt: skip
    with pytest.raises(RuntimeError, match="grid's columns \\[4, 40\\) are outside"):
        kernel.grid_linear_forward(grid, table, weight, None, grid.new_empty(2, 0),
                                   [], 4, -1, list(np.array(HIGH) + 1))  # fmt: skip


def test_small_batches_without_gradients_take_the_plain_path(kernel, monkeypatch):
    space = spaces.Dict({"image": grid_space(7), "direction": spaces.Discrete(4)})
    extractor = MemoryFeaturesExtractor(space, 64)
    built = []
    monkeypatch.setattr(grid_linear, "load_extension", lambda: built.append(1) or kernel)
    small = {k: v.float() for k, v in observations(space, COMPILED_MIN_ROWS - 1, 7, False).items()}
    large = {k: v.float() for k, v in observations(space, COMPILED_MIN_ROWS, 7, False).items()}
    with torch.no_grad():
        extractor(small)
        assert built == []  # a rollout step of a few envs: plain
        extractor(large)
        assert built == [1]
    extractor(small)  # with a backward pass to come: compiled at any size
    assert built == [1, 1]


def test_a_kernel_that_cannot_build_falls_back_with_one_warning(monkeypatch, no_compiler):
    monkeypatch.setattr(grid_linear.EXTENSION, "module", None)
    monkeypatch.setattr(grid_linear.EXTENSION, "failed", False)
    space = spaces.Dict({"image": grid_space(3), "direction": spaces.Discrete(4)})
    extractor = MemoryFeaturesExtractor(space, 8)
    obs = {k: v.float() for k, v in observations(space, 5, 3, False).items()}
    with pytest.warns(RuntimeWarning, match="symbol-grid encoder kernel could not be built"):
        out = extractor(obs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call does not warn again
        torch.testing.assert_close(extractor(obs), out)


def test_switched_off_it_is_not_even_built(monkeypatch):
    monkeypatch.setenv("MNM_RL_FUSED", "0")
    monkeypatch.setattr(grid_linear.EXTENSION, "module", None)
    monkeypatch.setattr(grid_linear.native, "build_extension", lambda *a: pytest.fail("built"))
    assert grid_linear.load_extension() is None
