"""The ``dspark-lab schedule`` verbs as functions returning :class:`~dspark_lab.output.Report` (CLI and notebooks)."""

from __future__ import annotations

import math
from pathlib import Path

from dspark_lab.errors import DSparkError
from dspark_lab.output import Report
from dspark_lab.pipeline.ir import Schedule
from dspark_lab.pipeline.schedules import SCHEDULES, build, default_chunks
from dspark_lab.pipeline.simulate import Costs, Simulation, simulate

# The sizes a user may choose, with room above real pipelines (tens of stages, up to thousands of micro-batches, a
# few chunks per rank). The simulator costs about 30 us per op and a slot (rank, micro-batch, chunk) is 2-3 ops, so
# 2**17 slots simulate in about 10 s on one core; `schedule show` also draws every op (36 px of PNG per rank).
LIMITS = {"ranks": 256, "microbatches": 4096, "chunks": 16}
MAX_SLOTS = 2**17
SHOW_LIMITS = {"ranks": 128, "microbatches": 4096, "chunks": 16}
SHOW_MAX_SLOTS = 2**15
# `schedule run` starts one process per rank on this machine and runs every step for real.
RUN_LIMITS = {"ranks": 16, "microbatches": 256, "chunks": 4, "steps": 1000}
RUN_MAX_SLOTS = 2**12


def check_sizes(limits: dict[str, int], max_slots: int, **sizes: int) -> None:
    """DSparkError in one line naming the first size outside ``1..limit``, or the product ranks x microbatches x
    chunks above ``max_slots``."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limits[name]:
            raise DSparkError(f"{name}: must be an int in 1..{limits[name]}, got {value!r}")
    slots = sizes["ranks"] * sizes["microbatches"] * sizes["chunks"]
    if slots > max_slots:
        raise DSparkError(f"ranks x microbatches x chunks: {sizes['ranks']} x {sizes['microbatches']} x "
                          f"{sizes['chunks']} = {slots} is above the limit {max_slots}")


def build_schedule(name: str, ranks: int, microbatches: int, chunks: int | None = None, *,
                   limits: dict[str, int] = LIMITS, max_slots: int = MAX_SLOTS, order: str = "megatron") -> Schedule:
    """The schedule ``name`` for the sizes given, each bounded (:data:`LIMITS`), in ``order`` (``megatron``, the
    paper's, or ``torch``, torch.distributed.pipelining's); DSparkError in one line."""
    if name in SCHEDULES:  # an unknown name gets build's error, which lists the schedules
        check_sizes(limits, max_slots, ranks=ranks, microbatches=microbatches,
                    chunks=default_chunks(name) if chunks is None else chunks)
    try:
        return build(name, ranks, microbatches, chunks, runtime=order)
    except ValueError as exc:
        raise DSparkError(str(exc)) from None


def make_costs(f: float, b: float, w: float, fb: float | None = None, comm: float = 0.0) -> Costs:
    for name, value in (("cost-f", f), ("cost-b", b), ("cost-w", w), ("cost-fb", fb), ("cost-comm", comm)):
        if value is not None and not (math.isfinite(value) and 0 <= value <= 1e12):
            raise DSparkError(f"{name}: must be a finite number in [0, 1e12], got {value!r}")
    try:
        return Costs(f=f, b=b, w=w, fb=fb, comm=comm)
    except ValueError as exc:
        raise DSparkError(str(exc)) from None


def _rank_rows(sim: Simulation) -> list[dict]:
    return [{"rank": r, "busy": sim.busy[r], "bubble": sim.bubble[r], "peak_activations": sim.peak[r],
             "ops": len(sim.schedule.ops[r])} for r in range(sim.schedule.ranks)]


def simulate_report(schedule: Schedule, costs: Costs, timeline: bool = False) -> Report:
    """``schedule simulate``: step time, per-rank bubble and peak activations, and the op order."""
    sim = simulate(schedule, costs)
    data = sim.as_dict()
    if not timeline:
        data.pop("timeline")
    s = schedule
    return Report("schedule.simulate", data, rows=_rank_rows(sim),
                  columns=("rank", "busy", "bubble", "peak_activations", "ops"),
                  title=f"{s.name}: p={s.ranks} m={s.microbatches} v={s.chunks}",
                  lines=[f"step_time {sim.step_time:.6g}   bubble fraction {sim.bubble_fraction:.4f}"])


def show_report(schedule: Schedule, costs: Costs, out: str | Path | None = None) -> Report:
    """``schedule show``: write the timeline as HTML (inline bokeh) and PNG; returns where they are."""
    from dspark_lab.pipeline.show import save_html, save_png

    check_sizes(SHOW_LIMITS, SHOW_MAX_SLOTS, ranks=schedule.ranks, microbatches=schedule.microbatches,
                chunks=schedule.chunks)
    sim = simulate(schedule, costs)
    stem = Path(out) if out else Path(f"schedule-{schedule.name}-p{schedule.ranks}-m{schedule.microbatches}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    html = save_html(sim, stem.with_suffix(".html"))
    png = save_png(sim, stem.with_suffix(".png"))
    data = {"schedule": schedule.name, "html": str(html), "png": str(png), "step_time": sim.step_time,
            "bubble_fraction": sim.bubble_fraction}
    return Report("schedule.show", data, lines=[f"wrote {html}", f"wrote {png}",
                                                f"step_time {sim.step_time:.6g}   bubble fraction "
                                                f"{sim.bubble_fraction:.4f}"])


def run_report(name: str, ranks: int, microbatches: int, chunks: int | None = None, steps: int = 3,
               check: bool = True) -> Report:
    """``schedule run``: a real gloo run; measured step time next to the simulator's prediction."""
    from dspark_lab.pipeline.run import RunConfig, run_schedule

    schedule = build_schedule(name, ranks, microbatches, chunks, limits=RUN_LIMITS, max_slots=RUN_MAX_SLOTS)
    check_sizes(RUN_LIMITS, RUN_MAX_SLOTS, ranks=ranks, microbatches=microbatches, chunks=schedule.chunks,
                steps=steps)
    result = run_schedule(RunConfig(schedule=schedule.name, ranks=ranks, microbatches=microbatches,
                                    chunks=schedule.chunks, steps=steps, check=check))
    rows = [{"measured_s": result["measured_step_time"], "predicted_s": result["predicted_step_time"],
             "error": result["prediction_error"], "grad_rel_diff": result.get("grad_rel_diff")}]
    return Report("schedule.run", result, rows=rows, columns=("measured_s", "predicted_s", "error", "grad_rel_diff"),
                  title=f"{name}: {ranks} ranks, {microbatches} micro-batches (gloo)")
