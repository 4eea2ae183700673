"""The ``dspark-lab trace`` and ``dspark-lab profile`` verbs as functions returning a :class:`Report`."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dspark_lab.errors import DSparkError
from dspark_lab.output import Report
from dspark_lab.runtime.records import FILE_MODE, LIVE_STATES, find_run, run_state

MAX_TRACES = 1024
_FIGURES = ("span_ms", "compute_ms", "comm_busy_ms", "comm_overlap_ms", "comm_exposed_ms", "wait_ms", "idle_ms")


def resolve(refs) -> list[Path]:
    """Trace files from arguments: files, directories of ``rank<k>.json[.gz]``, or ``RUN:PROFILE_ID``."""
    files: list[Path] = []
    for ref in refs:
        path = Path(ref)
        if not path.exists() and ":" in str(ref):
            run, _, profile_id = str(ref).partition(":")
            path = find_run(run).path / "profiles" / profile_id
            if not path.is_dir():
                raise DSparkError(f"trace: run {run} has no profile {profile_id!r} (look in {path.parent})")
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.name.endswith((".json", ".json.gz")))
            if not found:
                raise DSparkError(f"trace: no .json or .json.gz trace in {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DSparkError(f"trace: {ref!r} is not a file, a directory of traces, or RUN:PROFILE_ID")
    if not files:
        raise DSparkError("trace: give at least one TRACE")
    if len(files) > MAX_TRACES:
        raise DSparkError(f"trace: {len(files)} traces given; at most {MAX_TRACES}")
    return files


def _load(refs):
    from dspark_lab.trace.load import load

    return [load(p) for p in resolve(refs)]


def _classifier(classifier):
    from dspark_lab.trace.classify import default_classifier

    return classifier or default_classifier()


def analyze(refs, classifier=None) -> Report:
    """``trace analyze``: per rank compute / communication / overlap / exposed / waits / idle, skew across ranks."""
    from dspark_lab.trace.analyze import analyze as analyze_traces

    result = analyze_traces(_load(refs), _classifier(classifier))
    rows = [{"rank": r["rank"], "timeline": r["timeline"], **{k: r[k] for k in _FIGURES},
             "overlap": r["comm_overlap_fraction"]} for r in result["ranks"]]
    lines = [f"step skew {result['step_skew_ms']:.3f} ms, slowest rank {result['slowest_rank']}"]
    for r in result["ranks"]:
        patterns = ", ".join(f"{k} {v:.3f} ms" for k, v in r["by_pattern_ms"].items()) or "none"
        lines.append(f"rank {r['rank']}: communication by pattern: {patterns}")
        for category in ("comm", "wait", "compute"):
            for op in r["top"][category][:3]:
                lines.append(f"  top {category}: {op['ms']:.3f} ms x{op['count']}  {op['name'][:100]}")
        for ann in r["annotations"][:8]:
            lines.append(f"  annotation ({ann['where']}) {ann['name'][:60]}: x{ann['count']} {ann['total_ms']:.3f} ms")
    return Report("trace.analyze", result, rows=rows, columns=("rank", "timeline", *_FIGURES, "overlap"),
                  title="where the time goes (ms)", lines=lines)


def costs(refs, classifier=None) -> Report:
    """``trace costs``: median F, B, W per rank and chunk, bubbles; ``schedule simulate --costs-from`` reads it."""
    from dspark_lab.trace.costs import costs as measure

    result = measure(_load(refs), _classifier(classifier))
    fmt = lambda v: "-" if v is None else f"{v:.4g}"
    lines = [f"f {fmt(result['f'])}  b {fmt(result['b'])}  w {fmt(result['w'])} (ms, medians)" if result["table"]
             else "no F/B/W op annotations: no op costs"]
    source = {"labels": "op labels", "parts": "pass parts", "p2p waits": "exposed send/recv", "none": "no data"}
    lines += [f"rank {r['rank']}: bubble {fmt(r['bubble_ms'])} ms per step (from {source[r['style']]})"
              for r in result["ranks"]]
    return Report("trace.costs", {"costs": result}, rows=result["table"],
                  columns=("rank", "chunk", "kind", "cost", "count"), title="median op cost (ms)", lines=lines)


def show(refs, out: str | None = None, classifier=None) -> Report:
    """``trace show``: the timeline as standalone HTML (BokehJS inlined)."""
    from dspark_lab.trace.analyze import analyze as analyze_traces
    from dspark_lab.trace.view import save_html

    files = resolve(refs)
    traces = _load(files)
    classifier = _classifier(classifier)
    path = save_html(traces, classifier, out or files[0].parent / "timeline.html",
                     title=f"{len(traces)} trace(s): {files[0].name}", result=analyze_traces(traces, classifier))
    if out is None:
        os.chmod(path, FILE_MODE)  # beside the traces, in the run directory: private like every record there
    return Report("trace.show", {"html": str(path), "traces": [str(f) for f in files]},
                  lines=[f"wrote {path} (BokehJS inlined)"])


def profile(run: str, steps: int = 2, wait: bool = False, timeout: float = 600.0) -> Report:
    """``profile``: set ``profile.steps`` on a running job; with ``wait``, wait for every rank's file and analyse."""
    from dspark_lab.runtime.commands import set_policies

    run_dir = find_run(run)
    reply = set_policies(run, [f"profile.steps={steps}"], wait=True, timeout=min(timeout, 120.0))
    if reply.data["state"] != "applied":
        raise DSparkError(f"profile: {reply.lines[0]}")
    first = reply.data["step"]
    data = {"id": run_dir.id, "first_step": first, "steps": steps, "directory": str(run_dir.path / "profiles")}
    if not wait:
        return Report("profile", data, lines=[f"profiling steps {first}..{first + steps - 1} of run {run_dir.id}; "
                                              f"files under {data['directory']}"])
    ranks = int(run_dir.info().get("ranks") or 1)
    deadline = time.monotonic() + timeout
    while True:
        done = {e["rank"]: e for e in run_dir.events()
                if e.get("kind") == "profile" and (e.get("first_step") or 0) >= first}
        if len(done) >= ranks:
            break
        state = run_state(run_dir).get("state")
        if time.monotonic() > deadline or state not in (None, *LIVE_STATES):
            raise DSparkError(f"profile: {len(done)} of {ranks} rank(s) wrote their trace "
                              f"(run state {state}, waited {timeout:g} s)")
        time.sleep(0.5)
    files = [run_dir.path / done[r]["file"] for r in sorted(done)]
    report = analyze([str(f) for f in files if f.exists()]) if all(f.exists() for f in files) else None
    data.update(files=[str(f) for f in files], events=[done[r] for r in sorted(done)],
                analysis=report.data if report else None)
    lines = [f"rank {r}: {done[r]['file']} ({done[r].get('reason') or 'ok'})" for r in sorted(done)]
    lines += list(report.lines) if report else []
    return Report("profile", data, rows=report.rows if report else (), columns=report.columns if report else (),
                  title=report.title if report else "", lines=lines)
