"""ChunkRolloutBuffer: a rollout stored row by row, the policy's inputs handed out as views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces

from mnm_rl.agent.buffer import ChunkRolloutBuffer
from mnm_rl.memory import CoreState

N_STEPS, N_ENVS, SEQ_LEN = 4, 3, 2
SPACE = spaces.Dict(
    {"image": spaces.Box(0, 255, (2, 2), np.uint8), "direction": spaces.Discrete(4)}
)


def observation(step: int) -> dict[str, np.ndarray]:
    """A distinct observation for each step, as a vec env returns it."""
    image = (
        np.full((N_ENVS, 2, 2), step, np.uint8) + np.arange(N_ENVS, dtype=np.uint8)[:, None, None]
    )
    return {"image": image, "direction": np.arange(N_ENVS, dtype=np.int64) + step}


def state(step: int) -> CoreState:
    return CoreState({"h": torch.full((N_ENVS, 5), float(step))}, batch_size=N_ENVS)


def fill(buffer: ChunkRolloutBuffer, offset: float = 0.0):
    """One rollout; returns what each step's add() handed back."""
    obs, starts = buffer.start(observation(0), np.array([True, False, False]))
    handed = [(obs, starts)]
    for t in range(N_STEPS):
        with torch.inference_mode():  # as the rollout's policy outputs are
            actions = torch.arange(N_ENVS) + t
            values = torch.full((N_ENVS,), offset + t)
            log_probs = -torch.full((N_ENVS,), offset + t)
        rewards = np.full(N_ENVS, t / 10, np.float64)  # cast to the buffer's float32
        dones = np.arange(N_ENVS) == t % N_ENVS
        obs, starts = buffer.add(actions, rewards, values, log_probs, state(t), observation(t + 1),
                                 dones)  # fmt: skip
        handed.append((obs, starts))
    return handed


def test_each_step_is_stored_in_its_row_and_the_inputs_are_views_of_the_buffer():
    buffer = ChunkRolloutBuffer(N_STEPS, N_ENVS, SPACE, SEQ_LEN, torch.device("cpu"))
    handed = fill(buffer)
    assert buffer.full
    for t in range(N_STEPS):
        for key in ("image", "direction"):
            np.testing.assert_array_equal(buffer.observations[key][t].numpy(), observation(t)[key])
        torch.testing.assert_close(buffer.actions[t], torch.arange(N_ENVS) + t)
        torch.testing.assert_close(buffer.values[t], torch.full((N_ENVS,), float(t)))
        torch.testing.assert_close(buffer.log_probs[t], torch.full((N_ENVS,), -float(t)))
        torch.testing.assert_close(buffer.rewards[t], torch.full((N_ENVS,), t / 10))
        expected_starts = [1.0, 0.0, 0.0] if t == 0 else (np.arange(N_ENVS) == (t - 1) % N_ENVS)
        torch.testing.assert_close(buffer.episode_starts[t], torch.tensor(expected_starts).float())
        # the policy's inputs of step t are the buffer's row t, not copies
        obs, starts = handed[t]
        assert obs["image"].data_ptr() == buffer.observations["image"][t].data_ptr()
        assert starts.data_ptr() == buffer.episode_starts[t].data_ptr()
    assert buffer.actions.dtype == torch.long and buffer.rewards.dtype == torch.float32
    assert buffer.observations["image"].dtype == torch.uint8
    assert buffer.observations["image"].shape == (N_STEPS, N_ENVS, 2, 2)
    # after the last step: the inputs GAE and the last value start from
    obs, starts = handed[-1]
    np.testing.assert_array_equal(obs["image"].numpy(), observation(N_STEPS)["image"])
    assert buffer.next_observation["image"].data_ptr() == obs["image"].data_ptr()
    torch.testing.assert_close(starts, buffer.next_episode_starts)
    torch.testing.assert_close(starts, torch.tensor([1.0, 0.0, 0.0]))  # the last step's dones
    # the state before each chunk's first step, cloned
    assert [s["h"][0, 0].item() for s in buffer.chunk_states] == [0.0, 2.0]


def test_the_envs_arrays_are_copied_into_the_buffer():
    """A vec env may hand out the same arrays at every step (VecFrameStack does): what the buffer
    holds must not change with them."""
    buffer = ChunkRolloutBuffer(N_STEPS, N_ENVS, spaces.Box(0, 1, (2,)), SEQ_LEN, "cpu")
    shared, dones = np.zeros((N_ENVS, 2), np.float32), np.zeros(N_ENVS, bool)
    buffer.start(shared, dones)
    with torch.inference_mode():
        outputs = torch.zeros(N_ENVS, dtype=torch.long), torch.zeros(N_ENVS), torch.zeros(N_ENVS)
    for t in range(N_STEPS):
        shared[...] = t + 1
        dones[...] = t % 2 == 0
        buffer.add(outputs[0], np.zeros(N_ENVS), *outputs[1:], state(t), shared, dones)
    np.testing.assert_array_equal(buffer.observations[:, 0, 0].numpy(), [0.0, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(buffer.episode_starts[:, 0].numpy(), [0.0, 1.0, 0.0, 1.0])


def test_a_new_rollout_leaves_the_last_ones_tensors_as_they_were():
    buffer = ChunkRolloutBuffer(N_STEPS, N_ENVS, SPACE, SEQ_LEN, torch.device("cpu"))
    fill(buffer)
    values, starts = buffer.values, buffer.episode_starts
    kept_values, kept_starts = values.clone(), starts.clone()
    buffer.reset()
    fill(buffer, offset=100.0)
    torch.testing.assert_close(values, kept_values)
    torch.testing.assert_close(starts, kept_starts)
    torch.testing.assert_close(buffer.values[0], torch.full((N_ENVS,), 100.0))


def test_steps_out_of_order_are_refused():
    buffer = ChunkRolloutBuffer(N_STEPS, N_ENVS, SPACE, SEQ_LEN, torch.device("cpu"))
    step = (torch.zeros(N_ENVS, dtype=torch.long), np.zeros(N_ENVS), torch.zeros(N_ENVS),
            torch.zeros(N_ENVS), state(0), observation(1), np.zeros(N_ENVS, bool))  # fmt: skip
    with pytest.raises(RuntimeError, match="add\\(\\) before start\\(\\)"):
        buffer.add(*step)
    fill(buffer)
    with pytest.raises(RuntimeError, match="rollout buffer is full"):
        buffer.add(*step)
    with pytest.raises(RuntimeError, match="call reset\\(\\) first"):
        buffer.start(observation(0), np.zeros(N_ENVS, bool))
    with pytest.raises(RuntimeError, match="holds 0 of 4 steps"):
        buffer.reset()
        next(buffer.minibatches(2))
