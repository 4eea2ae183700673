"""The ``dspark-lab schedule`` verbs as functions returning :class:`~dspark_lab.output.Report` (CLI and notebooks)."""

from __future__ import annotations

from pathlib import Path

from dspark_lab.errors import DSparkError
from dspark_lab.output import Report
from dspark_lab.pipeline.ir import Schedule
from dspark_lab.pipeline.schedules import build
from dspark_lab.pipeline.simulate import Costs, Simulation, simulate


def build_schedule(name: str, ranks: int, microbatches: int, chunks: int | None = None) -> Schedule:
    try:
        return build(name, ranks, microbatches, chunks)
    except ValueError as exc:
        raise DSparkError(str(exc)) from None


def make_costs(f: float, b: float, w: float, fb: float | None = None, comm: float = 0.0) -> Costs:
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

    schedule = build_schedule(name, ranks, microbatches, chunks)
    result = run_schedule(RunConfig(schedule=schedule.name, ranks=ranks, microbatches=microbatches,
                                    chunks=schedule.chunks, steps=steps, check=check))
    rows = [{"measured_s": result["measured_step_time"], "predicted_s": result["predicted_step_time"],
             "error": result["prediction_error"], "grad_rel_diff": result.get("grad_rel_diff")}]
    return Report("schedule.run", result, rows=rows, columns=("measured_s", "predicted_s", "error", "grad_rel_diff"),
                  title=f"{name}: {ranks} ranks, {microbatches} micro-batches (gloo)")
