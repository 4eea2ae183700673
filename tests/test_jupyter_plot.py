"""The bokeh widget the live views use: a page reloaded later gets the plot as it is now, not as first sent, and
the browser's echo of a streamed step does not stream it into the kernel's data a second time."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("jupyter_bokeh", reason="the jupyter extra is not installed")

from bokeh.core.serialization import Serializer  # noqa: E402
from bokeh.document.events import ColumnsStreamedEvent, ModelChangedEvent  # noqa: E402
from bokeh.models import ColumnDataSource  # noqa: E402
from bokeh.plotting import figure  # noqa: E402

from dspark_lab.jupyter.plot import BokehPlot  # noqa: E402


@pytest.fixture
def charted():
    """A one-line chart of one step, its source, and the widget showing it (closed after the test)."""
    source = ColumnDataSource({"step": [1], "seconds": [0.5]})
    chart = figure()
    chart.line("step", "seconds", source=source)
    plot = BokehPlot(chart)
    yield source, chart, plot
    plot.close()


def test_state_asked_again_after_streaming_carries_the_streamed_points(charted):
    source, _, plot = charted
    source.stream({"step": [2, 3], "seconds": [0.25, 4096.125]})  # what the open views got as patches
    bundle = json.loads(plot.get_state()["render_bundle"])
    columns = [m["attributes"]["data"] for doc in bundle["docs_json"].values() for m in doc["roots"]
               for m in _models(m) if m.get("name") == "ColumnDataSource"]
    text = json.dumps(columns)
    assert "4096.125" in text, text[:500]  # a reloaded page would have shown only step 1
    assert plot.get_state("render_bundle").keys() == {"render_bundle"}
    plot.close()  # the fixture closes it again, as the garbage collector would: harmless


def from_browser(plot, event) -> None:
    """Deliver ``event`` to the widget as BokehJS sends a document change from the page (a ``jsevent``)."""
    content = Serializer(references=set(plot._document.models)).encode(event)
    plot._sync_model(plot, {"event": "jsevent", **content}, [])


def test_the_browsers_echo_of_a_stream_leaves_the_kernels_data_alone_and_other_changes_apply(charted):
    source, chart, plot = charted
    source.stream({"step": [2], "seconds": [0.25]})
    # BokehJS (jupyter_bokeh 4.1) replays the stream it just applied as a browser event, once per open view
    from_browser(plot, ColumnsStreamedEvent(plot._document, source, "data", {"step": [2], "seconds": [0.25]}, None))
    assert source.data == {"step": [1, 2], "seconds": [0.5, 0.25]}  # not [1, 2, 2]
    from_browser(plot, ModelChangedEvent(plot._document, chart.x_range, "start", 7.5))  # a real edit goes through
    assert chart.x_range.start == 7.5


def _models(node):
    """Every serialized bokeh model object under ``node`` (a document's JSON nests them)."""
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield node
        for value in node.values():
            yield from _models(value)
    elif isinstance(node, list):
        for value in node:
            yield from _models(value)
