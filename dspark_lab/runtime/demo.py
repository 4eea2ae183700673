"""``dspark-lab demo``: the main job. Trains a small transformer on 2 ranks and changes its policies while it runs.

It first records a reference run with default policies, then starts the same job again and, from this process,
through the real control endpoint, changes checkpointing, offload and gradient sync phase by phase. The table shows
each phase's median step time, peak activation bytes, gradient-communication time and how far the loss strays
from the reference (zero for lossless policies).

``--device cuda`` runs the same script on one GPU (one rank: the comm phases need two) with checkpointing and both
offload modes; its table adds the CUDA allocator's peak per phase (every step's, the live run reads memory each
step) next to the saved-activation bytes.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

from dspark_lab.runtime import commands
from dspark_lab.errors import DSparkError
from dspark_lab.output import Report

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "demo_train.py"
MODEL_ARGS = ["--layers", "4", "--dim", "128", "--seq", "128", "--batch", "8"]

CUDA_MODEL_ARGS = ["--layers", "4", "--dim", "256", "--seq", "256", "--batch", "16", "--device", "cuda"]
DEVICES = ("cpu", "cuda")

PHASES = (
    ("baseline", []),
    ("checkpoint every block", ["memory.activation_checkpointing=full"]),
    ("checkpoint every 2nd", ["memory.activation_checkpointing=every-2"]),
    ("ring all-reduce", ["memory.activation_checkpointing=none", "comm.grad_sync=ring"]),
    ("tree all-reduce", ["comm.grad_sync=tree"]),
    ("offload host-fp8 (lossy)", ["comm.grad_sync=builtin", "memory.activation_offload=host-fp8"]),
    ("fp8 grad sync (lossy)", ["memory.activation_offload=off", "comm.grad_sync=fp8"]),
)


CUDA_PHASES = (
    ("baseline", []),
    ("checkpoint every block", ["memory.activation_checkpointing=full"]),
    ("checkpoint every 2nd", ["memory.activation_checkpointing=every-2"]),
    ("offload host", ["memory.activation_checkpointing=none", "memory.activation_offload=host"]),
    ("offload host-fp8 (lossy)", ["memory.activation_offload=host-fp8"]),
)


def _say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def _wait_for_step(job, step: int, timeout: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = job.run_dir.metrics()
        if any(m["step"] >= step for m in metrics):
            return metrics
        if job.poll() is not None:
            raise DSparkError(f"demo: the job exited early; see {job.run_dir.path / 'output.log'}")
        if time.monotonic() > deadline:
            raise DSparkError(f"demo: step {step} not reached in {timeout:.0f} s")
        time.sleep(0.2)


def _reference_losses(steps: int, model_args: list[str], nproc: int) -> dict[int, float]:
    job = commands.launch(SCRIPT, [*model_args, "--steps", str(steps)], nproc=nproc, name="demo-reference")
    code = job.wait(timeout=600)
    if code != 0:
        raise DSparkError(f"demo: the reference run failed; see {job.run_dir.path / 'output.log'}")
    return {m["step"]: m["loss"] for m in job.run_dir.metrics() if m["rank"] == 0}


def summarize(metrics: list[dict], start: int, end: int, reference: dict[int, float]) -> dict:
    """One phase's figures over steps [start, end): medians over steps of the slowest / largest rank."""
    steps = sorted({m["step"] for m in metrics if start <= m["step"] < end})
    by_step = {s: [m for m in metrics if m["step"] == s] for s in steps}
    step_times = [max(m["step_time_s"] for m in by_step[s]) for s in steps]
    peaks = [max(m["peak_activation_bytes"] for m in by_step[s]) for s in steps]
    allocator = [max(m["memory_peak_bytes"] for m in by_step[s]) for s in steps
                 if all(m.get("memory_peak_bytes") is not None for m in by_step[s])]
    comms = [max(m["comm_s"] or 0.0 for m in by_step[s]) for s in steps]
    deviations = [abs(m["loss"] - reference[s]) / abs(reference[s]) for s in steps for m in by_step[s]
                  if m["rank"] == 0 and s in reference and m["loss"] is not None]
    return {
        "first_step": start, "last_step": end - 1, "steps": len(steps),
        "step_time_ms": 1e3 * statistics.median(step_times) if steps else None,
        "peak_activation_mb": statistics.median(peaks) / 2**20 if steps else None,
        "allocator_peak_mb": statistics.median(allocator) / 2**20 if allocator else None,
        "comm_ms": 1e3 * statistics.median(comms) if steps else None,
        "loss_deviation": (math.nan if any(math.isnan(d) for d in deviations) else max(deviations))
        if deviations else None,
    }


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise DSparkError(f"--device: {device!r} is not allowed; allowed: {' | '.join(DEVICES)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DSparkError(f"--device: cuda: no CUDA device here (torch {torch.__version__} sees none); "
                              f"allowed: {' | '.join(DEVICES)}")


def run_demo(*, quick: bool = False, steps_per_phase: int | None = None, device: str = "cpu") -> Report:
    _check_device(device)
    per_phase = steps_per_phase or (5 if quick else 12)
    if device == "cuda":
        phases = CUDA_PHASES[:2] + CUDA_PHASES[3:] if quick else CUDA_PHASES
        model_args, nproc, env = CUDA_MODEL_ARGS, 1, {"DSPARK_MEMORY_EVERY": "1"}
    else:
        phases = PHASES[:1] + PHASES[1:2] + PHASES[3:4] + PHASES[5:] if quick else PHASES
        model_args, nproc, env = MODEL_ARGS, 2, None
    total = len(phases) * (per_phase + 3) + 5  # room for each change's announce-to-apply steps
    _say(f"reference run: {total} steps on {nproc} rank(s) ({device}) with default policies")
    reference = _reference_losses(total, model_args, nproc)
    _say("live run: same job, policies changed from this process through the control endpoint")
    job = commands.launch(SCRIPT, [*model_args, "--steps", str(total + 50)], nproc=nproc, name="demo", env=env)
    rows = []
    try:
        start = 1
        _wait_for_step(job, start)
        for index, (label, changes) in enumerate(phases):
            if changes:
                reply = commands.set_policies(job.id, changes, wait=True, timeout=120)
                if reply.data["state"] != "applied":
                    raise DSparkError(f"demo: {changes} was {reply.data['state']}: {reply.data['reason']}")
                start = reply.data["step"]
                _say(f"step {start}: {', '.join(changes)} applied on {'both ranks' if nproc == 2 else 'the rank'}")
            metrics = _wait_for_step(job, start + per_phase)
            rows.append({"phase": label, "change": ", ".join(changes) or "-",
                         **summarize(metrics, start, start + per_phase, reference)})
        commands.stop(job.id)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.process.terminate()
    base = rows[0]
    for row in rows:
        row["peak_vs_baseline"] = row["peak_activation_mb"] / base["peak_activation_mb"] if base[
            "peak_activation_mb"] else None
        row["allocator_vs_baseline"] = row["allocator_peak_mb"] / base["allocator_peak_mb"] if (
            row["allocator_peak_mb"] is not None and base["allocator_peak_mb"]) else None
    columns = ("phase", "first_step", "step_time_ms", "peak_activation_mb", "peak_vs_baseline", "comm_ms",
               "loss_deviation")
    if device == "cuda":
        columns = ("phase", "first_step", "step_time_ms", "peak_activation_mb", "allocator_peak_mb",
                   "allocator_vs_baseline", "loss_deviation")
    where = "2 CPU ranks (gloo)" if device == "cpu" else "one GPU"
    return Report(
        "demo", {"run": job.id, "run_dir": str(job.run_dir.path), "device": device, "phases": rows}, rows=rows,
        columns=columns, title=f"dspark-lab demo: a 4-layer transformer on {where}, policies changed live",
        lines=[f"records: {job.run_dir.path} (events.jsonl, metrics.jsonl)",
               f"next: dspark-lab events {job.id}   dspark-lab metrics {job.id} --tail 5"])
