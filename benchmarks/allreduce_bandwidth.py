"""All-reduce bandwidth of builtin (torch.distributed) vs ring vs tree vs bf16 / fp8 with error feedback.

Launches its own ranks (gloo, loopback) at each world size of ``--ranks`` and prints one table per world size: per
size, each collective's median time, algbw and busbw (nccl-tests definitions, on logical fp32 bytes), the bytes one
rank sent, and the ratio of its time to builtin's (below 1: faster). Sizes go from 1 MB up to ``--max-mb``, four
times larger each. Then where compression stops saving bytes: bf16 and fp8 all-gather every rank's encoding, so a
rank sends ``(n - 1) * encoded`` bytes against ``2 (n - 1) / n * 4`` bytes per element for a fp32 ring all-reduce;
the table gives that ratio at each world size run and the first world size where it reaches 1.

    python benchmarks/allreduce_bandwidth.py                          # 2, 4, 8 ranks; 1 and 4 MB (about a minute)
    python benchmarks/allreduce_bandwidth.py --ranks 2 --max-mb 256   # the large sizes, 2 ranks
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
from dspark_lab.collectives.compress import CODECS, ErrorFeedbackAllReduce, make_codec, ring_wire_bytes

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


def wire_ratio(codec: str, world: int, numel: int = MB) -> float:
    """Bytes a rank sends in the compressed all-gather over those of a fp32 ring all-reduce of ``numel`` elements."""
    return (world - 1) * make_codec(codec).encoded_bytes(numel) / ring_wire_bytes(numel, world)


def break_even(codec: str, numel: int = MB, largest: int = 1024) -> int:
    """The smallest world size at which the codec's all-gather sends at least as many bytes as a fp32 ring."""
    return next(n for n in range(2, largest + 1) if wire_ratio(codec, n, numel) >= 1)


def savings_table(runs: dict[int, list[dict]]) -> str:
    """Per codec and world size: wire bytes over the fp32 ring's (a rank's, the largest size), time over
    builtin's, and the world size where the bytes stop saving."""
    lines = [f"{'codec':>6} {'ranks':>5} {'wire / ring':>11} {'time / builtin':>14} {'saves bytes':>11}"]
    for codec in CODECS:
        for world, rows in runs.items():
            mine = [r for r in rows if r["name"] == codec]
            if not mine:
                continue
            last = max(mine, key=lambda r: r["bytes"])
            builtin = next(r for r in rows if r["name"] == "builtin" and r["bytes"] == last["bytes"])
            ring = ring_wire_bytes(last["bytes"] // 4, world)
            ratio = last["wire_bytes"] / ring
            lines.append(f"{codec:>6} {world:>5} {ratio:>11.3f} {last['time_s'] / builtin['time_s']:>14.2f} "
                         f"{'yes' if ratio < 1 else 'no':>11}")
        lines.append(f"{codec:>6} stops saving bytes at {break_even(codec)} ranks "
                     f"(wire / ring = {wire_ratio(codec, break_even(codec)):.3f} there)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8], help="world sizes to run (2..64)")
    parser.add_argument("--max-mb", type=int, default=4, help="largest size in MB (1..1024)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=NAMES, help="measure only these collectives (keep builtin)")
    parser.add_argument("--quick", action="store_true", help="1 MB only, 2 repetitions")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_mb, args.reps, args.warmup = 1, 2, 1
    if any(not 2 <= n <= 64 for n in args.ranks):
        parser.error(f"--ranks: each must be in 2..64, got {args.ranks}")
    if not 1 <= args.max_mb <= 1024:
        parser.error(f"--max-mb: must be in 1..1024, got {args.max_mb}")
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    runs = {}
    for world in args.ranks:
        result_path = f"/tmp/dspark-allreduce-{os.getpid()}-{world}.json"
        mp.spawn(_rank, args=(world, free_port(), args, result_path), nprocs=world)
        with open(result_path) as f:
            runs[world] = json.load(f)
        os.unlink(result_path)
        if not args.json:
            print(f"\n{world} ranks (gloo, loopback, one thread each)")
            print(table(runs[world]))
    if args.json:
        print(json.dumps({"runs": {str(w): rows for w, rows in runs.items()},
                          "break_even_ranks": {c: break_even(c) for c in CODECS}}, indent=1))
    else:
        print("\nWhere all-gather compression stops saving bytes (a rank's bytes vs a fp32 ring all-reduce)")
        print(savings_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
