"""Trace analysis speed on a large trace, and our breakdown next to Holistic Trace Analysis (HTA) on the same files.

    python benchmarks/trace_analysis.py                      # a synthetic ~100 MB rank trace: load + analyse time
    python benchmarks/trace_analysis.py --size-mb 20         # a smaller one
    python benchmarks/trace_analysis.py --size-mb 20 --with-hta   # and HTA's time on the same file, with the ratio
    python benchmarks/trace_analysis.py --hook-cost          # per-step cost of the capture plugin when idle
    python benchmarks/trace_analysis.py --hta PATH           # ours vs HTA on a trace file or a directory of them
                                                             # (e.g. DeepSeek's profile-data train.json)

The synthetic trace has four CUDA streams (GEMMs, NCCL all-reduce, DeepEP dispatch/combine, copies), CPU ops and
runtime calls with Kineto-style args, so its bytes per event match a real one. ``--hta`` needs
``pip install HolisticTraceAnalysis`` (0.5.0 was measured); parts whose input is absent are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dspark_lab.output import text_table
from dspark_lab.plugins import make_manager
from dspark_lab.trace.analyze import analyze_trace
from dspark_lab.trace.classify import default_classifier
from dspark_lab.trace.load import load

KERNELS = [("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)", 7),
           ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", 13),
           ("void dpsk::ep::internode::dispatch<false, 8, true, 8>(int4*, float*, long*, float*)", 21),
           ("Memcpy DtoD (Device -> Device)", 27)]


def synthetic(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write a Kineto-like trace of about ``size_mb`` MB; return its event count."""
    rng = random.Random(seed)
    target = size_mb * 2**20
    clock = {s: 0.0 for _, s in KERNELS}
    cpu = 0.0
    written, count = 0, 0
    with open(path, "w") as fh:
        fh.write('{"schemaVersion": 1, "distributedInfo": {"backend": "nccl", "rank": 0, "world_size": 8}, '
                 '"traceEvents": [\n')
        first = True
        while written < target:
            name, stream = KERNELS[rng.randrange(4)]
            start = clock[stream] + rng.uniform(0, 20)
            dur = rng.uniform(2, 200)
            clock[stream] = start + dur
            cid = count
            events = [
                {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": stream, "ts": 1.7e15 + start, "dur": dur,
                 "args": {"External id": cid, "device": 0, "stream": stream, "correlation": cid,
                          "registers per thread": 128, "grid": [132, 1, 1], "block": [384, 1, 1],
                          "est. achieved occupancy %": 12}},
                {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": 1,
                 "ts": 1.7e15 + cpu, "dur": 4.5, "args": {"External id": cid, "correlation": cid, "cbid": 211}},
                {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 1.7e15 + cpu - 1,
                 "dur": 7.0, "args": {"External id": cid, "Input Dims": [[4096, 7168], [7168, 2048]],
                                      "Input type": ["c10::BFloat16", "c10::BFloat16"]}},
            ]
            cpu += 8.0
            for event in events:
                text = ("" if first else ",\n") + json.dumps(event)
                first = False
                fh.write(text)
                written += len(text)
                count += 1
        fh.write("\n]}\n")
    return count


def ours(path: Path) -> tuple[dict, float, float]:
    classifier = default_classifier(make_manager([], entry_points=False))
    t0 = time.perf_counter()
    trace = load(path)
    t1 = time.perf_counter()
    result = analyze_trace(trace, classifier)
    return result, t1 - t0, time.perf_counter() - t1


def ours_cpu(path: Path) -> float:
    """CPU seconds of load + analyse (what a shared, loaded machine does not inflate)."""
    c0 = time.process_time()
    analyze_trace(load(path), default_classifier(make_manager([], entry_points=False)))
    return time.process_time() - c0


def hta_seconds(path: Path) -> float | None:
    """HTA's parse + temporal breakdown + comm/comp overlap on one rank trace; None when HTA is not installed."""
    try:
        from hta.trace_analysis import TraceAnalysis
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, Path(tmp) / path.name)
        t0 = time.perf_counter()
        analysis = TraceAnalysis(trace_dir=tmp)
        analysis.get_temporal_breakdown(visualize=False)
        analysis.get_comm_comp_overlap(visualize=False)
        return time.perf_counter() - t0


def speed(size_mb: float, with_hta: bool = False) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dspark-trace-bench-"))
    try:
        path = tmp / "rank0.json"
        events = synthetic(path, size_mb)
        result, t_load, t_analyze = ours(path)
        mb = path.stat().st_size / 2**20
        cpu = ours_cpu(path)
        rows = [{"trace_mb": mb, "events": events, "load_s": t_load, "analyze_s": t_analyze,
                 "total_s": t_load + t_analyze, "cpu_s": cpu, "target_s": 10.0, "within": t_load + t_analyze < 10.0,
                 "comm_busy_ms": result["comm_busy_ms"], "comm_overlap": result["comm_overlap_fraction"]}]
        if with_hta:
            hta = hta_seconds(path)
            rows[0].update(hta_s=hta, hta_over_ours=hta / rows[0]["total_s"] if hta else None)
        print(text_table(rows, list(rows[0])))
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall times grow with it; cpu_s does not)")
        if with_hta and rows[0]["hta_s"] is None:
            print("skipped HTA: pip install HolisticTraceAnalysis")
    finally:
        shutil.rmtree(tmp)


def hta_side_by_side(target: Path) -> None:
    files = sorted(p for p in target.iterdir() if p.name.endswith((".json", ".json.gz"))) if target.is_dir() \
        else [target] if target.is_file() else []
    if not files:
        print(f"skipped: no trace at {target}")
        return
    rows = []
    for f in files:
        r, t_load, t_analyze = ours(f)
        rows.append({"tool": "dspark", "trace": f.name, "seconds": t_load + t_analyze, "span_ms": r["span_ms"],
                     "compute_ms": r["compute_ms"], "comm_busy_ms": r["comm_busy_ms"],
                     "comm_overlap_%": 100 * (r["comm_overlap_fraction"] or 0), "comm_exposed_ms": r["comm_exposed_ms"],
                     "idle_ms": r["idle_ms"], "non_compute_%": 100 * r["comm_exposed_fraction"]})
    try:
        from hta.trace_analysis import TraceAnalysis
    except ImportError:
        print(text_table(rows, list(rows[0])))
        print("skipped HTA: pip install HolisticTraceAnalysis")
        return
    with tempfile.TemporaryDirectory() as tmp:  # HTA reads a directory of rank traces
        for f in files:
            shutil.copy(f, Path(tmp) / f.name)
        t0 = time.perf_counter()
        analysis = TraceAnalysis(trace_dir=tmp)
        temporal = analysis.get_temporal_breakdown(visualize=False)
        overlap = analysis.get_comm_comp_overlap(visualize=False)
        seconds = time.perf_counter() - t0
    for _, row in temporal.iterrows():
        rank_overlap = overlap[overlap["rank"] == row["rank"]]["comp_comm_overlap_pctg"]
        rows.append({"tool": "HTA", "trace": f"rank {int(row['rank'])}", "seconds": seconds,
                     "span_ms": row["kernel_time(us)"] / 1e3, "compute_ms": row["compute_time(us)"] / 1e3,
                     "comm_busy_ms": row["non_compute_time(us)"] / 1e3,
                     "comm_overlap_%": float(rank_overlap.iloc[0]) if len(rank_overlap) else None,
                     "comm_exposed_ms": None, "idle_ms": row["idle_time(us)"] / 1e3,
                     "non_compute_%": row["non_compute_time_pctg"]})
    print(text_table(rows, list(rows[0])))
    print("HTA: comm_busy_ms is its non_compute_time (NCCL kernels and memory copies); "
          "comm_overlap_% its comp_comm_overlap_pctg")


def hook_cost(calls: int = 1_000_000) -> None:
    """The ``profile.steps`` plugin's ``dspark_step_end`` outside a capture, next to an empty function."""
    import timeit
    from types import SimpleNamespace

    from dspark_lab.trace import capture

    job = SimpleNamespace()
    plugin = timeit.timeit(lambda: capture.dspark_step_end(job, 5), number=calls) / calls
    empty = timeit.timeit(lambda: None, number=calls) / calls
    rows = [{"call": "capture.dspark_step_end (idle)", "ns": plugin * 1e9, "empty_lambda_ns": empty * 1e9,
             "ratio": plugin / empty}]
    print(text_table(rows, list(rows[0])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="synthetic trace size (1..2048 MB)")
    parser.add_argument("--hta", type=Path, default=None, help="trace file or directory: ours vs HTA")
    parser.add_argument("--with-hta", action="store_true", help="also time HTA on the synthetic trace")
    parser.add_argument("--hook-cost", action="store_true", help="per-step cost of the idle capture plugin")
    args = parser.parse_args(argv)
    if not 1 <= args.size_mb <= 2048:
        parser.error("--size-mb: must be in [1, 2048]")
    if args.hook_cost:
        hook_cost()
    elif args.hta is not None:
        hta_side_by_side(args.hta)
    else:
        speed(args.size_mb, args.with_hta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
