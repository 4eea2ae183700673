"""Scheduling policy: which pipeline schedule the job's pipeline runs (``sched.pipeline``).

Two kinds of pipeline are steered. A ``torch.distributed.pipelining`` schedule (registered with
``dspark_lab.attach(pipeline=schedule)``, else the one live schedule object of the process) is switched in place
at a step boundary, on every rank, to another torch class that keeps each rank's stages: :data:`TORCH_SCHEDULES`
maps values to classes; GPipe and 1F1B hold one stage per rank (``PipelineScheduleSingle``); interleaved 1F1B,
looped BFS and interleaved zero bubble hold the same looped virtual stages (``PipelineScheduleMulti``); ZBV and
DualPipeV place stages in a V and are refused unless the job already runs one of them. The script keeps its
schedule object: the runtime rebuilds the new class over the same stages, micro-batch count and loss, and
moves that state into the object (its class and attributes), so the script's next ``schedule.step`` runs it.

The executor (:class:`dspark_lab.pipeline.execute.PipelineTrainer`) can swap its schedule between steps when the
new one keeps the layout (ranks, micro-batches, which stage each rank holds): gpipe, 1f1b, zb-h1 and zb-h2 all
hold one stage per rank, so a job can move between them; interleaved-1f1b, zbv and dualpipev place stages
differently and are refused with that reason. A switch reorders ops, not math: gradients are the same sums, in
another order.
"""

from __future__ import annotations

import gc
import sys

NONE = "none"
# sched.pipeline value -> torch.distributed.pipelining class, and the stage layout a switch must keep
TORCH_SCHEDULES = {
    "gpipe": ("ScheduleGPipe", "single"),
    "1f1b": ("Schedule1F1B", "single"),
    "interleaved-1f1b": ("ScheduleInterleaved1F1B", "looped"),
    "looped-bfs": ("ScheduleLoopedBFS", "looped"),
    "interleaved-zb": ("ScheduleInterleavedZeroBubble", "looped"),
    "zbv": ("ScheduleZBVZeroBubble", "v"),
    "dualpipev": ("ScheduleDualPipeV", "v"),
}
TORCH_ONLY = ("looped-bfs", "interleaved-zb")


class PipelineState:
    """The scheduling policy's per-job state (created by ``dspark_job_started``): the torch pipelining schedule
    steered, once found. A schedule registered with ``attach(pipeline=...)`` wins; otherwise the heap is scanned
    once, after discovery, for the process's one live schedule object."""

    def __init__(self):
        self.schedule = None
        self.live_schedules = 0  # found by the scan; more than one cannot be steered without a registration
        self._scanned = False

    def find(self, job, schedules):
        registered = job.registered.get("pipeline")
        if isinstance(registered, schedules._PipelineSchedule):
            return registered
        if registered is None and job.discovered and not self._scanned:
            self._scanned = True
            # type(), not isinstance(): the heap holds dead weak proxies (torch.compile leaves some), and
            # isinstance on one raises ReferenceError
            found = [o for o in gc.get_objects() if issubclass(type(o), schedules._PipelineSchedule)]
            self.live_schedules = len(found)
            self.schedule = found[0] if len(found) == 1 else None
        return self.schedule


def torch_schedule(job):
    """The job's ``torch.distributed.pipelining`` schedule, or None. Never imports torch's pipelining package."""
    schedules = sys.modules.get("torch.distributed.pipelining.schedules")
    state = job.state.get("pipeline") if job is not None else None
    return state.find(job, schedules) if schedules is not None and state is not None else None


def _torch_value(schedule) -> str | None:
    return next((v for v, (name, _) in TORCH_SCHEDULES.items() if type(schedule).__name__ == name), None)


def _torch_refusal(schedule, value: str) -> str | None:
    current = _torch_value(schedule) or type(schedule).__name__
    if value == NONE:
        return f"the job runs a torch.distributed.pipelining {type(schedule).__name__}; choose a schedule"
    if value not in TORCH_SCHEDULES:
        return (f"torch.distributed.pipelining has no {value} schedule (values with a torch class: "
                f"{', '.join(TORCH_SCHEDULES)})")
    if _torch_value(schedule) is None:
        return f"the job's {type(schedule).__name__} is not a schedule the runtime can switch"
    layout, new_layout = TORCH_SCHEDULES[current][1], TORCH_SCHEDULES[value][1]
    if layout != new_layout or (layout == "v" and value != current):
        return (f"{TORCH_SCHEDULES[value][0]} places stages differently from {type(schedule).__name__} "
                f"({new_layout} vs {layout} stages per rank); a live switch keeps the stages each rank holds")
    from torch.distributed.pipelining import schedules

    _, lost = _torch_kwargs(getattr(schedules, TORCH_SCHEDULES[value][0]), schedule)
    if lost:
        return f"{TORCH_SCHEDULES[value][0]} takes no {', '.join(lost)}, which the job's schedule sets"
    return None


def _torch_kwargs(cls, schedule) -> tuple[dict, list[str]]:
    """The keyword arguments ``cls`` accepts, from the running schedule; and the set ones it cannot take."""
    import inspect

    state = {"n_microbatches": schedule._n_microbatches, "loss_fn": schedule._loss_fn,
             "args_chunk_spec": schedule._args_chunk_spec, "kwargs_chunk_spec": schedule._kwargs_chunk_spec,
             "output_merge_spec": schedule._output_merge_spec, "scale_grads": schedule.scale_grads}
    accepted = inspect.signature(cls.__init__).parameters
    lost = [k for k, v in state.items() if k not in accepted and v is not None and k != "scale_grads"]
    lost += ["scale_grads"] if "scale_grads" not in accepted and not schedule.scale_grads else []
    return {k: v for k, v in state.items() if k in accepted}, lost


def _torch_switch(schedule, value: str) -> str:
    """Rebuild ``schedule`` as the class of ``value`` over the same stages, in place."""
    from torch.distributed.pipelining import schedules

    cls = getattr(schedules, TORCH_SCHEDULES[value][0])
    kwargs, _ = _torch_kwargs(cls, schedule)
    if TORCH_SCHEDULES[value][1] == "single":
        new = cls(schedule._stage, **kwargs)
    else:
        new = cls(schedule._stages, **kwargs)
    schedule.__class__ = cls
    schedule.__dict__.clear()
    schedule.__dict__.update(new.__dict__)
    return f"{cls.__name__} (torch.distributed.pipelining) over the same stages"


def schedule_names() -> tuple[str, ...]:
    """Every sched.pipeline value: DSpark's executor's schedules, then the torch-only ones."""
    from dspark_lab.pipeline.schedules import SCHEDULES

    return tuple(SCHEDULES) + tuple(v for v in TORCH_ONLY if v not in SCHEDULES)


def trainer(job=None):
    """The job's DSpark pipeline executor: the one registered with ``attach(pipeline=...)``, else the live one of
    this process, or None (never imports the pipeline package by itself)."""
    execute = sys.modules.get("dspark_lab.pipeline.execute")
    if execute is None:
        return None
    registered = job.registered.get("pipeline") if job is not None else None
    if isinstance(registered, execute.PipelineTrainer):
        return registered
    return next(iter(execute.LIVE_TRAINERS), None) if registered is None else None


def current(job=None) -> str:
    schedule = torch_schedule(job)
    if schedule is not None:
        return _torch_value(schedule) or NONE
    found = trainer(job)
    return found.schedule.name if found is not None else NONE


def _build(value: str, job=None):
    from dspark_lab.pipeline.schedules import build

    schedule = trainer(job).schedule
    return build(value, schedule.ranks, schedule.microbatches, None)


def refusal(value: str, job=None) -> str | None:
    schedule = torch_schedule(job)
    if schedule is not None:
        return _torch_refusal(schedule, value)
    live = job.state["pipeline"].live_schedules if job is not None and "pipeline" in job.state else 0
    if live > 1:
        return (f"the process holds {live} torch.distributed.pipelining schedules; register the one to steer "
                "with dspark_lab.attach(pipeline=schedule)")
    if value in TORCH_ONLY:
        return f"{value} is a torch.distributed.pipelining schedule; this job runs no torch pipeline"
    found = trainer(job)
    if found is None:
        return ("this job runs no pipeline executor (dspark_lab.pipeline.execute.PipelineTrainer, found live or "
                "registered with dspark_lab.attach(pipeline=...))")
    if value == NONE:
        return f"the job runs a pipeline; choose a schedule ({', '.join(schedule_names())})"
    try:
        new = _build(value, job)
    except ValueError as exc:
        return str(exc)
    if new.layout() != found.schedule.layout():
        return (f"{value} places stages differently from {found.schedule.name}; a live switch keeps the stages "
                "each rank holds")
    return None


def apply(value: str, job=None) -> str:
    schedule = torch_schedule(job)
    if schedule is not None:
        return _torch_switch(schedule, value)
    found = trainer(job)
    found.schedule = _build(value, job)
    return f"{found.schedule.name}: {len(found.schedule.ops[found.rank])} ops on this rank"
