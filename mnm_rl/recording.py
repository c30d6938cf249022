"""Record episodes of a policy as a GIF or MP4, with the memory's per-step diagnostics.

The recurrent state is threaded from step to step and reset only at the first step of each
episode, exactly as during training. For MNM cores, each step's write strength ``beta`` and
write gain (reconstruction loss of the written values before the write minus after it) are
drawn in a header above the frame, saved as CSV and plotted.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mnm_rl.config import ConfigError, EnvSpec
from mnm_rl.env_factory import make_env

VIDEO_SUFFIXES = (".gif", ".mp4")
_HEADER = 16  # pixels of text above each frame


@dataclass
class StepRecord:
    """Diagnostics of one step."""

    episode: int
    step: int
    action: int
    reward: float
    value: float
    beta: float | None = None
    write_gain: float | None = None
    fast_weight_norm: float | None = None


@dataclass
class Recording:
    frames: list[np.ndarray] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)

    @property
    def has_memory(self) -> bool:
        return any(s.beta is not None for s in self.steps)


def _to_batch(policy, obs):
    from mnm_rl.agent.policy import map_obs

    tensor, _ = policy.obs_to_tensor(obs)
    return map_obs(tensor, lambda v: v.unsqueeze(0))


def _upscale(frame: np.ndarray, min_size: int = 192) -> np.ndarray:
    scale = max(1, int(np.ceil(min_size / max(frame.shape[:2]))))
    return np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1) if scale > 1 else frame


def _annotate(frame: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    frame = _upscale(np.asarray(frame, dtype=np.uint8))
    height, width = frame.shape[:2]
    # Pad to multiples of 16 (video codecs want even sizes, ideally macro-blocks).
    out_h = -(-(height + _HEADER) // 16) * 16
    out_w = -(-width // 16) * 16
    canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)
    canvas[_HEADER : _HEADER + height, :width] = frame[..., :3]
    image = Image.fromarray(canvas)
    ImageDraw.Draw(image).text((2, 2), text, fill=(255, 255, 255))
    return np.asarray(image)


def record_episodes(
    model,
    spec: EnvSpec,
    episodes: int = 2,
    deterministic: bool = True,
    max_steps: int = 1000,
) -> Recording:
    """Run ``episodes`` held-out episodes (seeds from ``spec.eval_seeds``) and keep every frame."""
    if episodes < 1:
        raise ConfigError(f"--episodes must be positive, got {episodes}")
    policy = model.policy
    policy.set_training_mode(False)
    env = make_env(spec, render_mode="rgb_array")
    recording = Recording()
    try:
        for k in range(episodes):
            obs, _ = env.reset(seed=spec.eval_seeds.seed(k))
            state = policy.initial_state(1)
            start = torch.ones(1, 1, device=policy.device)
            total, reward, done, t = 0.0, 0.0, False, 0
            frame = env.render()
            if frame is None:
                raise ConfigError(f"env {spec.name!r} does not render rgb_array frames")
            recording.frames.append(_annotate(frame, f"episode {k + 1} start"))
            while not done and t < max_steps:
                with torch.no_grad():
                    logits, values, state, aux = policy.forward_sequence(
                        _to_batch(policy, obs), state, start
                    )
                    logits = logits[0, 0]
                    action = (
                        int(logits.argmax())
                        if deterministic
                        else int(policy.distribution(logits).sample())
                    )
                start = torch.zeros(1, 1, device=policy.device)
                obs, reward, terminated, truncated, _ = env.step(action)
                done = terminated or truncated
                total += float(reward)
                t += 1
                record = StepRecord(k, t, action, float(reward), float(values[0, 0]))
                if aux:
                    record.beta = float(aux["beta"][0, 0])
                    record.write_gain = float(aux["recon_before"][0, 0] - aux["recon_after"][0, 0])
                    record.fast_weight_norm = float(aux["fast_weight_norm"][0, 0])
                recording.steps.append(record)
                text = f"ep {k + 1} t={t} a={action} r={float(reward):.2f}"
                if record.beta is not None:
                    text += f" beta={record.beta:.2f}"
                recording.frames.append(_annotate(env.render(), text))
            recording.returns.append(total)
    finally:
        env.close()
    return recording


def write_video(frames: list[np.ndarray], out: Path, fps: float) -> None:
    """Write ``frames`` as a GIF (pillow) or an MP4 (ffmpeg via imageio-ffmpeg)."""
    import imageio.v2 as imageio

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".gif":
        imageio.mimsave(out, frames, duration=1000.0 / fps, loop=0)
        return
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise ConfigError("writing MP4 needs imageio-ffmpeg: pip install imageio-ffmpeg") from None
    with imageio.get_writer(out, fps=fps, macro_block_size=16, format="FFMPEG") as writer:
        for frame in frames:
            writer.append_data(frame)


def write_diagnostics_csv(recording: Recording, path: Path) -> None:
    fields = list(StepRecord.__dataclass_fields__)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for step in recording.steps:
            writer.writerow(["" if getattr(step, k) is None else getattr(step, k) for k in fields])


def plot_diagnostics(recording: Recording, path: Path, title: str = "") -> None:
    """Plot beta and the write gain per step, one column of steps per episode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = recording.steps
    x = np.arange(len(steps))
    fig, axes = plt.subplots(3, 1, figsize=(8, 6), sharex=True)
    series = [
        ("beta", "write strength", [s.beta for s in steps]),
        ("write gain", "recon. loss before - after the write", [s.write_gain for s in steps]),
        ("value", "value estimate", [s.value for s in steps]),
    ]
    for ax, (label, meaning, values) in zip(axes, series, strict=True):
        ax.plot(x, [np.nan if v is None else v for v in values], marker=".", lw=1)
        ax.set_ylabel(label)
        ax.set_title(meaning, fontsize=9, loc="left")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        for i, s in enumerate(steps):
            if i and s.episode != steps[i - 1].episode:
                ax.axvline(i - 0.5, color="k", lw=0.8, ls="--")
            if s.reward > 0:
                ax.axvline(i, color="tab:green", lw=0.8, alpha=0.6)
    axes[-1].set_xlabel("step (episodes separated by dashed lines; green: positive reward)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = [
    "Recording",
    "StepRecord",
    "VIDEO_SUFFIXES",
    "plot_diagnostics",
    "record_episodes",
    "write_diagnostics_csv",
    "write_video",
]
