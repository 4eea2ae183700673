"""Expert placement: ours (dspark_lab.moe.rebalance_experts) against DeepSeek's EPLB, side by side in one run.

EPLB is upstream's ``eplb.py`` when ``--eplb PATH`` names a checkout (github.com/deepseek-ai/EPLB, commit d52c72d),
else our faithful re-implementation (dspark_lab.moe.eplb_reference), which is checked against the README example
first (and, with ``--eplb``, against upstream on every case). Loads are seeded synthetic: lognormal, Zipf,
near-uniform and sparse, plus DeepSeek-V3 shapes (58 layers, 256 experts, 288 and 320 replicas, 8 and 4 groups,
4 nodes, 32 GPUs). "Moved" is measured on a drift step: both place for yesterday's loads, then for today's, and we
count (expert, GPU) pairs today's placement adds, after renumbering each side's GPUs to overlap its own yesterday
most (an exact assignment, nodes as wholes: a placement equal up to a GPU permutation moves nothing). Ours is
counted twice: balance-only, and with the fewest moves that keep each layer at EPLB's balancedness (equal balance).

Three columns of time: EPLB with its loop packer (or upstream), EPLB with our vectorised packer (the same
placements, checked on every case: the strongest fair rival), and ours. The ablation table turns each of the
balancer's stages off in turn (``best_placement(skip=...)``) over the same cases.

    python benchmarks/moe_balance.py [--eplb PATH] [--repeats 3] [--threads 1] [--no-ablation] [--json]
    python benchmarks/moe_balance.py --sweep 16     # speed only: DeepSeek-V3 shapes over seeds 0..15

Times are the best of ``--repeats`` interleaved runs, wall clock and CPU time of this process. ``--sweep N`` times
both on the DeepSeek-V3 shapes with lognormal and Zipf loads for seeds 0..N-1 and prints, per shape and load kind,
the lowest and median speed-up, the slowest seed, and the same-GPU duplicates of both.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dspark_lab.moe import balance, eplb_reference, moves

def load_eplb(path: str | None):
    if path is None:
        return eplb_reference.rebalance_experts, "eplb_reference (re-implementation)"
    spec = importlib.util.spec_from_file_location("eplb_upstream", Path(path) / "eplb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.rebalance_experts, f"upstream {path}"


def loads(kind: str, rng: np.random.Generator, layers: int, experts: int) -> np.ndarray:
    if kind == "lognormal":
        return rng.lognormal(0, 1.0, (layers, experts))
    if kind == "zipf":
        return rng.zipf(1.6, (layers, experts)).astype(float)
    if kind == "near-uniform":
        return 1000 + rng.normal(0, 10, (layers, experts)).clip(-900)
    if kind == "sparse":
        return (rng.random((layers, experts)) < 0.25) * rng.lognormal(0, 1, (layers, experts))
    raise ValueError(kind)


def race(fns, repeats: int):
    """Run the functions in turn ``repeats`` times (interleaved, so bursts of load on a shared machine hit both);
    returns each one's result, best wall time and best CPU time of this process (immune to waiting for a core)."""
    results, wall, cpu = [None] * len(fns), [float("inf")] * len(fns), [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start, start_cpu = time.perf_counter(), time.process_time()
            results[i] = fn()
            wall[i] = min(wall[i], time.perf_counter() - start)
            cpu[i] = min(cpu[i], time.process_time() - start_cpu)
    return results, wall, cpu


def drifted_loads(kind: str, seed: int, layers: int, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """``(yesterday, today)``: seeded loads of one kind, and the same after a day of multiplicative drift."""
    rng = np.random.default_rng(seed)
    yesterday = loads(kind, rng, layers, experts)
    return yesterday, yesterday * rng.lognormal(0, 0.3, yesterday.shape)


def eplb_vectorised(weight: torch.Tensor, *args):
    """EPLB's steps with our vectorised packer: the strongest fair rival (same placements, checked per case)."""
    return eplb_reference.rebalance_experts(weight, *args, packer=balance.vector_packing)


def race_placements(eplb, today: np.ndarray, args: tuple, repeats: int):
    """EPLB's (loop packer, or upstream), EPLB's with the vectorised packer, and our ``phy2log`` for ``today``
    under :func:`race`: ``((loop, vectorised, ours), wall, cpu)``."""
    return race([lambda: eplb(torch.from_numpy(today).float(), *args)[0].numpy(),
                 lambda: eplb_vectorised(torch.from_numpy(today).float(), *args)[0].numpy(),
                 lambda: balance.rebalance_experts(today, *args)[0].numpy()], repeats)


def run_case(name, kind, shape, eplb, repeats, seed):
    layers, experts, replicas, groups, nodes, gpus = shape
    yesterday, today = drifted_loads(kind, seed, layers, experts)
    args = (replicas, groups, nodes, gpus)
    (theirs, vectorised, ours), wall, cpu = race_placements(eplb, today, args, repeats)
    reference_equal = bool(np.array_equal(theirs, eplb_reference.rebalance_experts(
        torch.from_numpy(today), *args)[0].numpy()))
    dims = balance.check_shape(today, *args)
    old_theirs = eplb(torch.from_numpy(yesterday).float(), *args)[0].numpy()
    old_ours = balance.rebalance_experts(yesterday, *args)[0].numpy()
    # Moves after relabelling GPUs on both sides (a placement equal up to a GPU permutation moves nothing):
    # EPLB's new plan relabelled against its old one; ours balance-only (relabelled inside), and ours with the
    # fewest moves at EPLB's balancedness, layer by layer.
    eplb_bal_layers = balance.balancedness_of_loads(balance.gpu_loads(today, theirs, gpus))
    theirs_relabelled = moves.relabel(theirs, balance.presence(old_theirs, experts, gpus) > 0, dims)
    ours_moving = balance.rebalance_experts(today, *args, current=old_ours)[0].numpy()
    ours_equal = moves.place_with_moves(today, dims, old_ours, 0.0, balance.best_placement(today, dims),
                                        floor=eplb_bal_layers)

    def moved(new, old):
        return int(moves.experts_moved(new, balance.presence(old, experts, gpus) > 0, experts, gpus).sum())

    row = {
        "case": name, "loads": kind, "shape": f"{layers}x{experts}->{replicas} g{groups} n{nodes} p{gpus}",
        "bal_eplb": balance.balancedness(today, theirs, gpus), "bal_ours": balance.balancedness(today, ours, gpus),
        "dups_eplb": balance.same_gpu_duplicates(theirs, gpus, experts),
        "dups_ours": balance.same_gpu_duplicates(ours, gpus, experts),
        "moved_eplb_raw": moved(theirs, old_theirs), "moved_eplb": moved(theirs_relabelled, old_theirs),
        "moved_ours": moved(ours_moving, old_ours), "moved_ours_eq": moved(ours_equal, old_ours),
        "bal_ours_eq": balance.balancedness(today, ours_equal, gpus),
        "ms_eplb": 1e3 * wall[0], "ms_eplb_vec": 1e3 * wall[1], "ms_ours": 1e3 * wall[2],
        "cpu_ms_eplb": 1e3 * cpu[0], "cpu_ms_eplb_vec": 1e3 * cpu[1], "cpu_ms_ours": 1e3 * cpu[2],
        "reference_equal": reference_equal, "vectorised_equal": bool(np.array_equal(theirs, vectorised)),
    }
    row["bal_ratio"] = row["bal_ours"] / row["bal_eplb"]
    row["moved_ratio_eq"] = row["moved_ours_eq"] / max(row["moved_eplb"], 1)
    row["x_loop"] = wall[0] / wall[2]
    row["x_vec"] = wall[1] / wall[2]
    row["cpu_x_vec"] = cpu[1] / cpu[2]
    return row


def ablation(cases: list[tuple[str, str, tuple, int]]) -> list[dict]:
    """Each balancer stage turned off in turn (``best_placement(skip=...)``), summed over ``cases``; layers
    worse / better are counted against the full balancer's balancedness of the same layer."""
    problems = []
    for name, kind, (layers, experts, replicas, groups, nodes, gpus), seed in cases:
        _, today = drifted_loads(kind, seed, layers, experts)
        problems.append((today, balance.check_shape(today, replicas, groups, nodes, gpus)))
    rows, full = [], None
    for skipped in (None, *balance.STAGES):
        skip = frozenset() if skipped is None else frozenset({skipped})
        bal, dups, ms = [], 0, 0.0
        for today, dims in problems:
            start = time.perf_counter()
            placed = balance.best_placement(today, dims, skip)
            ms += 1e3 * (time.perf_counter() - start)
            bal.append(balance.balancedness_of_loads(balance.gpu_loads(today, placed, dims.gpus)))
            dups += balance.same_gpu_duplicates(placed, dims.gpus, dims.experts)
        bal = np.concatenate(bal)
        full = bal if full is None else full
        rows.append({"stage_off": skipped or "(none)", "mean_bal": round(float(bal.mean()), 6),
                     "layers_worse": int((bal < full - 1e-12).sum()), "layers_better": int((bal > full + 1e-12).sum()),
                     "dups": dups, "ms_total": round(ms, 1)})
    return rows


CASES = [
    ("small-hier", (16, 64, 80, 8, 2, 8)),
    ("small-global", (16, 64, 72, 3, 2, 8)),
    ("dsv3-288", (58, 256, 288, 8, 4, 32)),
    ("dsv3-320", (58, 256, 320, 4, 4, 32)),
]
KINDS = ("lognormal", "zipf", "near-uniform", "sparse")
COLUMNS = ("case", "loads", "bal_eplb", "bal_ours", "bal_ratio", "dups_eplb", "dups_ours", "moved_eplb_raw",
           "moved_eplb", "moved_ours", "bal_ours_eq", "moved_ours_eq", "moved_ratio_eq", "ms_eplb", "ms_eplb_vec",
           "ms_ours", "x_loop", "x_vec", "cpu_x_vec")


def sweep(seeds: int, eplb, repeats: int) -> list[dict]:
    """Speed-up and duplicates over seeds 0..seeds-1 per DeepSeek-V3 shape and load kind."""
    rows = []
    for name, (layers, experts, replicas, groups, nodes, gpus) in CASES:
        if not name.startswith("dsv3"):
            continue
        args = (replicas, groups, nodes, gpus)
        for kind in ("lognormal", "zipf"):
            runs = []
            for seed in range(seeds):
                _, today = drifted_loads(kind, seed, layers, experts)
                (theirs, _, ours), wall, _ = race_placements(eplb, today, args, repeats)
                runs.append((wall[1] / wall[2], seed, balance.same_gpu_duplicates(theirs, gpus, experts),
                             balance.same_gpu_duplicates(ours, gpus, experts), 1e3 * wall[2], wall[0] / wall[2]))
            speedups = [r[0] for r in runs]
            slowest = min(runs)
            rows.append({"case": name, "loads": kind, "seeds": seeds, "min_x_vec": min(speedups),
                         "median_x_vec": float(np.median(speedups)), "median_x_loop": float(np.median(
                             [r[5] for r in runs])), "slowest_seed": slowest[1],
                         "ms_ours_max": max(r[4] for r in runs), "dups_eplb": sum(r[2] for r in runs),
                         "dups_ours": sum(r[3] for r in runs)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eplb", help="path to an EPLB checkout (a directory with eplb.py)")
    parser.add_argument("--repeats", type=int, default=3, help="timing: best of this many runs")
    parser.add_argument("--no-ablation", action="store_true", help="skip the stage ablation table")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both sides (default 1: extra threads only contend on a "
                             "small shared machine)")
    parser.add_argument("--sweep", type=int, metavar="N",
                        help="only time the DeepSeek-V3 shapes over seeds 0..N-1 (lognormal and Zipf loads)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dspark_lab.output import text_table

    example = eplb_reference.README_EXAMPLE
    if eplb_reference.rebalance_experts(torch.tensor(example["weight"]), *example["args"])[0].tolist() \
            != example["phy2log"]:
        print("eplb_reference does not reproduce EPLB's README example", file=sys.stderr)
        return 1
    eplb, source = load_eplb(args.eplb)
    if args.sweep:
        rows = sweep(args.sweep, eplb, args.repeats)
        print(json.dumps(rows, indent=2) if args.json else text_table(rows, tuple(rows[0])))
        return 0
    cases = [(name, kind, shape, 100 * seed + k) for seed, (name, shape) in enumerate(CASES)
             for k, kind in enumerate(KINDS if not name.startswith("dsv3") else ("lognormal", "zipf"))]
    rows = [run_case(name, kind, shape, eplb, args.repeats, seed) for name, kind, shape, seed in cases]
    ds = [r for r in rows if r["case"].startswith("dsv3")]
    summary = {
        "eplb": source, "readme_example_reproduced": True,
        "reference_equal_to_eplb_on_all_cases": all(r["reference_equal"] for r in rows),
        "vectorised_equal_to_eplb_on_all_cases": all(r["vectorised_equal"] for r in rows),
        "never_below_eplb": all(r["bal_ours"] >= r["bal_eplb"] - 1e-9 for r in rows),
        "min_x_loop_dsv3": min(r["x_loop"] for r in ds), "min_x_vec_dsv3": min(r["x_vec"] for r in ds),
        "min_cpu_x_vec_dsv3": min(r["cpu_x_vec"] for r in ds),
        "mean_bal_ratio": float(np.mean([r["bal_ratio"] for r in rows])),
        "dups_total": {"eplb": sum(r["dups_eplb"] for r in rows), "ours": sum(r["dups_ours"] for r in rows)},
        "moved_total_relabelled": {"eplb": sum(r["moved_eplb"] for r in rows),
                                   "ours_balance_only": sum(r["moved_ours"] for r in rows),
                                   "ours_at_eplb_balancedness": sum(r["moved_ours_eq"] for r in rows)},
    }
    stages = [] if args.no_ablation else ablation(cases)
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary, "ablation": stages}, indent=2))
        return 0
    print(f"EPLB: {source}; README example reproduced by eplb_reference; x_loop / x_vec: speed-up of ours over "
          "EPLB with the loop / the vectorised packer; moves counted after relabelling GPUs on both sides "
          "(moved_eplb_raw: before); *_eq: ours with the fewest moves at EPLB's balancedness, layer by layer")
    print(text_table(rows, COLUMNS))
    for key, value in summary.items():
        print(f"{key}: {value}")
    if stages:
        print("\nAblation: each stage of best_placement turned off in turn, over the cases above")
        print(text_table(stages, tuple(stages[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
