"""Pipeline schedules side by side: simulated bubble fraction and peak activations next to the closed forms, then
real gloo runs at 2 ranks (one core each) with the simulator's prediction error.

    python benchmarks/pipeline_bubbles.py                 # both tables
    python benchmarks/pipeline_bubbles.py --no-real       # simulation only (instant)
    python benchmarks/pipeline_bubbles.py --pictures docs/images   # also write the docs' timeline PNGs

Costs for the simulation table: F = B = W = 1 per chunk (B excludes W), FB = F + B + W, no communication cost;
"bubble fraction" is max over ranks of (step time - busy time) / step time.
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


def real_rows(steps: int) -> list[dict]:
    from dspark_lab.pipeline.run import RunConfig, run_schedule

    names = list(REAL_REQUIRED) + [n for n in SCHEDULES if n not in REAL_REQUIRED]
    results = run_schedule(RunConfig(schedule=names[0], extra=names[1:], ranks=2, microbatches=8, steps=steps,
                                     warmup=2, mb_size=4, model={"d_model": 192, "seq": 96, "heads": 4}))
    return [{"schedule": r["schedule"], "ranks": 2, "m": 8, "measured_ms": round(1e3 * r["measured_step_time"], 2),
             "predicted_ms": round(1e3 * r["predicted_step_time"], 2), "error": round(r["prediction_error"], 3),
             "target": "<=0.15" if r["schedule"] in REAL_REQUIRED else "-",
             "comm_ms": round(1e3 * r["comm_latency"], 3), "grad_rel_diff": r["grad_rel_diff"]} for r in results]


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
    parser.add_argument("--pictures", type=Path, default=None, help="write timeline PNGs (p=4, m=8) here")
    args = parser.parse_args(argv)
    rows = simulation_rows()
    print("Simulated (F=B=W=1, FB=3, comm 0)")
    print(text_table(rows, ("schedule", "p", "m", "v", "step", "bubble", "closed_bubble", "bubble_frac",
                            "closed_frac", "peak", "closed_peak", "note")))
    bad = [r for r in rows if r.get("note") == "MISMATCH"]
    if not args.no_real:
        print("\nReal runs: 2 gloo ranks, one core each, 8 micro-batches; predicted from the same steps' op costs")
        real = real_rows(args.steps)
        print(text_table(real, ("schedule", "ranks", "m", "measured_ms", "predicted_ms", "error", "target", "comm_ms",
                                "grad_rel_diff")))
    if args.pictures:
        write_pictures(args.pictures)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
