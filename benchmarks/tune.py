"""``dspark-lab tune`` against the oracle (quality) and against a relaunch-per-trial search (time to the answer).

One 2-rank job (gloo, CPU; ``--job demo``: the demo transformer, ``--job mlp``: the DDP script of
tests/tune_fixtures/ddp_mlp.py, which the tuner was not written against) is tuned live with ``--max-activation-mb`` at a fraction of its unconstrained peak.
Then:

* the oracle: every configuration of the searched keys as separate fixed runs (launched with ``--policy``), in
  ``--rounds`` rounds; each round runs every configuration once, in an order rotated by one per round (a Latin
  square), so a shared machine's drift between rounds hits every configuration alike and drift within a round
  does not always favour one position. A configuration's step time is the geometric mean over rounds of its run
  medians (rank 0, after the warm-up), with a hierarchical-bootstrap 95% CI (rounds, then steps within runs); the
  fastest one that fits the cap is the oracle's best.
* quality: the configuration tune kept is one of the oracle's, measured in the same rounds, so the comparison is
  paired by round: the geometric mean over rounds of (kept's run median / best's run median), with the same
  bootstrap's CI (same resampled rounds for both). The issue asks for the kept configuration within
  max(5%, the oracle's 95% CI) of the best: "ok" when the ratio's CI reaches 1.05 or below (the oracle cannot show
  the kept one more than 5% slower; a kept configuration equal to the best is 1.000 [1.000, 1.000]).
* relaunch per trial (DeepSpeed Autotuner's way): the tune's trials, in the same order, each a fresh launch that
  pays its start-up (launch to first step, median over the oracle's launches of that configuration) and runs the
  trial's steps at that configuration's step time; its time to reach the kept configuration / tune's.

    python benchmarks/tune.py              # about 4 minutes on 2 free cores
    python benchmarks/tune.py --rounds 5   # more rounds, tighter CIs
    python benchmarks/tune.py --job mlp    # the DDP script it has never seen
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from dspark_lab.runtime import commands
from dspark_lab.tune import commands as tune_commands

DEMO = Path(commands.__file__).parent.parent / "examples" / "demo_train.py"
MODEL = ["--layers", "4", "--dim", "64", "--seq", "32", "--batch", "8", "--vocab", "128"]
MLP = Path(__file__).resolve().parent.parent / "tests" / "tune_fixtures" / "ddp_mlp.py"
# the job to tune: script and its arguments for a run of N steps (mlp: a DDP script the tuner was not written for)
JOBS = {"demo": (DEMO, lambda steps: [*MODEL, "--steps", str(steps)]),
        "mlp": (MLP, lambda steps: [str(steps), os.devnull])}
KEYS = {"memory.activation_checkpointing": ["none", "full", "every-2", "every-4"]}
WARMUP = 5
GOAL = 0.05  # the kept configuration may be this much slower than the oracle's best (the 5%)


def first_step_time(job, started: float) -> float:
    while not job.run_dir.metrics_path.exists() or not job.run_dir.metrics():
        if job.poll() is not None:
            raise SystemExit((job.run_dir.path / "output.log").read_text()[-2000:])
        time.sleep(0.05)
    return time.monotonic() - started


def fixed_run(job_name: str, config: dict, steps: int) -> dict:
    """One separate run at ``config``: start-up, rank 0's step times after the warm-up, peak saved-activation bytes."""
    started = time.monotonic()
    script, script_args = JOBS[job_name]
    job = commands.launch(script, script_args(steps), nproc=2,
                          policies=[f"{k}={v}" for k, v in config.items()], name="oracle")
    startup = first_step_time(job, started)
    assert job.wait(600) == 0, (job.run_dir.path / "output.log").read_text()[-2000:]
    records = [m for m in job.run_dir.metrics() if m["step"] > WARMUP]
    return {"config": config, "startup_s": startup, "times": [m["step_time_s"] for m in records if m["rank"] == 0],
            "peak_bytes": max(m["peak_activation_bytes"] for m in records)}


def round_order(configs: list[tuple], r: int) -> list[tuple]:
    """Round ``r`` runs every configuration once, rotated by ``r`` (a Latin square over rounds): each configuration
    takes each position in a round equally often, so drift within a round does not always favour the first."""
    k = r % len(configs)
    return configs[k:] + configs[:k]


def hierarchical_boot(runs: dict[tuple, list[dict]], resamples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap log run-medians: ``(log_medians[c, r, b], round_idx[b, r])`` for a two-level bootstrap.

    Level 1 resamples rounds (the machine's drift between rounds is the variance that matters), level 2 the steps
    inside each run (Saravanan et al., "Application of the hierarchical bootstrap to multi-level data in
    neuroscience", 2020). A statistic over configurations uses the same resampled rounds for all, so a comparison
    stays paired by round.
    """
    rng = np.random.default_rng(seed)
    configs = list(runs)
    rounds = len(runs[configs[0]])
    logs = np.empty((len(configs), rounds, resamples))
    for c, config in enumerate(configs):
        for r, run in enumerate(runs[config]):
            t = np.asarray(run["times"])
            logs[c, r] = np.log(np.median(t[rng.integers(0, len(t), (resamples, len(t)))], axis=1))
    return logs, rng.integers(0, rounds, (resamples, rounds))


def geo_mean_ci(logs: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    """95% CI of the geometric mean over rounds of one configuration's run medians (``logs[r, b]``)."""
    boot = np.exp(logs[idx.T, np.arange(idx.shape[0])].mean(axis=0))
    return float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def oracle_table(runs: dict[tuple, list[dict]], resamples: int = 2000) -> tuple[dict, np.ndarray, np.ndarray]:
    """Per configuration: the geometric mean over rounds of its run medians (the statistic the oracle ranks by: in
    a full design every round's speed scales every configuration alike, so it cancels from the ranking), its CI,
    the per-round medians, the median start-up and the peak."""
    logs, idx = hierarchical_boot(runs, resamples)
    table = {}
    for c, (values, rs) in enumerate(runs.items()):
        medians = [float(np.median(r["times"])) for r in rs]
        table[values] = {"config": rs[0]["config"], "index": c, "round_medians": medians,
                         "median_s": float(np.exp(np.mean(np.log(medians)))), "ci": geo_mean_ci(logs[c], idx),
                         "startup_s": float(np.median([r["startup_s"] for r in rs])),
                         "peak_bytes": max(r["peak_bytes"] for r in rs)}
    return table, logs, idx


def paired_ratio(table: dict, logs: np.ndarray, idx: np.ndarray, a: tuple, b: tuple) -> tuple[float, tuple]:
    """Step time of ``a`` over ``b``, paired by round: the geometric mean over rounds of the per-round ratio of run
    medians, with its hierarchical-bootstrap 95% CI. Configurations measured in the same round share that round's
    machine, so its drift cancels from each per-round ratio."""
    i, j = table[a]["index"], table[b]["index"]
    ratio = float(np.exp(np.mean(np.log(table[a]["round_medians"]) - np.log(table[b]["round_medians"]))))
    cols = np.arange(idx.shape[0])
    boot = np.exp((logs[i][idx.T, cols] - logs[j][idx.T, cols]).mean(axis=0))
    return ratio, (float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975)))


def live_tune(job_name: str, budget: int, fraction: float) -> tuple[dict, float]:
    script, script_args = JOBS[job_name]
    job = commands.launch(script, script_args(100_000), nproc=2, name="tuned")
    try:
        while len(job.run_dir.metrics()) < 2 * (WARMUP + 1):
            time.sleep(0.1)
        peak = max(m["peak_activation_bytes"] for m in job.run_dir.metrics())
        cap_mb = peak * fraction / 2**20
        report = tune_commands.tune(job.id, budget_steps=budget, keys=list(KEYS), max_activation_mb=cap_mb)
        return report.data, cap_mb
    finally:
        job.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps of each oracle run (10 to 1000)")
    parser.add_argument("--budget-steps", type=int, default=200,
                        help="the tune's step budget (the CLI's default: 110 per candidate)")
    parser.add_argument("--cap-fraction", type=float, default=0.5,
                        help="the cap as a fraction of the unconstrained peak (0.05 to 1; default 0.5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of oracle runs (2 to 8)")
    parser.add_argument("--job", choices=tuple(JOBS), default="demo",
                        help="demo: the demo transformer; mlp: tests/tune_fixtures/ddp_mlp.py, a DDP residual MLP")
    args = parser.parse_args()
    if not 10 <= args.steps <= 1000 or not 2 <= args.rounds <= 8 or not 10 <= args.budget_steps <= 100_000 \
            or not 0.05 <= args.cap_fraction <= 1:
        raise SystemExit("--steps: 10 to 1000; --rounds: 2 to 8; --budget-steps: 10 to 100000; "
                         "--cap-fraction: 0.05 to 1")
    os.environ.setdefault("DSPARK_HOME", tempfile.mkdtemp(prefix="dspark_tune_bench_"))

    state, cap_mb = live_tune(args.job, args.budget_steps, args.cap_fraction)
    out = state["outcome"]
    short = lambda values: {k: v for k, v in values.items() if k in KEYS}
    print(f"job {args.job}; ", end="")
    print(f"tune: cap {cap_mb * 1024:.1f} KB saved activations ({args.cap_fraction:g} of the unconstrained peak); "
          f"{len(state['trials'])} trials, {out['steps']} steps, {out['seconds']:.1f} s; kept {short(out['best'])} "
          f"(found after {out['found_after_s']:.1f} s)")
    for t in state["trials"]:
        ci = f"[{t['ci'][0]:.3f}, {t['ci'][1]:.3f}]" if t["ci"] else "-"
        ratio = f"{t['ratio']:.3f}" if t["ratio"] is not None else "-"
        peak = f"{t['peak_bytes'] / 1024:.1f} KB" if t["peak_bytes"] is not None else "-"
        pairs = f" ({t['pairs']} of at most {t['max_pairs']} pairs)" if t.get("max_pairs") else ""
        print(f"  trial {t['change']}: {t['verdict']}, {t['steps']} steps{pairs}, ratio {ratio} {ci}, peak {peak}"
              + (f" ({t['reason']})" if t["verdict"] in ("tie", "skipped_budget") else ""))

    configs = list(itertools.product(*KEYS.values()))
    runs: dict[tuple, list[dict]] = {values: [] for values in configs}
    for r in range(args.rounds):
        for values in round_order(configs, r):
            runs[values].append(fixed_run(args.job, dict(zip(KEYS, values)), args.steps))
    oracle, logs, idx = oracle_table(runs)
    for values, o in oracle.items():
        rounds = ", ".join(f"{m * 1e3:.1f}" for m in o["round_medians"])
        print(f"oracle {o['config']}: start-up {o['startup_s']:.1f} s, step {o['median_s'] * 1e3:.1f} ms "
              f"[{o['ci'][0] * 1e3:.1f}, {o['ci'][1] * 1e3:.1f}] (rounds: {rounds}), peak {o['peak_bytes'] / 1024:.1f} KB"
              f"{'' if o['peak_bytes'] <= cap_mb * 2**20 else '  (over the cap)'}")

    feasible = [v for v in configs if oracle[v]["peak_bytes"] <= cap_mb * 2**20]
    best = min(feasible, key=lambda v: oracle[v]["median_s"])
    kept = tuple(out["best"][k] for k in KEYS)
    quality, (lo, hi) = paired_ratio(oracle, logs, idx, kept, best)
    fits = oracle[kept]["peak_bytes"] <= cap_mb * 2**20
    print(f"quality: kept {oracle[kept]['config']} vs oracle's best {oracle[best]['config']}, paired by round: "
          f"ratio {quality:.3f} [{lo:.3f}, {hi:.3f}] (ok when the CI reaches {1 + GOAL:.2f} or below and it fits "
          f"the cap: {'ok' if lo <= 1 + GOAL and fits else 'MISSED'})")

    # relaunch per trial: the baseline measurement plus each trial up to the one that found the kept configuration
    start = tuple(out["start"][k] for k in KEYS)
    relaunch = oracle[start]["startup_s"] + 2 * (WARMUP + 4) * oracle[start]["median_s"]
    tune_time = out["found_after_s"] or out["seconds"]
    for t in state["trials"]:
        o = oracle[tuple(t["values"][k] for k in KEYS)]
        relaunch += o["startup_s"] + t["steps"] * o["median_s"]
        if t["values"] == out["best"]:
            break
    print(f"time to the kept configuration: relaunch per trial {relaunch:.1f} s vs tune {tune_time:.1f} s: "
          f"ratio {relaunch / tune_time:.1f}x")


if __name__ == "__main__":
    main()
