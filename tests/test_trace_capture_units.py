"""The ``profile.steps`` policy on one process with a stand-in job: start at a boundary, stop after N steps, refuse
a second capture, undo on rollback, end early on 0, and cut an oversized trace to the cap."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dspark_lab.errors import PolicyError
from dspark_lab.trace import capture
from dspark_lab.trace.load import load


class FakeJob:
    def __init__(self, path: Path):
        self.run_dir = SimpleNamespace(path=path)
        self.rank, self.step = 0, 10
        self.backend = SimpleNamespace(torch_device="cpu")
        self.policies = {capture.KEY: 0}
        self.events: list[dict] = []
        self.state: dict = {}
        capture.dspark_job_started(self)

    def record_event(self, kind, **fields):
        self.events.append({"kind": kind, **fields})

    def run_step(self):
        (torch.randn(64, 64) @ torch.randn(64, 64)).sum()
        self.step += 1
        capture.dspark_step_end(self, self.step)


def apply(job, value):
    note = capture.dspark_apply_policy(job, capture.KEY, value, job.policies[capture.KEY])
    job.policies[capture.KEY] = value  # what the runtime does on commit
    return note


def test_capture_records_exactly_n_steps_and_refuses_a_second(tmp_path):
    job = FakeJob(tmp_path)
    assert capture.dspark_apply_policy(job, "other.key", 1, 0) is None
    assert "steps 11..12" in apply(job, 2)
    job.run_step()
    with pytest.raises(PolicyError, match="a capture is running"):
        capture.dspark_apply_policy(job, capture.KEY, 5, 2)
    job.run_step()
    assert capture.running(job) is None
    [event] = job.events
    assert (event["kind"], event["first_step"], event["last_step"], event["file"]) == \
        ("profile", 11, 12, "profiles/step11/rank0.json.gz")
    trace = load(tmp_path / event["file"])
    names = {trace.names[i] for i in set(trace.name.tolist())}
    assert {"ProfilerStep#11", "ProfilerStep#12", "aten::mm"} <= names and "ProfilerStep#13" not in names
    job.run_step()  # outside the window: nothing more is recorded
    assert len(job.events) == 1


def test_a_capture_is_private_like_every_record_of_the_run(tmp_path):
    import os
    import stat

    from dspark_lab.trace.commands import show

    old = os.umask(0)  # the most permissive umask: the modes must not depend on it
    try:
        job = FakeJob(tmp_path)
        apply(job, 1)
        job.run_step()
        show([str(tmp_path / "profiles" / "step11")])
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    found = {str(p.relative_to(tmp_path)): mode(p) for p in tmp_path.rglob("*")}
    assert found == {"profiles": 0o700, "profiles/step11": 0o700, "profiles/step11/rank0.json.gz": 0o600,
                     "profiles/step11/timeline.html": 0o600}


def test_rollback_undoes_the_start_and_zero_ends_early(tmp_path):
    job = FakeJob(tmp_path)
    capture.dspark_apply_policy(job, capture.KEY, 3, 0)  # applied, not committed: the runtime then rolls back
    assert capture.dspark_apply_policy(job, capture.KEY, 0, 3) == "capture cancelled"
    assert capture.running(job) is None and job.events == []
    assert apply(job, 0) == "no capture running"
    apply(job, 20)
    job.run_step()
    assert "ended early" in apply(job, 0)
    [event] = job.events
    assert (event["first_step"], event["last_step"]) == (11, 11) and "ended early" in event["reason"]


def test_oversized_trace_is_cut_to_the_cap_and_says_so(tmp_path):
    path = tmp_path / "rank0.json"
    events = [{"ph": "X", "name": f"op{i}", "cat": "cpu_op", "ts": i, "dur": 1, "pid": 1, "tid": 1}
              for i in range(2000)]
    path.write_text(json.dumps({"traceEvents": events}))
    note = capture._cut_to(path, 20_000)
    assert "cut to" in note and path.stat().st_size <= 20_000 + 100
    kept = json.loads(path.read_text())["traceEvents"]
    assert [e["name"] for e in kept] == [f"op{i}" for i in range(len(kept))] and 100 < len(kept) < 2000


def test_a_change_sent_during_a_capture_waits_until_it_has_ended(tmp_path):
    """A `set` while a capture is announced or running is held on rank 0, then applied; it says it waited."""
    from dspark_lab.backends import cpu
    from dspark_lab.plugins import make_manager
    from dspark_lab.runtime.attach import Job
    from dspark_lab.runtime.policies import builtin
    from dspark_lab.runtime.records import RunDir

    manager = make_manager([cpu, builtin, capture], entry_points=False)
    job = Job(RunDir.create("20260101-000000-cafe00", {"name": "u"}, root=tmp_path), rank=0, world=1,
              manager=manager)
    job.coordinator.margin = 2  # as with several ranks: an announcement at boundary s applies at s + 2
    block = lambda: torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    model = torch.nn.Sequential(*[block() for _ in range(4)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    job.set_model(model)

    def step():
        model(torch.randn(4, 16)).sum().backward()
        optimizer.step()
        job.on_step_end(optimizer)

    try:
        step()  # boundary 1: the model is discovered
        profile = job.request({capture.KEY: 3})
        step()  # boundary 2: the capture is announced for step 4 (steps 4..6)
        change = job.request({"memory.activation_checkpointing": "full"})
        step()  # boundary 3: held behind the announced capture, which then starts
        assert change.state == "queued" and change.waited.startswith("waited for the profile.steps change")
        for _ in range(2):
            step()  # boundaries 4, 5: held while the capture runs
            assert change.state == "queued" and change.step is None
        step()  # boundary 6: the capture ended and wrote its trace; the change is announced for step 8
        assert change.state == "pending" and change.step == 8
        step()
        assert (profile.state, profile.step) == ("applied", 4)
        assert change.state == "applied", change.reason
        assert change.waited == "waited for profile capture step4 (steps 4..6) to end (held from step 3 to 6)"
        events = job.run_dir.events()
        [trace] = [e for e in events if e["kind"] == "profile"]
        [apply] = [e for e in events if e["kind"] == "apply" and e["key"] == "memory.activation_checkpointing"]
        assert (trace["first_step"], trace["last_step"], apply["step"]) == (4, 6, 8)
        assert "waited for profile capture step4" in apply["reason"]
        # ending a capture early is the capture's own key: it is never held
        job.request({capture.KEY: 5})
        step()
        step()
        end = job.request({capture.KEY: 0})
        step()
        step()
        assert end.state == "applied" and end.waited == "" and capture.running(job) is None
    finally:
        job.close()
