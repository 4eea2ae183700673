"""Timeline pictures of a simulated schedule: a bokeh figure (notebooks, HTML) and a PNG drawn with Pillow.

One row per rank, time to the right, ops coloured by kind; the white gaps are the bubbles. In the PNG each op
carries its micro-batch number, with a prime per chunk index (``3'`` is micro-batch 3 on chunk 1; FB shows
forward/backward).
"""

from __future__ import annotations

from pathlib import Path

from dspark_lab.pipeline.simulate import Simulation

COLORS = {"F": "#4c72b0", "B": "#dd8452", "Bi": "#f2b880", "W": "#55a868", "FB": "#8172b3"}
LEGEND = {"F": "F forward", "B": "B full backward", "Bi": "B input grads", "W": "W weight grads",
          "FB": "FB forward+backward"}


def _boxes(sim: Simulation) -> list[dict]:
    rows = []
    for rank, row in enumerate(sim.timeline):
        for start, end, op in row:
            kind = "Bi" if op.kind == "B" and not op.full else op.kind
            short = f"{op.mb}{chr(39) * op.chunk}" + (f"/{op.b_mb}{chr(39) * op.b_chunk}" if op.kind == "FB" else "")
            rows.append({"rank": rank, "start": start, "end": end, "kind": kind, "label": op.label(), "short": short,
                         "color": COLORS[kind], "y0": rank - 0.4, "y1": rank + 0.4})
    return rows


def timeline_figure(sim: Simulation, title: str | None = None):
    """A bokeh figure of the timeline (``show(fig)`` in Jupyter; the CLI saves it as HTML)."""
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.plotting import figure

    s = sim.schedule
    title = title or (f"{s.name}: p={s.ranks} m={s.microbatches} v={s.chunks}  step {sim.step_time:.4g}  "
                      f"bubble {sim.bubble_fraction:.1%}")
    fig = figure(title=title, width=1000, height=60 + 40 * s.ranks, y_range=(s.ranks - 0.5, -0.5),
                 x_axis_label="time", y_axis_label="rank", tools="xpan,xwheel_zoom,reset,save")
    boxes = _boxes(sim)
    for kind, legend in LEGEND.items():
        rows = [b for b in boxes if b["kind"] == kind]
        if not rows:
            continue
        source = ColumnDataSource({k: [r[k] for r in rows] for k in rows[0]})
        fig.quad(left="start", right="end", bottom="y0", top="y1", source=source, fill_color="color",
                 line_color="white", legend_label=legend)
    fig.add_tools(HoverTool(tooltips=[("op", "@label"), ("rank", "@rank"), ("start", "@start"), ("end", "@end")]))
    fig.yaxis.ticker = list(range(s.ranks))
    fig.legend.location = "bottom_right"
    fig.legend.orientation = "horizontal"
    return fig


def save_html(sim: Simulation, path: str | Path) -> Path:
    """Save the figure as a standalone HTML file with inline resources (no CDN)."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    path = Path(path)
    path.write_text(file_html(timeline_figure(sim), INLINE, title=sim.schedule.name), encoding="utf-8")
    return path


def save_png(sim: Simulation, path: str | Path, width: int = 1200, row: int = 36) -> Path:
    """Draw the same timeline with Pillow (bokeh's PNG export would need a browser)."""
    from PIL import Image, ImageDraw

    s = sim.schedule
    left, top, legend_h = 60, 30, 28
    height = top + row * s.ranks + legend_h + 10
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    scale = (width - left - 10) / (sim.step_time or 1.0)
    draw.text((4, 8), f"{s.name}  p={s.ranks} m={s.microbatches} v={s.chunks}  step {sim.step_time:.4g}  "
                      f"bubble {sim.bubble_fraction:.1%}", fill="black")
    for r in range(s.ranks):
        y = top + r * row
        draw.text((4, y + row // 3), f"rank {r}", fill="black")
        draw.rectangle([left, y + 2, width - 10, y + row - 2], outline="#dddddd")
    for box in _boxes(sim):
        y = top + box["rank"] * row
        x0, x1 = left + box["start"] * scale, left + box["end"] * scale
        draw.rectangle([x0, y + 3, max(x0 + 1, x1 - 1), y + row - 3], fill=COLORS[box["kind"]], outline="white")
        if x1 - x0 >= 7 * len(box["short"]) + 4:  # micro-batch number; a prime marks chunk 1
            draw.text((x0 + 3, y + row // 3), box["short"], fill="white")
    x = left
    for kind, legend in LEGEND.items():
        y = top + row * s.ranks + 8
        draw.rectangle([x, y, x + 12, y + 12], fill=COLORS[kind])
        draw.text((x + 16, y), legend, fill="black")
        x += 30 + 7 * len(legend)
    path = Path(path)
    img.save(path, format="PNG")
    return path
