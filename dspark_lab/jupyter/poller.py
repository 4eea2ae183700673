"""A background loop that calls one function at a settable rate, can be paused, and stops when told.

Widgets own one each: the sampling runs on this thread, never inside a widget's event handler (unlike
jupyterlab-nvdashboard's ``apps/gpu.py``, which samples in the bokeh callback), and closing the widget stops it.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

from dspark_lab.errors import DSparkError

MIN_INTERVAL_S = 0.05
HZ_RANGE = (0.05, 20.0)  # the refresh rates a view takes: `%dspark ... --hz` and every view's slider

# Every poller not yet stopped, so tests and ``close_all`` can check that none outlives its widget.
LIVE: "set[Poller]" = set()
_live_lock = threading.Lock()


def interval_for(hz) -> float:
    """Seconds between ticks at ``hz``; one line naming ``hz`` when it is outside :data:`HZ_RANGE`."""
    low, high = HZ_RANGE
    try:
        value = float(hz)
    except (TypeError, ValueError):
        value = math.nan
    if not low <= value <= high:
        raise DSparkError(f"hz: must be within [{low:g}, {high:g}], got {hz}")
    return 1.0 / value


class Poller:
    """Call ``tick()`` every ``interval`` seconds on a daemon thread until :meth:`stop`, or until it returns False.

    An exception from ``tick`` is kept in ``error`` and polling goes on; ``ticks`` counts the calls made.
    """

    def __init__(self, tick: Callable[[], object], interval: float = 0.5, name: str = "dspark-poller"):
        self._tick = tick
        self.interval = max(float(interval), MIN_INTERVAL_S)
        self.paused = False
        self.ticks = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._busy = threading.Lock()  # held while tick runs, so pause() can wait out a tick in flight
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Poller":
        with _live_lock:
            LIVE.add(self)
        self._thread.start()
        return self

    def set_interval(self, seconds: float) -> None:
        self.interval = max(float(seconds), MIN_INTERVAL_S)
        self._wake.set()

    def pause(self, paused: bool = True) -> None:
        """Pause (or resume); once a pause returns, no tick runs until resumed."""
        self.paused = paused
        self._wake.set()
        if paused and threading.current_thread() is not self._thread:
            with self._busy:
                pass

    def poke(self) -> None:
        """Tick now instead of at the end of the current wait."""
        self._wake.set()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        with _live_lock:
            LIVE.discard(self)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._busy:
                    if not self.paused:
                        self.ticks += 1
                        try:
                            if self._tick() is False:
                                break
                        except Exception as exc:  # shown by the owning widget; one bad read must not end the view
                            self.error = exc
                self._wake.wait(self.interval)
                self._wake.clear()
        finally:
            self._stop.set()
            with _live_lock:
                LIVE.discard(self)
