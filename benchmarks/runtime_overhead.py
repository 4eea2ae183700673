"""Overhead of running a job under ``dspark-lab run`` (default policies) against plain torchrun.

Runs the same 2-rank script (steps of >= 100 ms) under both, interleaved round by round so drift in machine speed
hits both alike, and compares the median step time over all measured steps (>= 200 per side by default) with a
bootstrap 95% confidence interval on the ratio. Two jobs: ``ddp`` (dspark_lab/examples/demo_train.py) and
``fsdp2`` (this file as the worker: an MLP stack sharded with torch's ``fully_shard``, gloo). Then times the
runtime's own per-step work directly. Target: <= 1% overhead.

``--profile-window`` measures instead that a live profile (``dspark-lab profile RUN --steps 2``) leaves the steps
outside its window at full speed: the ddp job under ``dspark-lab run``, once with a 2-step capture set live
mid-run and once without (launched and polled alike), interleaved; the ratios compare the profiled run's steps
before and after the window (the window and one step on each side, where the profiler starts, stops and writes its
trace, are left out and reported apart) with the unprofiled run's steps, in wall time and in rank 0's process CPU
time (which other processes' load barely moves, so it resolves the 1% that wall time on a shared machine cannot).

``--device cuda`` runs the ddp job on one GPU (one rank, nccl when there are two GPUs: two ranks) under both
launchers, and times the runtime's boundary work with a CUDA loss (its non-blocking copy and event) on the host.

    python benchmarks/runtime_overhead.py [--job ddp|fsdp2|both] [--rounds 3] [--steps 80]
    python benchmarks/runtime_overhead.py --device cuda [--rounds 3] [--steps 80]
    python benchmarks/runtime_overhead.py --profile-window [--rounds 3] [--steps 80]
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


def run(kind: str, steps: int, workdir: Path, job: str = "ddp", device: str = "cpu") -> list[float]:
    times = workdir / f"{job}-{kind}-{time.monotonic_ns()}.json"
    args = [*JOBS[job], "--steps", str(steps), "--times-file", str(times)]
    nproc = 2
    if device == "cuda":
        import torch

        args += ["--device", "cuda"]
        nproc = min(2, torch.cuda.device_count())
    if kind == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    else:
        cmd = [sys.executable, "-m", "dspark_lab", "run", "--nproc", str(nproc), *args]
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


def per_step_work_us(iterations: int = 2000, device: str = "cpu") -> dict[str, float]:
    """Microseconds the runtime spends at one step boundary on rank 0 and on another rank (its store poll).

    On ``cuda`` the model and each step's loss live on the GPU, so the boundary includes the loss's non-blocking
    copy and event, and the host time is measured without waiting for the device."""
    import torch
    import torch.distributed as dist

    from dspark_lab.runtime.attach import Job
    from dspark_lab.runtime.records import RunDir, new_run_id

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDir.create(new_run_id(), {"name": "bench"}, root=Path(tmp))
        model = torch.nn.Linear(4, 4).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        job = Job(run_dir, rank=0, world=1)
        job.set_model(model)
        job.optimizer = optimizer
        losses = [torch.full((), float(i), device=device) for i in range(iterations)]
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for loss in losses:
            job.meter._loss = loss  # what the backward hook keeps of each step
            job.on_step_begin(optimizer)
            job.on_step_end(optimizer)
        boundary = (time.perf_counter() - start) / iterations * 1e6
        job.close()
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=10))
        start = time.perf_counter()
        for _ in range(iterations):
            store.check(["announce/1"])
        poll = (time.perf_counter() - start) / iterations * 1e6
    return {"boundary_rank0_us": boundary, "store_poll_us": poll}


def compare(job: str, rounds: int, steps: int, device: str = "cpu") -> None:
    plain: list[float] = []
    ours: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = ("torchrun", "dspark") if r % 2 == 0 else ("dspark", "torchrun")
            for kind in order:
                (plain if kind == "torchrun" else ours).extend(run(kind, steps, Path(tmp), job, device))
            print(f"[{job}] round {r + 1}/{rounds}: torchrun median {statistics.median(plain) * 1e3:.1f} ms, "
                  f"dspark-lab run median {statistics.median(ours) * 1e3:.1f} ms", flush=True)
    ratio = statistics.median(ours) / statistics.median(plain)
    low, high = bootstrap_ratio_ci(ours, plain)
    print(f"\n[{job}] steps measured: torchrun {len(plain)}, dspark-lab run {len(ours)}")
    print(f"[{job}] median step time: torchrun {statistics.median(plain) * 1e3:.2f} ms, "
          f"dspark-lab run {statistics.median(ours) * 1e3:.2f} ms")
    print(f"[{job}] ratio dspark/torchrun: {ratio:.4f}  (overhead {100 * (ratio - 1):+.2f}%, "
          f"95% CI {100 * (low - 1):+.2f}% .. {100 * (high - 1):+.2f}%)\n", flush=True)


def windowed_run(steps: int, workdir: Path, capture: bool) -> tuple[list[float], list[float], int]:
    """The ddp job under ``dspark-lab run``, launched and polled the same way whether or not it is profiled; with
    ``capture``, ``profile.steps=2`` is set live a third of the way in. Returns rank 0's wall and process-CPU step
    times (index i: runtime step i + 1) and the first profiled step (0 without a capture)."""
    from dspark_lab.runtime import commands
    from dspark_lab.runtime.launch import launch_background

    os.environ["DSPARK_HOME"] = str(workdir / "home")
    stamp = time.monotonic_ns()
    wall, cpu = workdir / f"wall-{stamp}.json", workdir / f"cpu-{stamp}.json"
    job = launch_background(JOBS["ddp"][0], [*JOBS["ddp"][1:], "--steps", str(steps), "--times-file", str(wall),
                                             "--cpu-times-file", str(cpu)],
                            nproc=2, name="bench-profile-window")
    first = 0
    try:
        deadline = time.monotonic() + 600
        while max((m["step"] for m in job.run_dir.metrics()), default=0) < steps // 3:
            if job.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the run ended or stalled before a third of its steps; see its output.log")
            time.sleep(0.5)
        if capture:
            reply = commands.set_policies(job.id, ["profile.steps=2"], timeout=120)
            if reply.data["state"] != "applied":
                raise SystemExit(f"profile.steps=2: {reply.lines[0]}")
            first = reply.data["step"]
        if job.wait(900) != 0:
            raise SystemExit(f"the run failed; see {job.run_dir.path / 'output.log'}")
    finally:
        if job.poll() is None:
            job.process.kill()
    traces = [e for e in job.run_dir.events() if e.get("kind") == "profile"]
    if capture and (len(traces) != 2 or not all(e.get("file") for e in traces)):
        raise SystemExit(f"expected a trace from each of 2 ranks, got {traces}")
    return json.loads(wall.read_text()), json.loads(cpu.read_text()), first


def _ratio_line(label: str, a: list[float], b: list[float]) -> str:
    low, high = bootstrap_ratio_ci(a, b)
    ratio = statistics.median(a) / statistics.median(b)
    return (f"{label}: {ratio:.4f}  ({100 * (ratio - 1):+.2f}%, 95% CI {100 * (low - 1):+.2f}% .. "
            f"{100 * (high - 1):+.2f}%)")


def profile_window(rounds: int, steps: int) -> None:
    """Wall and CPU time of the steps outside a live capture against an uncaptured run's, interleaved round by
    round. Process CPU time (all of rank 0's threads: the profiler's and the runtime's included) barely moves with
    other processes' load, so it resolves small differences that wall time on a shared machine cannot."""
    series = {(clock, part): [] for clock in ("wall", "cpu") for part in ("baseline", "before", "after", "window")}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for capture in ((False, True) if r % 2 == 0 else (True, False)):
                wall, cpu, first = windowed_run(steps, Path(tmp), capture)
                for index in range(WARMUP_STEPS + 1, len(wall) + 1):  # runtime step number
                    if not capture:
                        part = "baseline"
                    else:  # the window and one step each side (profiler start, trace export) are apart
                        part = "before" if index < first - 1 else "after" if index > first + 2 else "window"
                    series["wall", part].append(wall[index - 1])
                    series["cpu", part].append(cpu[index - 1])
            print(f"round {r + 1}/{rounds}: median wall / cpu ms: unprofiled "
                  f"{statistics.median(series['wall', 'baseline']) * 1e3:.1f} / "
                  f"{statistics.median(series['cpu', 'baseline']) * 1e3:.1f}, outside the window "
                  f"{statistics.median(series['wall', 'before'] + series['wall', 'after']) * 1e3:.1f} / "
                  f"{statistics.median(series['cpu', 'before'] + series['cpu', 'after']) * 1e3:.1f}", flush=True)
    print(f"\nsteps measured: unprofiled {len(series['wall', 'baseline'])}, profiled run before "
          f"{len(series['wall', 'before'])}, after {len(series['wall', 'after'])}, window and its edges "
          f"{len(series['wall', 'window'])}")
    for clock in ("wall", "cpu"):
        outside = series[clock, "before"] + series[clock, "after"]
        base = statistics.median(series[clock, "baseline"])
        print(f"[{clock}] median ms: unprofiled {base * 1e3:.2f}; profiled run before the window "
              f"{statistics.median(series[clock, 'before']) * 1e3:.2f}, after "
              f"{statistics.median(series[clock, 'after']) * 1e3:.2f}, window and its edges "
              f"{statistics.median(series[clock, 'window']) * 1e3:.2f}")
        print(f"[{clock}] " + _ratio_line("outside-window / unprofiled", outside, series[clock, "baseline"]))
        # the same run before and after its window: no second job, so drift between runs does not enter
        print(f"[{clock}] " + _ratio_line("after-window / before-window (same run)", series[clock, "after"],
                                          series[clock, "before"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=("ddp", "fsdp2", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80, help="steps per run (the first 5 are not counted)")
    parser.add_argument("--profile-window", action="store_true",
                        help="steps outside a live 2-step profile vs a run without profiling")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the ddp job on the GPU(s) and the boundary work with a CUDA loss")
    parser.add_argument("--worker", choices=("fsdp2",), help=argparse.SUPPRESS)  # a rank of the FSDP2 job
    parser.add_argument("--times-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fsdp2_worker(args.steps, args.times_file)
        return
    if not 1 <= args.rounds <= 50 or not WARMUP_STEPS < args.steps <= 10_000:
        raise SystemExit(f"--rounds: 1..50 and --steps: {WARMUP_STEPS + 1}..10000")
    if args.profile_window:
        if args.steps < 3 * WARMUP_STEPS + 10:
            raise SystemExit(f"--steps: at least {3 * WARMUP_STEPS + 10} with --profile-window")
        profile_window(args.rounds, args.steps)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device: cuda: no CUDA device here (torch {torch.__version__} sees none)")
        if args.job == "fsdp2":
            raise SystemExit("--job: fsdp2 runs on cpu only (gloo); with --device cuda: ddp | both")
    for job in (("ddp", "fsdp2") if args.job == "both" else (args.job,)):
        if args.device == "cuda" and job == "fsdp2":
            continue
        compare(job, args.rounds, args.steps, args.device)
    work = per_step_work_us(device=args.device)
    print(f"runtime's own work per step ({args.device}): {work['boundary_rank0_us']:.1f} us of host time at a "
          f"boundary (rank 0, metrics record included), {work['store_poll_us']:.1f} us for the store poll other "
          f"ranks add")


if __name__ == "__main__":
    main()
