"""sched.pipeline on a live 2-rank pipeline job: a switch applies on both ranks at one step and keeps the losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import plain_torchrun, wait_for_step
from dspark_lab.runtime import commands
from dspark_lab.errors import PolicyError

pytestmark = pytest.mark.slow

SCRIPT = Path(commands.__file__).parent.parent / "examples" / "pipeline_train.py"
ARGS = ["--microbatches", "4", "--d-model", "32", "--seq", "16"]


def test_live_schedule_switch_keeps_the_loss_trajectory(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    steps = 40
    plain_torchrun([SCRIPT, *ARGS, "--steps", steps, "--loss-file", tmp_path / "plain.json"])

    job = commands.launch(SCRIPT, [*ARGS, "--steps", str(steps), "--step-sleep", "0.05",
                                   "--loss-file", str(tmp_path / "live.json")], nproc=2, name="pipe")
    wait_for_step(job, 3, timeout=120)
    assert commands.get(job.id, "sched.pipeline").data["policies"][0]["value"] == "1f1b"
    report = commands.set_policies(job.id, ["sched.pipeline=zb-h1"])
    assert report.data["state"] == "applied"
    applies = [e for e in job.run_dir.events() if e["kind"] == "apply" and e["key"] == "sched.pipeline"]
    assert sorted(e["rank"] for e in applies) == [0, 1] and {e["step"] for e in applies} == {report.data["step"]}
    with pytest.raises(PolicyError, match="places stages differently"):
        commands.set_policies(job.id, ["sched.pipeline=interleaved-1f1b"])
    assert job.wait(240) == 0
    assert report.data["step"] < steps
    live = json.loads((tmp_path / "live.json").read_text())
    reference = json.loads((tmp_path / "plain.json").read_text())
    assert len(live) == len(reference) == steps
    assert max(abs(a - b) / abs(b) for a, b in zip(live, reference)) <= 1e-5
