"""``dspark-lab doctor``: what this machine has, what DSpark Lab can use of it, and how to fix what is missing."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
from dataclasses import dataclass

from dspark_lab.plugins import Manager


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # "ok", "missing" (optional piece absent), "problem" (something is broken)
    detail: str
    hint: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status, "detail": self.detail, "hint": self.hint}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_torch() -> list[Check]:
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else ("HIP " + torch.version.hip if torch.version.hip
                                                                      else "CPU build")
    checks = [Check("torch", "ok", f"{torch.__version__} ({build})")]
    if torch.version.cuda:
        ok = torch.cuda.is_available()
        checks.append(Check("cuda", "ok" if ok else "missing",
                            f"{torch.cuda.device_count()} device(s)" if ok else "torch sees no CUDA device",
                            "" if ok else "install the NVIDIA driver, or ignore on a CPU machine"))
    else:
        checks.append(Check("cuda", "missing", "torch is a CPU build", "fine on a CPU machine; GPU runs need a CUDA "
                                                                       "build of torch"))
    return checks


def check_nvml() -> Check:
    try:
        import pynvml
    except ImportError:
        return Check("nvml", "missing", "nvidia-ml-py is not installed", "pip install 'dspark-lab[cuda]'")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return Check("nvml", "missing", f"NVML could not start: {exc}", "needs the NVIDIA driver; fine on a CPU machine")
    try:
        return Check("nvml", "ok", f"driver {pynvml.nvmlSystemGetDriverVersion()}, "
                                   f"{pynvml.nvmlDeviceGetCount()} GPU(s)")
    finally:
        pynvml.nvmlShutdown()


def check_cupy() -> Check:
    try:
        import cupy
    except ImportError:
        return Check("cupy", "missing", "cupy is not installed", "pip install 'dspark-lab[cuda]'")
    except Exception as exc:  # cupy raises more than ImportError when CUDA libraries are broken
        return Check("cupy", "problem", f"cupy failed to import: {exc}", "reinstall cupy-cuda12x")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return Check("cupy", "missing", f"{cupy.__version__} imports, cannot run: {str(exc).splitlines()[0]}",
                     "kernels fall back to their torch reference; needs an NVIDIA driver to run")
    return Check("cupy", "ok", f"{cupy.__version__}, {count} device(s)")


def check_nvcc() -> Check:
    path = shutil.which("nvcc")
    if not path:
        return Check("nvcc", "missing", "nvcc is not on PATH", "install the CUDA toolkit to compile-check kernels")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    release = next((line.strip() for line in out.splitlines() if "release" in line), out.strip()[:60])
    return Check("nvcc", "ok", f"{path}: {release}")


def check_jupyter() -> list[Check]:
    checks = []
    for dist in ("jupyterlab", "ipywidgets", "jupyter_bokeh", "ipykernel"):
        version = _version(dist)
        checks.append(Check(dist, "ok" if version else "missing", version or "not installed",
                            "" if version else "pip install 'dspark-lab[jupyter]'"))
    return checks


def check_plugins(manager: Manager) -> list[Check]:
    manager.backends()  # calling the discovery hooks surfaces plugins that raise
    manager.policies()
    checks = [Check(f"plugin {name}", "ok", "loaded") for name in manager.plugin_names()]
    checks += [Check(f"plugin {p.plugin}", "problem", f"skipped at {p.stage}: {p.reason}", p.hint)
               for p in manager.problems]
    return checks


def run_checks(manager: Manager) -> list[Check]:
    return [
        *check_torch(),
        Check("bokeh", "ok", _version("bokeh") or "?"),
        check_nvml(),
        check_cupy(),
        check_nvcc(),
        *check_jupyter(),
        *check_plugins(manager),
    ]
