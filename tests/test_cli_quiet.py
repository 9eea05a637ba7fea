"""The CLI hides TensorFlow's start-up lines (oneDNN, CUDA, XLA) unless the user set TF_CPP_MIN_LOG_LEVEL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clippy_monitor import cli
from clippy_monitor.tensorboard_plugin.demo import DemoRun

REPO = Path(__file__).resolve().parents[1]
NOISE = re.compile(
    r"oneDNN|cuda|I0000|E0000|TF_ENABLE_ONEDNN_OPTS|absl::InitializeLog|XLA", re.IGNORECASE
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quiet") / "run"
    DemoRun(300, 4, micro=[100], seed=0).write(path, tensorboard=False)
    return path


def _cli(*argv: str, **env: str) -> subprocess.CompletedProcess:
    """``clippy-monitor ARGV`` in a fresh process, with the user's environment plus ``env``."""
    environ = {
        k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"
    }  # conftest sets it for itself
    environ.update(env)
    command = [sys.executable, "-m", "clippy_monitor.cli", *argv]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env=environ, timeout=300
    )


def test_a_command_that_imports_tensorflow_prints_none_of_its_start_up_lines(run_dir):
    proc = _cli(
        "postmortem", str(run_dir), "--redetect", "spike_ratio=3"
    )  # --redetect runs the TF detector
    assert proc.returncode == 0, proc.stderr
    assert "steps    300 (steps 1..300)" in proc.stdout
    assert [line for line in proc.stderr.splitlines() if NOISE.search(line)] == []


def test_the_users_own_tensorflow_log_level_is_left_alone(run_dir):
    proc = _cli("postmortem", str(run_dir), "--redetect", "spike_ratio=3", TF_CPP_MIN_LOG_LEVEL="0")
    assert proc.returncode == 0, proc.stderr
    assert "oneDNN" in proc.stderr  # nothing was filtered


def test_quiet_tensorflow_sets_the_level_only_when_unset(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    cli.quiet_tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    cli.quiet_tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"


def test_other_lines_written_while_tensorflow_loads_are_kept(capfd):
    lines = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796163736.577081    5864 port.cc:153] oneDNN custom operations are on.",
        "W0000 00:00:1796163736.577456    5864 cudart_stub.cc:31] Could not find cuda drivers",
        "E0000 00:00:1796163739.104922    5864 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)",
        "E0000 00:00:1796163739.104922    5864 other.cc:52] a real error",
        "/x.py:3: UserWarning: kept",
    ]
    with cli.tensorflow_noise_filtered():
        os.write(2, ("\n".join(lines) + "\n").encode())
    assert capfd.readouterr().err.splitlines() == lines[-2:]
