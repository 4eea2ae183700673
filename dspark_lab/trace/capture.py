"""Live capture: the ``profile.steps`` policy, a built-in plugin like any other.

Setting ``profile.steps=N`` goes through the runtime's change protocol, so every rank applies it at the same step
boundary: each starts ``torch.profiler`` (CPU, plus CUDA kernels when the job runs on CUDA; shapes; Python stacks
only with ``DSPARK_PROFILE_STACKS=1``: :func:`stacks_wanted`),
records N steps, stops at the boundary after the N-th, and writes ``profiles/step<S>/rank<k>.json.gz`` (S = the
first profiled step) in the run directory, with one ``profile`` event per rank naming the steps and the file. Steps
outside the window run with no profiler at all. A request while a capture runs is refused (the runtime rolls the
change back with the reason); ``profile.steps=0`` ends a running capture early and writes what it has. While a
capture is announced or running, the job is busy (:class:`ProfileState`): any other change waits, queued on rank 0,
until the capture has ended, so no step in the window is slowed or changed by an apply. Sizes are
bounded: at most :data:`MAX_STEPS` steps, and a trace over ``DSPARK_PROFILE_MAX_MB`` (uncompressed) is cut to its
earliest events that fit, which the ``profile`` event says.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_lab import hookimpl
from dspark_lab.errors import PolicyError
from dspark_lab.policy import PolicySpec
from dspark_lab.runtime.records import FILE_MODE, make_private_dir

KEY = "profile.steps"
MAX_STEPS = 50
DEFAULT_MAX_MB = 512
SPEC = PolicySpec(key=KEY, type="int", min=0, max=MAX_STEPS, default=0, tunable=False,
                  doc="profile the next N steps on every rank with torch.profiler (0: off / end a capture early); "
                      "traces go to profiles/step<S>/rank<k>.json.gz")


@dataclass(slots=True)
class Capture:
    """One rank's running capture: ``boundary`` is the step after which it started."""

    profiler: Any
    boundary: int
    steps: int
    directory: Path
    step_range: Any = None  # the record_function of the step being recorded

    @property
    def first_step(self) -> int:
        return self.boundary + 1

    @property
    def id(self) -> str:
        return f"step{self.first_step}"


class ProfileState:
    """``job.state["profile"]``: the running capture, and what the coordinator reads to hold other changes.

    ``busy`` (a reason, or "") and ``busy_keys`` are the runtime's contract for a plugin that must not be
    disturbed (docs/runtime.md): while ``busy`` is set, or a change of a ``busy_keys`` key is announced but not
    yet applied, changes of other keys stay queued on rank 0.
    """

    busy_keys = (KEY,)

    def __init__(self):
        self.capture: Capture | None = None

    @property
    def busy(self) -> str:
        c = self.capture
        return f"profile capture {c.id} (steps {c.first_step}..{c.first_step + c.steps - 1})" if c else ""


def max_bytes() -> int:
    raw = os.environ.get("DSPARK_PROFILE_MAX_MB", "")
    try:
        mb = int(raw) if raw else DEFAULT_MAX_MB
    except ValueError:
        mb = DEFAULT_MAX_MB
    return max(1, mb) * 2**20


def stacks_wanted() -> bool:
    """Python stacks in the trace only when ``DSPARK_PROFILE_STACKS=1`` is set in the job's environment. torch's
    Python tracer (``with_stack=True``) walks every thread's frames when the profiler stops, and the job has threads
    of its own (the control endpoint serves each request on a thread): on torch 2.13 (CPU) a capture with stacks
    killed a rank with SIGSEGV in 3 of 17 runs of tests/test_trace_capture.py, and none of 24 without."""
    return os.environ.get("DSPARK_PROFILE_STACKS", "") == "1"


def running(job) -> Capture | None:
    state = job.state.get("profile")
    return state.capture if state is not None else None


def _open_step(capture: Capture, step: int) -> None:
    from torch.autograd.profiler import record_function

    capture.step_range = record_function(f"ProfilerStep#{step}")
    capture.step_range.__enter__()


def _close_step(capture: Capture) -> None:
    if capture.step_range is not None:
        capture.step_range.__exit__(None, None, None)
        capture.step_range = None


def start(job, steps: int) -> Capture:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if job.backend.torch_device == "cuda" and torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    directory = make_private_dir(Path(job.run_dir.path) / "profiles" / f"step{job.step + 1}")
    capture = Capture(profiler=profile(activities=activities, record_shapes=True, with_stack=stacks_wanted()),
                      boundary=job.step, steps=steps, directory=directory)
    capture.profiler.start()
    _open_step(capture, capture.first_step)
    job.state["profile"].capture = capture
    return capture


def _stop(job, capture: Capture, last_step: int, note: str = "") -> None:
    """Stop profiling, write the rank's trace and record its ``profile`` event (never raises)."""
    job.state["profile"].capture = None
    relative = f"profiles/{capture.id}/rank{job.rank}.json.gz"
    try:
        _close_step(capture)
        capture.profiler.stop()
        raw = capture.directory / f"rank{job.rank}.json"
        capture.profiler.export_chrome_trace(str(raw))
        size = raw.stat().st_size
        cut = _cut_to(raw, max_bytes()) if size > max_bytes() else ""
        packed = capture.directory / f"rank{job.rank}.json.gz"
        fd = os.open(packed, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with open(raw, "rb") as src, os.fdopen(fd, "wb") as out, gzip.GzipFile(fileobj=out, mode="wb",
                                                                                compresslevel=6) as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        raw.unlink()
        reason = "; ".join(n for n in (note, cut) if n)
        job.record_event("profile", step=last_step, rank=job.rank, key=KEY, reason=reason, id=capture.id,
                         file=relative, first_step=capture.first_step, last_step=last_step, bytes=size)
    except Exception as exc:  # a failed export must never stop training
        job.record_event("profile", step=last_step, rank=job.rank, key=KEY, reason=f"capture failed: {exc}",
                         id=capture.id, file=None, first_step=capture.first_step, last_step=last_step)


def _cut_to(path: Path, limit: int) -> str:
    """Keep the earliest events of the trace at ``path`` that fit in ``limit`` bytes; say what was cut."""
    import orjson

    doc = orjson.loads(path.read_bytes())
    events = sorted(doc.get("traceEvents", []), key=lambda e: e.get("ts", 0) if e.get("ph") != "M" else -1)
    kept, used = [], 0
    for event in events:
        used += len(orjson.dumps(event)) + 1
        if used > limit:
            break
        kept.append(event)
    end = max((e.get("ts", 0) for e in kept if e.get("ph") != "M"), default=0)
    doc["traceEvents"] = kept
    before = path.stat().st_size
    path.write_bytes(orjson.dumps(doc))
    return (f"trace cut to {len(kept)} of {len(events)} events ({before / 2**20:.0f} MB is over the "
            f"{limit / 2**20:.0f} MB cap, DSPARK_PROFILE_MAX_MB); events end at ts {end}")


@hookimpl
def dspark_job_started(job):
    job.state["profile"] = ProfileState()


@hookimpl
def dspark_register_policies():
    return [SPEC]


@hookimpl
def dspark_apply_policy(job, key, value, old):
    if key != KEY:
        return None
    capture = running(job)
    if capture is not None and capture.boundary == job.step and old == capture.steps \
            and value == job.policies.get(KEY):
        # The runtime rolls back a change another key or rank refused: undo the start.
        job.state["profile"].capture = None
        _close_step(capture)
        capture.profiler.stop()
        return "capture cancelled"
    if capture is not None:
        if value == 0:
            _stop(job, capture, job.step, note=f"ended early at step {job.step} by {KEY}=0")
            return f"capture {capture.id} ended early"
        raise PolicyError(f"{KEY}: a capture is running (steps {capture.first_step}.."
                          f"{capture.first_step + capture.steps - 1}); ask again after step "
                          f"{capture.first_step + capture.steps - 1}")
    if value == 0:
        return "no capture running"
    capture = start(job, int(value))
    return f"profiling steps {capture.first_step}..{capture.first_step + capture.steps - 1} into profiles/{capture.id}"


@hookimpl
def dspark_step_end(job, step):
    capture = running(job)
    if capture is None:
        return None
    if step >= capture.boundary + capture.steps:
        _stop(job, capture, step)
    else:
        _close_step(capture)
        _open_step(capture, step + 1)
    return None
