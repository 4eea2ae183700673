"""A jupyter_bokeh ``BokehModel`` that can be closed twice (an explicit close, then the garbage collector's).

jupyter_bokeh 4.1's ``close`` unhooks the widget from its bokeh document unconditionally, so the second call (from
``Widget.__del__``) raises ``KeyError``. Everything else is the upstream widget.
"""

from __future__ import annotations

from jupyter_bokeh import BokehModel


class BokehPlot(BokehModel):
    def close(self) -> None:
        if self.comm is None:
            return
        super().close()
