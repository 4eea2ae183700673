"""moe.placement on a live 2-rank expert-parallel job: loads recorded every step, experts re-placed at boundaries,
the loss trajectory unchanged and the busiest rank's token load lower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import plain_torchrun, wait_for_step
from dspark_lab.runtime import commands

pytestmark = pytest.mark.slow

SCRIPT = Path(commands.__file__).parent.parent / "examples" / "moe_train.py"


def last_json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_live_replacement_keeps_losses_and_lowers_the_max_rank_load(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    args = ["--steps", "40", "--placement", "static", "--json"]
    static = plain_torchrun([SCRIPT, *args])
    reference = last_json_line(static.stdout)

    job = commands.launch(SCRIPT, [*args, "--step-sleep", "0.1"], nproc=2, name="moe",
                          policies=["moe.placement_interval=5", "moe.placement_window=5"])
    wait_for_step(job, 3, timeout=120)
    report = commands.set_policies(job.id, ["moe.placement=dspark"])
    assert report.data["state"] == "applied"
    assert job.wait(300) == 0
    live = last_json_line((job.run_dir.path / "output.log").read_text())

    assert max(abs(a - b) / abs(b) for a, b in zip(live["loss"], reference["loss"])) <= 1e-5
    placements = [e for e in job.run_dir.events() if e["kind"] == "placement"]
    assert placements and {e["rank"] for e in placements} == {0, 1}
    first = min(e["step"] for e in placements)
    assert first >= report.data["step"] and all(e["step"] % 5 == 1 for e in placements)
    assert all(e["balancedness_after"] >= e["balancedness_before"] - 1e-9 for e in placements)
    # the runtime's own records: per-layer expert loads and tokens each rank's slots processed, every step
    metrics = job.run_dir.metrics()
    assert all(len(m["expert_loads"]) == len(m["moe_rank_tokens"]) > 0 for m in metrics)
    max_rank = {}
    for m in metrics:
        max_rank[m["step"]] = max(max_rank.get(m["step"], 0), sum(m["moe_rank_tokens"]))
    before = [v for s, v in max_rank.items() if s < first]
    after = [v for s, v in max_rank.items() if s >= first]
    assert sum(after) / len(after) < 0.95 * sum(before) / len(before)
