"""Bokeh figures of traces: a timeline (one row per rank and track, stream or thread; events coloured by category;
the trace's annotation ranges as translucent bands on a row of their own above each rank; zoom and hover), and a
per-rank bar of where the time goes (compute, exposed communication, waits, idle) from ``trace analyze``'s result.

Both take plain data and return bokeh objects, shown inline in a notebook or written as standalone HTML.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure

from dspark_lab.trace.analyze import ANNOTATIONS, categorise
from dspark_lab.trace.classify import Classifier
from dspark_lab.trace.load import Trace

COLOURS = {"compute": "#4c78a8", "comm": "#f58518", "wait": "#e45756", "annotation": "#9d9d9d"}
# Drawn glyphs per figure; above it the longest events are kept (a 100 MB trace has ~10^6 of them).
MAX_DRAWN = 150_000


def _rows(trace: Trace, classifier: Classifier, rank: int) -> dict[str, list]:
    _, code, _, _ = categorise(trace, classifier)
    names = ("compute", "comm", "wait")
    ann_ids = [i for i, c in enumerate(trace.cats) if c in ANNOTATIONS]
    is_ann = np.isin(trace.cat, ann_ids) & (code == 0)
    keep = np.flatnonzero((code > 0) | is_ann)
    cols: dict[str, list] = {k: [] for k in ("row", "left", "right", "name", "category", "ms", "colour", "alpha")}
    for i in keep.tolist():
        ann = bool(is_ann[i])
        category = "annotation" if ann else names[code[i] - 1]
        cols["row"].append(f"rank {rank} · " + ("annotations" if ann else trace.track_labels[trace.track[i]]))
        cols["left"].append(trace.start[i] / 1e3)
        cols["right"].append((trace.start[i] + trace.dur[i]) / 1e3)
        cols["name"].append(trace.names[trace.name[i]][:160])
        cols["category"].append(category)
        cols["ms"].append(trace.dur[i] / 1e3)
        cols["colour"].append(COLOURS[category])
        cols["alpha"].append(0.35 if ann else 0.9)
    return cols


def timeline_figure(traces: list[Trace], classifier: Classifier, title: str = "trace timeline"):
    """The timeline of every trace (x: ms from each trace's first event; y: rank · track)."""
    data: dict[str, list] = {}
    for i, trace in enumerate(traces):
        rank = trace.rank if trace.rank is not None else i
        for k, v in _rows(trace, classifier, rank).items():
            data.setdefault(k, []).extend(v)
    if not data or not data["row"]:
        data = {k: [] for k in ("row", "left", "right", "name", "category", "ms", "colour", "alpha")}
    dropped = 0
    if len(data["ms"]) > MAX_DRAWN:
        keep = np.sort(np.argsort(-np.asarray(data["ms"]))[:MAX_DRAWN])
        dropped = len(data["ms"]) - MAX_DRAWN
        data = {k: [v[j] for j in keep.tolist()] for k, v in data.items()}
    rows = sorted(set(data["row"]), key=lambda r: (r.split(" · ")[0], not r.endswith("annotations"), r))
    label = f"{title} ({dropped} shortest events not drawn)" if dropped else title
    fig = figure(title=label, y_range=list(reversed(rows)) or ["-"], width=1200,
                 height=max(240, 40 + 26 * len(rows)), x_axis_label="ms", tools="xpan,xwheel_zoom,box_zoom,reset,save",
                 active_scroll="xwheel_zoom", toolbar_location="above")
    fig.hbar(y="row", left="left", right="right", height=0.8, source=ColumnDataSource(data), fill_color="colour",
             fill_alpha="alpha", line_color=None, legend_field="category")
    fig.add_tools(HoverTool(tooltips=[("name", "@name"), ("category", "@category"), ("ms", "@ms{0.000}")]))
    fig.legend.location = "top_right"
    fig.legend.click_policy = "hide"
    return fig


BREAKDOWN = (("compute_ms", "compute", COLOURS["compute"]), ("comm_exposed_ms", "exposed comm", COLOURS["comm"]),
             ("wait_ms", "wait", COLOURS["wait"]), ("idle_ms", "idle", "#d9d9d9"))


def breakdown_figure(result: dict, title: str = "where the time goes"):
    """One stacked bar per rank (ms): compute, exposed communication, waits, idle; hover adds the overlap."""
    ranks = result.get("ranks", [])
    labels = [f"rank {r['rank']}" for r in ranks]
    data = {"rank": labels, "overlap": [r.get("comm_overlap_fraction") for r in ranks],
            "comm_busy_ms": [r["comm_busy_ms"] for r in ranks]}
    data.update({key: [r[key] for r in ranks] for key, _, _ in BREAKDOWN})
    fig = figure(title=title, y_range=list(reversed(labels)) or ["-"], width=900,
                 height=max(160, 60 + 30 * len(labels)), x_axis_label="ms", toolbar_location=None)
    fig.hbar_stack([k for k, _, _ in BREAKDOWN], y="rank", height=0.7, source=ColumnDataSource(data),
                   color=[c for _, _, c in BREAKDOWN], legend_label=[n for _, n, _ in BREAKDOWN])
    fig.add_tools(HoverTool(tooltips=[("rank", "@rank"), ("compute ms", "@compute_ms{0.000}"),
                                      ("comm busy ms", "@comm_busy_ms{0.000}"),
                                      ("comm exposed ms", "@comm_exposed_ms{0.000}"),
                                      ("overlap", "@overlap{0.000}"), ("wait ms", "@wait_ms{0.000}"),
                                      ("idle ms", "@idle_ms{0.000}")]))
    fig.legend.orientation = "horizontal"
    fig.legend.location = "top_left"
    return fig


def save_html(traces: list[Trace], classifier: Classifier, path: str | Path, title: str = "trace timeline",
              result: dict | None = None) -> Path:
    """The timeline, under the per-rank breakdown bar when ``result`` (``trace analyze``'s data) is given."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    timeline = timeline_figure(traces, classifier, title)
    layout = column(breakdown_figure(result), timeline) if result else timeline
    path.write_text(file_html(layout, INLINE, title=title), encoding="utf-8")
    return path
