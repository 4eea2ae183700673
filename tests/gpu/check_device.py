"""The checks behind tests/gpu/check_device.sh, one line each: ``check NAME: ok|FAIL|skipped: detail``.

Run on a machine with a CUDA device after the project is installed; exits 1 if any check failed. Each check is
independent: one that raises is reported as FAIL and the rest still run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
failed: list[str] = []


def report(name: str, status: str, detail: str) -> None:
    if status == "FAIL":
        failed.append(name)
    print(f"check {name}: {status}: {detail}", flush=True)


def check(fn):
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
def kernel_tests():
    env = {**os.environ, "DSPARK_GPU_TESTS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests/test_kernels.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    ok = done.returncode == 0 and re.search(r"\d+ passed", summary) and "skipped" not in summary
    report("kernel_tests", "ok" if ok else "FAIL", f"gpu-marked kernel tests bit-exact vs CPU reference: {summary}")


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
    return subprocess.run([sys.executable, "-m", "dspark_lab.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "DSPARK_HOME": os.environ.get("DSPARK_HOME", "/tmp/dspark-gpu")})


@check
def demo_on_gpu():
    help_text = _cli("demo", "--help", timeout=60).stdout
    if "--device" not in help_text:
        report("demo_on_gpu", "skipped", "this version's demo has no --device option")
        return
    done = _cli("demo", "--quick", "--device", "cuda", "--json", timeout=150)
    if done.returncode != 0:
        report("demo_on_gpu", "FAIL", (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1])
        return
    phases = json.loads(done.stdout).get("phases", [])
    rows = "; ".join(f"{p.get('phase')}: step {p.get('median_step_s')} s, peak {p.get('peak_memory_bytes')} B, "
                     f"loss dev {p.get('max_loss_rel_dev')}" for p in phases)
    lossless_ok = all((p.get("max_loss_rel_dev") or 0) == 0 for p in phases if p.get("lossless"))
    report("demo_on_gpu", "ok" if lossless_ok else "FAIL", rows or done.stdout[-300:])


@check
def runtime_overhead():
    script = ROOT / "benchmarks" / "runtime_overhead.py"
    if "--device" not in script.read_text():
        report("runtime_overhead", "skipped", "this version's benchmark has no --device option")
        return
    done = subprocess.run([sys.executable, str(script), "--device", "cuda", "--rounds", "1", "--steps", "40"],
                          cwd=ROOT, capture_output=True, text=True, timeout=150)
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    report("runtime_overhead", "ok" if done.returncode == 0 else "FAIL", last)


print(f"check_device: {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""), flush=True)
sys.exit(1 if failed else 0)
