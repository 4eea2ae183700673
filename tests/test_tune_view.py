"""The live view of ``%dspark tune``, driven by a recorded events.jsonl with tune events (the transport swapped: a
synthetic run directory and ipywidgets' dummy comm); and the magic's dispatch in a notebook and a terminal."""

from __future__ import annotations

import math

import pytest
from IPython.core.interactiveshell import InteractiveShell

from dspark_lab.jupyter import magics
from dspark_lab.jupyter import poller as poller_mod
from dspark_lab.jupyter.tune_view import TuneView, TuneWatch
from dspark_lab.output import Report
from dspark_lab.runtime.records import JsonlWriter
from dspark_lab.tune import commands as tune_commands

from test_views import append_steps, write_run

SPACE = {"keys": {"memory.activation_checkpointing": ["none", "full", "every-2"]}, "bit_exact": True,
         "needs_restart": [{"key": "comm.bucket_mb", "value": 25.0, "would_try": [1.0, 2.0]}], "excluded": []}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    return tmp_path / "runs"


def trial(value, verdict, ratio=None, ci=None, peak=3e5, median=0.05, incumbent=0.04, steps=22):
    return {"values": {"memory.activation_checkpointing": value}, "change": {"memory.activation_checkpointing": value},
            "verdict": verdict, "steps": steps, "median_step_time_s": median, "incumbent_step_time_s": incumbent,
            "ratio": ratio, "ci": ci, "peak_bytes": peak, "predicted_peak_bytes": None, "reason": ""}


def write_tune(run, reason, tune_id="t1", step=10, **extra):
    writer = JsonlWriter(run.events_path)
    writer.write({"time": 0.0, "step": step, "rank": None, "kind": "tune", "key": None, "old": None, "new": None,
                  "reason": reason, "change_id": None, "tune_id": tune_id, **extra})
    writer.close()


def decision(best):
    return {"start": {"memory.activation_checkpointing": "none"}, "best": {"memory.activation_checkpointing": best},
            "best_step_time_s": 0.06, "best_peak_bytes": 2**19, "feasible": True, "steps": 60, "seconds": 4.0,
            "stopped": False, "found_at_step": 22, "found_after_s": 1.5}


def test_view_grows_its_table_and_chart_as_tune_events_arrive_and_stops_after_the_decision(home):
    run = write_run(home, steps=4, state="running")
    write_tune(run, "start", space=SPACE, options={"budget_steps": 100})
    write_tune(run, "trial", trial=trial("full", "win", ratio=1.5, ci=[1.25, 1.75], median=0.061), step=30)
    view = TuneView(run.id, tune_id="t1", refresh_hz=20)
    sent = []
    view.plot.send = lambda msg, buffers=None: sent.append(msg)
    try:
        assert [r["change"] for r in view.rows] == ["memory.activation_checkpointing=full"]
        row = view.rows[0]
        assert row["verdict"] == "win" and row["steps"] == 22 and row["ci"] == "[1.250, 1.750]"
        assert row["peak_mb"] == pytest.approx(3e5 / 2**20) and row["median_step_time_s"] == 0.061
        data = view.watch.chart.source.data
        assert data["trial"] == [1] and data["verdict"] == ["win"]
        assert data["step_ms"][0] == pytest.approx(60.0) and data["incumbent_ms"][0] == pytest.approx(40.0)
        assert (data["lo_ms"][0], data["hi_ms"][0]) == pytest.approx((50.0, 70.0))
        assert "running" in view.header.value and "needs a restart: comm.bucket_mb" in view.table.value
        assert view.poller.alive

        append_steps(run, range(4, 8))
        write_tune(run, "trial", trial=trial("every-2", "over_cap", peak=9e5, median=0.03), step=46)
        write_tune(run, "trial", trial=trial("every-4", "tie", ratio=0.98, ci=[0.9, 1.1]), step=60)
        assert view.wait_until(lambda v: len(v.rows) == 3, timeout=10)
        data = view.watch.chart.source.data
        assert data["trial"] == [1, 2, 3] and data["verdict"] == ["win", "over_cap", "tie"]
        assert data["step_ms"][1] == pytest.approx(30.0) and math.isnan(data["lo_ms"][1])  # no ratio: raw median
        assert (data["lo_ms"][2], data["hi_ms"][2]) == pytest.approx((36.0, 44.0))
        assert "ColumnsStreamed" in " ".join(str(m.get("payload", "")) for m in sent)
        assert "over_cap" in view.table.value and "every-4" in view.table.value

        write_tune(run, "decision", decision=decision("full"), step=70)
        assert view.wait_until(lambda v: v.watch.done, timeout=10)
        view.poller._thread.join(5)
        assert not view.poller.alive  # the tune has ended: no more polling
        assert "done" in view.header.value and "kept: memory.activation_checkpointing=full" in view.table.value
        assert view.stop_button.disabled
    finally:
        view.close()
    assert not view.poller.alive and view.poller not in poller_mod.LIVE


def test_without_an_id_the_view_follows_the_newest_tune_and_shows_a_failure(home):
    run = write_run(home, steps=2, state="running")
    write_tune(run, "start", space=SPACE)
    write_tune(run, "trial", trial=trial("full", "loss", ratio=1.3, ci=[1.2, 1.4]))
    write_tune(run, "decision", decision=decision("none"))
    write_tune(run, "start", tune_id="t2", space=SPACE, step=80)
    write_tune(run, "trial", tune_id="t2", trial=trial("every-2", "failed", median=None), step=90)
    watch = TuneWatch(run.id)
    assert watch.tick() is True
    assert watch.state["id"] == "t2" and [t["verdict"] for t in watch.state["trials"]] == ["failed"]
    assert watch.chart.source.data["verdict"] == ["failed"] and math.isnan(watch.chart.source.data["step_ms"][0])
    write_tune(run, "error", tune_id="t2", error="RuntimeError: the run is stopping")
    assert watch.tick() is False
    assert watch.state["state"] == "failed"
    assert "tune failed: RuntimeError: the run is stopping" in watch.report().lines


def test_the_stop_button_stops_the_tune_of_this_run(home):
    run = write_run(home, steps=2, state="running")
    write_tune(run, "start", space=SPACE)
    stopped = []
    view = TuneView(run.id, tune_id="t1", refresh_hz=20, stop_tune=stopped.append)
    try:
        view.stop_button.click()
        assert view.wait_until(lambda v: stopped == [run.id], timeout=5)
    finally:
        view.close()


@pytest.fixture(scope="module")
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "dspark_lab")
    return shell


def test_the_magic_shows_the_live_view_in_a_notebook_and_the_report_in_a_terminal(ip, home, monkeypatch):
    run = write_run(home, steps=2, state="running")
    calls = []

    def fake_start(target, **options):
        calls.append(("start", target, options))
        write_tune(run, "start", space=SPACE)
        return {"id": "t1", "state": "running"}

    def fake_tune(target, **options):
        calls.append(("tune", target, options))
        return tune_commands.report({"id": "t1", "state": "done", "trials": [trial("full", "win", 1.5, [1.2, 1.8])]})

    monkeypatch.setattr(tune_commands, "start", fake_start)
    monkeypatch.setattr(tune_commands, "tune", fake_tune)
    monkeypatch.setattr(magics, "in_notebook", lambda: True)
    assert ip.run_line_magic("dspark", f"tune {run.id} --budget-steps 50 --keys memory.activation_offload") is None
    view = magics.OPEN[-1]
    try:
        assert isinstance(view, TuneView) and view.watch.tune_id == "t1"
        assert calls[0][0] == "start" and calls[0][2]["budget_steps"] == 50
        assert calls[0][2]["keys"] == ["memory.activation_offload"]
        assert view.wait_until(lambda v: v.watch.state["state"] == "running", timeout=5)
    finally:
        magics.close_all()
    monkeypatch.setattr(magics, "in_notebook", lambda: False)
    report = ip.run_line_magic("dspark", f"tune {run.id} --max-activation-mb 2")
    assert isinstance(report, Report) and report.rows[0]["verdict"] == "win"
    assert calls[-1][0] == "tune" and calls[-1][2]["max_activation_mb"] == 2.0
