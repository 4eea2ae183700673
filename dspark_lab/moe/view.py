"""Bokeh figure for an expert placement: per-GPU load before and after, one heatmap row per layer.

Takes plain arrays (``[layers, gpus]`` loads, e.g. ``gpu_loads_before`` / ``gpu_loads_after`` of
``dspark-lab moe balance --json``) and returns a bokeh layout; notebooks and HTML export show it alike. Colour is
load relative to the layer's mean GPU load (1.0 = perfectly even), so layers with different token counts share one
scale; the hover shows the absolute load.
"""

from __future__ import annotations

import numpy as np
from bokeh.layouts import row
from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LinearColorMapper
from bokeh.palettes import Viridis256
from bokeh.plotting import figure

from dspark_lab.moe.balance import balancedness_of_loads


def _heatmap(loads: np.ndarray, title: str, mapper: LinearColorMapper, balancedness: np.ndarray):
    layers, gpus = loads.shape
    mean = loads.mean(1, keepdims=True)
    relative = np.divide(loads, mean, out=np.ones_like(loads), where=mean > 0)
    layer, gpu = np.meshgrid(np.arange(layers), np.arange(gpus), indexing="ij")
    source = ColumnDataSource({
        "gpu": gpu.ravel(), "layer": layer.ravel(), "load": loads.ravel(), "relative": relative.ravel(),
        "balancedness": np.repeat(balancedness, gpus),
    })
    fig = figure(title=f"{title} (balancedness {balancedness.mean():.4f})", width=420,
                 height=min(900, 60 + 14 * layers), x_range=(-0.5, gpus - 0.5), y_range=(layers - 0.5, -0.5),
                 x_axis_label="GPU", y_axis_label="layer", tools="hover,save,reset", toolbar_location="above")
    fig.rect("gpu", "layer", 1, 1, source=source, fill_color={"field": "relative", "transform": mapper},
             line_color=None)
    fig.select_one(HoverTool).tooltips = [("layer", "@layer"), ("GPU", "@gpu"), ("load", "@load{0,0.[00]}"),
                                          ("load / layer mean", "@relative{0.000}"),
                                          ("layer balancedness", "@balancedness{0.0000}")]
    fig.grid.visible = False
    return fig


def placement_heatmaps(before, after, title: str = "per-GPU load"):
    """A row of two heatmaps (before, after) of ``[layers, gpus]`` loads, with one shared colour bar."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.ndim != 2 or before.shape != after.shape:
        raise ValueError(f"before and after must both be [layers, gpus], got {before.shape} and {after.shape}")

    def relative_max(loads):
        mean = loads.mean(1, keepdims=True)
        return float(np.divide(loads, mean, out=np.ones_like(loads), where=mean > 0).max())

    mapper = LinearColorMapper(palette=Viridis256, low=0.0, high=max(relative_max(before), relative_max(after)))
    left = _heatmap(before, f"{title}: before", mapper, balancedness_of_loads(before))
    right = _heatmap(after, f"{title}: after", mapper, balancedness_of_loads(after))
    right.y_range = left.y_range
    right.add_layout(ColorBar(color_mapper=mapper, title="load / mean"), "right")
    return row(left, right)
