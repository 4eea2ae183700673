"""Discovery on a live run (issue 13's mixed container, issue 12 §2): a `set` sent before the script's first optimizer
step is not refused with a false reason but applies once the model is found, and `status --json` reports the job."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import wait_for_step
from dspark_lab.runtime import commands

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "runtime_fixtures"


def test_a_set_before_discovery_applies_to_blocks_in_a_mixed_container(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    root = str(Path(__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    job = commands.launch(FIXTURES / "mixed_train.py", ["100000", "3"], nproc=1, name="mixed")
    try:
        report = commands.set_policies(job.id, ["memory.activation_checkpointing=full"])  # while it is still loading
        assert report.data["state"] == "applied", report.data
        assert report.data["step"] >= 2  # announced at the first boundary at the earliest, after discovery
        applies = [e for e in job.run_dir.events() if e["kind"] == "apply"]
        assert [e["reason"] for e in applies] == ["4 of 4 blocks checkpointed"]
        wait_for_step(job, report.data["step"] + 1)
        live = commands.status(job.id).data["run"]["live"]
        assert live["job"]["blocks"] == {
            "type": "Block", "count": 4, "path": "model[1:5]",
            "why": "longest run of same-type modules with parameters: 4 x Block at model[1:5]"}
        assert live["job"]["model"]["class"] == "torch.nn.modules.container.Sequential"
        assert live["job"]["policies"]["memory.activation_checkpointing"] == {"applies": True, "reason": None}
        assert live["job"]["data_parallel"] is None and live["job"]["compile"]["compiled"] is False
    finally:
        job.stop()
