"""Whether a run's ranks live, and where rank 0's endpoint is: two small files rank 0 keeps in the run directory.

``heartbeat.json`` (time, pid, step, state) is rewritten about every second by rank 0 while it runs and once more,
with its final state, when it ends. ``control.json`` (host, port) publishes the control endpoint. Both are 0600
and replaced atomically. A run's state thus comes from its ranks, not only from its supervisor: a killed
``dspark-lab run`` process leaves a job that still reads as running and can still be changed and stopped.
run.json stays the supervisor's alone.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from dspark_lab.private_files import write_private_text

HEARTBEAT_FILE = "heartbeat.json"
CONTROL_FILE = "control.json"
BEAT_EVERY_S = 1.0
FRESH_S = 5.0  # a heartbeat older than this (or of a dead pid) says nothing about the run


def write_private_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``data`` as JSON, readable by the owner only."""
    write_private_text(path, json.dumps(data))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_heartbeat(run_path: Path) -> dict[str, Any] | None:
    return _read(Path(run_path) / HEARTBEAT_FILE)


def read_endpoint(run_path: Path) -> dict[str, Any] | None:
    """``{"host", "port"}`` of rank 0's control endpoint, or None while none is published."""
    data = _read(Path(run_path) / CONTROL_FILE)
    if data and isinstance(data.get("host"), str) and isinstance(data.get("port"), int):
        return data
    return None


def beating(beat: dict[str, Any] | None, now: float | None = None) -> bool:
    """True while rank 0 is alive and says it runs: a fresh 'running' heartbeat from a live process."""
    if not beat or beat.get("state") != "running":
        return False
    try:
        fresh = (now or time.time()) - float(beat["time"]) < FRESH_S
        proc = psutil.Process(int(beat["pid"]))
        return fresh and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and \
            abs(proc.create_time() - float(beat["start"])) < 1.0
    except (KeyError, TypeError, ValueError, psutil.Error):
        return False


class Heartbeat:
    """Rank 0's heartbeat thread; ``stop(state)`` writes the final beat ('stopped' or 'ended')."""

    def __init__(self, run_path: Path, step=lambda: None):
        self.path = Path(run_path) / HEARTBEAT_FILE
        self._step = step
        me = psutil.Process()
        self._who = {"pid": me.pid, "start": me.create_time()}
        self._done = threading.Event()
        self.beat("running")
        self._thread = threading.Thread(target=self._run, name="dspark-heartbeat", daemon=True)
        self._thread.start()

    def beat(self, state: str) -> None:
        try:
            write_private_json(self.path, {"time": time.time(), **self._who, "step": self._step(), "state": state})
        except OSError:  # a full disk must not stop training; the beat goes stale and readers say so
            pass

    def _run(self) -> None:
        while not self._done.wait(BEAT_EVERY_S):
            self.beat("running")

    def stop(self, state: str) -> None:
        self._done.set()
        self._thread.join(timeout=2 * BEAT_EVERY_S)
        self.beat(state)
