"""jupyter_bokeh's ``BokehModel`` with three fixes the live views need.

- A reloaded page sees the plot as it is now. jupyter_bokeh sends the document once, as its ``render_bundle``, and
  every later change (each streamed step) as a patch to the views open at the time; a page reloaded in JupyterLab
  asks the kernel for the widget's state again (ipywidgets' ``request_state``) and would get that first document
  back, without the steps streamed since. The state sent is made from the document as it is now.
- The kernel's data is not doubled. BokehJS in jupyter_bokeh 4.1 sends every streamed or patched column back to the
  kernel after applying it (its view queues the document change it made and replays it as a browser event), and the
  upstream widget streams it into the source a second time: each open view doubled every step kept in the kernel.
  These views take no edits to their data from the browser, so such events are dropped; the rest (ranges, tools,
  button events) go through as upstream.
- It can be closed twice (an explicit close, then the garbage collector's): jupyter_bokeh 4.1's ``close`` unhooks the
  widget from its bokeh document unconditionally, so the second call (from ``Widget.__del__``) raises ``KeyError``.
"""

from __future__ import annotations

from bokeh.core.json_encoder import serialize_json
from jupyter_bokeh import BokehModel


ECHOED = ("ColumnsStreamed", "ColumnsPatched")


class BokehPlot(BokehModel):
    def _sync_model(self, model, content: dict, buffers: list) -> None:
        if content.get("event") == "jsevent" and content.get("kind") in ECHOED:
            return
        super()._sync_model(model, content, buffers)

    def get_state(self, key=None, drop_defaults=False):
        state = super().get_state(key, drop_defaults)
        if "render_bundle" in state:
            state["render_bundle"] = serialize_json(self._model_to_traits(self._model))
        return state

    def close(self) -> None:
        if self.comm is None:
            return
        super().close()
