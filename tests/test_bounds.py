"""Every size a user chooses in ``schedule simulate|show|run`` and ``moe balance`` is bounded: a size past its limit
is refused at once in one line naming it and the limit, and the limits leave room for real models."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dspark_lab.cli import main
from dspark_lab.errors import DSparkError
from dspark_lab.moe import commands as moe_commands
from dspark_lab.pipeline import commands as pipe


def refused(argv, capsys) -> str:
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 2.0  # refused before any work (100000 ranks used to run for minutes)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err.strip()


@pytest.mark.parametrize("argv, message", [
    ("simulate 1f1b --ranks 100000 -m 8", "error: ranks: must be an int in 1..256, got 100000"),
    ("simulate 1f1b -p 4 -m 1000000", "error: microbatches: must be an int in 1..4096, got 1000000"),
    ("simulate interleaved-1f1b -p 4 -m 8 -v 1000", "error: chunks: must be an int in 1..16, got 1000"),
    ("simulate interleaved-1f1b -p 64 -m 4096 -v 2",
     "error: ranks x microbatches x chunks: 64 x 4096 x 2 = 524288 is above the limit 131072"),
    ("simulate 1f1b -p 4 -m 0", "error: microbatches: must be an int in 1..4096, got 0"),
    ("simulate 1f1b -p 4 -m 8 --cost-f nan", "error: cost-f: must be a finite number in [0, 1e12], got nan"),
    ("simulate 1f1b -p 4 -m 8 --cost-comm inf", "error: cost-comm: must be a finite number in [0, 1e12], got inf"),
    ("show 1f1b -p 200 -m 8", "error: ranks: must be an int in 1..128, got 200"),
    ("show 1f1b -p 128 -m 1024", "error: ranks x microbatches x chunks: 128 x 1024 x 1 = 131072 is above the limit "
                                 "32768"),
    ("run 1f1b -p 64 -m 8", "error: ranks: must be an int in 1..16, got 64"),
    ("run 1f1b -p 2 -m 4 --steps 100000000", "error: steps: must be an int in 1..1000, got 100000000"),
])
def test_schedule_sizes_are_bounded(argv, message, capsys):
    assert refused(["schedule", *argv.split()], capsys) == message


def test_schedule_limits_allow_real_pipelines():
    # Megatron-style: 64 stages, 512 micro-batches, 4 chunks per rank is exactly at the simulator's limit.
    pipe.check_sizes(pipe.LIMITS, pipe.MAX_SLOTS, ranks=64, microbatches=512, chunks=4)
    pipe.check_sizes(pipe.LIMITS, pipe.MAX_SLOTS, ranks=128, microbatches=1024, chunks=1)
    report = pipe.simulate_report(pipe.build_schedule("interleaved-1f1b", 16, 128, 4), pipe.make_costs(1, 1, 1))
    assert report.data["step_time"] > 0
    pipe.check_sizes(pipe.SHOW_LIMITS, pipe.SHOW_MAX_SLOTS, ranks=32, microbatches=256, chunks=4)
    pipe.check_sizes(pipe.RUN_LIMITS, pipe.RUN_MAX_SLOTS, ranks=8, microbatches=64, chunks=2, steps=100)


@pytest.fixture
def loads(tmp_path):
    def write(shape):
        path = tmp_path / f"loads-{shape[0]}x{shape[1]}.npy"
        np.save(path, np.random.default_rng(0).lognormal(0, 1, shape))
        return str(path)
    return write


@pytest.mark.parametrize("option, value, message", [
    ("--replicas", "100000", "error: --replicas: must be an int in 1..16384, got 100000"),
    ("--gpus", "1000000", "error: --gpus: must be an int in 1..4096, got 1000000"),
    ("--nodes", "0", "error: --nodes: must be an int in 1..1024, got 0"),
    ("--groups", "5000", "error: --groups: must be an int in 1..4096, got 5000"),
])
def test_moe_balance_sizes_are_bounded(option, value, message, loads, capsys):
    argv = {"--replicas": "8", "--groups": "1", "--nodes": "1", "--gpus": "2", option: value}
    assert refused(["moe", "balance", "--loads", loads((2, 4)), *sum(argv.items(), ())], capsys) == message


def test_moe_balance_bounds_the_loads_file(loads, tmp_path, capsys, monkeypatch):
    base = ["--groups", "1", "--nodes", "1", "--gpus", "2"]
    assert refused(["moe", "balance", "--loads", loads((5000, 4)), "--replicas", "8", *base], capsys) == \
        "error: --loads: 5000 layers; allowed: 1..4096"
    assert refused(["moe", "balance", "--loads", loads((64, 64)), "--replicas", "4096", *base], capsys) == \
        "error: --loads x --replicas: 64 layers x 4096 slots = 262144 is above the limit 131072"
    monkeypatch.setattr(moe_commands, "MAX_FILE_BYTES", 1024)  # the real limit is 64 MiB; a small file shows it
    assert refused(["moe", "balance", "--loads", loads((64, 64)), "--replicas", "128", *base], capsys) == \
        "error: --loads: loads-64x64.npy is 32896 bytes; the limit is 1024 bytes"


def test_moe_balance_limits_allow_deepseek_v3(loads):
    # DeepSeek-V3: 58 MoE layers, 256 routed experts, 288 slots (32 redundant) on 32 GPUs of 4 nodes, 8 groups.
    report = moe_commands.balance(loads((58, 256)), 288, 8, 4, 32)
    assert report.data["after"]["balancedness"] > report.data["before"]["balancedness"]


def test_check_sizes_refuses_bools_and_floats():
    with pytest.raises(DSparkError, match=r"^ranks: must be an int in 1..256, got True$"):
        pipe.check_sizes(pipe.LIMITS, pipe.MAX_SLOTS, ranks=True, microbatches=1, chunks=1)
    with pytest.raises(DSparkError, match=r"^--gpus: must be an int in 1..4096, got 2.0$"):
        moe_commands.check_sizes({"--gpus": 2.0})
