"""Overhead of running a job under ``dspark-lab run`` (default policies) against plain torchrun.

Runs the same 2-rank script (steps of >= 100 ms) under both, interleaved round by round so drift in machine speed
hits both alike, and compares the median step time over all measured steps (>= 200 per side by default) with a
bootstrap 95% confidence interval on the ratio. Two jobs: ``ddp`` (dspark_lab/examples/demo_train.py) and
``fsdp2`` (this file as the worker: an MLP stack sharded with torch's ``fully_shard``, gloo). Then times the
runtime's own per-step work directly. Target: <= 1% overhead.

    python benchmarks/runtime_overhead.py [--job ddp|fsdp2|both] [--rounds 3] [--steps 80]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "dspark_lab" / "examples" / "demo_train.py"
JOBS = {
    "ddp": [str(DEMO), "--layers", "4", "--dim", "128", "--seq", "128", "--batch", "8"],
    "fsdp2": [str(Path(__file__).resolve()), "--worker", "fsdp2"],
}
WARMUP_STEPS = 5
FSDP2_DIM, FSDP2_BLOCKS, FSDP2_BATCH = 256, 4, 256


def fsdp2_worker(steps: int, times_file: str) -> None:
    """One rank of the FSDP2 job: every block and the root sharded with ``fully_shard``; step times to a file."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(FSDP2_DIM, 4 * FSDP2_DIM), nn.GELU(),
                                          nn.Linear(4 * FSDP2_DIM, FSDP2_DIM)) for _ in range(FSDP2_BLOCKS)])
    for block in model:
        fully_shard(block)
    fully_shard(model)
    for module in model.modules():
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_force_sum_reduction_for_comms(True)  # gloo has no AVG / PREMUL_SUM reduce-scatter
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(FSDP2_BATCH, FSDP2_DIM, generator=torch.Generator().manual_seed(dist.get_rank()))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        Path(times_file).write_text(json.dumps(times))
    dist.destroy_process_group()


def run(kind: str, steps: int, workdir: Path, job: str = "ddp") -> list[float]:
    times = workdir / f"{job}-{kind}-{time.monotonic_ns()}.json"
    args = [*JOBS[job], "--steps", str(steps), "--times-file", str(times)]
    if kind == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    else:
        cmd = [sys.executable, "-m", "dspark_lab", "run", "--nproc", "2", *args]
    env = {**os.environ, "DSPARK_HOME": str(workdir / "home")}
    for attempt in (1, 2):  # a loaded machine can lose a launch to a port race; say so and try once more
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode == 0:
            return json.loads(times.read_text())[WARMUP_STEPS:]
        tail = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("[W"))[-1500:]
        print(f"{kind} run failed (attempt {attempt}):\n{tail}", file=sys.stderr)
    raise SystemExit(f"{kind} run failed twice")


def bootstrap_ratio_ci(a: list[float], b: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
                    for _ in range(reps))
    return ratios[int(0.025 * reps)], ratios[int(0.975 * reps)]


def per_step_work_us(iterations: int = 2000) -> dict[str, float]:
    """Microseconds the runtime spends at one step boundary on rank 0 and on another rank (its store poll)."""
    import torch
    import torch.distributed as dist

    from dspark_lab.runtime.attach import Job
    from dspark_lab.runtime.records import RunDir, new_run_id

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDir.create(new_run_id(), {"name": "bench"}, root=Path(tmp))
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        job = Job(run_dir, rank=0, world=1)
        job.set_model(model)
        job.optimizer = optimizer
        start = time.perf_counter()
        for _ in range(iterations):
            job.on_step_begin(optimizer)
            job.on_step_end(optimizer)
        boundary = (time.perf_counter() - start) / iterations * 1e6
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=10))
        start = time.perf_counter()
        for _ in range(iterations):
            store.check(["announce/1"])
        poll = (time.perf_counter() - start) / iterations * 1e6
    return {"boundary_rank0_us": boundary, "store_poll_us": poll}


def compare(job: str, rounds: int, steps: int) -> None:
    plain: list[float] = []
    ours: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = ("torchrun", "dspark") if r % 2 == 0 else ("dspark", "torchrun")
            for kind in order:
                (plain if kind == "torchrun" else ours).extend(run(kind, steps, Path(tmp), job))
            print(f"[{job}] round {r + 1}/{rounds}: torchrun median {statistics.median(plain) * 1e3:.1f} ms, "
                  f"dspark-lab run median {statistics.median(ours) * 1e3:.1f} ms", flush=True)
    ratio = statistics.median(ours) / statistics.median(plain)
    low, high = bootstrap_ratio_ci(ours, plain)
    print(f"\n[{job}] steps measured: torchrun {len(plain)}, dspark-lab run {len(ours)}")
    print(f"[{job}] median step time: torchrun {statistics.median(plain) * 1e3:.2f} ms, "
          f"dspark-lab run {statistics.median(ours) * 1e3:.2f} ms")
    print(f"[{job}] ratio dspark/torchrun: {ratio:.4f}  (overhead {100 * (ratio - 1):+.2f}%, "
          f"95% CI {100 * (low - 1):+.2f}% .. {100 * (high - 1):+.2f}%)\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=("ddp", "fsdp2", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80, help="steps per run (the first 5 are not counted)")
    parser.add_argument("--worker", choices=("fsdp2",), help=argparse.SUPPRESS)  # a rank of the FSDP2 job
    parser.add_argument("--times-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fsdp2_worker(args.steps, args.times_file)
        return
    if not 1 <= args.rounds <= 50 or not WARMUP_STEPS < args.steps <= 10_000:
        raise SystemExit(f"--rounds: 1..50 and --steps: {WARMUP_STEPS + 1}..10000")
    for job in (("ddp", "fsdp2") if args.job == "both" else (args.job,)):
        compare(job, args.rounds, args.steps)
    work = per_step_work_us()
    print(f"runtime's own work per step: {work['boundary_rank0_us']:.1f} us at a boundary (rank 0, metrics "
          f"record included), {work['store_poll_us']:.1f} us for the store poll other ranks add")


if __name__ == "__main__":
    main()
