"""tests/gpu/check_device.sh on a machine without a CUDA device: one line that says so, exit 0, nothing installed."""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "gpu" / "check_device.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: run the script itself")
def test_check_device_says_skipped_in_one_line_without_a_device():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stderr
    assert len(lines) == 1 and lines[0].startswith("check_device: skipped: no CUDA device here"), done.stdout
    assert "sees no CUDA device" in lines[0]


def test_check_device_checks_compile():
    py_compile.compile(str(SCRIPT.with_suffix(".py")), doraise=True)


ROOT = SCRIPT.parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", [
    ["-m", "dspark_lab", "demo", "--device", "cuda"],
    [str(ROOT / "dspark_lab" / "examples" / "demo_train.py"), "--device", "cuda", "--steps", "1"],
    [str(ROOT / "benchmarks" / "runtime_overhead.py"), "--device", "cuda"],
], ids=["demo", "demo_train", "runtime_overhead"])
def test_cuda_paths_refuse_in_one_line_without_a_device(command, tmp_path):
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DSPARK_HOME": str(tmp_path)})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "--device: cuda: " in lines[0] and "no CUDA device" in lines[0]
