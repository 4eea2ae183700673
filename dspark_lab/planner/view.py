"""Bokeh view of a layout search: predicted throughput against memory per GPU for every evaluated layout, the Pareto
front (no other fitting layout is both faster and smaller) marked, the memory limit drawn; and a stacked bar of
where the step time goes for the layouts the search returned.

Takes the dict of :func:`dspark_lab.planner.search.search` run with ``points=True`` (``plan search --html PATH``
writes it as standalone HTML; a notebook shows :func:`search_figure` directly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, HoverTool, Span
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from bokeh.resources import INLINE

BREAKDOWN = ("compute", "recompute", "tp_comm", "cp_comm", "ep_comm", "dp_comm", "pipeline_bubble", "optimizer")


def label(layout: dict[str, Any]) -> str:
    parts = [f"TP{layout['tp']}", f"PP{layout['pp']}", f"DP{layout['dp']}"]
    parts += [f"{k.upper()}{layout[k]}" for k in ("cp", "ep", "vpp") if layout.get(k, 1) > 1]
    parts += [f"mb{layout['micro_batch']}", str(layout["recompute"]), f"z{layout['zero']}"]
    return " ".join(parts)


def pareto(points: list[dict[str, Any]]) -> list[int]:
    """Indices of the fitting points no other fitting point beats on both throughput (higher) and memory (lower)."""
    fitting = sorted((i for i, p in enumerate(points) if p["fits"]),
                     key=lambda i: (points[i]["memory_gb"], -points[i]["tokens_per_s_per_gpu"]))
    front, best = [], float("-inf")
    for i in fitting:
        if points[i]["tokens_per_s_per_gpu"] > best:
            front.append(i)
            best = points[i]["tokens_per_s_per_gpu"]
    return front


def _scatter(result: dict[str, Any]):
    points = result["points"]
    front = set(pareto(points))
    data = {"memory": [p["memory_gb"] for p in points], "rate": [p["tokens_per_s_per_gpu"] for p in points],
            "layout": [label(p["layout"]) for p in points],
            "color": [Category10_10[0] if p["fits"] else "#bbbbbb" for p in points]}
    fig = figure(title=f"{result['model']} on {result['gpus']} x {result['gpu']}: {len(points)} layouts "
                       f"({result['fitting']} fit)", width=820, height=420, x_axis_label="memory per GPU (GB)",
                 y_axis_label="tokens / s / GPU", tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="above")
    dots = fig.scatter("memory", "rate", source=ColumnDataSource(data), size=6, color="color", alpha=0.6)
    ordered = sorted(front, key=lambda i: points[i]["memory_gb"])
    front_src = ColumnDataSource({"memory": [points[i]["memory_gb"] for i in ordered],
                                  "rate": [points[i]["tokens_per_s_per_gpu"] for i in ordered],
                                  "layout": [label(points[i]["layout"]) for i in ordered]})
    fig.line("memory", "rate", source=front_src, color=Category10_10[3], line_width=2, legend_label="Pareto front")
    marks = fig.scatter("memory", "rate", source=front_src, size=10, marker="diamond", color=Category10_10[3],
                        legend_label="Pareto front")
    if result.get("memory_limit_gb"):
        fig.add_layout(Span(location=result["memory_limit_gb"], dimension="height", line_dash="dashed",
                            line_color="#666666"))
    fig.add_tools(HoverTool(renderers=[dots, marks], tooltips=[("layout", "@layout"), ("tok/s/GPU", "@rate{0.0}"),
                                                              ("memory", "@memory{0.0} GB")]))
    fig.legend.location = "bottom_right"
    return fig


def _breakdown(result: dict[str, Any]):
    chosen = result["results"]
    names = [f"#{i + 1} {label(r['layout'])}" for i, r in enumerate(chosen)]
    data = {"layout": names, **{k: [r["breakdown_s"].get(k, 0.0) for r in chosen] for k in BREAKDOWN}}
    fig = figure(y_range=list(reversed(names)), title="where the step time goes (s)", width=820,
                 height=80 + 36 * max(1, len(names)), x_axis_label="seconds per step", toolbar_location="above",
                 tools="save,reset")
    fig.hbar_stack(list(BREAKDOWN), y="layout", height=0.7, source=ColumnDataSource(data),
                   color=[Category10_10[i] for i in range(len(BREAKDOWN))], legend_label=list(BREAKDOWN))
    fig.add_tools(HoverTool(tooltips=[("layout", "@layout"), *[(k, f"@{k}{{0.000}} s") for k in BREAKDOWN]]))
    fig.legend.orientation = "horizontal"
    fig.legend.location = "top_left"
    fig.add_layout(fig.legend[0], "below")
    return fig


def search_figure(result: dict[str, Any]):
    """The scatter with its Pareto front above the breakdown bars; ``result`` needs ``points``."""
    if "points" not in result:
        raise ValueError("search result has no 'points': run search(..., points=True)")
    return column(_scatter(result), _breakdown(result))


def write_html(result: dict[str, Any], path: str | Path) -> Path:
    """Standalone HTML (bokeh's JavaScript inlined, no network needed to open it)."""
    path = Path(path)
    path.write_text(file_html(search_figure(result), INLINE, title=f"plan search: {result['model']}"))
    return path
