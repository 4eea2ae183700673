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
