"""tests/gpu/check_device.sh on a machine without a CUDA device: one line that says so, exit 0, nothing installed."""

from __future__ import annotations

import os
import re
import py_compile
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "gpu" / "check_device.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: run the script itself")
def test_check_device_says_skipped_in_one_line_without_a_device(tmp_path):
    """Even where torch's import warns on stderr (an old NumPy): the probe reads only its last stdout line."""
    shim = tmp_path / "noisy"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nprint('UserWarning: NumPy 1.x\\nsecond', file=sys.stderr)\n")
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(shim)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        f"check_device: skipped: no CUDA device here (torch {torch.__version__} sees no CUDA device)"], done.stdout


def test_check_device_checks_compile():
    py_compile.compile(str(SCRIPT.with_suffix(".py")), doraise=True)


ROOT = SCRIPT.parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", [
    ["-m", "dspark_lab", "demo", "--device", "cuda"],
    [str(ROOT / "dspark_lab" / "examples" / "demo_train.py"), "--device", "cuda", "--steps", "1"],
    [str(ROOT / "benchmarks" / "runtime_overhead.py"), "--device", "cuda"],
], ids=["demo", "demo_train", "runtime_overhead"])
def test_cuda_paths_refuse_in_one_line_without_a_device(command, tmp_path):
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DSPARK_HOME": str(tmp_path)})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "--device: cuda: " in lines[0] and "no CUDA device" in lines[0]


def test_demo_phase_summary_takes_the_allocator_peak_only_from_steps_every_rank_read():
    from dspark_lab.runtime.demo import summarize

    metrics = [{"step": s, "rank": 0, "step_time_s": 0.1, "peak_activation_bytes": 2**20, "comm_s": None,
                "loss": 1.0, "memory_peak_bytes": (3 * 2**20 if s != 3 else None)} for s in (1, 2, 3, 4)]
    row = summarize(metrics, 1, 5, {s: 1.0 for s in (1, 2, 3, 4)})
    assert row["allocator_peak_mb"] == 3.0 and row["loss_deviation"] == 0.0 and row["steps"] == 4
    no_reads = [{**m, "memory_peak_bytes": None} for m in metrics]
    assert summarize(no_reads, 1, 5, {})["allocator_peak_mb"] is None


# --- the checks as a GPU machine would run them, simulated: torch.cuda.is_available() forced True --------------

CHECKER = SCRIPT.with_suffix(".py")
LINE = r"^check \w+: (ok|FAIL|skipped): \S.*$|^check_device: (\d+ failed.*|skipped: .+|FAIL: .+)$"


# Patches torch as it is imported rather than importing it at startup: most Pythons started here (pip, the checker's
# refusals, launchers) never need torch, and its import costs seconds of CPU each.
FAKE_CUDA = """\
import sys
from importlib.machinery import PathFinder


class FakeCuda:
    @staticmethod
    def find_spec(name, path=None, target=None):
        spec = PathFinder.find_spec(name, path) if name == "torch" else None
        if spec is not None:
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                module.cuda.is_available = lambda: True

            spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, FakeCuda)
"""


def fake_cuda_env(tmp_path, *, modules: dict[str, str] | None = None, budget: int | None = None) -> dict:
    """An environment whose Pythons believe a CUDA device exists (a sitecustomize patches torch when it is imported),
    with ``modules`` (name -> source) shadowing installed ones, e.g. one that fails to import."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(FAKE_CUDA)
    for name, source in (modules or {}).items():
        (shim / f"{name}.py").write_text(source)
    env = {**os.environ, "DSPARK_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), str(ROOT), os.environ.get("PYTHONPATH")]))}
    if budget is not None:
        env["DSPARK_CHECK_BUDGET_S"] = str(budget)
    return env


def run_checker(env, *checks, timeout=120) -> tuple[subprocess.CompletedProcess, list[str]]:
    done = subprocess.run([sys.executable, str(CHECKER), *checks], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    lines = done.stdout.strip().splitlines()
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    bad = [line for line in lines if not re.match(LINE, line)]
    assert not bad, done.stdout
    return done, lines


@pytest.fixture(scope="module")
def every_check(tmp_path_factory):
    """One run of every check on the fake machine, each failing or skipped; shared, as it takes a minute or more."""
    start = time.monotonic()
    done, lines = run_checker(fake_cuda_env(tmp_path_factory.mktemp("every"), budget=100), timeout=200)
    return done, lines, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_checks_on_a_broken_cuda_machine_each_say_fail_or_skipped_in_one_line(every_check):
    done, lines, _ = every_check
    status = {line.split(":")[0].split()[1]: line.split(": ")[1] for line in lines[:-1]}
    assert list(status) == ["backend", "nvml_sampler", "gpu_tests", "kernel_tests", "kernel_bandwidth", "demo_on_gpu",
                            "live_profile", "runtime_overhead", "allocator_model"], lines
    assert status["backend"] == "FAIL"  # torch has no CUDA build here: get_device_name raises, in one line
    # cupy cannot reach a GPU here: the kernel checks are skipped with that reason, not failed
    assert status["kernel_tests"] == status["kernel_bandwidth"] == "skipped", lines
    assert "no device path for the kernels" in lines[3]
    assert lines[-1].startswith("check_device: ") and "failed (backend" in lines[-1] and done.returncode == 1


@pytest.mark.slow  # every check, each failing on a machine whose CUDA is fake: bounded by the budget
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_every_check_ends_in_one_line_within_the_budget(every_check):
    done, lines, took = every_check
    assert took < 100 + 20, lines
    assert len(lines) == 10 and lines[-1].startswith("check_device: ") and done.returncode == 1, lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_missing_dependency_is_one_fail_line(tmp_path):
    env = fake_cuda_env(tmp_path, modules={"pluggy": "raise ModuleNotFoundError(\"No module named 'pluggy'\")"})
    done, lines = run_checker(env)
    assert lines == ["check import: FAIL: ModuleNotFoundError: No module named 'pluggy' (install the project and "
                     "its dependencies: pip install -e .)", "check_device: 1 failed (import)"]
    assert done.returncode == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_missing_pytest_skips_the_test_checks_and_an_empty_budget_skips_the_rest(tmp_path):
    env = fake_cuda_env(tmp_path, modules={"pytest": "raise ModuleNotFoundError(\"No module named 'pytest'\")"})
    done, lines = run_checker(env, "gpu_tests")
    assert lines[0] == "check gpu_tests: skipped: pytest is not installed (the project's dev extra)", lines
    done, lines = run_checker(fake_cuda_env(tmp_path, budget=0))
    assert len(lines) == 10 and all(line.endswith("skipped: out of the time budget (0 s)") for line in lines[:-1])
    assert lines[-1] == "check_device: 0 failed" and done.returncode == 0


def test_unknown_check_and_bad_budget_are_refused_in_one_line(tmp_path):
    env = fake_cuda_env(tmp_path)
    done, lines = run_checker(env, "bakend")
    assert len(lines) == 1 and lines[0].startswith("check_device: FAIL: unknown check 'bakend'; allowed: backend |")
    env["DSPARK_CHECK_BUDGET_S"] = "soon"
    done, lines = run_checker(env)
    assert lines == ["check_device: FAIL: DSPARK_CHECK_BUDGET_S: 'soon' is not allowed; allowed: seconds in [0, 290]"]
    assert done.returncode == 2


PIP_OK = "import sys\nif '--version' in sys.argv:\n    print('pip 0 (shim)')\n"
PIP_OFFLINE = PIP_OK + ("else:\n    print('ERROR: Could not find a version that satisfies the requirement "
                        "setuptools>=68')\n    sys.exit(1)\n")
TORCH_STUB = "__version__ = '0 (stub)'\n\n\nclass cuda:\n    is_available = staticmethod(lambda: True)\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("pip", ["ok", "offline"])
def test_the_script_on_a_cuda_machine_installs_then_runs_the_named_checks(tmp_path, pip):
    """The whole shell script past its probe, with pip shadowed (the project is already installed here)."""
    # offline, nothing past the probe imports torch: a stub answers the probe without the real import's cost
    modules = {"pip": PIP_OK} if pip == "ok" else {"pip": PIP_OFFLINE, "torch": TORCH_STUB}
    env = fake_cuda_env(tmp_path, modules=modules)
    done = subprocess.run(["bash", str(SCRIPT), "backend"], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHON": sys.executable})
    lines = done.stdout.strip().splitlines()
    assert "Traceback" not in done.stdout + done.stderr and done.returncode == 1, done.stdout + done.stderr
    if pip == "offline":
        assert lines == ["check install: FAIL: pip install --no-deps -e . (ERROR: Could not find a version that "
                         "satisfies the requirement setuptools>=68; offline, the build needs setuptools>=68 "
                         "installed)"]
        return
    import dspark_lab

    assert lines[0] == f"check install: ok: {dspark_lab.__version__} over torch {torch.__version__}"
    assert lines[1].startswith("check backend: FAIL: ") and lines[2] == "check_device: 1 failed (backend)", lines
