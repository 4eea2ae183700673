"""A bokeh timeline of traces: one row per rank and track (stream or thread), events coloured by category, the
trace's annotation ranges as translucent bands on a row of their own above each rank; zoom and hover.

Returns a bokeh layout, shown inline in a notebook or written as standalone HTML with BokehJS inlined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure

from dspark_lab.trace.analyze import ANNOTATIONS, categorise
from dspark_lab.trace.classify import Classifier
from dspark_lab.trace.load import Trace

COLOURS = {"compute": "#4c78a8", "comm": "#f58518", "wait": "#e45756", "annotation": "#9d9d9d"}
# Drawn glyphs per figure; above it the longest events are kept (a 100 MB trace has ~10^6 of them).
MAX_DRAWN = 150_000


def _rows(trace: Trace, classifier: Classifier, rank: int) -> dict[str, list]:
    _, code, _ = categorise(trace, classifier)
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


def save_html(traces: list[Trace], classifier: Classifier, path: str | Path, title: str = "trace timeline") -> Path:
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(file_html(timeline_figure(traces, classifier, title), INLINE, title=title), encoding="utf-8")
    return path
