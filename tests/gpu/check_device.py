"""The checks behind tests/gpu/check_device.sh, one line each: ``check NAME: ok|FAIL|skipped: detail``.

Run on a machine with a CUDA device after the project is installed; exits 1 if any check failed, 0 with one
"skipped" line when there is no device. Each check is independent: one that raises is reported as FAIL in one line
and the rest still run; what the machine lacks (cupy or NVRTC, nvidia-ml-py, pytest) makes the checks that need it
"skipped", with why. All of them share one time budget (``DSPARK_CHECK_BUDGET_S``, default :data:`BUDGET_S`; the
shell script passes what is left of its 5 minutes): a check that would start without enough of it left is skipped,
and a subprocess still running at the end of its share is killed with its process group.

    python tests/gpu/check_device.py [CHECK ...]     # all checks, or only the named ones
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "dspark_lab" / "examples" / "demo_train.py"
BUDGET_S, BUDGET_MAX_S = 265, 290
DEADLINE = time.monotonic() + BUDGET_S
failed: list[str] = []
CHECKS: list = []


class Skip(Exception):
    """A check that cannot run on this machine (or in the time left): reported as skipped with the reason."""


def time_left(want: float) -> float:
    """Seconds a check may take: ``want``, or what is left of the budget; raises :class:`Skip` under 10 s."""
    left = DEADLINE - time.monotonic() - 5
    if left < 10:
        raise Skip(f"out of the time budget ({BUDGET_S} s)")
    return min(want, left)


def report(name: str, status: str, detail: str) -> None:
    if status == "FAIL":
        failed.append(name)
    detail = " ".join(detail.split())
    print(f"check {name}: {status}: {detail if len(detail) <= 600 else detail[:597] + '...'}", flush=True)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def check(fn):
    CHECKS.append(fn)
    return fn


def run_check(fn) -> None:
    try:
        time_left(1)
        fn()
    except Skip as why:
        report(fn.__name__, "skipped", str(why))
    except Exception as exc:  # one broken check must not hide the others
        report(fn.__name__, "FAIL", one_line(exc))


def run(command: list[str], want_s: float, env=None) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group for at most its share of the budget; on timeout the whole group
    (torchrun's workers too) is killed and TimeoutError names the command."""
    timeout = time_left(want_s)
    process = subprocess.Popen(command, cwd=ROOT, env=env or os.environ, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise TimeoutError(f"{' '.join(Path(c).name for c in command[:4])} ran over {timeout:.0f} s") from None
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def needs_module(name: str, hint: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise Skip(f"{name} is not installed ({hint})")


def cuda_backend():
    from dspark_lab.plugins import get_manager

    manager = get_manager()
    found = [b for b in manager.backends() if b.torch_device == "cuda" and b.availability().available]
    return manager, (found[0] if found else None)


@check
def backend():
    import torch

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
    needs_module("pynvml", "pip install nvidia-ml-py")
    manager, chosen = cuda_backend()
    if chosen is None:
        raise Skip("no CUDA backend")
    sample = manager.device_sampler(chosen)
    values = sample() if sample else None
    if not values or "error" in values:
        report("nvml_sampler", "FAIL", f"sampler returned {values!r}"[:300])
        return
    devices = values.get("devices") or []
    first = devices[0] if devices else {}
    report("nvml_sampler", "ok", f"{len(devices)} device(s); first: " + json.dumps(first, default=str)[:200])


def _pytest_gpu(files: list[str], want_s: float) -> tuple[bool, str]:
    """Run the gpu-marked tests of ``files``; (passed with none skipped, pytest's summary line)."""
    needs_module("pytest", "the project's dev extra")
    done = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files], want_s,
               env={**os.environ, "DSPARK_GPU_TESTS": "1"})
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    missing = re.search(r"No module named '?([\w.]+)'?", done.stdout + done.stderr)
    if missing and not re.search(r"\d+ (passed|failed)", summary):  # pytest or a test's dependency is missing
        raise Skip(f"{missing.group(1)} is not installed (the project's dev extra)")
    return done.returncode == 0 and bool(re.search(r"\d+ passed", summary)) and "skipped" not in summary, summary


@check
def gpu_tests():
    ok, summary = _pytest_gpu(["tests/test_offload.py", "tests/test_step_reading_moe.py"], 90)
    report("gpu_tests", "ok" if ok else "FAIL", "gpu-marked runtime tests (offload frees the offloaded bytes at "
           f"the backward peak; the MoE load record needs no host sync): {summary}")


def _device_path() -> None:
    from dspark_lab.kernels import cuda

    status = cuda.cupy_status()
    if not status.ok:
        raise Skip(f"no device path for the kernels: {status.reason}")


@check
def kernel_tests():
    _device_path()
    ok, summary = _pytest_gpu(["tests/test_kernels.py"], 60)
    report("kernel_tests", "ok" if ok else "FAIL",
           f"gpu-marked kernel tests (bit-exact vs the CPU references): {summary}")


def _time_cuda(fn, repeats: int = 20) -> float:
    import torch

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
    import torch

    from dspark_lab.kernels import flatten_scale, fp8_quantize, reference

    _device_path()
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


def _cli(*args: str, want_s: float) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dspark_lab", *args], want_s)


def _why(text: str) -> str:
    """The line of a log that says why: the first exception raised (a worker's, not torchrun's ChildFailedError
    that follows it), else the last line naming an error, else the last with words in it."""
    lines = [line.strip() for line in text.splitlines() if re.search(r"\w", line)]
    raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line) and "ChildFailedError" not in line]
    errors = [line for line in lines if re.search(r"error|Error|FAIL", line)]
    return (raised[:1] or errors[-1:] or lines[-1:] or ["no output"])[0][:300]


def _last_line(done: subprocess.CompletedProcess) -> str:
    line = _why(done.stderr) if done.stderr.strip() else _why(done.stdout or f"exit {done.returncode}")
    log = re.search(r"see (\S+output\.log)", line)  # a run's log named by the error: add its cause
    if log and Path(log.group(1)).exists():
        line += f" ({_why(Path(log.group(1)).read_text(errors='replace'))})"
    return line


LOSSLESS = ("baseline", "checkpoint every block", "offload host")


@check
def demo_on_gpu():
    """One-GPU demo: checkpointing and both offload modes switched live; the allocator's peak and the losses."""
    done = _cli("demo", "--quick", "--device", "cuda", "--json", want_s=110)
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

    deadline = time.monotonic() + time_left(40)
    job = commands.launch(DEMO, ["--device", "cuda", "--steps", "20000", "--step-sleep", "0.01"], nproc=1,
                          name="gpu-profile")
    try:
        while not any(m["step"] >= 3 for m in job.run_dir.metrics()):
            if job.poll() is not None or time.monotonic() > deadline:
                log = job.run_dir.path / "output.log"
                why = _why(log.read_text(errors="replace")) if log.exists() else "no output"
                report("live_profile", "FAIL", f"the cuda demo did not reach step 3 ({why}; {log})")
                return
            time.sleep(0.5)
        done = _cli("profile", job.id, "--steps", "2", "--wait", "--timeout", "60", "--json", want_s=80)
        if done.returncode != 0:
            report("live_profile", "FAIL", f"profile: {_last_line(done)}")
            return
        files = json.loads(done.stdout).get("files") or []
        if not files:
            report("live_profile", "FAIL", "profile wrote no trace")
            return
        done = _cli("trace", "analyze", *files, "--json", want_s=40)
        if done.returncode != 0:
            report("live_profile", "FAIL", f"trace analyze: {_last_line(done)}")
            return
        rank = json.loads(done.stdout)["ranks"][0]
        ok = rank["timeline"] == "device" and rank["compute_ms"] > 0
        report("live_profile", "ok" if ok else "FAIL", f"{len(files)} trace(s); timeline {rank['timeline']}, compute "
               f"{rank['compute_ms']:.2f} ms, idle {rank['idle_ms']:.2f} ms over {rank['span_ms']:.2f} ms")
    finally:
        _end(job)


def _end(job) -> None:
    """Stop the background demo at a step boundary if it answers, else kill its session (the launcher, torchrun
    and the worker: launch starts it with ``start_new_session``)."""
    from dspark_lab.runtime import commands

    if job.poll() is None:
        try:
            commands.stop(job.id, timeout=15)
        except Exception:
            pass
    if job.poll() is None:
        try:
            os.killpg(job.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.process.wait(10)


@check
def runtime_overhead():
    script = ROOT / "benchmarks" / "runtime_overhead.py"
    done = run([sys.executable, str(script), "--device", "cuda", "--job", "ddp", "--rounds", "1", "--steps", "40"],
               90)
    lines = done.stdout.strip().splitlines()
    wanted = [l.split("] ", 1)[-1] for l in lines if "ratio dspark/torchrun" in l or "runtime's own work" in l]
    report("runtime_overhead", "ok" if done.returncode == 0 and len(wanted) == 2 else "FAIL",
           " | ".join(wanted) or _last_line(done))


@check
def allocator_model():
    """The planner's caching-allocator model against PyTorch's allocator on the same traces (torchtitan's rows):
    the reserved peaks must agree within 5%."""
    script = ROOT / "benchmarks" / "allocator_replay.py"
    done = run([sys.executable, str(script), "--device", "cuda", "--json"], 120)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    ratios = [r["reserved_ratio"] for r in rows if "reserved_ratio" in r]
    if done.returncode != 0 or not ratios:
        report("allocator_model", "FAIL", _last_line(done))
        return
    parts = [f"{r['row']}: model {r['model']['reserved'] / 1e9:.2f} GB vs cuda "
             + (f"{r['cuda']['reserved'] / 1e9:.2f} GB (x{r['reserved_ratio']:.3f})" if "reserved_ratio" in r
                else str(r["cuda"])) for r in rows]
    report("allocator_model", "ok" if all(abs(x - 1) <= 0.05 for x in ratios) else "FAIL", "; ".join(parts))


def preflight() -> str | None:
    """Why no check can run here (one line), or None. Prints nothing."""
    try:
        import torch
    except Exception as exc:
        return f"skipped: torch cannot be imported ({one_line(exc)})"
    try:
        available = torch.cuda.is_available()
    except Exception as exc:
        available, why = False, one_line(exc)
    else:
        why = f"torch {torch.__version__} sees no CUDA device"
    if not available:
        return f"skipped: no CUDA device here ({why})"
    return None


def main(argv: list[str] | None = None) -> int:
    global DEADLINE, BUDGET_S
    names = list(sys.argv[1:] if argv is None else argv)
    known = {fn.__name__: fn for fn in CHECKS}
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"check_device: FAIL: unknown check {unknown[0]!r}; allowed: {' | '.join(known)}", flush=True)
        return 2
    text = os.environ.get("DSPARK_CHECK_BUDGET_S", "").strip() or str(BUDGET_S)
    try:
        BUDGET_S = max(0, min(int(float(text)), BUDGET_MAX_S))
    except ValueError:
        print(f"check_device: FAIL: DSPARK_CHECK_BUDGET_S: {text!r} is not allowed; allowed: seconds in "
              f"[0, {BUDGET_MAX_S}]", flush=True)
        return 2
    DEADLINE = time.monotonic() + BUDGET_S
    refusal = preflight()
    if refusal:
        print(f"check_device: {refusal}", flush=True)
        return 0
    home = None
    if not os.environ.get("DSPARK_HOME"):  # the checks' runs go to a home of their own, removed at the end
        home = tempfile.TemporaryDirectory(prefix="dspark-gpu-check-", ignore_cleanup_errors=True)
        os.environ["DSPARK_HOME"] = home.name
    try:
        import dspark_lab.kernels  # noqa: F401  (installed under dspark_lab: the project must be installed)
        import dspark_lab.plugins  # noqa: F401
    except Exception as exc:
        report("import", "FAIL", f"{one_line(exc)} (install the project and its dependencies: pip install -e .)")
    else:
        for fn in CHECKS:
            if not names or fn.__name__ in names:
                run_check(fn)
    finally:
        if home is not None:
            home.cleanup()
    print(f"check_device: {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
