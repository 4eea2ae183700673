"""The part every live view shares: a widget box fed by a :class:`~dspark_lab.jupyter.poller.Poller` under a lock,
with a blocking ``wait_until`` for notebooks and tests, a stop action run off the UI thread, and a ``close`` that
stops the polling before the widgets go."""

from __future__ import annotations

import html
import threading
import time
from typing import Callable

import ipywidgets as widgets

from dspark_lab.jupyter.display import close_tree
from dspark_lab.jupyter.poller import HZ_RANGE


def rate_slider(hz: float) -> widgets.FloatSlider:
    """The refresh-rate slider of a view, over the same range ``--hz`` takes."""
    return widgets.FloatSlider(value=hz, min=HZ_RANGE[0], max=HZ_RANGE[1], step=0.05, description="refresh Hz",
                               continuous_update=False, readout_format=".2f")


class LiveBox(widgets.VBox):
    """Subclasses set ``self._lock`` (held while the view's state changes) and ``self.poller``."""

    def _stop_in_background(self, stop: Callable[[str], object], run_id: str, shown_in: widgets.HTML,
                            button: widgets.Button) -> None:
        """Call ``stop(run_id)`` (a request over the network: never on the UI thread); a failure is shown as its
        one line in ``shown_in`` and the button comes back."""
        def request() -> None:
            try:
                stop(run_id)
            except Exception as exc:  # a DSparkError is one line; anything else is shown the same way
                shown_in.value = f'<span style="color:#d62728">stop: {html.escape(str(exc))}</span>'
                button.disabled = False
            self.poller.poke()

        button.disabled = True
        threading.Thread(target=request, daemon=True).start()

    def wait_until(self, predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
        """Block until ``predicate(self)`` is true (for notebooks and tests that show a state, then read it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self):
                    return True
            time.sleep(interval)
        return False

    def close(self) -> None:
        """Stop the polling thread, then close the widget and its children."""
        if getattr(self, "poller", None) is not None:
            self.poller.stop()
        close_tree(self.children)
        super().close()
