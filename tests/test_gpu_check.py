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


def test_demo_phase_summary_takes_the_allocator_peak_only_from_steps_every_rank_read():
    from dspark_lab.runtime.demo import summarize

    metrics = [{"step": s, "rank": 0, "step_time_s": 0.1, "peak_activation_bytes": 2**20, "comm_s": None,
                "loss": 1.0, "memory_peak_bytes": (3 * 2**20 if s != 3 else None)} for s in (1, 2, 3, 4)]
    row = summarize(metrics, 1, 5, {s: 1.0 for s in (1, 2, 3, 4)})
    assert row["allocator_peak_mb"] == 3.0 and row["loss_deviation"] == 0.0 and row["steps"] == 4
    no_reads = [{**m, "memory_peak_bytes": None} for m in metrics]
    assert summarize(no_reads, 1, 5, {})["allocator_peak_mb"] is None
