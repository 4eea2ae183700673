"""Scheduling policy: which pipeline schedule the job's pipeline executor runs (``sched.pipeline``).

The executor (:class:`dspark_lab.pipeline.execute.PipelineTrainer`) can swap its schedule between steps when the
new one keeps the layout (ranks, micro-batches, which stage each rank holds): gpipe, 1f1b, zb-h1 and zb-h2 all
hold one stage per rank, so a job can move between them; interleaved-1f1b, zbv and dualpipev place stages
differently and are refused with that reason. A switch reorders ops, not math: gradients are the same sums, in
another order.
"""

from __future__ import annotations

import sys

NONE = "none"


def schedule_names() -> tuple[str, ...]:
    from dspark_lab.pipeline.schedules import SCHEDULES

    return tuple(SCHEDULES)


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
    found = trainer(job)
    return found.schedule.name if found is not None else NONE


def _build(value: str, job=None):
    from dspark_lab.pipeline.schedules import build

    schedule = trainer(job).schedule
    return build(value, schedule.ranks, schedule.microbatches, None)


def refusal(value: str, job=None) -> str | None:
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
    found = trainer(job)
    found.schedule = _build(value, job)
    return f"{found.schedule.name}: {len(found.schedule.ops[found.rank])} ops on this rank"
