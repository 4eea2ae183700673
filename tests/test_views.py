"""The shared bokeh figures: records in, streamed sources and markers out (no browser, no widgets)."""

from __future__ import annotations

import math
import os
import stat

import pytest
from bokeh.document import Document
from bokeh.document.events import ColumnDataChangedEvent, ColumnsPatchedEvent, ColumnsStreamedEvent
from bokeh.models import LabelSet

from dspark_lab import views
from dspark_lab.runtime import commands
from dspark_lab.runtime.records import JsonlWriter, RunDir, new_run_id


def write_run(root, *, ranks=2, steps=6, state="finished", apply_at=None, name="synthetic") -> RunDir:
    """A run directory as the runtime writes it: run.json, metrics per step per rank, apply events per rank."""
    run = RunDir.create(new_run_id(), {"name": name, "ranks": ranks}, root=root)
    append_steps(run, range(steps), ranks)
    if apply_at is not None:
        append_apply(run, apply_at, "memory.activation_checkpointing", "none", "full", ranks)
    run.update_info(state=state)
    return run


def append_steps(run: RunDir, steps, ranks=2, activation_bytes=4e8) -> None:
    writer = JsonlWriter(run.metrics_path)
    for step in steps:
        for rank in range(ranks):
            record = {"step": step, "rank": rank, "step_time_s": 0.1 + 0.01 * rank, "comm_s": 0.02,
                      "loss": 2.0 / (step + 1), "samples_per_s": 80.0, "peak_activation_bytes": activation_bytes,
                      "memory_allocated_bytes": None, "memory_peak_bytes": None, "rss_bytes": 1.5e9}
            if step % 3 == 0:
                record["device"] = {"backend": "cpu", "utilization_pct": 40.0 + step}
            writer.write(record)
    writer.close()


def append_apply(run: RunDir, step, key, old, new, ranks=2, change_id="c1") -> None:
    writer = JsonlWriter(run.events_path)
    writer.write({"kind": "pending", "step": step, "rank": None, "key": key, "old": old, "new": new,
                  "change_id": change_id})
    for rank in range(ranks):
        writer.write({"kind": "apply", "step": step, "rank": rank, "key": key, "old": old, "new": new,
                      "change_id": change_id})
    writer.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    return tmp_path / "runs"


def test_columns_scale_fill_missing_and_carry_device_forward():
    cols = views.MetricColumns()
    batches = cols.batches([
        {"step": 0, "rank": 0, "step_time_s": 0.5, "peak_activation_bytes": 5e8, "device": {"utilization_pct": 30.0}},
        {"step": 1, "rank": 0, "step_time_s": 0.4, "peak_activation_bytes": 2.5e8, "memory_allocated_bytes": None},
        {"step": 0, "rank": 1, "step_time_s": 0.6},
        {"kind": "not a step record"},
    ])
    assert sorted(batches) == [0, 1]
    r0 = batches[0]
    assert r0["step"] == [0.0, 1.0] and r0["activations_gb"] == [0.5, 0.25]
    assert r0["util_pct"] == [30.0, 30.0]  # carried forward between device samples
    assert math.isnan(r0["allocated_gb"][1]) and math.isnan(batches[1]["util_pct"][0])
    assert set(r0) == set(views.COLUMNS)


def test_change_markers_once_per_change_and_only_applies():
    events = [
        {"kind": "pending", "step": 7, "key": "memory.activation_checkpointing", "new": "full", "change_id": "a"},
        {"kind": "apply", "step": 7, "rank": 0, "key": "memory.activation_checkpointing", "new": "full",
         "change_id": "a"},
        {"kind": "apply", "step": 7, "rank": 1, "key": "memory.activation_checkpointing", "new": "full",
         "change_id": "a"},
        {"kind": "refuse", "step": 8, "key": "comm.grad_sync", "new": "bogus"},
        {"kind": "rollback", "step": 9, "rank": 0, "key": "comm.grad_sync", "new": "ring"},
        {"kind": "apply", "step": 12, "rank": 0, "key": "comm.grad_sync", "new": "ring", "change_id": "b"},
    ]
    assert views.change_markers(events) == [(7, "activation_checkpointing=full"), (12, "grad_sync=ring")]


def test_update_streams_only_new_points_and_markers():
    charts = views.MetricCharts(ranks=2)
    doc = Document()
    doc.add_root(charts.layout)
    seen = []
    doc.on_change(lambda event: seen.append(event))
    first = [{"step": s, "rank": r, "step_time_s": 0.1, "loss": 1.0} for s in range(3) for r in range(2)]
    assert charts.update(first) == 6
    assert [len(charts.sources[r].data["step"]) for r in (0, 1)] == [3, 3]
    seen.clear()
    apply = [{"kind": "apply", "step": 3, "rank": r, "key": "memory.activation_checkpointing", "new": "full",
              "change_id": "x"} for r in range(2)]
    assert charts.update([{"step": 3, "rank": 0, "step_time_s": 0.1}], apply) == 1
    assert all(isinstance(e, (ColumnsStreamedEvent, ColumnsPatchedEvent)) for e in seen), seen
    assert not any(isinstance(e, ColumnDataChangedEvent) for e in seen)
    streamed = [e for e in seen if isinstance(e, ColumnsStreamedEvent)]
    assert {len(e.data["step"]) for e in streamed} == {1}  # the new row and the new marker, not the history
    assert charts.marker_steps() == [3] and charts.points == 7


def charts_with_three_changes(second_step: int, third_step: int, second_id: str) -> views.MetricCharts:
    """Checkpointing applied at step 5, then in one update grad_sync=ring and grad_sync=tree at the steps given."""
    def apply(step, key, new, change_id):
        return {"kind": "apply", "step": step, "rank": 0, "key": key, "new": new, "change_id": change_id}

    charts = views.MetricCharts(ranks=1)
    charts.update([], [apply(5, "memory.activation_checkpointing", "full", "a")])
    charts.update([], [apply(second_step, "comm.grad_sync", "ring", second_id),
                       apply(third_step, "comm.grad_sync", "tree", "c")])
    return charts


def test_two_changes_at_one_step_share_one_labelled_marker():
    charts = charts_with_three_changes(5, 9, second_id="a")
    assert charts.markers.data["step"] == [5, 9]
    assert charts.markers.data["label"] == ["activation_checkpointing=full, grad_sync=ring", "grad_sync=tree"]


def test_a_rank_beyond_the_expected_gets_its_own_line():
    charts = views.MetricCharts(ranks=1)
    charts.update([{"step": 0, "rank": 2, "step_time_s": 0.3}])
    assert 2 in charts.sources and charts.sources[2].data["step_time_s"] == [0.3]
    step_fig = charts.figures["step_time"]
    assert any(r.data_source is charts.sources[2] for r in step_fig.renderers)


def test_feed_reads_only_what_was_appended_and_waits_for_whole_lines(home):
    run = write_run(home, steps=2, state="running")
    feed = views.RunFeed(run)
    metrics, events = feed.poll()
    assert len(metrics) == 4 and events == [] and not feed.finished()
    assert feed.poll() == ([], [])
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 2, "rank": 0, "step_')  # a line being written
    assert feed.poll()[0] == []
    with open(run.metrics_path, "a") as f:
        f.write('time_s": 0.2}\n')
    assert feed.poll()[0] == [{"step": 2, "rank": 0, "step_time_s": 0.2}]
    run.update_info(state="stopped")
    assert feed.finished()


def test_run_html_is_self_contained(home):
    run = write_run(home, steps=8, apply_at=4)
    page = views.run_html(run)
    assert "cdn.bokeh.org" not in page and "Bokeh" in page
    assert "activation_checkpointing=full" in page
    charts = views.run_charts(run)
    assert charts.points == 16 and charts.marker_steps() == [4]
    out = views.save_run_html(run, home / "page.html")
    assert "activation_checkpointing=full" in out.read_text()


def test_show_writes_a_private_page_whatever_the_umask(home):
    """docs/records.md: every file in a run directory is 0600; the old charts.html took the umask's 0666."""
    run = write_run(home, steps=4, apply_at=2)
    stale = run.path / "charts.html"
    stale.write_text("old")
    stale.chmod(0o644)
    old = os.umask(0)
    try:
        report = commands.show(run.id)
        other = views.save_run_html(run, home / "mine.html")
    finally:
        os.umask(old)
    assert report.data["html"] == str(stale) and "Bokeh" in stale.read_text()
    assert stat.S_IMODE(stale.stat().st_mode) == 0o600 and stat.S_IMODE(other.stat().st_mode) == 0o600
    assert sorted(p.name for p in run.path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_mean_around_sees_the_drop_after_a_change(home):
    run = write_run(home, steps=5, state="running")
    append_steps(run, range(5, 10), activation_bytes=1e8)
    before, after = views.mean_around(run.metrics(), 5, "peak_activation_bytes")
    assert before == 4e8 and after == 1e8
    assert all(math.isnan(x) for x in views.mean_around([], 5, "loss"))


def test_device_charts_patch_bars_and_roll_the_history():
    def sample(a, b):
        return {"backend": "cpu", "utilization_pct": (a + b) / 2, "memory_used_gb": 2.0, "memory_total_gb": 8.0,
                "devices": [{"index": 0, "name": "core 0", "utilization_pct": a},
                            {"index": 1, "name": "core 1", "utilization_pct": b}]}

    charts = views.DeviceCharts([sample(10, 95)], history=3)
    bars = charts.bars["cpu"]
    assert bars.data["util"] == [10.0, 95.0] and bars.data["color"] == ["#2ca02c", "#d62728"]
    for i in range(5):
        charts.update([sample(60, 20), {"backend": "unknown-later"}], now=float(i))
    assert bars.data["util"] == [60.0, 20.0] and bars.data["color"][0] == "#ff7f0e"
    trend = charts.trend["cpu"].data
    assert len(trend["t"]) == 3 and trend["memory_pct"][-1] == 25.0 and trend["util"][-1] == 40.0
    rows = views.device_rows([sample(1, 2)])
    assert [r["device"] for r in rows] == ["core 0", "core 1"] and rows[1]["utilization_pct"] == 2


def test_views_does_not_import_ipywidgets():
    import subprocess
    import sys

    code = "import sys, dspark_lab.views; print('ipywidgets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_run_summary_and_comparison(home):
    run = write_run(home, steps=8)
    summary = views.run_summary(run.metrics(), gradient_bytes=2e9, skip=3)
    assert summary["steps"] == 5 and summary["step_time_s"] == 0.1
    assert summary["peak_activation_mb"] == 400.0 and summary["allreduce_gb_s"] == pytest.approx(100.0)
    assert math.isnan(views.run_summary([], 1.0)["allreduce_gb_s"])
    layout = views.policy_comparison([{**summary, "label": "none"}, {**summary, "label": "full", "step_time_s": 0.2}])
    bars = layout.children[0][0].renderers[0].data_source.data
    assert bars["label"] == ["none", "full"] and bars["step_time_s"] == [0.1, 0.2]


def test_the_labels_of_consecutive_markers_sit_on_opposite_sides_of_their_lines():
    """Two changes a few steps apart: one label left of its line, the next right of its own (not over each other)."""
    charts = charts_with_three_changes(6, 7, second_id="b")
    offsets = charts.markers.data["x_offset"]
    assert charts.markers.data["step"] == [5, 6, 7] and offsets[0] < 0 < offsets[1] and offsets[2] < 0
    for fig in charts.figures.values():  # every chart's labels read the column, not one fixed offset
        labels = [r for r in fig.center if isinstance(r, LabelSet)]
        assert [label.x_offset for label in labels] == ["x_offset"]
