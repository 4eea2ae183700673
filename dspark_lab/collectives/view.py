"""A topology drawn with the packed trees on it: devices on a circle, switches inside, each tree in its own colour.

Bokeh, so the same figure is a standalone HTML file (``collectives plan --html``) and a notebook output.
"""

from __future__ import annotations

import math
from pathlib import Path

from bokeh.embed import file_html
from bokeh.models import ColumnDataSource, HoverTool, LabelSet
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from bokeh.resources import INLINE

from dspark_lab.collectives.packing import Plan
from dspark_lab.collectives.topology import Topology


def layout(topology: Topology) -> dict[str, tuple[float, float]]:
    """Devices evenly on the unit circle, switches on a smaller inner circle."""
    pos = {}
    for i, name in enumerate(topology.devices):
        angle = math.pi / 2 - 2 * math.pi * i / len(topology.devices)
        pos[name] = (math.cos(angle), math.sin(angle))
    for i, name in enumerate(topology.switches):
        angle = math.pi / 2 - 2 * math.pi * (i + 0.5) / max(len(topology.switches), 1)
        radius = 0.0 if len(topology.switches) == 1 else 0.45
        pos[name] = (radius * math.cos(angle), radius * math.sin(angle))
    return pos


def plan_figure(topology: Topology, plan: Plan):
    pos = layout(topology)
    fig = figure(width=640, height=640, match_aspect=True, tools="pan,wheel_zoom,reset,save",
                 title=f"{plan.op} on {topology.name}: {plan.rate_gb_s:.4g} GB/s in {len(plan.trees)} trees "
                       f"(best ring {plan.ring_algbw_gb_s:.4g} GB/s)")
    fig.axis.visible = False
    fig.grid.visible = False
    seen = set()
    links = {"x0": [], "y0": [], "x1": [], "y1": [], "gb_s": []}
    for link in topology.links:
        key = tuple(sorted((link.src, link.dst)))
        if key in seen or link.src not in pos or link.dst not in pos:
            continue
        seen.add(key)
        (x0, y0), (x1, y1) = pos[link.src], pos[link.dst]
        links["x0"].append(x0), links["y0"].append(y0), links["x1"].append(x1), links["y1"].append(y1)
        links["gb_s"].append(link.gb_s)
    fig.segment("x0", "y0", "x1", "y1", source=ColumnDataSource(links), line_color="#cccccc", line_width=2)
    for i, (tree, rate) in enumerate(plan.trees):
        offset = 0.015 * (i - len(plan.trees) / 2)
        hops = {"x0": [], "y0": [], "x1": [], "y1": [], "tree": [], "rate": []}
        for path in tree.paths:
            for a, b in zip(path, path[1:]):
                (x0, y0), (x1, y1) = pos[a], pos[b]
                hops["x0"].append(x0 + offset), hops["y0"].append(y0 + offset)
                hops["x1"].append(x1 + offset), hops["y1"].append(y1 + offset)
                hops["tree"].append(i), hops["rate"].append(round(rate, 3))
        fig.segment("x0", "y0", "x1", "y1", source=ColumnDataSource(hops), line_width=1 + 4 * rate / plan.rate_gb_s,
                    line_color=Category10_10[i % 10], alpha=0.8, legend_label=f"tree {i}: {rate:.3g} GB/s")
    allocated = set(plan.devices)
    nodes = {"x": [], "y": [], "name": [], "color": [], "size": []}
    for name, (x, y) in pos.items():
        nodes["x"].append(x), nodes["y"].append(y), nodes["name"].append(name)
        is_device = name in topology.devices
        nodes["color"].append(("#1f77b4" if name == plan.root else "#444444") if name in allocated else
                              ("#dddddd" if is_device else "#999999"))
        nodes["size"].append(22 if is_device else 14)
    source = ColumnDataSource(nodes)
    renderer = fig.scatter("x", "y", size="size", color="color", source=source)
    fig.add_layout(LabelSet(x="x", y="y", text="name", source=source, x_offset=10, y_offset=6,
                            text_font_size="9pt"))
    fig.add_tools(HoverTool(renderers=[renderer], tooltips=[("node", "@name")]))
    fig.legend.location = "top_left"
    fig.legend.label_text_font_size = "8pt"
    fig.legend.click_policy = "hide"
    return fig


def save_plan_html(topology: Topology, plan: Plan, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(file_html(plan_figure(topology, plan), INLINE, title=f"{plan.op} on {topology.name}"))
    return path
