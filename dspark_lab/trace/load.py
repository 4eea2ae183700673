"""Read one Chrome / Kineto trace (``.json`` or ``.json.gz``, as ``torch.profiler`` exports it) into columns.

orjson parses the document; one pass keeps the complete (``ph: "X"``) events as numpy columns: name, Kineto
category, track, start and duration in microseconds from the trace's first event. A 100 MB trace loads in a few
seconds (``benchmarks/trace_analysis.py``). Chrome trace event format:
https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU
"""

from __future__ import annotations

import gc
import gzip
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from dspark_lab.errors import DSparkError

# A trace bigger than this (uncompressed) is refused rather than exhausting memory; DSPARK_TRACE_MAX_MB changes it.
DEFAULT_MAX_MB = 4096
# Keys in an event's args that torch copies from ``record_param_comms`` onto collective ops and kernels.
COMM_METADATA_KEYS = ("Collective name", "collective_name")
_RANK_IN_NAME = re.compile(r"rank[_-]?(\d+)")


@dataclass(slots=True)
class Trace:
    """One rank's complete events as columns; ``names``/``cats``/``tracks`` are the tables the int columns index."""

    path: str
    rank: int | None
    names: list[str]
    cats: list[str]
    tracks: list[tuple[Any, Any]]
    track_labels: list[str]
    name: np.ndarray  # int32 -> names
    cat: np.ndarray  # int32 -> cats
    track: np.ndarray  # int32 -> tracks
    start: np.ndarray  # float64, microseconds from t0
    dur: np.ndarray  # float64, microseconds
    comm_metadata: np.ndarray  # bool: args carry record_param_comms metadata
    t0: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> np.ndarray:
        return self.start + self.dur

    def __len__(self) -> int:
        return len(self.start)


def max_bytes() -> int:
    raw = os.environ.get("DSPARK_TRACE_MAX_MB", "")
    try:
        mb = int(raw) if raw else DEFAULT_MAX_MB
    except ValueError:
        raise DSparkError(f"DSPARK_TRACE_MAX_MB: expected an integer number of MB, got {raw!r}") from None
    return mb * 1024 * 1024


def read_bytes(path: str | Path, limit: int | None = None) -> bytes:
    """The file's (decompressed) bytes, refusing more than ``limit`` of them."""
    path = Path(path)
    limit = max_bytes() if limit is None else limit
    if not path.is_file():
        raise DSparkError(f"trace: no such file {str(path)!r}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise DSparkError(f"trace: {path} is over {limit // 2**20} MB uncompressed; "
                          "raise DSPARK_TRACE_MAX_MB to read it")
    return data


def parse(data: bytes, path: str = "<memory>", rank: int | None = None) -> Trace:
    """Columns of the complete events in a Chrome trace document (a dict with ``traceEvents`` or a bare list)."""
    # Millions of short-lived containers: the cyclic GC would rescan them again and again (half the CPU time).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _parse(data, path, rank)
    finally:
        if enabled:
            gc.enable()


def _parse(data: bytes, path: str, rank: int | None) -> Trace:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DSparkError(f"trace: {path} is not JSON ({exc})") from None
    events = doc.get("traceEvents", []) if isinstance(doc, dict) else doc
    meta = {k: v for k, v in doc.items() if k != "traceEvents"} if isinstance(doc, dict) else {}
    if not isinstance(events, list):
        raise DSparkError(f"trace: {path}: traceEvents must be a list")
    names: dict[str, int] = {}
    cats: dict[str, int] = {}
    tracks: dict[tuple, int] = {}
    process_names: dict[Any, str] = {}
    thread_names: dict[tuple, str] = {}
    col_name, col_cat, col_track, col_ts, col_dur, col_meta = [], [], [], [], [], []
    for e in events:
        if not isinstance(e, dict):
            continue
        ph = e.get("ph")
        if ph != "X":
            if ph == "M":
                args = e.get("args") or {}
                if e.get("name") == "process_labels" or (e.get("name") == "process_name"
                                                          and e.get("pid") not in process_names):
                    process_names[e.get("pid")] = str(args.get("labels") or args.get("name") or "")
                elif e.get("name") == "thread_name":
                    thread_names[(e.get("pid"), e.get("tid"))] = str(args.get("name", ""))
            continue
        try:
            ts = float(e["ts"])
            dur = float(e.get("dur", 0.0))
        except (KeyError, TypeError, ValueError):
            continue
        name = e.get("name", "")
        cat = e.get("cat", "")
        key = (e.get("pid"), e.get("tid"))
        col_name.append(names.setdefault(name, len(names)))
        col_cat.append(cats.setdefault(cat, len(cats)))
        col_track.append(tracks.setdefault(key, len(tracks)))
        col_ts.append(ts)
        col_dur.append(dur)
        args = e.get("args")
        col_meta.append(bool(args) and any(k in args for k in COMM_METADATA_KEYS))
    start = np.asarray(col_ts, dtype=np.float64)
    t0 = float(start.min()) if len(start) else 0.0
    track_list = list(tracks)
    labels = [_track_label(pid, tid, process_names, thread_names) for pid, tid in track_list]
    if rank is None:
        info = meta.get("distributedInfo") or {}
        rank = info.get("rank") if isinstance(info.get("rank"), int) else None
    return Trace(path=path, rank=rank, names=list(names), cats=list(cats), tracks=track_list, track_labels=labels,
                 name=np.asarray(col_name, dtype=np.int32), cat=np.asarray(col_cat, dtype=np.int32),
                 track=np.asarray(col_track, dtype=np.int32), start=start - t0,
                 dur=np.maximum(np.asarray(col_dur, dtype=np.float64), 0.0),
                 comm_metadata=np.asarray(col_meta, dtype=bool), t0=t0, meta=meta)


def load(path: str | Path, rank: int | None = None) -> Trace:
    """Load one trace file; its rank comes from ``distributedInfo``, else ``rank<k>`` in the file name, else None."""
    path = Path(path)
    trace = parse(read_bytes(path), str(path), rank)
    if trace.rank is None:
        found = _RANK_IN_NAME.search(path.name)
        trace.rank = int(found.group(1)) if found else None
    return trace


def _track_label(pid, tid, process_names: dict, thread_names: dict) -> str:
    process = process_names.get(pid) or f"pid {pid}"
    thread = thread_names.get((pid, tid))
    if thread:
        return f"{process} / {thread}"
    if isinstance(tid, int) and process.startswith("GPU"):
        return f"{process} / stream {tid}"
    return f"{process} / {tid}"
