"""The planner's caching-allocator model against PyTorch's own CUDA caching allocator, on the same allocation trace.

For torchtitan's published rows (benchmarks/planner_accuracy.py's torchtitan source), the planner writes one
pipeline rank's allocations through two training steps (``planner/model/step_trace.py``) and replays them
through its model of the allocator (``planner/model/allocator.py``). With ``--device cuda`` the same trace is
replayed through PyTorch's allocator itself (``torch.empty`` for each allocation, ``del`` for each free, with
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` as torchtitan launches), and the peaks are printed side by side
with their ratio. That checks the allocator model, not the trace: both sides replay the same requests.

    python benchmarks/allocator_replay.py                 # the model's figures
    python benchmarks/allocator_replay.py --device cuda   # and PyTorch's, side by side (needs a CUDA device)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import planner_accuracy  # noqa: E402

from dspark_lab.planner import predict as P  # noqa: E402
from dspark_lab.planner.model.allocator import CachingAllocator  # noqa: E402
from dspark_lab.planner.model.step_trace import RankStep  # noqa: E402

ROWS = {  # row -> pipeline rank traced (the fullest one)
    "T5 405B 1F1B fp8": 7,
    "T5 405B interleaved fp8": 7,
    "T2 8B CP1 32k fp8": 0,
    "T1 8B FSDP8": 0,
}
CONF = "expandable_segments:True"


def trace_of(name: str, rank: int) -> list[tuple[int, int]]:
    """The allocation events the planner replays for ``rank`` of a torchtitan row."""
    source = planner_accuracy.load_sources()["torchtitan-h100-2412"]
    row = next(r for r in source["rows"] if r["name"] == name)
    config = planner_accuracy.row_config(source, row)[0]
    recompute = P.parse(config).layout.recompute
    return RankStep(P.rank_trace_spec(config, rank)).run(recompute).events


def model_peaks(events) -> dict[str, int]:
    allocator = CachingAllocator()
    for key, nbytes in events:
        if nbytes:
            allocator.malloc(key, nbytes)
        else:
            allocator.free(key)
    return {"allocated": allocator.peak_allocated, "reserved": allocator.peak_reserved}


def cuda_peaks(events) -> dict[str, int] | str:
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_reserved()
    need = max(model_peaks(events).values())
    free, _ = torch.cuda.mem_get_info()
    if need > 0.9 * free:
        return f"skipped: needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
    live = {}
    for key, nbytes in events:
        if nbytes:
            live[key] = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        else:
            del live[key]
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    out = {"allocated": stats["allocated_bytes.all.peak"], "reserved": stats["reserved_bytes.all.peak"] - base}
    live.clear()
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("model", "cuda"), default="model",
                        help="model: the planner's allocator only; cuda: also PyTorch's, on this machine's GPU")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)
    if args.device == "cuda" and CONF not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        # the allocator reads its configuration once, when CUDA starts: run again with it set
        env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": CONF}
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("allocator_replay: --device cuda: no CUDA device here", file=sys.stderr)
            return 2
        try:
            torch.zeros(1, device="cuda")
        except Exception as exc:  # a broken driver or build: say so before any trace is written
            print(f"allocator_replay: --device cuda: CUDA cannot allocate ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''})", file=sys.stderr)
            return 2
    worst = 0.0
    for name, rank in ROWS.items():
        events = trace_of(name, rank)
        ours = model_peaks(events)
        row = {"row": name, "rank": rank, "requests": sum(1 for _, n in events if n), "model": ours}
        line = (f"{name:26s} rank {rank}  model: allocated {ours['allocated'] / 1e9:6.2f} GB  "
                f"reserved {ours['reserved'] / 1e9:6.2f} GB")
        if args.device == "cuda":
            theirs = cuda_peaks(events)
            row["cuda"] = theirs
            if isinstance(theirs, str):
                line += f"  cuda: {theirs}"
            else:
                ratio = ours["reserved"] / theirs["reserved"]
                worst = max(worst, abs(ratio - 1))
                row["reserved_ratio"] = ratio
                line += (f"  cuda: allocated {theirs['allocated'] / 1e9:6.2f} GB  reserved "
                         f"{theirs['reserved'] / 1e9:6.2f} GB  reserved model/cuda x{ratio:.3f}")
        print(json.dumps(row) if args.json else line, flush=True)
    if args.device == "cuda" and not args.json:
        print(f"largest reserved-peak difference, model vs PyTorch: {worst:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
