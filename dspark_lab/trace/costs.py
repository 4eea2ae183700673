"""Pipeline op costs and bubbles measured from a trace's annotations, in the form ``schedule simulate`` takes.

Two annotation styles are read (``record_function`` ranges, GPU-side ones preferred when present):

- the pipeline executor's op labels, ``F3.1`` / ``B3.1`` / ``Bi3.1`` / ``W3.1`` (kind, micro-batch, chunk): each
  range is one op, and a kind's cost is the median over its ranges;
- parts of a pass tagged with its kind, ``attn(F)``, ``dispatch(B)``, ``mlp(W)`` (DeepSeek's DualPipe profile): the
  parts of one step add up to one op, so a kind's cost is the median over steps of the per-step sum. A ``chunk<N>``
  in the name names the chunk (default 0). With ``(W)`` parts present, ``(B)`` is the input-gradient pass (Bi).

A trace is one pipeline rank (its stage or stages). The bubble of a rank is its step time not covered by any op
range (the idle a schedule leaves, cf. Qi et al., *Zero Bubble Pipeline Parallelism*, arXiv:2401.10241). A trace
without op annotations still gets a bubble: the time its point-to-point sends and receives are exposed (no compute
running), which is where a pipeline rank waits for its neighbours.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from dspark_lab.errors import DSparkError
from dspark_lab.trace import intervals as iv
from dspark_lab.trace.analyze import CPU_ANNOTATION, DEVICE_ANNOTATION, STEP, category_sets, categorise
from dspark_lab.trace.classify import Classifier
from dspark_lab.trace.load import Trace

LABEL = re.compile(r"^(F|B|Bi|W)(\d+)\.(\d+)$")
PART = re.compile(r"\((F|B|W)\)\s*$")
CHUNK = re.compile(r"chunk[_ ]?(\d+)")
KINDS = ("F", "B", "Bi", "W")
P2P = re.compile(r"(?i)(^|[:_])i?(send|recv)|SendRecv")
MAX_FILE_BYTES = 16 * 2**20


def _ops(trace: Trace) -> tuple[list[tuple[str, int, float, float]], str]:
    """``(kind, chunk, start, end)`` of every op range (µs), and the style found (labels, parts or none)."""
    for cats in (DEVICE_ANNOTATION, CPU_ANNOTATION):
        ids = [i for i, c in enumerate(trace.cats) if c in cats]
        sel = np.flatnonzero(np.isin(trace.cat, ids))
        labels, parts = [], []
        for i in sel.tolist():
            name = trace.names[trace.name[i]]
            start, end = float(trace.start[i]), float(trace.start[i] + trace.dur[i])
            if m := LABEL.match(name):
                labels.append((m.group(1), int(m.group(3)), start, end))
            elif m := PART.search(name):
                chunk = CHUNK.search(name)
                parts.append((m.group(1), int(chunk.group(1)) if chunk else 0, start, end))
        if labels:
            return labels, "labels"
        if parts:
            if any(k == "W" for k, *_ in parts):
                parts = [("Bi" if k == "B" else k, c, s, e) for k, c, s, e in parts]
            return parts, "parts"
    return [], "none"


def _steps(trace: Trace) -> list[tuple[float, float]]:
    ids = [i for i, n in enumerate(trace.names) if STEP.match(n)]
    cats = [i for i, c in enumerate(trace.cats) if c in CPU_ANNOTATION]
    sel = np.flatnonzero(np.isin(trace.name, ids) & np.isin(trace.cat, cats))
    return sorted((float(trace.start[i]), float(trace.start[i] + trace.dur[i])) for i in sel)


def _p2p_exposed(trace: Trace, classifier: Classifier) -> iv.Intervals:
    """Time in point-to-point communication with no compute running."""
    _, code, _, ranges = categorise(trace, classifier)
    p2p_names = np.array([bool(P2P.search(n)) for n in trace.names], dtype=bool)
    p2p = (code == 2) & p2p_names[trace.name]
    compute = category_sets(trace, code, ranges)["compute"]
    return iv.subtract(iv.union(trace.start[p2p], trace.end[p2p]), compute)


def rank_costs(trace: Trace, rank: int, classifier: Classifier | None = None) -> dict[str, Any]:
    """Median cost per (chunk, kind) in ms, and the rank's bubble per step."""
    ops, style = _ops(trace)
    steps = _steps(trace) or ([(min(o[2] for o in ops), max(o[3] for o in ops))] if ops else [])
    if not ops and classifier is not None:
        style = "p2p waits"
    samples: dict[tuple[int, str], list[float]] = defaultdict(list)
    if style == "labels":
        for kind, chunk, s, e in ops:
            samples[(chunk, kind)].append((e - s) / 1e3)
    elif style == "parts":
        for lo, hi in steps:
            per_step: dict[tuple[int, str], float] = defaultdict(float)
            for kind, chunk, s, e in ops:
                if lo <= s < hi:
                    per_step[(chunk, kind)] += (e - s) / 1e3
            for key, value in per_step.items():
                samples[key].append(value)
    table = [{"rank": rank, "chunk": c, "kind": k, "cost": statistics.median(v), "count": len(v)}
             for (c, k), v in sorted(samples.items())]
    bubbles = []
    starts = np.array([o[2] for o in ops]) if ops else np.zeros(0)
    ends = np.array([o[3] for o in ops]) if ops else np.zeros(0)
    covered = iv.union(starts, ends)
    exposed = _p2p_exposed(trace, classifier) if style == "p2p waits" else iv.EMPTY
    for lo, hi in steps:
        step = (np.array([lo]), np.array([hi]))
        if style == "p2p waits":
            bubble = iv.total(iv.intersect(exposed, step))
        else:
            bubble = hi - lo - iv.total(iv.intersect(covered, step))
        bubbles.append({"step_ms": (hi - lo) / 1e3, "bubble_ms": bubble / 1e3})
    return {"rank": rank, "style": style, "table": table, "steps": bubbles,
            "bubble_ms": statistics.median(b["bubble_ms"] for b in bubbles) if bubbles else None,
            "bubble_fraction": (statistics.median(b["bubble_ms"] / b["step_ms"] for b in bubbles if b["step_ms"])
                                if bubbles else None)}


def costs(traces: list[Trace], classifier: Classifier | None = None) -> dict[str, Any]:
    """Per rank and chunk, the median F, B, W; scalar medians over all of them; the ``schedule simulate`` form.
    With a ``classifier``, ranks without op annotations get their bubble from exposed send/recv time."""
    ranks = [rank_costs(t, t.rank if t.rank is not None else i, classifier) for i, t in enumerate(traces)]
    table = [row for r in ranks for row in r["table"]]
    by_kind = {k: [row["cost"] for row in table if row["kind"] == k] for k in KINDS}
    med = {k: statistics.median(v) if v else None for k, v in by_kind.items()}
    w = med["W"] or 0.0
    b = med["Bi"] if med["Bi"] is not None else (med["B"] - w if med["B"] is not None else None)
    scalar = {"f": med["F"], "b": max(b, 0.0) if b is not None else None, "w": w}
    return {"unit": "ms", **scalar, "table": table, "ranks": ranks}


def read_costs(path: str | Path) -> tuple[dict[str, float], dict[tuple[int, int, str], float]]:
    """A ``trace costs --json`` file (or its ``costs`` object): scalar f, b, w and the (rank, chunk, kind) table."""
    path = Path(path)
    if not path.is_file():
        raise DSparkError(f"--costs-from: no such file {str(path)!r}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DSparkError(f"--costs-from: {path} is over {MAX_FILE_BYTES // 2**20} MB")
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise DSparkError(f"--costs-from: {path} is not JSON ({exc})") from None
    doc = doc.get("costs", doc) if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or not isinstance(doc.get("table"), list):
        raise DSparkError("--costs-from: expected the JSON of `dspark-lab trace costs --json` (a 'table' list)")
    scalar = {k: float(doc[k]) for k in ("f", "b", "w") if isinstance(doc.get(k), (int, float))}
    table = {}
    for row in doc["table"]:
        try:
            kind = str(row["kind"])
            if kind not in KINDS:
                raise ValueError(kind)
            table[(int(row["rank"]), int(row["chunk"]), kind)] = float(row["cost"])
        except (KeyError, TypeError, ValueError):
            raise DSparkError(f"--costs-from: table row {row!r} needs rank, chunk, kind (one of "
                              f"{', '.join(KINDS)}) and cost") from None
    return scalar, table
