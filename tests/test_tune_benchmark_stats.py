"""The oracle statistics of benchmarks/tune.py: a rotated order per round, and the kept-vs-best ratio paired by round
so a machine whose speed changes between rounds neither hides a slower kept configuration nor fakes one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import load_file

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "tune.py"


@pytest.fixture(scope="module")
def bench():
    return load_file("tune_benchmark", SCRIPT)


def runs_with_drift(speeds: dict, drift=(1.0, 1.6, 0.7), noise=0.02, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {(name,): [{"config": {"k": name}, "startup_s": 10.0, "peak_bytes": 1.0,
                       "times": list(speed * d * (1 + noise * rng.standard_normal(25)))} for d in drift]
            for name, speed in speeds.items()}


def test_every_configuration_takes_every_position_of_a_round(bench):
    configs = ["a", "b", "c", "d"]
    orders = [bench.round_order(configs, r) for r in range(4)]
    assert all(sorted(o) == configs for o in orders)
    assert all(sorted(o[i] for o in orders) == configs for i in range(4))


def test_the_paired_ratio_sees_a_10_percent_gap_that_drift_between_rounds_hides_from_each_configuration(bench):
    runs = runs_with_drift({"best": 0.040, "kept": 0.044})
    table, logs, idx = bench.oracle_table(runs)
    best, kept = table[("best",)], table[("kept",)]
    assert best["ci"][1] > kept["ci"][0]  # each configuration's own CI is as wide as the drift: they overlap
    ratio, (lo, hi) = bench.paired_ratio(table, logs, idx, ("kept",), ("best",))
    assert ratio == pytest.approx(1.10, abs=0.02) and 1.05 < lo < 1.10 < hi < 1.15  # paired: clearly > 5% slower
    assert bench.paired_ratio(table, logs, idx, ("best",), ("best",)) == (1.0, (1.0, 1.0))


def test_equal_configurations_under_drift_are_not_called_apart(bench):
    runs = runs_with_drift({"a": 0.040, "b": 0.040}, seed=3)
    table, logs, idx = bench.oracle_table(runs)
    _, (lo, hi) = bench.paired_ratio(table, logs, idx, ("b",), ("a",))
    assert lo <= 1.0 <= hi and hi < 1.05
