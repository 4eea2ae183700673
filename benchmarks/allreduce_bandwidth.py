"""All-reduce bandwidth of builtin (torch.distributed) vs ring vs tree vs bf16 / fp8 with error feedback.

Launches its own ranks (gloo, loopback) and prints one table: per size, each collective's median time, algbw and
busbw (nccl-tests definitions, on logical fp32 bytes), the bytes one rank sent, and the ratio of its time to
builtin's (below 1: faster). Sizes go from 1 MB up to ``--max-mb``, four times larger each.

    python benchmarks/allreduce_bandwidth.py            # 1 MB .. 256 MB, 2 ranks
    python benchmarks/allreduce_bandwidth.py --quick    # 1 MB .. 16 MB, fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dspark_lab.collectives import make_standard
from dspark_lab.localhost import free_port
from dspark_lab.collectives.bandwidth import MB, measure_all_reduce
from dspark_lab.collectives.compress import ErrorFeedbackAllReduce

NAMES = ("builtin", "ring", "tree", "bf16", "fp8")


def sizes(max_mb: int) -> list[int]:
    out, mb = [], 1
    while mb <= max_mb:
        out.append(mb * MB)
        mb *= 4
    return out


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, result_path: str) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    for size in sizes(args.max_mb):
        for name in args.only or NAMES:
            if name in ("bf16", "fp8"):
                compressed = ErrorFeedbackAllReduce(name)
                op, wire = compressed.all_reduce, compressed.wire_bytes
            else:
                op, wire = make_standard(name).all_reduce, None
            rows += measure_all_reduce(name, op, [size], wire_bytes=wire, warmup=args.warmup, reps=args.reps)
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump([r.as_dict() for r in rows], f)
    dist.destroy_process_group()


def table(rows: list[dict]) -> str:
    builtin = {r["bytes"]: r["time_s"] for r in rows if r["name"] == "builtin"}
    lines = [f"{'size':>8} {'collective':>10} {'time ms':>9} {'algbw GB/s':>10} {'busbw GB/s':>10} "
             f"{'wire MB':>8} {'vs builtin':>10}"]
    for r in rows:
        ratio = r["time_s"] / builtin[r["bytes"]] if r["bytes"] in builtin else float("nan")
        lines.append(f"{r['bytes'] / MB:>6.0f}MB {r['name']:>10} {r['time_s'] * 1e3:>9.2f} {r['algbw_gb_s']:>10.3f} "
                     f"{r['busbw_gb_s']:>10.3f} {r['wire_bytes'] / MB:>8.1f} {ratio:>9.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-mb", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=NAMES, help="measure only these collectives (keep builtin)")
    parser.add_argument("--quick", action="store_true", help="1..16 MB, 3 repetitions")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_mb, args.reps, args.warmup = min(args.max_mb, 16), 3, 1
    result_path = f"/tmp/dspark-allreduce-{os.getpid()}.json"
    mp.spawn(_rank, args=(args.ranks, free_port(), args, result_path), nprocs=args.ranks)
    with open(result_path) as f:
        rows = json.load(f)
    os.unlink(result_path)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
