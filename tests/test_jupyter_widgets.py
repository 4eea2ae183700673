"""Dashboard, device view and policy panel with their transport swapped: synthetic run directories, a fake command
client and ipywidgets' dummy comm (no kernel, no browser). The logic under test is the shipped logic."""

from __future__ import annotations

import threading
import time

import pytest

from dspark_lab import hookimpl
from dspark_lab.backend import Availability, Backend, DeviceSpec
from dspark_lab.errors import PolicyError
from dspark_lab.jupyter import poller as poller_mod
from dspark_lab.jupyter.dashboard import Dashboard, RunWatch
from dspark_lab.jupyter.devices import DeviceView, device_report, sample_all, samplers
from dspark_lab.jupyter.policy_panel import PolicyPanel, PolicyPanelModel, control_for, state_text
from dspark_lab.output import Report
from dspark_lab.plugins import make_manager

from test_views import append_apply, append_steps, write_run


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    return tmp_path / "runs"


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# --- poller ----------------------------------------------------------------------------------------------------


def test_poller_pauses_changes_rate_and_stops():
    calls = []
    p = poller_mod.Poller(lambda: calls.append(time.monotonic()), interval=0.02).start()
    assert wait_for(lambda: len(calls) >= 3)
    p.pause()
    time.sleep(0.1)
    paused_at = len(calls)
    time.sleep(0.15)
    assert len(calls) == paused_at
    p.set_interval(10.0)
    p.pause(False)
    assert wait_for(lambda: len(calls) == paused_at + 1)
    time.sleep(0.1)
    assert len(calls) == paused_at + 1  # the next tick is 10 s away
    assert p in poller_mod.LIVE
    p.stop()
    assert not p.alive and p not in poller_mod.LIVE


def test_poller_ends_when_tick_says_so_and_keeps_errors():
    results = iter([ValueError("torn read"), True, False])

    def tick():
        r = next(results)
        if isinstance(r, Exception):
            raise r
        return r

    p = poller_mod.Poller(tick, interval=0.01).start()
    assert wait_for(lambda: not p.alive)
    assert p.ticks == 3 and isinstance(p.error, ValueError) and p not in poller_mod.LIVE


# --- dashboard -------------------------------------------------------------------------------------------------


def test_watch_shows_a_finished_run_whole_then_stops(home):
    run = write_run(home, steps=10, apply_at=6)
    watch = RunWatch(run.id)
    assert watch.tick() is False
    assert watch.charts.points == 20 and watch.charts.marker_steps() == [6] and watch.step == 9
    assert "whole run shown" in watch.summary()
    assert any("apply memory.activation_checkpointing: none -> full" in line for line in watch.event_lines())


def test_a_dashboard_of_an_ended_run_sends_the_whole_run_with_its_first_render(home):
    # jupyter_bokeh sends the document as it is when the plot widget is made; a browser that renders the view
    # later never receives streams sent before it, so the history must be in that first document.
    import json
    import re

    run = write_run(home, steps=10, apply_at=6)
    dash = Dashboard(run.id)
    document = json.dumps(dash.plot.render_bundle["docs_json"])
    steps = re.findall(r'\["step", \[([^\]]*)\]', document)
    assert steps.count(", ".join(f"{k:.1f}" for k in range(10))) == 2 and "6" in steps  # 2 ranks, the marker
    assert not dash.poller.alive and "whole run shown" in dash.header.value  # ended: nothing left to poll
    dash.close()


def test_refresh_rates_outside_the_views_range_are_one_line_errors(home):
    from dspark_lab.errors import DSparkError

    run = write_run(home, steps=2, state="running")
    for hz in (0, 0.01, 25):
        with pytest.raises(DSparkError, match=r"hz: must be within \[0.05, 20\]"):
            Dashboard(run.id, refresh_hz=hz)
    dash = Dashboard(run.id, refresh_hz=20)
    try:
        assert dash.rate.value == 20 and dash.poller.interval == pytest.approx(0.05)  # the slider shows the rate
    finally:
        dash.close()


def test_dashboard_streams_a_live_run_and_close_stops_its_thread(home):
    run = write_run(home, steps=3, state="running")
    dash = Dashboard(run.id, refresh_hz=20)
    sent = []
    dash.plot.send = lambda msg, buffers=None: sent.append(msg)
    assert dash.charts.points == 6 and dash.poller.alive
    append_steps(run, range(3, 6))
    append_apply(run, 4, "memory.activation_checkpointing", "none", "full")
    assert dash.wait_until(lambda d: d.charts.points == 12 and d.charts.marker_steps() == [4], timeout=10)
    patches = " ".join(str(m.get("payload", "")) for m in sent)
    assert "ColumnsStreamed" in patches and "ColumnDataChanged" not in patches
    assert "step 5" in dash.header.value and "full" in dash.event_log.value
    dash.close()
    assert not dash.poller.alive and dash.poller not in poller_mod.LIVE
    assert dash.plot.comm is None


def test_dashboard_pause_and_rate_controls_drive_the_poller(home):
    run = write_run(home, steps=2, state="running")
    dash = Dashboard(run.id, refresh_hz=2)
    try:
        dash.pause.value = True
        assert dash.poller.paused and dash.pause.description == "resume"
        append_steps(run, range(2, 4))
        time.sleep(0.8)
        assert dash.charts.points == 4  # nothing read while paused
        dash.rate.value = 10.0
        assert dash.poller.interval == pytest.approx(0.1)
        dash.pause.value = False
        assert dash.wait_until(lambda d: d.charts.points == 8)
    finally:
        dash.close()


def test_dashboard_stops_polling_once_the_run_ends(home):
    run = write_run(home, steps=2, state="running")
    dash = Dashboard(run.id, refresh_hz=20)
    append_steps(run, range(2, 5))
    run.update_info(state="finished")
    assert wait_for(lambda: not dash.poller.alive)
    assert dash.charts.points == 10 and "whole run shown" in dash.header.value
    assert dash.stop_button.disabled
    dash.close()


def test_several_dashboards_run_independently(home):
    a = write_run(home, steps=2, state="running", name="a")
    b = write_run(home, steps=4, state="running", name="b")
    one, two = Dashboard(a.id, refresh_hz=20), Dashboard(b.id, refresh_hz=20)
    try:
        one.close()
        append_steps(b, range(4, 6))
        assert two.wait_until(lambda d: d.charts.points == 12)
        assert one.charts.points == 4 and not one.poller.alive and two.poller.alive
    finally:
        two.close()
    assert not two.poller.alive


def test_dashboard_stop_button_calls_stop_with_the_run_id(home):
    run = write_run(home, steps=1, state="running")
    asked = []
    dash = Dashboard(run.id, stop_run=asked.append)
    try:
        dash.stop_button.click()
        assert wait_for(lambda: asked == [run.id])
    finally:
        dash.close()


def test_dashboard_for_an_unknown_run_is_a_one_line_error(home):
    write_run(home)
    with pytest.raises(Exception, match="no run matches 'nope'"):
        Dashboard("nope")


# --- device view -----------------------------------------------------------------------------------------------


class FakeAccelerator:
    """A backend plugin with two devices whose sampler counts its calls; a second backend's sampler raises."""

    def __init__(self):
        self.calls = 0

    @hookimpl
    def dspark_register_backends(self):
        probe = lambda: Availability.yes(devices=2)
        return [Backend(name="fakeacc", vendor="test", spec=DeviceSpec(), probe=probe, torch_device="cpu"),
                Backend(name="broken", vendor="test", spec=DeviceSpec(), probe=probe, torch_device="cpu"),
                Backend(name="absent", vendor="test", spec=DeviceSpec(),
                        probe=lambda: Availability.no("not here"), torch_device="cpu")]

    @hookimpl
    def dspark_device_sampler(self, backend):
        if backend.name == "broken":
            return lambda: 1 / 0
        if backend.name != "fakeacc":
            return None

        def sample():
            self.calls += 1
            return {"utilization_pct": 50.0, "memory_used_gb": 1.0, "memory_total_gb": 4.0,
                    "devices": [{"index": 0, "name": "gpu 0", "utilization_pct": 10.0 * self.calls},
                                {"index": 1, "name": "gpu 1", "utilization_pct": 5.0}]}

        return sample


def test_device_view_samples_on_its_thread_and_skips_a_broken_sampler():
    plugin = FakeAccelerator()
    manager = make_manager([plugin], entry_points=False)
    view = DeviceView(manager, refresh_hz=20)
    try:
        assert list(view.charts.bars) == ["fakeacc"]
        assert wait_for(lambda: plugin.calls >= 3)
        assert view.charts.bars["fakeacc"].data["util"][0] >= 20.0
        assert "broken: sampler raised ZeroDivisionError" in view.status.value
    finally:
        view.close()
    assert not view.poller.alive
    report = device_report(manager)
    assert isinstance(report, Report) and [r["device"] for r in report.rows] == ["gpu 0", "gpu 1"]
    assert "gpu 1" in report.to_text() and report.lines


def test_the_cpu_backend_is_shown_here():
    samples, errors = sample_all(samplers())
    assert not errors and samples[0]["backend"] == "cpu" and len(samples[0]["devices"]) >= 1


# --- policy panel ----------------------------------------------------------------------------------------------

SCHEMA = [
    {"key": "comm.grad_sync", "type": "enum", "choices": ["ddp", "ring", "tree"], "min": None, "max": None,
     "default": "ddp", "live": True, "lossless": True, "doc": "how gradients are reduced", "value": "ddp",
     "since_step": 0, "state": "applied", "pending_value": None, "pending_step": None},
    {"key": "memory.activation_checkpointing", "type": "enum", "choices": ["none", "selective", "full"],
     "min": None, "max": None, "default": "none", "live": True, "lossless": True, "doc": "recompute activations",
     "value": "none", "since_step": 0, "state": "applied", "pending_value": None, "pending_step": None},
    {"key": "comm.bucket_mb", "type": "float", "choices": [], "min": 1, "max": 100, "default": 25.0, "live": True,
     "lossless": True, "doc": "bucket size", "value": 25.0, "since_step": 0, "state": "applied",
     "pending_value": None, "pending_step": None},
    {"key": "sched.log_every", "type": "int", "choices": [], "min": 1, "max": None, "default": 10, "live": True,
     "lossless": True, "doc": "", "value": 10, "since_step": 0, "state": "applied", "pending_value": None,
     "pending_step": None},
    {"key": "memory.offload", "type": "bool", "choices": [], "min": None, "max": None, "default": False,
     "live": False, "lossless": True, "doc": "launch-only", "value": False, "since_step": None,
     "state": "applied", "pending_value": None, "pending_step": None},
]


class FakeClient:
    """The command model's policies/set_policies over an in-memory schema; 'tree' is refused."""

    def __init__(self):
        self.rows = {r["key"]: dict(r) for r in SCHEMA}
        self.asked: list[list[str]] = []
        self.step = 10
        self.release = threading.Event()
        self.release.set()

    def policies(self, run):
        return Report("policies", {"policies": [dict(r) for r in self.rows.values()]})

    def set_policies(self, run, assignments, wait=True, timeout=60.0):
        self.asked.append(list(assignments))
        key, _, value = assignments[0].partition("=")
        if value == "tree":
            raise PolicyError(f"{key}: 'tree' needs a power-of-two world size")
        row = self.rows[key]
        row.update(state="pending", pending_value=value, pending_step=self.step + 2)
        self.release.wait(5)
        self.step += 2
        row.update(value=value, since_step=self.step, state="applied", pending_value=None, pending_step=None)
        return Report("set", {"change_id": "c", "state": "applied", "step": self.step,
                              "changes": [{"key": key, "old": None, "new": value}], "reason": None})


def test_controls_come_from_the_schema():
    kinds = {r["key"]: control_for(r) for r in SCHEMA}
    assert kinds["comm.grad_sync"].kind == "dropdown" and kinds["comm.grad_sync"].options == ("ddp", "ring", "tree")
    assert kinds["comm.bucket_mb"].kind == "float_slider" and kinds["comm.bucket_mb"].max == 100
    assert kinds["sched.log_every"].kind == "int_text"  # unbounded above: a text box
    assert kinds["memory.offload"].kind == "checkbox" and kinds["memory.offload"].read_only
    assert control_for({"key": "comm.topology", "type": "str", "live": False}).kind == "text"
    with pytest.raises(ValueError, match="allowed: enum"):
        control_for({"key": "a.b", "type": "list"})
    pending = {**SCHEMA[0], "state": "pending", "pending_value": "ring", "pending_step": 12}
    assert state_text(pending) == "ddp in force since step 0 | pending: ring at step 12"
    hooked = {**SCHEMA[0], "state": "not_applicable", "reason": "the script registered its own DDP comm hook (h)"}
    assert state_text(hooked) == "ddp in force since step 0 | not applicable: the script registered its own DDP " \
                                 "comm hook (h)"
    assert state_text(SCHEMA[4]).startswith("launch-only | False in force")


def test_model_reports_applied_and_refused():
    client = FakeClient()
    model = PolicyPanelModel("r1", client)
    assert model.submit("comm.grad_sync", "ring") == "applied at step 12"
    assert model.rows["comm.grad_sync"]["value"] == "ring" and "since step 12" in model.status("comm.grad_sync")
    message = model.submit("comm.grad_sync", "tree")
    assert message == "refused: comm.grad_sync: 'tree' needs a power-of-two world size"
    assert model.rows["comm.grad_sync"]["value"] == "ring"
    model.submit("memory.offload", True)
    assert client.asked[-1] == ["memory.offload=true"]


def test_panel_dropdown_change_applies_and_a_refusal_snaps_back():
    client = FakeClient()
    panel = PolicyPanel("r1", client, refresh_s=0.05)
    try:
        dropdown = panel.controls["comm.grad_sync"]
        assert panel.controls["memory.offload"].disabled and not dropdown.disabled
        client.release.clear()
        dropdown.value = "ring"
        assert wait_for(lambda: "requesting ring" in panel.states["comm.grad_sync"].value)
        client.release.set()
        assert wait_for(lambda: "applied at step 12" in panel.states["comm.grad_sync"].value)
        assert client.asked == [["comm.grad_sync=ring"]]
        dropdown.value = "tree"
        assert wait_for(lambda: "refused" in panel.states["comm.grad_sync"].value)
        assert dropdown.value == "ring"  # the value in force, not the refused one
        assert client.asked[-1] == ["comm.grad_sync=tree"] and len(client.asked) == 2  # the snap-back sent nothing
        client.rows["memory.activation_checkpointing"].update(state="pending", pending_value="full",
                                                              pending_step=20)  # changed elsewhere (the CLI)
        assert wait_for(lambda: "pending: full at step 20" in panel.states["memory.activation_checkpointing"].value)
    finally:
        panel.close()
    assert not panel.poller.alive


def test_the_panel_stops_polling_and_goes_read_only_once_the_run_ended(home):
    from dspark_lab.errors import DSparkError

    run = write_run(home, steps=2, state="running")
    client = FakeClient()
    panel = PolicyPanel(run.id, client, refresh_s=0.05)
    try:
        assert wait_for(lambda: panel.poller.ticks >= 2) and panel.poller.alive

        def gone(_run):
            raise DSparkError(f"run {run.id} is finished: it has no live control endpoint")

        client.policies = gone
        run.update_info(state="finished")
        assert wait_for(lambda: not panel.poller.alive)
        assert all(control.disabled for control in panel.controls.values())
        assert "ended finished: the values shown were the last in force" in panel.header.value
    finally:
        panel.close()


# --- the job panel and the profile bar ---------------------------------------------------------------------------

# `status --json` -> run.live.job of the 2-rank FSDP2 test model (docs/runtime.md), trimmed to two policies.
FSDP2_JOB = {
    "discovered": True, "model": {"class": "__main__.Transformer"}, "rank": 0, "world": 2,
    "data_parallel": {"kind": "fsdp2", "modules": 5, "reshard_after_forward": True,
                      "mesh": {"shape": [2], "dim_names": ["dp"], "device_type": "cpu"}},
    "tensor_parallel": None, "pipeline": None,
    "compile": {"compiled": False, "modules": [], "functions_compiled": 0},
    "mixed_precision": {"autocast": None, "param_dtypes": {"torch.float32": 27}, "fsdp": None},
    "blocks": {"type": "TransformerBlock", "count": 4, "path": "model.layers", "why": "longest run"},
    "policies": {"memory.activation_checkpointing": {"applies": True, "reason": None},
                 "comm.grad_sync": {"applies": False, "reason": "the model is sharded with FSDP"}},
}


def test_dashboard_shows_the_live_job_and_rereads_it_after_a_change(home):
    run = write_run(home, steps=3, state="running")
    reads = []

    def source(run_dir):
        reads.append(run_dir.id)
        return FSDP2_JOB

    dash = Dashboard(run.id, refresh_hz=20, job_source=source)
    try:
        panel = dash.job_panel.value
        assert "4 x TransformerBlock at model.layers" in panel
        assert "FSDP2 (fully_shard, 5 modules) on mesh dp=2 (cpu), reshard_after_forward=True" in panel
        assert "cannot apply: comm.grad_sync" in panel and "sharded with FSDP" in panel
        assert "memory.activation_checkpointing" not in panel  # it applies: not listed
        first = len(reads)
        append_apply(run, 4, "memory.activation_checkpointing", "none", "full")
        assert dash.wait_until(lambda d: len(reads) > first, timeout=10)
    finally:
        dash.close()


def test_the_newest_complete_profile_becomes_a_per_rank_breakdown_bar(home, tmp_path):
    from dspark_lab.jupyter.plot import BokehPlot
    from dspark_lab.runtime.records import JsonlWriter
    from test_trace import X, write

    run = write_run(home, steps=8, state="running")
    events = JsonlWriter(run.events_path)
    # compute 0..600 and 950..1000 µs, an all-reduce 400..900 µs (500 busy, 200 under compute), idle 900..950 µs
    for pid, last in (("step2", 3), ("step5", 6)):
        (run.path / "profiles" / pid).mkdir(parents=True)
        for rank in range(2):
            write(run.path / "profiles" / pid / f"rank{rank}.json.gz", [
                X("ProfilerStep#1", "user_annotation", 0, 1000, pid=1, tid=1),
                X("aten::mm", "cpu_op", 0, 600, pid=1, tid=1),
                X("gloo:all_reduce", "cpu_op", 400, 900, pid=1, tid=2),
                X("aten::add", "cpu_op", 950, 1000, pid=1, tid=1)])
            if (pid, rank) != ("step5", 1):  # the newest profile is complete only once rank 1 wrote it
                events.write({"kind": "profile", "step": last, "rank": rank, "id": pid,
                              "file": f"profiles/{pid}/rank{rank}.json.gz"})
    events.close()
    dash = Dashboard(run.id, refresh_hz=20, job_source=lambda run_dir: None)
    try:
        assert dash.watch.profile["id"] == "step2"
        line = dash.watch.profile_line()
        assert line.startswith("profile step2: rank 0: span 1.0 ms, compute 65%, exposed comm 30%, idle 5%")
        assert "comm overlapped 40%" in line
        assert isinstance(dash.profile_panel.children[1], BokehPlot)
        assert dash._profile_shown == "step2" and "profile step2" in dash.profile_panel.children[0].value
        writer = JsonlWriter(run.events_path)
        writer.write({"kind": "profile", "step": 6, "rank": 1, "id": "step5", "file": "profiles/step5/rank1.json.gz"})
        writer.close()
        assert dash.wait_until(lambda d: d._profile_shown == "step5", timeout=10)
        assert len(dash.watch.profile["result"]["ranks"]) == 2
    finally:
        dash.close()
