"""Where a rank's time goes: compute, communication (overlapped or exposed), synchronisation waits and idle.

The rank's *timeline* is its device tracks (kernels, copies, memsets, GPU sync records) when the trace has any,
else its CPU threads (``cpu_op`` events; busy = the union over threads of top-level ops). Annotation ranges
(``record_function``) are not busy time, except those a pattern names communication or a wait (gloo's ``gloo:*``
ranges, on its worker threads or around an async send). On each track, communication and wait *ops* are carved out
of the ops that contain them; a communication *range* is work in flight, not the thread being blocked, so it carves
nothing. Across tracks::

    compute  = union of compute time            comm_busy = union of communication time
    overlap  = comm_busy ∩ compute              exposed   = comm_busy − compute
    wait     = waits − compute − comm_busy      idle      = span − (compute ∪ comm_busy ∪ waits)

so ``compute + exposed + wait + idle = span`` exactly. The span runs from the timeline's first event to its last.
The overlap is what Holistic Trace Analysis' ``get_comm_comp_overlap`` reports
(github.com/facebookresearch/HolisticTraceAnalysis), with communication taken from :mod:`.classify` instead of NCCL
kernel names only.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

import numpy as np

from dspark_lab.trace import intervals as iv
from dspark_lab.trace.classify import Classifier
from dspark_lab.trace.load import Trace

DEVICE_ACTIVITY = ("kernel", "gpu_memcpy", "gpu_memset", "cuda_sync")
DEVICE_ANNOTATION = ("gpu_user_annotation",)
CPU_ACTIVITY = ("cpu_op",)
CPU_ANNOTATION = ("user_annotation",)
ANNOTATIONS = CPU_ANNOTATION + DEVICE_ANNOTATION
STEP = re.compile(r"^ProfilerStep#\d+$")
TOP = 8
_CODE = {"compute": 1, "comm": 2, "wait": 3}
_NAME = {v: k for k, v in _CODE.items()}


def categorise(trace: Trace, classifier: Classifier) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """The timeline used (``device`` or ``cpu``); per event its code (0: not on it, 1 compute, 2 comm, 3 wait),
    its deciding pattern's index into ``classifier.patterns`` (-1 for none), and whether it is a range
    (an annotation) rather than an op."""
    has_device = any(c in ("kernel", "gpu_memcpy") for c in trace.cats)
    timeline = "device" if has_device else "cpu"
    activity, annotation = (DEVICE_ACTIVITY, DEVICE_ANNOTATION) if has_device else (CPU_ACTIVITY, CPU_ANNOTATION)
    index = {p.name: i for i, p in enumerate(classifier.patterns)}
    key = (trace.name.astype(np.int64) * len(trace.cats) + trace.cat) * 2 + trace.comm_metadata
    unique, inverse = np.unique(key, return_inverse=True)
    codes = np.zeros(len(unique), dtype=np.int8)
    which = np.full(len(unique), -1, dtype=np.int32)
    for i, k in enumerate(unique.tolist()):
        metadata, rest = bool(k % 2), k // 2
        name, cat = trace.names[rest // len(trace.cats)], trace.cats[rest % len(trace.cats)]
        if cat not in activity and cat not in annotation:
            continue
        verdict = classifier.classify(name, cat, metadata)
        if cat in annotation and verdict.category == "compute":
            continue  # a plain annotation range is not busy time
        codes[i] = _CODE[verdict.category]
        which[i] = index.get(verdict.pattern, -1)
    range_cats = [i for i, c in enumerate(trace.cats) if c in annotation]
    return timeline, codes[inverse], which[inverse], np.isin(trace.cat, range_cats)


def category_sets(trace: Trace, code: np.ndarray, ranges: np.ndarray) -> dict[str, iv.Intervals]:
    """Per category, the union over tracks of each track's time; comm and wait ops carved out of their parents."""
    found: dict[str, list[iv.Intervals]] = {"compute": [], "comm": [], "wait": []}
    on = code > 0
    start, end, track, c, is_range = trace.start[on], trace.end[on], trace.track[on], code[on], ranges[on]
    for t in np.unique(track):
        sel = track == t
        s, e, k, op = start[sel], end[sel], c[sel], ~is_range[sel]
        wait = iv.union(s[k == 3], e[k == 3])
        found["wait"].append(wait)
        found["comm"].append(iv.subtract(iv.union(s[k == 2], e[k == 2]), wait))
        carved = iv.union(s[op & (k >= 2)], e[op & (k >= 2)])
        found["compute"].append(iv.subtract(iv.union(s[op], e[op]), carved))
    return {k: iv.union_of(*v) for k, v in found.items()}


def _outermost(trace: Trace, mask: np.ndarray) -> np.ndarray:
    """Indices of events in ``mask`` not nested in another event of ``mask`` on the same track."""
    idx = np.flatnonzero(mask)
    keep = []
    for t in np.unique(trace.track[idx]):
        sub = idx[trace.track[idx] == t]
        order = np.lexsort((-trace.end[sub], trace.start[sub]))
        sub = sub[order]
        ends = trace.end[sub]
        reach = np.maximum.accumulate(ends)
        nested = np.zeros(len(sub), dtype=bool)
        nested[1:] = ends[1:] <= reach[:-1]
        keep.append(sub[~nested])
    return np.concatenate(keep) if keep else idx


def _top(trace: Trace, events: np.ndarray, limit: int = TOP) -> list[dict[str, Any]]:
    if not len(events):
        return []
    totals = np.bincount(trace.name[events], weights=trace.dur[events], minlength=len(trace.names))
    counts = np.bincount(trace.name[events], minlength=len(trace.names))
    best = np.argsort(-totals)[:limit]
    return [{"name": trace.names[i], "ms": totals[i] / 1e3, "count": int(counts[i])} for i in best if counts[i]]


def annotations(trace: Trace) -> list[dict[str, Any]]:
    """The trace's own ranges (``record_function`` / ``user_annotation``): count and total time per name and side."""
    rows = []
    for cat in ANNOTATIONS:
        if cat not in trace.cats:
            continue
        sel = trace.cat == trace.cats.index(cat)
        names, inverse = np.unique(trace.name[sel], return_inverse=True)
        totals = np.bincount(inverse, weights=trace.dur[sel])
        counts = np.bincount(inverse)
        where = "gpu" if cat in DEVICE_ANNOTATION else "cpu"
        rows += [{"name": trace.names[n], "where": where, "count": int(k), "total_ms": t / 1e3}
                 for n, k, t in zip(names.tolist(), counts.tolist(), totals.tolist())]
    return sorted(rows, key=lambda r: -r["total_ms"])


def steps(trace: Trace) -> list[float]:
    """Durations (ms) of ``ProfilerStep#N`` ranges, in order."""
    ids = [i for i, n in enumerate(trace.names) if STEP.match(n)]
    if not ids:
        return []
    sel = np.isin(trace.name, ids) & np.isin(trace.cat, [i for i, c in enumerate(trace.cats) if c in CPU_ANNOTATION])
    order = np.argsort(trace.start[sel])
    return (trace.dur[sel][order] / 1e3).tolist()


def analyze_trace(trace: Trace, classifier: Classifier, rank: int | None = None) -> dict[str, Any]:
    """One rank's breakdown (ms and fractions of the span), top ops per category, and its annotations."""
    timeline, code, which, ranges = categorise(trace, classifier)
    sets = category_sets(trace, code, ranges)
    on = code > 0
    lo = float(trace.start[on].min()) if on.any() else 0.0
    hi = float(trace.end[on].max()) if on.any() else 0.0
    span = hi - lo
    compute, comm, wait = sets["compute"], sets["comm"], sets["wait"]
    overlap = iv.total(iv.intersect(comm, compute))
    exposed = iv.total(iv.subtract(comm, compute))
    wait_only = iv.total(iv.combine(lambda w, x, c: w & ~x & ~c, wait, comm, compute))
    busy = iv.total(iv.union_of(compute, comm, wait))
    comm_busy = iv.total(comm)
    ms = lambda us: us / 1e3
    figures = {
        "span_ms": ms(span), "compute_ms": ms(iv.total(compute)), "comm_busy_ms": ms(comm_busy),
        "comm_overlap_ms": ms(overlap), "comm_exposed_ms": ms(exposed), "wait_ms": ms(wait_only),
        "idle_ms": ms(span - busy),
        "comm_overlap_fraction": overlap / comm_busy if comm_busy else None,
    }
    fractions = {f"{k[:-3]}_fraction": figures[k] / figures["span_ms"] if span else 0.0
                 for k in ("compute_ms", "comm_busy_ms", "comm_exposed_ms", "wait_ms", "idle_ms")}
    by_pattern = {}
    for p in np.unique(which[on & (which >= 0)]):
        sel = on & (which == p)
        by_pattern[classifier.patterns[p].name] = ms(iv.total(iv.union(trace.start[sel], trace.end[sel])))
    step_ms = steps(trace)
    return {
        "rank": trace.rank if rank is None else rank, "path": trace.path, "timeline": timeline,
        **figures, **fractions,
        "steps_ms": step_ms, "step_ms": statistics.fmean(step_ms) if step_ms else ms(span),
        "by_pattern_ms": by_pattern,
        "top": {name: _top(trace, _outermost(trace, code == c)) for c, name in _NAME.items()},
        "annotations": annotations(trace),
        "events": len(trace),
    }


def analyze(traces: list[Trace], classifier: Classifier) -> dict[str, Any]:
    """Every rank's breakdown, and across ranks the step-time skew and the slowest rank."""
    ranks = [analyze_trace(t, classifier, rank=t.rank if t.rank is not None else i) for i, t in enumerate(traces)]
    step = [r["step_ms"] for r in ranks]
    return {"ranks": ranks, "step_skew_ms": max(step) - min(step) if step else 0.0,
            "slowest_rank": ranks[step.index(max(step))]["rank"] if step else None}
