"""The built wheel: it holds every package and preset, and an installed (non-editable) copy finds
its presets from any folder.

How the fresh environment gets its dependencies: reinstalling torch & co. into a new virtual
environment would take minutes and a download, so the test creates the venv *without* them, installs
only the wheel (``--no-deps``) and adds a ``.pth`` file that appends this interpreter's
site-packages to the new venv's ``sys.path`` (for torch, gymnasium, ...). A path appended by a
``.pth`` line is not itself a site dir, so the development environment's editable-install hook is
not run there, and the venv's own site-packages comes first: the ``mnm_rl`` imported is the
wheel's. The commands run from an empty folder outside the source tree.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


def test_wheel_installs_in_a_fresh_venv_and_finds_presets(tmp_path: Path):
    # Build from a copy so the checkout gets no build/ or egg-info folders.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("mnm_rl", "envs", "agents"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--wheel", "--outdir", dist, src, cwd=tmp_path)
    (wheel,) = dist.glob("mnm_rl-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mnm_rl").rglob("*.py")}
    assert modules - names == set(), "packages missing from [tool.setuptools] packages"
    assert "mnm_rl/memory/csrc/mnm_sequence.cpp" in names  # the fused kernels' sources
    assert "mnm_rl/memory/csrc/lstm_sequence.cpp" in names
    assert "mnm_rl/memory/csrc/elementwise.h" in names
    assert "mnm_rl/agent/csrc/grid_linear.cpp" in names  # the grid encoder's kernel
    assert "mnm_rl/agent/csrc/action_heads.cpp" in names  # a rollout step's heads
    assert "mnm_rl/agent/csrc/ppo_loss.cpp" in names  # PPO's loss
    assert "mnm_rl/agent/csrc/gradient_step.cpp" in names  # clipping and Adam's step
    assert "mnm_rl/agent/csrc/policy_step.cpp" in names  # a rollout step of the whole policy
    assert "mnm_rl/agent/csrc/heads.h" in names  # and what it shares with the others
    assert "mnm_rl/agent/csrc/grid_projection.h" in names
    for kind in ("envs", "agents"):
        presets = {f"mnm_rl/presets/{kind}/{p.name}" for p in (ROOT / kind).glob("*.yaml")}
        assert presets and presets <= names

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        wheel,
        cwd=tmp_path,
    )
    purelib = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).stdout.strip()
    )
    (purelib / "dev_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(python, "-c", "import mnm_rl; print(mnm_rl.__file__)", cwd=elsewhere).stdout
    assert Path(where.strip()).is_relative_to(venv)
    result = run(venv / "bin" / "mnm-rl", "list", cwd=elsewhere)
    for name in ("MiniGrid-Memory", "MiniGrid-MemoryS9", "DelayedCueRecall", "mnm-p", "lstm"):
        assert name in result.stdout
    assert f"presets read from {purelib}" in result.stdout
