"""Pipeline schedules side by side: simulated bubble fraction and peak activations next to the closed forms, then
real gloo runs at 2 ranks (one core each) with the simulator's prediction error, in sample and out of sample.

    python benchmarks/pipeline_bubbles.py                 # both tables
    python benchmarks/pipeline_bubbles.py --no-real       # simulation only (instant)
    python benchmarks/pipeline_bubbles.py --pictures docs/images   # also write the docs' timeline PNGs

Costs for the simulation table: F = B = W = 1 per chunk (B excludes W), FB = F + B + W, no communication cost;
"bubble fraction" is max over ranks of (step time - busy time) / step time.

Real-run errors, each |predicted - measured| / measured (median over measured steps):
  replay_err    each step predicted from the op costs measured in that same step (in sample: a replay);
  forecast_err  each step predicted from the op costs of the warm-up steps (out of sample in time);
  cross_err     the median step predicted from another schedule's per-stage costs (out of sample in schedule),
                median (and worst) over every other schedule with the same model stages whose costs cover it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dspark_lab.output import text_table
from dspark_lab.pipeline.schedules import SCHEDULES, build
from dspark_lab.pipeline.simulate import Costs, simulate

REAL_REQUIRED = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")  # the 15% target applies to these


def closed_forms(name: str, p: int, m: int, f: float, b: float, w: float) -> tuple[float | None, int | None]:
    """(bubble time, peak activations) from the papers, where they give one."""
    bubble = {"gpipe": (p - 1) * (f + b + w), "1f1b": (p - 1) * (f + b + w),
              "interleaved-1f1b": (p - 1) * (f + b + w), "zb-h1": (p - 1) * (f + b - w)}.get(name)
    if name in ("dualpipe", "dualpipev") and w == f == b:
        stages = p if name == "dualpipe" else 2 * p
        bubble = (stages / 2 - 1) * ((f + b + w) + (b + w) - 3 * w)
    peak = {"gpipe": m, "1f1b": min(p, m), "zb-h1": min(p, m), "zb-h2": min(2 * p - 1, m), "dualpipe": p + 1,
            "dualpipev": 2 * p + 1}.get(name)
    return bubble, peak


def simulation_rows() -> list[dict]:
    rows = []
    for p in (4, 8):
        for m in (8, 16, 32):
            for name in SCHEDULES:
                try:
                    schedule = build(name, p, m)
                except ValueError as exc:
                    rows.append({"schedule": name, "p": p, "m": m, "note": str(exc).split(": ", 1)[1]})
                    continue
                sim = simulate(schedule, Costs(f=1, b=1, w=1))
                bubble, peak = closed_forms(name, p, m, 1, 1, 1)
                rows.append({
                    "schedule": name, "p": p, "m": m, "v": schedule.chunks, "step": sim.step_time,
                    "bubble": max(sim.bubble), "closed_bubble": bubble, "bubble_frac": round(sim.bubble_fraction, 4),
                    "closed_frac": None if bubble is None else round(bubble / (max(sim.busy) + bubble), 4),
                    "peak": max(sim.peak), "closed_peak": peak,
                    "note": "" if (bubble is None or abs(bubble - max(sim.bubble)) < 1e-9) and
                    (peak is None or peak == max(sim.peak)) else "MISMATCH",
                })
    return rows


def cross_schedule(results: list[dict], ranks: int, m: int) -> dict[str, list[tuple[str, float]]]:
    """For each schedule: (source, relative error) of its median step predicted from each other schedule's costs."""
    from dspark_lab.pipeline.run import transfer_costs

    out: dict[str, list[tuple[str, float]]] = {}
    for target in results:
        schedule = build(target["schedule"], ranks, m)
        for source in results:
            if source is target:
                continue
            costs = {(int(k.split(",")[0]), k.split(",")[1]): v for k, v in source["stage_costs"].items()}
            table = transfer_costs(costs, schedule)
            if table is None:
                continue
            pred = simulate(schedule, Costs(f=0, b=0, w=0, comm=source["comm_latency"], table=table)).step_time
            measured = target["measured_step_time"]
            out.setdefault(target["schedule"], []).append((source["schedule"], abs(pred - measured) / measured))
    return out


def real_rows(steps: int, warmup: int) -> list[dict]:
    from dspark_lab.pipeline.run import RunConfig, run_schedule

    names = list(REAL_REQUIRED) + [n for n in SCHEDULES if n not in REAL_REQUIRED]
    results = run_schedule(RunConfig(schedule=names[0], extra=names[1:], ranks=2, microbatches=8, steps=steps,
                                     warmup=warmup, mb_size=4, model={"d_model": 192, "seq": 96, "heads": 4}))
    cross = cross_schedule(results, 2, 8)
    rows = []
    for r in results:
        errs = sorted(e for _, e in cross.get(r["schedule"], []))
        rows.append({
            "schedule": r["schedule"], "ranks": 2, "m": 8, "measured_ms": round(1e3 * r["measured_step_time"], 2),
            "replay_ms": round(1e3 * r["predicted_step_time"], 2), "replay_err": round(r["replay_error"], 3),
            "forecast_ms": round(1e3 * r["forecast_step_time"], 2), "forecast_err": round(r["forecast_error"], 3),
            "cross_err": round(errs[len(errs) // 2], 3) if errs else None,
            "cross_worst": round(errs[-1], 3) if errs else None, "sources": len(errs),
            "target": "<=0.15" if r["schedule"] in REAL_REQUIRED else "-",
            "comm_ms": round(1e3 * r["comm_latency"], 3), "grad_rel_diff": r["grad_rel_diff"]})
    return rows


def write_pictures(folder: Path) -> None:
    from dspark_lab.pipeline.show import save_png

    folder.mkdir(parents=True, exist_ok=True)
    for name in SCHEDULES:
        sim = simulate(build(name, 4, 8), Costs(f=1, b=1, w=1))
        print("wrote", save_png(sim, folder / f"pipeline-{name}.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-real", action="store_true", help="skip the real gloo runs")
    parser.add_argument("--steps", type=int, default=7, help="measured steps per schedule in the real runs")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps (their costs drive the forecast)")
    parser.add_argument("--pictures", type=Path, default=None, help="write timeline PNGs (p=4, m=8) here")
    args = parser.parse_args(argv)
    rows = simulation_rows()
    print("Simulated (F=B=W=1, FB=3, comm 0)")
    print(text_table(rows, ("schedule", "p", "m", "v", "step", "bubble", "closed_bubble", "bubble_frac",
                            "closed_frac", "peak", "closed_peak", "note")))
    bad = [r for r in rows if r.get("note") == "MISMATCH"]
    if not args.no_real:
        if args.steps < 1 or args.warmup < 1:
            parser.error("--steps and --warmup: need at least 1 each")
        print(f"\nReal runs: 2 gloo ranks, one core each, 8 micro-batches, {args.warmup} warm-up + {args.steps} "
              "measured steps; replay = same-step costs (in sample), forecast = warm-up costs, cross = other "
              "schedules' costs (the target applies to the replay)")
        real = real_rows(args.steps, args.warmup)
        print(text_table(real, ("schedule", "measured_ms", "replay_ms", "replay_err", "forecast_ms", "forecast_err",
                                "cross_err", "cross_worst", "sources", "target", "comm_ms", "grad_rel_diff")))
    if args.pictures:
        write_pictures(args.pictures)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
