"""Property-based tests (hypothesis): any ``--set`` assignment, any flag value and any
``config.yaml`` text gives a working config or one line ``mnm-rl: error: ...`` with exit
status 2, never a traceback. Everything runs in-process and stops before training."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnm_rl import cli
from mnm_rl.config import RunConfig, known_keys

KEYS = known_keys(RunConfig)
YAML_BITS = [
    "[",
    "]",
    "{",
    "}",
    ":",
    "- ",
    "!!python/object/apply:os.system",
    "&a",
    "*a",
    "'",
    '"',
    "\n",
    "  ",
    "#",
    "null",
    "1e-3",
    "nan",
    ".inf",
    "-1",
    "0",
    "true",
    "%",
    "|",
]
yaml_like = st.lists(st.sampled_from(YAML_BITS) | st.text(max_size=6), max_size=8).map("".join)
keys = st.sampled_from(KEYS) | st.sampled_from(KEYS).map(lambda k: k + ".x") | st.text(max_size=12)
values = yaml_like | st.text(max_size=20)


class Preflight(Exception):
    """Raised in place of the env/device check: the arguments resolved to a valid config."""


def run_main(argv: list[str]) -> tuple[int | None, str]:
    """``(exit status, stderr)``; ``None`` when the config was valid (training not started)."""
    err = io.StringIO()
    with (
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
        mock.patch.object(cli, "_preflight", side_effect=Preflight),
    ):
        try:
            status = cli.main(argv)
        except SystemExit as exit_:  # argparse
            status = exit_.code
        except Preflight:
            status = None
    return status, err.getvalue()


def assert_one_line_usage_error(status: int | None, stderr: str) -> None:
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnm-rl: error: "), stderr
    assert "Traceback" not in stderr


QUICK = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@QUICK
@given(key=keys, value=values)
def test_any_set_assignment_resolves_or_is_a_one_line_error(key: str, value: str):
    status, stderr = run_main(["train", "--env", "DelayedCueRecall", "--set", f"{key}={value}"])
    if status is not None:
        assert_one_line_usage_error(status, stderr)


@QUICK
@given(text=st.text(max_size=15))
def test_any_set_text_without_key_value_shape(text: str):
    status, stderr = run_main(["train", "--env", "DelayedCueRecall", "--set", text])
    if status is not None:
        assert_one_line_usage_error(status, stderr)
        if "=" not in text and not text.startswith("-"):  # "-x" is taken for an option
            assert "key=value" in stderr


@QUICK
@given(
    flag=st.sampled_from(["--timesteps", "--n-envs", "--seed", "--episodes-bad"]),
    value=st.text(max_size=10).filter(lambda v: not v.startswith("-")),
)
def test_any_flag_value_resolves_or_is_a_one_line_error(flag: str, value: str):
    status, stderr = run_main(["train", "--env", "DelayedCueRecall", flag, value])
    if status is not None:
        assert_one_line_usage_error(status, stderr)


@QUICK
@given(text=yaml_like | st.text(max_size=40))
def test_any_config_yaml_is_read_or_is_a_one_line_error(text: str):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(text)
        status, stderr = run_main(["train", "--resume", tmp, "--timesteps", "10"])
    # Refused as a config or, were it valid, as a run without a checkpoint: one line, status 2.
    assert_one_line_usage_error(status, stderr)
