"""The checks behind tests/gpu/check_device.sh, one line each: ``check NAME: ok|FAIL|skipped: detail``.

Run on a machine with a CUDA device after the project is installed; exits 1 if any check failed. Each check is
independent: one that raises is reported as FAIL and the rest still run. All of them share one time budget
(:data:`BUDGET_S`, inside the 5 minutes check_device.sh allows): a check that would start without enough of it left
is reported as skipped, with that reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DSPARK_HOME", tempfile.mkdtemp(prefix="dspark-gpu-check-"))  # runs of the checks go here

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "dspark_lab" / "examples" / "demo_train.py"
BUDGET_S = 265
DEADLINE = time.monotonic() + BUDGET_S
failed: list[str] = []


def time_left(want: float) -> float:
    """Seconds a check may take: ``want``, or what is left of the budget (0 when under 10 s are left)."""
    left = DEADLINE - time.monotonic() - 5
    return min(want, left) if left >= 10 else 0


def report(name: str, status: str, detail: str) -> None:
    if status == "FAIL":
        failed.append(name)
    print(f"check {name}: {status}: {detail}", flush=True)


def check(fn):
    if time_left(1) == 0:
        report(fn.__name__, "skipped", f"out of the {BUDGET_S} s budget")
        return fn
    try:
        fn()
    except Exception as exc:  # one broken check must not hide the others
        report(fn.__name__, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return fn


def cuda_backend():
    from dspark_lab.plugins import get_manager

    manager = get_manager()
    found = [b for b in manager.backends() if b.torch_device == "cuda" and b.availability().available]
    return manager, (found[0] if found else None)


@check
def backend():
    manager, chosen = cuda_backend()
    name = torch.cuda.get_device_name(0)
    if chosen is None:
        report("backend", "FAIL", f"no available CUDA backend for {name!r}; problems: {manager.problems}")
        return
    spec = chosen.spec.as_dict()
    figures = ", ".join(f"{k}={v}" for k, v in spec.items() if v is not None and k != "source")
    report("backend", "ok", f"{name!r} -> {chosen.name} ({figures}; {spec.get('source')})")


@check
def nvml_sampler():
    manager, chosen = cuda_backend()
    if chosen is None:
        report("nvml_sampler", "skipped", "no CUDA backend")
        return
    sample = manager.device_sampler(chosen)
    values = sample() if sample else None
    if not values or "error" in values:
        report("nvml_sampler", "FAIL", f"sampler returned {values!r}")
        return
    devices = values.get("devices") or []
    first = devices[0] if devices else {}
    report("nvml_sampler", "ok", f"{len(devices)} device(s); first: " + json.dumps(first, default=str)[:200])


@check
def gpu_tests():
    env = {**os.environ, "DSPARK_GPU_TESTS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests/test_kernels.py", "tests/test_offload.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=time_left(90))
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    ok = done.returncode == 0 and re.search(r"\d+ passed", summary) and "skipped" not in summary
    report("gpu_tests", "ok" if ok else "FAIL", "gpu-marked tests (kernels bit-exact vs the CPU references; offload "
           f"frees the offloaded bytes at the backward peak): {summary}")


def _time_cuda(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


@check
def kernel_bandwidth():
    from dspark_lab.kernels import flatten_scale, fp8_quantize, reference

    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ours = _time_cuda(lambda: fp8_quantize(x, path="device"))
    theirs = _time_cuda(lambda: reference.fp8_quantize(x))
    moved = x.numel() * (2 + 1)  # read bf16, write fp8 (scales are 1/128 of that)
    parts = [f"fp8_quantize {moved / ours / 1e9:.0f} GB/s vs torch reference {moved / theirs / 1e9:.0f} GB/s "
             f"(x{theirs / ours:.2f})"]
    tensors = [torch.randn(n, device="cuda") for n in (1 << 22, 3_000_001, 1 << 20, 777)]
    out = torch.empty(sum(t.numel() for t in tensors), device="cuda")
    ours = _time_cuda(lambda: flatten_scale(tensors, 0.5, out, path="device"))
    theirs = _time_cuda(lambda: torch.mul(torch.cat([t.flatten() for t in tensors]), 0.5, out=out))
    moved = out.numel() * 4 * 2
    parts.append(f"flatten_scale {moved / ours / 1e9:.0f} GB/s vs torch cat+mul {moved / theirs / 1e9:.0f} GB/s "
                 f"(x{theirs / ours:.2f})")
    report("kernel_bandwidth", "ok", "; ".join(parts))


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dspark_lab", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=os.environ)


def _last_line(done: subprocess.CompletedProcess) -> str:
    return (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or [f"exit {done.returncode}"])[-1]


LOSSLESS = ("baseline", "checkpoint every block", "offload host")


@check
def demo_on_gpu():
    """One-GPU demo: checkpointing and both offload modes switched live; the allocator's peak and the losses."""
    done = _cli("demo", "--quick", "--device", "cuda", "--json", timeout=time_left(110))
    if done.returncode != 0:
        report("demo_on_gpu", "FAIL", _last_line(done))
        return
    phases = {p["phase"]: p for p in json.loads(done.stdout)["phases"]}
    fmt = lambda v, f: "-" if v is None else format(v, f)
    rows = "; ".join(f"{name}: {fmt(p['step_time_ms'], '.1f')} ms/step, allocator peak "
                     f"{fmt(p['allocator_peak_mb'], '.0f')} MB (x{fmt(p['allocator_vs_baseline'], '.2f')}), "
                     f"loss dev {fmt(p['loss_deviation'], '.2g')}" for name, p in phases.items())
    problems = [f"{n}: loss differs" for n in LOSSLESS if n in phases and phases[n]["loss_deviation"] != 0]
    for name in ("offload host", "offload host-fp8 (lossy)"):
        ratio = phases.get(name, {}).get("allocator_vs_baseline")
        if ratio is None or ratio >= 1:
            problems.append(f"{name}: no allocator memory drop")
    report("demo_on_gpu", "FAIL" if problems else "ok", ("; ".join(problems) + " | " if problems else "") + rows)


@check
def live_profile():
    """`dspark-lab profile RUN --steps 2 --wait` on the cuda demo, then `trace analyze`: kernels on device streams."""
    from dspark_lab.runtime import commands

    job = commands.launch(DEMO, ["--device", "cuda", "--steps", "20000", "--step-sleep", "0.01"], nproc=1,
                          name="gpu-profile")
    try:
        deadline = time.monotonic() + time_left(40)
        while not any(m["step"] >= 3 for m in job.run_dir.metrics()):
            if job.poll() is not None or time.monotonic() > deadline:
                report("live_profile", "FAIL", f"the cuda demo did not reach step 3; see {job.run_dir.path}/output.log")
                return
            time.sleep(0.5)
        done = _cli("profile", job.id, "--steps", "2", "--wait", "--timeout", "60", "--json", timeout=time_left(80))
        if done.returncode != 0:
            report("live_profile", "FAIL", f"profile: {_last_line(done)}")
            return
        files = json.loads(done.stdout).get("files") or []
        done = _cli("trace", "analyze", *files, "--json", timeout=time_left(40))
        if done.returncode != 0 or not files:
            report("live_profile", "FAIL", f"trace analyze: {_last_line(done)}")
            return
        rank = json.loads(done.stdout)["ranks"][0]
        ok = rank["timeline"] == "device" and rank["compute_ms"] > 0
        report("live_profile", "ok" if ok else "FAIL", f"{len(files)} trace(s); timeline {rank['timeline']}, compute "
               f"{rank['compute_ms']:.2f} ms, idle {rank['idle_ms']:.2f} ms over {rank['span_ms']:.2f} ms")
    finally:
        try:
            commands.stop(job.id, timeout=20)
        except Exception:
            pass
        if job.poll() is None:
            job.process.kill()


@check
def runtime_overhead():
    script = ROOT / "benchmarks" / "runtime_overhead.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cuda", "--job", "ddp", "--rounds", "1",
                           "--steps", "40"], cwd=ROOT, capture_output=True, text=True, timeout=time_left(90))
    lines = done.stdout.strip().splitlines()
    wanted = [l.split("] ", 1)[-1] for l in lines if "ratio dspark/torchrun" in l or "runtime's own work" in l]
    report("runtime_overhead", "ok" if done.returncode == 0 and len(wanted) == 2 else "FAIL",
           " | ".join(wanted) or _last_line(done))


print(f"check_device: {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""), flush=True)
sys.exit(1 if failed else 0)
