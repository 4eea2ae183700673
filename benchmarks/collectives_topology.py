"""Packed spanning trees against the best ring on emulated links: planned vs measured bandwidth, side by side.

For each allocation of a topology, every rank runs a broadcast from rank 0 twice with the links emulated (each
message paced at its modelled link rate times ``--scale``): once over the packed trees the planner chose, once over
the chain of the best ring order (the ring's broadcast). It prints, per allocation, the planned and measured
algorithm bandwidth of both (in the topology's GB/s, i.e. measured / scale), measured / planned, and trees / ring;
then the same for the packed trees' all-reduce (reduce and broadcast overlapped). "Planned" is the alpha-beta rate
at this size and chunk (``PackedTreesCollective.expected_seconds``: the plan's rate plus the pipeline's fill), shown
next to the plan's asymptotic rate. Planning figures (fraction of the max-flow bound, trees kept,
planning time) come first, for every allocation of 3 to 8 GPUs of a DGX-1.

    python benchmarks/collectives_topology.py [--scale 2e-4] [--mb 4] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dspark_lab.collectives.packed_trees import PackedTreesCollective
from dspark_lab.collectives.packing import allocations, chain_plan, plan
from dspark_lab.collectives.topology import Topology, load_topology
from dspark_lab.localhost import free_port

CASES = [("dgx1-v100", [0, 1, 2, 3]), ("dgx1-v100", [0, 1, 5, 6]), ("dgx1-v100", [0, 1, 2, 3, 4]),
         ("dgx1-v100", [0, 2, 4, 6, 7]), ("mi300x", [0, 1, 2, 3])]


def planning_table() -> None:
    topo = load_topology("dgx1-v100")
    rows = [plan(topo, alloc) for alloc in allocations(topo.devices, range(3, 9))]
    fractions = [p.rate_gb_s / p.bound_gb_s for p in rows]
    speedups = [p.rate_gb_s / p.ring_rate_gb_s for p in rows]
    wide = [p for p in rows if p.bound_gb_s >= 1.5 * p.ring_rate_gb_s]
    print(f"planning, every allocation of 3-8 GPUs of dgx1-v100 ({len(rows)}), broadcast from the first GPU:")
    print(f"  packed / max-flow bound: min {min(fractions):.4f}, median {statistics.median(fractions):.4f}")
    print(f"  packed / best ring: min {min(speedups):.2f}x, median {statistics.median(speedups):.2f}x, "
          f"max {max(speedups):.2f}x; where the bound is >= 1.5x the ring ({len(wide)}): "
          f"min {min(p.rate_gb_s / p.ring_rate_gb_s for p in wide):.2f}x")
    print(f"  trees kept: max {max(len(p.trees) / len(p.devices) for p in rows):.2f} per device; planning time: "
          f"median {statistics.median(p.plan_ms for p in rows):.0f} ms, max {max(p.plan_ms for p in rows):.0f} ms")
    sixteen = load_topology("nodes:2,gpus:8")
    cpu = []
    for _ in range(3):  # CPU time: wall time on a shared machine counts the neighbours too
        start = time.process_time()
        big = plan(sixteen)
        cpu.append((time.process_time() - start) * 1e3)
    print(f"  16 devices (nodes:2,gpus:8): {big.rate_gb_s:.4g} of a {big.bound_gb_s:.4g} GB/s bound, "
          f"{len(big.trees)} trees, planned in {min(cpu):.0f} ms of CPU (wall {big.plan_ms:.0f} ms)")


def _time(collective, x, op: str, reps: int) -> float:
    run = collective.broadcast if op == "broadcast" else collective.all_reduce
    run(x)  # warm-up: plan and first messages
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        run(x)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank, world, port, name, ranks, scale, nbytes, reps, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    full = load_topology(name)
    devices = [full.devices[i] for i in ranks]
    topo = Topology(full.name, devices, full.switches, [l for l in full.links if l.src not in set(full.devices) -
                    set(devices) and l.dst not in set(full.devices) - set(devices)], full.source)
    chunk = 64 << 10
    trees = PackedTreesCollective(topo, op="broadcast", emulate=scale, chunk_bytes=chunk)
    ring = PackedTreesCollective(topo, op="broadcast", emulate=scale, chunk_bytes=chunk,
                                 fixed_plan=chain_plan(topo, devices, trees.plan.ring_order))
    reduce = PackedTreesCollective(topo, op="allreduce", emulate=scale, chunk_bytes=chunk)
    x = torch.zeros(nbytes // 4)
    result = {}
    for key, collective, op in (("trees", trees, "broadcast"), ("ring", ring, "broadcast"),
                                ("allreduce", reduce, "allreduce")):
        seconds = _time(collective, x, op, reps)
        # in the topology's GB/s: measured, the plan's rate, and the alpha-beta rate (the plan with the pipeline fill)
        result[key] = (nbytes / seconds / 1e9 / scale, collective.plan.rate_gb_s,
                       nbytes / collective.expected_seconds(x.numel(), op) / 1e9 / scale)
    result["ring_allreduce"] = reduce.plan.ring_algbw_gb_s
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=2e-4, help="emulated rate = modelled GB/s x scale")
    parser.add_argument("--mb", type=int, default=4, help="message size in MB")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per collective (median)")
    parser.add_argument("--quick", action="store_true", help="two allocations only")
    args = parser.parse_args()
    planning_table()
    print(f"\nemulated links (rates x {args.scale:g}), {args.mb} MB, GB/s in the topology's units:")
    print("plan: the planned rate; a-b: the alpha-beta rate at this size and chunk (the plan plus the pipeline's fill);"
          " m/p: measured / a-b")
    print(f"{'topology':10} {'ranks':12} {'trees plan':>10} {'a-b':>6} {'measured':>8} {'m/p':>5}   {'ring plan':>9} "
          f"{'a-b':>6} {'measured':>8} {'m/p':>5}   {'trees/ring':>10}   {'allreduce plan':>14} {'a-b':>6} "
          f"{'measured':>8} {'m/p':>5} {'ring plan':>9}")
    for name, ranks in CASES[:2] if args.quick else CASES:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.spawn(_worker, args=(len(ranks), free_port(), name, ranks, args.scale, args.mb << 20, args.reps, out),
                     nprocs=len(ranks))
            r = json.loads(Path(out).read_text())
        (tm, tp, ta), (rm, rp, ra), (am, ap, aa) = r["trees"], r["ring"], r["allreduce"]
        print(f"{name:10} {','.join(map(str, ranks)):12} {tp:10.4g} {ta:6.4g} {tm:8.4g} {tm / ta:5.2f}   {rp:9.4g} "
              f"{ra:6.4g} {rm:8.4g} {rm / ra:5.2f}   {tm / rm:9.2f}x   {ap:14.4g} {aa:6.4g} {am:8.4g} {am / aa:5.2f} "
              f"{r['ring_allreduce']:9.4g}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
