"""Bokeh figures shared by the CLI (standalone HTML) and the notebooks (through jupyter_bokeh).

Sampling and rendering meet at plain data: a run's ``metrics.jsonl``/``events.jsonl`` records (docs/records.md) and
a backend sampler's dict (``dspark_device_sampler``). :class:`RunFeed` tails a run directory; :class:`MetricCharts`
and :class:`DeviceCharts` own bokeh ``ColumnDataSource`` objects and *stream* new points into them, so a live view
sends only the new rows (the pattern of jupyterlab-nvdashboard's ``apps/gpu.py``, without sampling in handlers).
Nothing here imports ipywidgets; ``dspark_lab.jupyter`` wraps these figures in widgets.

Pipeline and MoE figures live beside their areas (``pipeline/show.py``, ``moe/view.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from bokeh.embed import file_html
from bokeh.layouts import column, gridplot
from bokeh.models import ColumnDataSource, FactorRange, LabelSet, Range1d
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from bokeh.resources import INLINE

from dspark_lab.private_files import write_private_text
from dspark_lab.runtime.jsonl import Follower, read_jsonl
from dspark_lab.runtime.records import ENDED_STATES, RunDir, run_state

NAN = float("nan")
GB = 1e9


# --- plain data ------------------------------------------------------------------------------------------------


class RunFeed:
    """Tail one run directory: each :meth:`poll` returns the metrics and events appended since the last call (the
    first, every record kept, metrics.jsonl's moved files included)."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self._metrics = Follower(run_dir.metrics_path, lookback=None)
        self._events_offset = 0

    def poll(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        metrics = self._metrics.poll()
        events, self._events_offset = read_jsonl(self.run_dir.events_path, self._events_offset)
        return metrics, events

    def info(self) -> dict[str, Any]:
        return run_state(self.run_dir)

    def finished(self) -> bool:
        """True once the run has ended (as :func:`~dspark_lab.runtime.records.run_state` reads it: a live rank 0
        outvotes a dead supervisor or an unreadable run.json); a last :meth:`poll` then reads everything."""
        return self.info().get("state") in ENDED_STATES


@dataclass(frozen=True, slots=True)
class Series:
    """One plotted quantity: ``field`` is a (dotted) key of a metrics record, divided by ``scale``."""

    column: str
    label: str
    field: str
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class Panel:
    """One chart of the dashboard. ``per_rank`` draws a line per rank, else rank 0's series only."""

    name: str
    title: str
    y_label: str
    series: tuple[Series, ...]
    per_rank: bool = False


PANELS: tuple[Panel, ...] = (
    Panel("step_time", "Step time per rank", "seconds", (Series("step_time_s", "step", "step_time_s"),), True),
    Panel("throughput", "Throughput (rank 0)", "samples/s", (Series("samples_per_s", "samples/s", "samples_per_s"),)),
    Panel("memory", "Memory (rank 0)", "GB", (
        Series("allocated_gb", "allocated", "memory_allocated_bytes", GB),
        Series("peak_gb", "peak", "memory_peak_bytes", GB),
        Series("activations_gb", "held for backward", "peak_activation_bytes", GB),
    )),  # process RSS is left out: on CPU it is mostly libraries and would flatten the lines that move
    Panel("device", "Device utilization (rank 0)", "%", (Series("util_pct", "utilization", "device.utilization_pct"),)),
    Panel("comm", "Communication time per rank", "seconds", (Series("comm_s", "comm", "comm_s"),), True),
    Panel("loss", "Loss (rank 0)", "loss", (Series("loss", "loss", "loss"),)),
)
COLUMNS: tuple[str, ...] = ("step",) + tuple(s.column for p in PANELS for s in p.series)


def field_value(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _number(value: Any, scale: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return NAN
    return value / scale


class MetricColumns:
    """Turn metrics records into per-rank column batches (plain lists of floats, NaN where a field is missing).

    The device sampler runs every few steps, so its fields are carried forward from the rank's last sample.
    """

    def __init__(self):
        self._last_device: dict[int, dict[str, Any]] = {}

    def row(self, record: dict[str, Any]) -> dict[str, float]:
        rank = int(record.get("rank") or 0)
        if isinstance(record.get("device"), dict):
            self._last_device[rank] = record["device"]
        merged = {**record, "device": self._last_device.get(rank)}
        row = {"step": _number(record.get("step"))}
        for panel in PANELS:
            for s in panel.series:
                row[s.column] = _number(field_value(merged, s.field), s.scale)
        return row

    def batches(self, records: Iterable[dict[str, Any]]) -> dict[int, dict[str, list[float]]]:
        """``{rank: {column: [values...]}}`` for the records given, in their order."""
        out: dict[int, dict[str, list[float]]] = {}
        for record in records:
            if record.get("step") is None:
                continue
            batch = out.setdefault(int(record.get("rank") or 0), {c: [] for c in COLUMNS})
            for name, value in self.row(record).items():
                batch[name].append(value)
        return out


def change_markers(events: Iterable[dict[str, Any]]) -> list[tuple[int, str]]:
    """``(step, "name=value")`` for every change that took effect, once per change (events repeat per rank)."""
    seen: set[tuple] = set()
    out = []
    for event in events:
        if event.get("kind") != "apply" or event.get("step") is None:
            continue
        ident = (event.get("change_id"), event.get("step"), event.get("key"), str(event.get("new")))
        if ident in seen:
            continue
        seen.add(ident)
        name = str(event.get("key") or "?").rsplit(".", 1)[-1]
        out.append((int(event["step"]), f"{name}={event.get('new')}"))
    return out


def mean_around(records: Sequence[dict[str, Any]], step: int, field: str, window: int = 5,
                rank: int = 0) -> tuple[float, float]:
    """Mean of ``field`` over ``window`` steps of ``rank`` before ``step`` and from ``step`` on (NaN if none)."""
    mine = [r for r in records if (r.get("rank") or 0) == rank and r.get("step") is not None]
    before = [_number(field_value(r, field)) for r in mine if step - window <= r["step"] < step]
    after = [_number(field_value(r, field)) for r in mine if step <= r["step"] < step + window]
    return _mean(before), _mean(after)


def _mean(values: list[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    return sum(known) / len(known) if known else NAN


# --- figures ---------------------------------------------------------------------------------------------------


def _color(i: int) -> str:
    return Category10_10[i % len(Category10_10)]


# A marker's label runs up its line, on the left of it; every second marker's on the right, so the labels of two
# changes a few steps apart (the usual case: one change, then a second to compare) do not print over each other.
LABEL_OFFSETS = (-3, 13)  # screen pixels from the line to the label's baseline (8pt text is about 10 px tall)


class MetricCharts:
    """The dashboard's charts: one figure per :data:`PANELS` entry, sharing the step axis, with change markers.

    :meth:`update` streams metrics records and ``apply`` events into the sources; nothing is redrawn in full.
    ``layout`` is the bokeh object to show (``bokeh.io.show``, ``jupyter_bokeh.BokehModel`` or :func:`run_html`).
    """

    def __init__(self, ranks: int = 1, width: int = 420, height: int = 190, rollover: int | None = None):
        self.rollover = rollover
        self.columns = MetricColumns()
        self.sources: dict[int, ColumnDataSource] = {}
        self.markers = ColumnDataSource({"step": [], "label": [], "x_offset": []})
        self._marker_rows: dict[int, int] = {}
        self.marker_labels: dict[int, str] = {}  # step -> label, our own record of what the sources were sent
        self.points = 0
        self.figures: dict[str, Any] = {}
        x_range = None
        for panel in PANELS:
            fig = figure(title=panel.title, width=width, height=height, x_axis_label="step",
                         y_axis_label=panel.y_label, tools="pan,xwheel_zoom,box_zoom,reset,save,hover",
                         **({"x_range": x_range} if x_range is not None else {}))
            x_range = x_range or fig.x_range
            fig.vspan(x="step", source=self.markers, line_color="#d62728", line_dash="dashed", line_width=1.5)
            fig.add_layout(LabelSet(x="step", y=4, y_units="screen", text="label", source=self.markers,
                                    angle=math.pi / 2, x_offset="x_offset", text_font_size="8pt",
                                    text_color="#d62728"))
            fig.toolbar.logo = None
            self.figures[panel.name] = fig
        for rank in range(max(ranks, 1)):
            self._add_rank(rank)
        self.layout = gridplot([self.figures[p.name] for p in PANELS], ncols=2, merge_tools=True,
                               toolbar_location="right")

    def _add_rank(self, rank: int) -> ColumnDataSource:
        source = ColumnDataSource({c: [] for c in COLUMNS})
        self.sources[rank] = source
        for panel in PANELS:
            if rank and not panel.per_rank:
                continue
            fig = self.figures[panel.name]
            for i, s in enumerate(panel.series):
                label = f"rank {rank}" if panel.per_rank else s.label
                color = _color(rank if panel.per_rank else i)
                fig.line("step", s.column, source=source, color=color, legend_label=label, line_width=1.5)
            fig.legend.location = "top_left"
            fig.legend.label_text_font_size = "8pt"
            fig.legend.background_fill_alpha = 0.6
        return source

    def update(self, metrics: Sequence[dict[str, Any]] = (), events: Sequence[dict[str, Any]] = ()) -> int:
        """Stream new records in; returns the number of new metric points."""
        added = 0
        for rank, batch in sorted(self.columns.batches(metrics).items()):
            source = self.sources.get(rank) or self._add_rank(rank)
            source.stream(batch, rollover=self.rollover)
            added += len(batch["step"])
        self.points += added
        self._add_markers(change_markers(events))
        return added

    def _add_markers(self, markers: list[tuple[int, str]]) -> None:
        new_steps: list[int] = []
        new_labels: list[str] = []
        for step, label in markers:
            if step in self._marker_rows:  # a second key applied at the same step: one line, both names
                row = self._marker_rows[step]
                current = self.markers.data["label"][row]
                if label not in current.split(", "):
                    self.markers.patch({"label": [(row, f"{current}, {label}")]})
            elif step in new_steps:
                i = new_steps.index(step)
                new_labels[i] = f"{new_labels[i]}, {label}"
            else:
                new_steps.append(step)
                new_labels.append(label)
        for step, label in markers:
            known = self.marker_labels.get(step)
            self.marker_labels[step] = label if known is None or label in known.split(", ") else f"{known}, {label}"
        if new_steps:
            start = len(self.markers.data["step"])
            self._marker_rows.update({s: start + i for i, s in enumerate(new_steps)})
            self.markers.stream({"step": new_steps, "label": new_labels,
                                 "x_offset": [LABEL_OFFSETS[(start + i) % 2] for i in range(len(new_steps))]})

    def marker_steps(self) -> list[int]:
        return sorted(self.marker_labels)


class DeviceCharts:
    """Live per-device utilization for every backend sampled: a bar per device and a history of the mean.

    Built from a first list of sampler dicts (it fixes the devices shown); :meth:`update` takes the next list.
    """

    def __init__(self, samples: Sequence[dict[str, Any]], history: int = 240, width: int = 420, height: int = 200):
        self.history = history
        self.bars: dict[str, ColumnDataSource] = {}
        self.trend: dict[str, ColumnDataSource] = {}
        self._t0 = time.monotonic()
        rows = []
        for sample in samples:
            backend = str(sample.get("backend", "?"))
            names = [str(d.get("name", d.get("index"))) for d in sample.get("devices", [])] or [backend]
            bars = ColumnDataSource({"device": names, "util": self._utils(sample, len(names)),
                                     "color": [_color(0)] * len(names)})
            bar_fig = figure(title=f"{backend}: utilization per device", x_range=FactorRange(*names),
                             y_range=Range1d(0, 100), width=width, height=height, y_axis_label="%",
                             tools="hover,save", tooltips=[("device", "@device"), ("util", "@util{0.0}%")])
            bar_fig.vbar(x="device", top="util", width=0.8, source=bars, color="color")
            bar_fig.xaxis.major_label_orientation = math.pi / 4 if len(names) > 8 else 0
            trend = ColumnDataSource({"t": [], "util": [], "memory_pct": []})
            trend_fig = figure(title=f"{backend}: mean utilization and memory", y_range=Range1d(0, 100),
                               width=width, height=height, x_axis_label="seconds", y_axis_label="%",
                               tools="pan,xwheel_zoom,reset,save")
            trend_fig.line("t", "util", source=trend, color=_color(0), legend_label="utilization", line_width=1.5)
            trend_fig.line("t", "memory_pct", source=trend, color=_color(1), legend_label="memory", line_width=1.5)
            trend_fig.legend.location = "top_left"
            for fig in (bar_fig, trend_fig):
                fig.toolbar.logo = None
            self.bars[backend], self.trend[backend] = bars, trend
            rows.append([bar_fig, trend_fig])
        self.layout = gridplot(rows, merge_tools=True, toolbar_location="right") if rows else column()
        self.update(samples)

    @staticmethod
    def _utils(sample: dict[str, Any], n: int) -> list[float]:
        devices = sample.get("devices") or [{"utilization_pct": sample.get("utilization_pct")}]
        values = [_number(d.get("utilization_pct")) for d in devices][:n]
        return values + [NAN] * (n - len(values))

    def update(self, samples: Sequence[dict[str, Any]], now: float | None = None) -> None:
        t = (time.monotonic() if now is None else now) - self._t0
        for sample in samples:
            backend = str(sample.get("backend", "?"))
            if backend not in self.bars:
                continue  # a backend that appeared after the view was built is shown by the next view
            bars = self.bars[backend]
            utils = self._utils(sample, len(bars.data["device"]))
            bars.patch({"util": [(slice(0, len(utils)), utils)],
                        "color": [(slice(0, len(utils)), [_heat(u) for u in utils])]})
            used, total = _number(sample.get("memory_used_gb")), _number(sample.get("memory_total_gb"))
            memory_pct = 100.0 * used / total if total and not math.isnan(total) else NAN
            self.trend[backend].stream({"t": [t], "util": [_number(sample.get("utilization_pct"))],
                                        "memory_pct": [memory_pct]}, rollover=self.history)


def _heat(pct: float) -> str:
    """Bar colour by load: green, amber, red (grey when unknown)."""
    if math.isnan(pct):
        return "#999999"
    return "#2ca02c" if pct < 50 else "#ff7f0e" if pct < 85 else "#d62728"


def device_rows(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per device, for the text rendering of ``%dspark devices`` in a terminal."""
    rows = []
    for sample in samples:
        for device in sample.get("devices") or [{"index": 0, "name": sample.get("backend")}]:
            rows.append({"backend": sample.get("backend"), "device": device.get("name", device.get("index")),
                         "utilization_pct": device.get("utilization_pct", sample.get("utilization_pct")),
                         "memory_used_gb": sample.get("memory_used_gb"),
                         "memory_total_gb": sample.get("memory_total_gb")})
    return rows


# --- comparing runs -------------------------------------------------------------------------------------------


def run_summary(records: Sequence[dict[str, Any]], gradient_bytes: float, skip: int = 3,
                rank: int = 0) -> dict[str, float]:
    """Steady-state figures of one run (the first ``skip`` steps are warm-up): median step time, peak activation
    memory, and the all-reduce bus bandwidth ``gradient_bytes / comm_s`` (what the gradient collectives moved per
    second of their own time)."""
    mine = [r for r in records if (r.get("rank") or 0) == rank and (r.get("step") or 0) >= skip]

    def median(field: str) -> float:
        values = sorted(v for v in (_number(field_value(r, field)) for r in mine) if not math.isnan(v))
        return values[len(values) // 2] if values else NAN

    comm = median("comm_s")
    return {"steps": len(mine), "step_time_s": median("step_time_s"),
            "peak_activation_mb": median("peak_activation_bytes") / 1e6,
            "comm_s": comm, "allreduce_gb_s": gradient_bytes / comm / GB if comm and comm > 0 else NAN}


COMPARED = (("peak_activation_mb", "Peak activation memory", "MB"), ("step_time_s", "Step time", "seconds"),
            ("allreduce_gb_s", "All-reduce bandwidth", "GB/s"))


def policy_comparison(rows: Sequence[dict[str, Any]], width: int = 300, height: int = 260):
    """Bar charts of :func:`run_summary` rows side by side, one bar per row's ``label``."""
    labels = [str(r["label"]) for r in rows]
    source = ColumnDataSource({"label": labels, **{k: [r.get(k, NAN) for r in rows] for k, _, _ in COMPARED},
                               "color": [_color(i) for i in range(len(rows))]})
    figures = []
    for key, title, unit in COMPARED:
        fig = figure(title=title, x_range=FactorRange(*labels), width=width, height=height, y_axis_label=unit,
                     tools="hover,save", tooltips=[("policy", "@label"), (unit, f"@{key}{{0.000}}")])
        fig.vbar(x="label", top=key, width=0.7, source=source, color="color")
        fig.xaxis.major_label_orientation = math.pi / 6
        fig.toolbar.logo = None
        figures.append(fig)
    return gridplot([figures], merge_tools=True, toolbar_location="right")


# --- whole-run pages (the CLI) ---------------------------------------------------------------------------------


CHART_RANKS = 64  # ranks whose lines the charts draw before their metrics arrive (about 8 ms each); more join as seen


def run_charts(run_dir: RunDir) -> MetricCharts:
    """Charts holding a run's whole history so far (the ranks past :data:`CHART_RANKS` join as their metrics do)."""
    charts = MetricCharts(ranks=min(int(run_dir.info().get("ranks") or 1), CHART_RANKS))
    metrics = run_dir.metrics()
    events, _ = read_jsonl(run_dir.events_path)
    charts.update(metrics, events)
    return charts


def run_html(run_dir: RunDir) -> str:
    """A standalone HTML page of a run's charts with BokehJS inlined (no CDN is reachable on these machines)."""
    return file_html(run_charts(run_dir).layout, INLINE, title=f"dspark-lab run {run_dir.id}")


def save_run_html(run_dir: RunDir, path: Path) -> Path:
    """Write the run's charts as one HTML page at ``path``, mode 0600 like the records it shows."""
    return write_private_text(Path(path), run_html(run_dir))
