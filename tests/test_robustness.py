"""Robustness guarantees (docs/robustness.md): signals and kills during training, atomic
checkpoints, non-finite faults at the CLI level, determinism, safe policy loading, space checks."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from test_cli import COMMAND, TINY_AGENT, mnm_rl, ok, optimizer_step, sets, tb_steps

import mnm_rl as package
from mnm_rl.runs import CheckpointError, checkpoint_steps, checkpoints, latest_model

TESTS = Path(__file__).resolve().parent

# Tiny mnm-p on DelayedCueRecall: 4 envs x 32 steps = 128 env steps per rollout, 8 Adam steps each.
FAST = [*TINY_AGENT, *sets("train.checkpoint_every=256", "train.eval_episodes=0")]


def start(*args: str | Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [*COMMAND, *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.1)


def latest_steps(run: Path) -> int:
    try:
        return checkpoint_steps(latest_model(run))
    except (CheckpointError, ValueError):
        return -1


def assert_checkpoints_complete(run: Path) -> None:
    """Every file at a checkpoint path is complete and loadable (leftovers are hidden .tmp)."""
    for path in checkpoints(run):
        steps = checkpoint_steps(path)
        assert package.load_policy(path.with_suffix(".pt"), device="cpu").num_timesteps == steps
    visible = [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert all(re.fullmatch(r"step_\d{10}\.(zip|pt)", name) for name in visible), visible


def test_kill_and_signals_during_training_then_resume(tmp_path: Path):
    run = tmp_path / "run"
    # 1. SIGKILL once the first checkpoint exists: nothing to flush, the checkpoints stay whole.
    proc = start("train", "--env", "DelayedCueRecall", "--timesteps", "100000", *FAST,
                 "--run-dir", run, cwd=tmp_path)  # fmt: skip
    wait_for(lambda: latest_steps(run) >= 256, proc)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert_checkpoints_complete(run)
    killed_at = latest_steps(run)
    assert killed_at % 256 == 0

    # 2. Resume, then SIGINT mid-training: a final checkpoint at the exact step, exit 130.
    resume = ["train", "--resume", run, "--timesteps", "100000", "--no-progress"]
    proc = start(*resume, cwd=tmp_path)
    wait_for(lambda: latest_steps(run) > killed_at, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    found = re.search(r"interrupted at (\d+) env steps; saved (\S+); continue with --resume", err)
    assert found, err
    interrupted_at = int(found[1])
    assert interrupted_at > killed_at
    assert latest_model(run) == Path(found[2]).resolve() or latest_model(run) == Path(found[2])
    assert checkpoint_steps(Path(found[2])) == interrupted_at == latest_steps(run)
    assert_checkpoints_complete(run)
    # TensorBoard was flushed: the session's scalars (one dump per 128-step rollout) are on disk.
    logged = tb_steps(run)
    assert killed_at + 128 <= max(logged) <= interrupted_at

    # 3. Resume again and SIGTERM: exit 143, same guarantees.
    proc = start(*resume, cwd=tmp_path)
    wait_for(lambda: latest_steps(run) > interrupted_at, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    terminated_at = latest_steps(run)
    assert f"interrupted at {terminated_at} env steps" in err
    assert_checkpoints_complete(run)

    # 4. Resume to the end: steps, TensorBoard step and Adam's step count all continue.
    adam_before = optimizer_step(latest_model(run))
    total = terminated_at + 256
    ok(mnm_rl("train", "--resume", run, "--timesteps", str(total), "--no-progress", cwd=tmp_path))
    assert checkpoint_steps(run / "model.zip") == total
    assert optimizer_step(run / "model.zip") == adam_before + 2 * 8  # 2 rollouts x 8 steps
    after = tb_steps(run)
    assert after[-1] == total and [s for s in after if s > terminated_at] == after[-2:]
    assert package.load_policy(run, device="cpu").num_timesteps == total


def test_killed_while_writing_a_checkpoint_leaves_the_old_file(tmp_path: Path):
    target = tmp_path / "checkpoints" / "step_0000000256.zip"
    target.parent.mkdir()
    target.write_bytes(b"old complete file")
    script = (
        "import os, signal, sys\n"
        "from mnm_rl import runs\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # die before the rename\n"
        "runs.atomic_write_bytes(runs.Path(sys.argv[1]), b'new' * 100000)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(target)], timeout=60)
    assert result.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old complete file"
    leftovers = [p.name for p in target.parent.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step_0000000256.zip.")
    assert checkpoints(tmp_path) == [target]  # the leftover is never taken for a checkpoint


def nan_env_run(
    tmp_path: Path, *extra: str, env_id: str = "NaNRewardCue-v0"
) -> tuple[subprocess.CompletedProcess, Path]:
    run = tmp_path / "nan"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(TESTS)}
    args = ["train", "--env", f"nan_env:{env_id}", "--timesteps", "1024", *FAST,
            "--set", "env.kwargs.nan_after=100", *extra, "--run-dir", str(run)]  # fmt: skip
    result = subprocess.run(
        [*COMMAND, *args], cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env
    )
    return result, run


def test_nan_stops_the_run_naming_the_quantity_and_keeps_the_last_good_checkpoint(tmp_path):
    # Rewards turn NaN after 100 steps per env (step 400 of the run, in the 4th rollout); the
    # checkpoint at step 512 is written before that rollout's update.
    result, run = nan_env_run(tmp_path)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("mnm-rl: error: non-finite ")
    assert "value loss" in lines[0] and "the update was not applied" in lines[0]
    last = run / "checkpoints" / "step_0000000512.zip"
    assert f"the last good checkpoint is {last}" in lines[0]
    assert latest_model(run) == last and checkpoint_steps(last) == 512
    assert not (run / "model.zip").exists() and not (run / "policy.pt").exists()
    policy = package.load_policy(run, device="cpu")
    assert all(torch.isfinite(p).all() for p in policy.policy.state_dict().values())
    assert tb_steps(run)  # TensorBoard events were flushed before exiting


def test_nan_in_the_rollout_stops_the_run_with_one_line_and_the_last_good_checkpoint(tmp_path):
    # Observations turn NaN after 100 steps per env: step 404 of the run, inside the 4th rollout
    # (385-512), before the checkpoint at 512; the one at 256 is the last good one.
    result, run = nan_env_run(tmp_path, env_id="NaNObsCue-v0")
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("mnm-rl: error: non-finite policy output (action logits) in the ")
    assert "rollout at step 404" in lines[0]
    last = run / "checkpoints" / "step_0000000256.zip"
    assert f"the last good checkpoint is {last}" in lines[0]
    assert latest_model(run) == last and not (run / "model.zip").exists()
    assert tb_steps(run)


def test_nan_skip_mode_is_settable_and_counts(tmp_path: Path):
    result, run = nan_env_run(tmp_path, "--set", "agent.ppo.on_nonfinite=skip")
    assert result.returncode == 0, result.stderr
    from mnm_rl.plotting import read_scalars

    steps, skips = read_scalars(run / "tb", "train/nonfinite_skips")
    assert skips[0] == 0 and skips[-1] > 0 and np.all(np.diff(skips) >= 0)
    assert checkpoint_steps(run / "model.zip") == 1024
    bad = mnm_rl("train", "--set", "agent.ppo.on_nonfinite=ignore", cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and "agent.ppo.on_nonfinite" in bad.stderr


def all_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


@pytest.mark.parametrize(
    "second_run", ["train.kernel_threads=1", "train.kernel_threads=2", "train.env_workers=1"]
)
def test_same_seed_gives_identical_scalars_and_parameters(tmp_path: Path, second_run: str):
    """Also with the MNM kernel splitting each minibatch (8 sequences of 8 steps) between two
    threads (both runs), and with the second run stepping its envs in two processes."""
    runs = [tmp_path / "a", tmp_path / "b"]
    first_run = second_run if "kernel_threads" in second_run else "train.env_workers=0"
    for run, setting in zip(runs, (first_run, second_run), strict=True):
        ok(mnm_rl("train", "--env", "DelayedCueRecall", "--timesteps", "512", *FAST,
                  *sets("agent.ppo.seq_len=8", setting),
                  "--seed", "3", "--run-dir", run, cwd=tmp_path))  # fmt: skip
    a, b = (all_scalars(run / "tb") for run in runs)
    timing = {t for t in a if t.startswith("time/")}  # fps and elapsed time are wall-clock
    assert {"rollout/success_rate", "train/loss", "train/memory_loss"} <= set(a)
    assert {t: a[t] for t in a if t not in timing} == {t: b[t] for t in b if t not in timing}
    pa, pb = (package.load_policy(run, device="cpu").policy.state_dict() for run in runs)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


# ----------------------------------------------------------------------- safe policy loading
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[object, Path]:
    from test_agent import small_model

    from mnm_rl.training import save_checkpoint

    folder = tmp_path_factory.mktemp("policy")
    model = small_model("mnm-p").learn(64)
    save_checkpoint(model, folder / "model.zip")
    return model, folder


class Payload:
    """Unpickling this runs ``open(marker, "w")``: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_policy_reads_tensors_and_matches_the_model(saved):
    model, folder = saved
    for path in (folder / "policy.pt", folder / "model.zip"):
        policy = package.load_policy(path, device="cpu")
        assert policy.num_timesteps == model.num_timesteps > 0
        obs = np.stack([model.observation_space.sample() for _ in range(3)])
        expected, _ = model.predict(obs, deterministic=True)
        actions, state = policy.predict(obs, deterministic=True)
        assert np.array_equal(actions, expected) and state.batch_size == 3


def test_load_policy_refuses_pickle_payloads_without_running_them(saved, tmp_path: Path):
    _, folder = saved
    marker = tmp_path / "payload-ran"
    good = torch.load(folder / "policy.pt", weights_only=True)
    evil_torch = tmp_path / "evil.pt"
    torch.save({**good, "extra": Payload(marker)}, evil_torch)
    evil_pickle = tmp_path / "plain.pt"
    evil_pickle.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    for path in (evil_torch, evil_pickle):
        with pytest.raises(CheckpointError, match="refusing .*pickled Python objects"):
            package.load_policy(path)
        assert not marker.exists()
    pickle.loads(evil_pickle.read_bytes()).close()  # the payload is real: plain pickle runs it
    assert marker.exists()
    bare = tmp_path / "model.zip"
    bare.write_bytes((folder / "model.zip").read_bytes())
    with pytest.raises(CheckpointError, match="no safe policy file policy.pt.*MemoryPPO.load"):
        package.load_policy(bare)
    not_policy = tmp_path / "tensors.pt"
    torch.save({"w": torch.zeros(2)}, not_policy)
    with pytest.raises(CheckpointError, match="not a mnm-rl policy file"):
        package.load_policy(not_policy)


def test_space_mismatch_names_both_spaces(saved):
    _, folder = saved
    other = gym.make("CartPole-v1")
    with pytest.raises(ValueError, match=r"observation_space .* does not match the env's .*Box\("):
        package.load_policy(folder / "model.zip", device="cpu", env=other)
    policy = package.load_policy(folder / "policy.pt", device="cpu")
    env = gym.make("mnm_rl/DelayedCueRecall-v0", n_cues=8)
    with pytest.raises(ValueError) as info:
        policy.check_env(env, "the 8-cue env")
    message = str(info.value)
    assert str(policy.observation_space) in message and str(env.observation_space) in message


def test_a_second_signal_aborts_at_once():
    # In-process: the first SIGINT only sets the stop event (training saves and exits), the
    # second raises at once; the previous handlers are back after the block.
    from mnm_rl.cli import _stop_on_signals

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="aborted by a second signal; no checkpoint saved"):
        with _stop_on_signals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 5
            while not stop.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)  # the handler runs between bytecodes of the main thread
            assert stop.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the second signal's KeyboardInterrupt
            pytest.fail("the second signal did not abort")
    assert signal.getsignal(signal.SIGINT) is before
