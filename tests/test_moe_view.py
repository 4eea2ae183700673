"""The placement heatmap: two figures over the same layers, colour relative to each layer's mean, no ipywidgets."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from bokeh.embed import file_html
from bokeh.models import ColumnDataSource
from bokeh.resources import INLINE

from dspark_lab.moe.view import placement_heatmaps


def test_heatmaps_carry_the_loads():
    before = np.array([[4.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    after = np.array([[2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    layout = placement_heatmaps(before, after)
    left, right = layout.children
    assert "before (balancedness 0.7500)" in left.title.text  # layer 0: 2/4, empty layer 1 counts as 1
    assert "after (balancedness 1.0000)" in right.title.text
    sources = [f.select_one(ColumnDataSource).data for f in (left, right)]
    assert list(sources[0]["load"]) == before.ravel().tolist()
    assert list(sources[0]["relative"])[:4] == [2.0, 0.0, 1.0, 1.0]
    assert list(sources[1]["relative"]) == [1.0] * 8
    assert right.y_range is left.y_range
    assert "Bokeh" in file_html(layout, INLINE, "placement")


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="before and after"):
        placement_heatmaps(np.ones((2, 4)), np.ones((2, 3)))


def test_view_does_not_import_ipywidgets():
    code = "import sys, dspark_lab.moe.view, dspark_lab.moe.cli; print('ipywidgets' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
