"""Live capture end to end: a 2-rank gloo job is profiled at one step boundary on both ranks, each rank writes its
trace and a ``profile`` event, the traces show gloo communication, and a second request meanwhile is refused."""

from __future__ import annotations

import importlib.metadata
import os
import time

import pytest

from conftest import wait_for_step
import dspark_lab
from dspark_lab.runtime import commands
from dspark_lab.trace import commands as trace_commands
from dspark_lab.trace.load import load

pytestmark = pytest.mark.slow

DEMO = os.path.join(os.path.dirname(dspark_lab.__file__), "examples", "demo_train.py")
SMALL = ["--layers", "2", "--dim", "32", "--seq", "16", "--batch", "4", "--vocab", "64"]


@pytest.fixture(scope="module")
def live_job(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("DSPARK_HOME", "DSPARK_PLUGIN_MODULES")}
    os.environ["DSPARK_HOME"] = str(tmp_path_factory.mktemp("dspark_home"))
    if not importlib.metadata.entry_points(group="dspark_lab", name="trace"):  # not reinstalled since it was added
        os.environ["DSPARK_PLUGIN_MODULES"] = "dspark_lab.trace.capture"
    from dspark_lab.plugins import reset_manager

    reset_manager()
    job = commands.launch(DEMO, [*SMALL, "--steps", "100000", "--step-sleep", "0.05"], nproc=2, name="profiled")
    wait_for_step(job, 2)
    yield job
    if job.poll() is None:
        job.stop()
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    reset_manager()


def test_profile_two_steps_on_every_rank_then_refuse_a_second_one(live_job):
    report = trace_commands.profile(live_job.id, steps=2, wait=True, timeout=180)
    first = report.data["first_step"]
    events = report.data["events"]
    assert sorted(e["rank"] for e in events) == [0, 1]
    assert {(e["first_step"], e["last_step"], e["id"]) for e in events} == {(first, first + 1, f"step{first}")}
    for rank, path in enumerate(report.data["files"]):
        assert path.endswith(f"profiles/step{first}/rank{rank}.json.gz")
        trace = load(path)
        steps = sorted(trace.names[i] for i in set(trace.name.tolist()) if trace.names[i].startswith("ProfilerStep#"))
        assert steps == [f"ProfilerStep#{first}", f"ProfilerStep#{first + 1}"]
    for rank in report.data["analysis"]["ranks"]:
        assert rank["timeline"] == "cpu" and rank["comm_busy_ms"] > 0
        assert "gloo" in rank["by_pattern_ms"] or "c10d" in rank["by_pattern_ms"]

    long = commands.set_policies(live_job.id, ["profile.steps=30"])
    assert long.data["state"] == "applied"
    second = commands.set_policies(live_job.id, ["profile.steps=3"])
    assert second.data["state"] == "rolled_back" and "a capture is running" in second.data["reason"]
    # another policy during the capture is held on rank 0: not even announced while the capture runs
    held = commands.set_policies(live_job.id, ["memory.activation_checkpointing=full"], wait=False, timeout=1)
    assert held.data["state"] == "timed_out" and held.data["pending_state"] == "queued", held.data
    ended = commands.set_policies(live_job.id, ["profile.steps=0"])
    assert ended.data["state"] == "applied"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        applies = [e for e in live_job.run_dir.events() if e["kind"] == "apply"
                   and e.get("key") == "memory.activation_checkpointing"]
        if len(applies) == 2:
            break
        time.sleep(0.2)
    early = [e for e in live_job.run_dir.events() if e["kind"] == "profile" and e["first_step"] == long.data["step"]]
    assert len(applies) == 2 and min(e["step"] for e in applies) > max(e["last_step"] for e in early), applies
    assert all("waited for profile capture" in e["reason"] for e in applies), applies
    early = [e for e in live_job.run_dir.events() if e["kind"] == "profile" and e["first_step"] == long.data["step"]]
    assert sorted(e["rank"] for e in early) == [0, 1]
    assert all("ended early" in e["reason"] and e["last_step"] < long.data["step"] + 29 for e in early)
