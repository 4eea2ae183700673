"""False verdicts and power of the tune's trial statistics on the fake job (:mod:`dspark_lab.tune.fakejob`).

For each variant of the statistics (block summary, block length, boundary over the looks, the order of a pair's
blocks: ABBA, the coin, or "auto", which gives the coin to trials of 12 coin pairs or more) and each machine
(steady, linear drift, +-30% load jumps, a periodic load, bursty or crowded interference that only adds time):

* false verdicts: S seeded searches over two keys whose values are all equally fast (2 trials each): every win or
  loss is false; the tests' bound is 10 of 100 (the 99th percentile of Binomial(100, 0.05));
* power: S seeded searches where one value is truly 10%, 20% or 40% faster: how often the search keeps it.

    python benchmarks/tune_power.py                       # the variants below, 50 searches each (a few minutes)
    python benchmarks/tune_power.py --variants median,min-obf --searches 20
    python benchmarks/tune_power.py --variants min-pocock,min-pocock-coin,min-pocock-auto --budget-steps 800 \
        --searches 100                                    # ABBA against the coin in long trials (docs/tune.md)
"""

from __future__ import annotations

import argparse
import time

from dspark_lab.tune.fakejob import MACHINES, FakeJob
from dspark_lab.tune.search import Search, TuneOptions

VARIANTS = {  # every field explicit: the defaults of TuneOptions are one of these
    "median": {"block_stat": "median", "boundary": "bonferroni", "order": "abba"},  # the previous statistics
    "q25": {"block_stat": "q25", "boundary": "bonferroni", "order": "abba"},
    "min": {"block_stat": "min", "boundary": "bonferroni", "order": "abba"},
    "median-pocock": {"block_stat": "median", "boundary": "pocock", "order": "abba"},
    "median-obf": {"block_stat": "median", "boundary": "obf", "order": "abba"},
    "q25-pocock": {"block_stat": "q25", "boundary": "pocock", "order": "abba"},
    "q25-obf": {"block_stat": "q25", "boundary": "obf", "order": "abba"},
    "min-pocock": {"block_stat": "min", "boundary": "pocock", "order": "abba"},  # ABBA only (the default before)
    "min-pocock-coin": {"block_stat": "min", "boundary": "pocock", "order": "coin"},
    "min-pocock-auto": {"block_stat": "min", "boundary": "pocock", "order": "auto"},  # the default now
    "min-obf": {"block_stat": "min", "boundary": "obf", "order": "abba"},
    "min6-pocock": {"block_stat": "min", "boundary": "pocock", "block": 6, "order": "abba"},
    "min6-obf": {"block_stat": "min", "boundary": "obf", "block": 6, "order": "abba"},
    "median6-pocock": {"block_stat": "median", "boundary": "pocock", "block": 6, "order": "abba"},
}
START = {"a": "x", "b": 1}
SPACE = {"a": ["x", "y"], "b": [1, 2]}
GAINS = (0.10, 0.20, 0.40)


def search(machine: str, seed: int, gain: float, options: dict):
    job = FakeJob(lambda v: 0.10 * ((1 - gain) if v["b"] == 2 else 1.0), drift=MACHINES[machine](seed), seed=seed)
    job.values = dict(START)
    return Search(job, START, SPACE, TuneOptions(seed=seed, **options)).run()


def false_verdicts(machine: str, options: dict, searches: int) -> tuple[int, int]:
    false = trials = 0
    for seed in range(searches):
        out = search(machine, seed, 0.0, options)
        trials += len(out.trials)
        false += sum(t.verdict in ("win", "loss") for t in out.trials)
    return false, trials


def power(machine: str, options: dict, searches: int, gain: float) -> int:
    return sum(search(machine, 500 + seed, gain, options).best["b"] == 2 for seed in range(searches))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--machines", default=",".join(MACHINES), help=f"comma-separated, of: {', '.join(MACHINES)}")
    ap.add_argument("--searches", type=int, default=50, help="seeded searches per cell (2 to 500)")
    ap.add_argument("--budget-steps", type=int, default=200, help="each search's budget (200 to 800: the fake "
                    "machines' scripts last 1400 steps)")
    args = ap.parse_args(argv)
    variants, machines = args.variants.split(","), args.machines.split(",")
    if bad := [v for v in variants if v not in VARIANTS] + [m for m in machines if m not in MACHINES]:
        raise SystemExit(f"--variants/--machines: {bad[0]!r} is not allowed; allowed: "
                         f"{', '.join(VARIANTS)} / {', '.join(MACHINES)}")
    if not 2 <= args.searches <= 500:
        raise SystemExit(f"--searches: {args.searches} is not allowed; allowed: 2 to 500")
    if not 200 <= args.budget_steps <= 800:
        raise SystemExit(f"--budget-steps: {args.budget_steps} is not allowed; allowed: 200 to 800")
    s = args.searches
    print(f"budget {args.budget_steps} steps; {s} searches a cell; false: wins or losses among {2 * s} trials of equal configurations; "
          f"power: searches (of {s}) that kept a value truly 10/20/40% faster")
    print("| variant | machine | false | power 10% | power 20% | power 40% |")
    print("|---|---|---|---|---|---|")
    for variant in variants:
        began = time.monotonic()
        for machine in machines:
            options = {**VARIANTS[variant], "budget_steps": args.budget_steps}
            false, trials = false_verdicts(machine, options, s)
            gains = [power(machine, options, s, g) for g in GAINS]
            print(f"| {variant} | {machine} | {false} / {trials} | " + " | ".join(f"{k} / {s}" for k in gains) + " |",
                  flush=True)
        print(f"<!-- {variant}: {time.monotonic() - began:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
