"""How benchmarks/pipeline_memory.py reads a rank's peak from PyTorch's profiler: from the profiler's start (so what
the first step left counts), the most bytes live after the marker's free, frees matched to allocations by address."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_file

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "pipeline_memory.py"
MB = 1 << 20


@pytest.fixture(scope="module")
def bench():
    return load_file("pipeline_memory_benchmark", SCRIPT)


def test_the_peak_counts_what_the_first_step_left_and_only_the_second_steps_moments(bench):
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        left = torch.empty(MB, dtype=torch.uint8)  # a receive buffer the first step made and kept
        first_step = torch.empty(8 * MB, dtype=torch.uint8)  # the first step's own peak, gone before the marker
        del first_step
        marker = torch.empty(bench.MARKER, dtype=torch.uint8)
        del marker
        second = torch.empty(2 * MB, dtype=torch.uint8)
        del second
        later = torch.empty(MB // 2, dtype=torch.uint8)
    assert bench._peak_after_marker(profiler) == 3 * MB  # the kept buffer and the second step's 2 MB
    del left, later

