"""The control plane against real 2-rank torchrun jobs: a forged write to torchrun's store, a killed supervisor,
and a stop whose reply agrees with its events."""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import wait_for_step
from dspark_lab.errors import ControlError
from dspark_lab.localhost import free_port
from dspark_lab.runtime import commands, liveness
from dspark_lab.runtime.coordinator import Sealer
from dspark_lab.runtime.records import run_state

pytestmark = pytest.mark.slow

DEMO = Path(commands.__file__).parent.parent / "examples" / "demo_train.py"
SMALL = ["--layers", "3", "--dim", "32", "--seq", "16", "--batch", "4", "--vocab", "64", "--steps", "100000",
         "--step-sleep", "0.02"]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    from dspark_lab.plugins import reset_manager

    reset_manager()
    yield tmp_path
    reset_manager()


def tree(job) -> list:
    """The supervisor, torchrun and the ranks (torchrun puts each rank in a session of its own)."""
    import psutil

    me = psutil.Process(job.process.pid)
    return [me, *me.children(recursive=True)]


def kill_all(processes) -> None:
    for proc in processes:
        try:
            proc.kill()
        except Exception:  # already gone
            pass


def steps_by_rank(run_dir) -> dict[int, int]:
    last: dict[int, int] = {}
    for m in run_dir.metrics():
        last[m["rank"]] = max(last.get(m["rank"], 0), m["step"])
    return last


def wait_steps(run_dir, more: int, timeout: float = 60):
    start = steps_by_rank(run_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = steps_by_rank(run_dir)
        if all(now.get(r, 0) >= start.get(r, 0) + more for r in (0, 1)):
            return now
        time.sleep(0.1)
    raise AssertionError(f"ranks did not advance {more} steps in {timeout} s: {start} -> {steps_by_rank(run_dir)}")


def test_forged_store_writes_change_nothing_and_stall_nothing():
    import torch.distributed as dist

    port = free_port()
    job = commands.launch(DEMO, SMALL, nproc=2, name="forged", options={"master_port": port})
    processes = []
    try:
        wait_for_step(job, 2)
        processes = tree(job)
        store = dist.PrefixStore(f"dspark/{job.id}/", dist.TCPStore(
            "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10)))
        stop_now = {"seq": 1, "change_id": "evil", "kind": "stop", "step": 0, "changes": {}}
        store.set("announce/1", json.dumps(stop_now))  # what rank 1 used to apply blindly
        store.set("announce/2", Sealer("not-the-token", job.id).seal("announce/2", {**stop_now, "seq": 2}))
        store.set("announce/3", b"\xff\x00 not json")
        store.set("result/1/1", "evil reason")  # rank 1's answer to the first real change, forged in advance
        wait_steps(job.run_dir, 5)
        assert job.poll() is None

        first = commands.set_policies(job.id, ["memory.activation_checkpointing=full"], timeout=60)
        assert first.data["state"] == "applied", first.data
        second = commands.set_policies(job.id, ["memory.activation_checkpointing=every-2"], timeout=60)
        assert second.data["state"] == "applied", second.data
        for report in (first, second):
            applies = [e for e in job.run_dir.events() if e["change_id"] == report.data["change_id"]
                       and e["kind"] == "apply"]
            assert sorted(e["rank"] for e in applies) == [0, 1]
        wait_steps(job.run_dir, 3)

        ignored = [e for e in job.run_dir.events() if e["kind"] == "refuse" and "store: ignored" in e["reason"]]
        where = sorted((e["rank"], e["reason"].split(f"{job.id}/")[1].split(":")[0]) for e in ignored)
        # each forged announcement logged once, when rank 1 reached its number; the forged answer at most once
        # (rank 1's own write may replace it before rank 0 reads it)
        assert [w for w in where if w[1].startswith("announce")] == [(1, f"announce/{n}") for n in (1, 2, 3)], where
        assert [w for w in where if w[1].startswith("result")] in ([], [(0, "result/1/1")]), where
        assert "HMAC" in next(e["reason"] for e in ignored if "announce/2" in e["reason"])

        stopped = commands.stop(job.id, timeout=60)
        assert stopped.data["state"] == "stopped" and stopped.data["exit_code"] == 0
        assert job.wait(60) == 0
        stops = [e for e in job.run_dir.events() if e["kind"] == "stop"]
        assert sorted(e["rank"] for e in stops) == [0, 1]
        assert {e["step"] for e in stops} == {stopped.data["step"]}  # the reply and the events name one step
        assert max(steps_by_rank(job.run_dir).values()) == stopped.data["step"]
    finally:
        kill_all(processes)


def test_a_killed_supervisor_leaves_a_job_that_reads_running_and_obeys():
    job = commands.launch(DEMO, SMALL, nproc=2, name="orphan")
    processes = []
    try:
        wait_for_step(job, 2)
        processes = tree(job)
        os.kill(job.process.pid, signal.SIGKILL)
        job.process.wait(10)
        wait_steps(job.run_dir, 3)  # the ranks train on
        mine = {j["id"]: j for j in commands.jobs().data["jobs"]}[job.id]
        assert mine["state"] == "running"
        assert json.loads(job.run_dir.run_json.read_text())["state"] == "running"  # nobody but the supervisor writes
        report = commands.set_policies(job.id, ["memory.activation_checkpointing=full"], timeout=60)
        assert report.data["state"] == "applied"
        stopped = commands.stop(job.id, timeout=60)
        assert stopped.data["state"] == "stopped"
        deadline = time.monotonic() + 60
        while run_state(job.run_dir)["state"] != "stopped":
            assert time.monotonic() < deadline, run_state(job.run_dir)
            time.sleep(0.2)
        assert liveness.read_endpoint(job.run_dir.path) is None
        with pytest.raises(ControlError, match="stopped"):
            commands.set_policies(job.id, ["memory.activation_checkpointing=none"])
    finally:
        kill_all(processes)


def test_a_change_one_ranks_schema_refuses_rolls_back_at_once_and_the_next_ones_apply():
    """Two plugin versions on two ranks: rank 0 takes ``skew.mode=c``, rank 1's copy refuses it. Rank 1 must say no
    (not wait as for a forged value), so the change rolls back with its reason and later changes and the stop work."""
    plugins = Path(__file__).parent / "plugins"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")])),
           "DSPARK_PLUGIN_MODULES": "rank_skewed_policy"}
    job = commands.launch(DEMO, SMALL, nproc=2, name="skewed", env=env)
    try:
        wait_for_step(job, 2)
        started = time.monotonic()
        skewed = commands.set_policies(job.id, ["skew.mode=c"], timeout=60)
        assert time.monotonic() - started < 30, "rank 1 made the change wait out the agreement timeout"
        assert skewed.data["state"] == "rolled_back"
        assert "rank 1: this rank's policy schema refuses it: skew.mode: 'c' is not allowed" in skewed.data["reason"]
        rollbacks = [e for e in job.run_dir.events() if e["kind"] == "rollback"
                     and e["change_id"] == skewed.data["change_id"]]
        assert sorted(e["rank"] for e in rollbacks) == [0, 1]
        after = commands.set_policies(job.id, ["memory.activation_checkpointing=full"], timeout=60)
        assert after.data["state"] == "applied", after.data
        assert commands.set_policies(job.id, ["skew.mode=b"], timeout=60).data["state"] == "applied"
        assert commands.stop(job.id, timeout=60).data["state"] == "stopped"
        assert job.wait(60) == 0
    finally:
        if job.poll() is None:
            job.process.kill()
