"""NVIDIA backends: one per GPU family of ``data/gpu_parts.json`` (``nvidia-a100``, ``nvidia-h100``, ``nvidia-h200``,
``nvidia-gh200``, ``nvidia-b200``, ``nvidia-gb200``), plus ``nvidia-unlisted`` for a GPU the table does not know.

Availability is probed through NVML (the ``nvidia-ml-py`` package, ``[cuda]`` extra), never at import: a machine
without the driver gets an honest "not available" with the reason, not a crash. torch's own view
(``torch.cuda.is_available()``) is added to the reason.

A device is matched on its full NVML name (and its memory size where one name covers two SKUs), never on a
substring; the peak figures and their datasheet citations are in ``data/gpu_parts.json`` (see ``parts.py``). A GPU
that matches no entry makes ``nvidia-unlisted`` available, with a warning naming it, so a run is not silently
moved to the CPU backend and nothing plans on figures that belong to another part.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from dspark_lab import hookimpl
from dspark_lab.allocator import HostPool
from dspark_lab.backend import Availability, Backend, DeviceSpec, devices_sample
from dspark_lab.backends import parts
from dspark_lab.collectives import STANDARD_NAMES, make_standard

UNLISTED = "nvidia-unlisted"


@dataclass(frozen=True)
class _Model:
    backend: str
    part: str  # the part whose figures are the backend's spec
    spec: DeviceSpec


MODELS = tuple(_Model(name, part["part"], parts.spec(part)) for name, part in parts.backend_parts("nvidia-").items())
# the target each backend's device kernels are built for: its parts' compute capability (one per family)
KERNEL_ARCH = {name: part["cuda_arch"] for name, part in parts.backend_parts("nvidia-").items()}
H100 = next(m.spec for m in MODELS if m.backend == "nvidia-h100")
B200 = next(m.spec for m in MODELS if m.backend == "nvidia-b200")


def backend_of(name: str, memory_gb: float | None) -> str:
    """The backend an NVML device belongs to, or ``nvidia-unlisted``."""
    part = parts.lookup(name, memory_gb)
    return part["backend"] if part and part["backend"].startswith("nvidia-") else UNLISTED


def _nvml():
    """Import pynvml; raise ImportError with an install hint when nvidia-ml-py is missing."""
    try:
        import pynvml
    except ImportError as exc:
        raise ImportError("nvidia-ml-py is not installed (pip install 'dspark-lab[cuda]')") from exc
    return pynvml


def nvml_devices() -> list[tuple[int, str, float | None]]:
    """(index, name, memory GB) of every GPU NVML sees. Raises with a readable reason when NVML cannot start."""
    pynvml = _nvml()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise RuntimeError(f"NVML could not start ({exc}): no NVIDIA driver on this machine") from None
    try:
        return nvml_devices_open(pynvml)
    finally:
        pynvml.nvmlShutdown()


def _torch_view() -> str:
    import torch

    if torch.version.cuda is None:
        return "torch is a CPU build"
    return f"torch.cuda.is_available()={torch.cuda.is_available()}"


def make_probe(backend: str):
    def probe() -> Availability:
        try:
            devices = nvml_devices()
        except (ImportError, RuntimeError) as exc:
            return Availability.no(f"{exc}; {_torch_view()}")
        matching = [name for _, name, gb in devices if backend_of(name, gb) == backend]
        if backend == UNLISTED and matching:
            warnings.warn(f"NVIDIA GPU {matching[0]!r} is not in dspark_lab/backends/data/gpu_parts.json: its peak "
                          "figures are unknown (no planning or MFU for it); add an entry", stacklevel=2)
            return Availability.yes(len(matching), f"{len(matching)} x {matching[0]}, not in gpu_parts.json: "
                                                   f"peak figures unknown; {_torch_view()}")
        if not matching:
            seen = ", ".join(name for _, name, _ in devices) or "no GPUs"
            return Availability.no(f"no {backend} part among NVML devices ({seen}); {_torch_view()}")
        return Availability.yes(len(matching), f"{len(matching)} x {matching[0]}; {_torch_view()}")

    return probe


def make_sampler(backend: str):
    """An NVML sampler for the GPUs of this backend. NVML is started here, once, not at import."""
    pynvml = _nvml()
    pynvml.nvmlInit()
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i, name, gb in nvml_devices_open(pynvml)
               if backend_of(name, gb) == backend]

    def optional(fn, *args, scale=1.0):
        try:
            return fn(*args) * scale
        except pynvml.NVMLError:
            return None

    def sample() -> dict:
        devices = []
        for index, handle in enumerate(handles):
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append({
                "index": index,
                "name": backend,
                "utilization_pct": float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                "memory_used_gb": memory.used / 1e9,
                "memory_total_gb": memory.total / 1e9,
                "power_w": optional(pynvml.nvmlDeviceGetPowerUsage, handle, scale=1e-3),
                "temperature_c": optional(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU),
                # PCIe counters are in KB/s; NVLink counters need field queries not every driver answers.
                "link_tx_gb_s": optional(pynvml.nvmlDeviceGetPcieThroughput, handle,
                                         pynvml.NVML_PCIE_UTIL_TX_BYTES, scale=1e-6),
                "link_rx_gb_s": optional(pynvml.nvmlDeviceGetPcieThroughput, handle,
                                         pynvml.NVML_PCIE_UTIL_RX_BYTES, scale=1e-6),
            })
        return devices_sample(backend, devices)

    return sample


def nvml_devices_open(pynvml) -> list[tuple[int, str, float | None]]:
    """(index, name, memory GB) of every GPU, with NVML already started."""
    out = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        name = pynvml.nvmlDeviceGetName(handle)
        try:
            memory_gb = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 1e9
        except pynvml.NVMLError:
            memory_gb = None
        out.append((i, name.decode() if isinstance(name, bytes) else name, memory_gb))
    return out


def _model(backend) -> str | None:
    """The backend's name when it is one of ours."""
    return backend.name if backend.name == UNLISTED or any(m.backend == backend.name for m in MODELS) else None


@hookimpl
def dspark_register_backends():
    return [
        Backend(name=m.backend, vendor="nvidia", spec=m.spec, probe=make_probe(m.backend), torch_device="cuda")
        for m in MODELS
    ] + [Backend(name=UNLISTED, vendor="nvidia", spec=DeviceSpec(source="not in gpu_parts.json"),
                 probe=make_probe(UNLISTED), torch_device="cuda")]


@hookimpl
def dspark_collective_names(backend):
    return list(STANDARD_NAMES) if _model(backend) else None


@hookimpl
def dspark_make_collective(backend, name, group):
    return make_standard(name, group) if _model(backend) else None


@hookimpl
def dspark_make_allocator(backend, config):
    if not _model(backend):
        return None
    # Pinned host memory lets device-to-host offload copies run on a side stream without blocking.
    return HostPool(pinned=config.get("pinned", True), pool_mb=config.get("pool_mb", 4096))


@hookimpl
def dspark_device_sampler(backend):
    name = _model(backend)
    if name is None or not backend.availability().available:
        return None
    return make_sampler(name)


@hookimpl
def dspark_register_kernels(backend):
    arch = KERNEL_ARCH.get(backend.name)
    if arch is None:
        return None
    from dspark_lab.kernels.registry import builtin_kernels  # imports torch: only when kernels are listed

    return builtin_kernels(backend.name, arch)


# --- dspark-lab doctor: what the NVIDIA backends need on this machine ------------------------------------------


def _check(*args):
    from dspark_lab.doctor import Check

    return Check(*args)


def check_cuda():
    import torch

    if not torch.version.cuda:
        return _check("cuda", "missing", "torch is not a CUDA build",
                      "fine on a CPU machine; GPU runs need a CUDA build of torch")
    if torch.cuda.is_available():
        return _check("cuda", "ok", f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)")
    return _check("cuda", "missing", f"torch is built for CUDA {torch.version.cuda} but sees no device",
                  "install the NVIDIA driver, or ignore on a CPU machine")


def check_nvml():
    try:
        pynvml = _nvml()
    except ImportError:
        return _check("nvml", "missing", "nvidia-ml-py is not installed", "pip install 'dspark-lab[cuda]'")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return _check("nvml", "missing", f"NVML could not start: {exc}",
                      "needs the NVIDIA driver; fine on a CPU machine")
    try:
        return _check("nvml", "ok", f"driver {pynvml.nvmlSystemGetDriverVersion()}, "
                                    f"{pynvml.nvmlDeviceGetCount()} GPU(s)")
    finally:
        pynvml.nvmlShutdown()


def check_cupy():
    try:
        import cupy
    except ImportError:
        return _check("cupy", "missing", "cupy is not installed", "pip install 'dspark-lab[cuda]'")
    except Exception as exc:  # cupy raises more than ImportError when CUDA libraries are broken
        return _check("cupy", "problem", f"cupy failed to import: {exc}", "reinstall cupy-cuda12x")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return _check("cupy", "missing", f"{cupy.__version__} imports, cannot run: {str(exc).splitlines()[0]}",
                      "kernels fall back to their torch reference; needs an NVIDIA driver to run")
    return _check("cupy", "ok", f"{cupy.__version__}, {count} device(s)")


def check_nvcc():
    import shutil
    import subprocess

    path = shutil.which("nvcc")
    if not path:
        return _check("nvcc", "missing", "nvcc is not on PATH", "install the CUDA toolkit to compile-check kernels")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    release = next((line.strip() for line in out.splitlines() if "release" in line), out.strip()[:60])
    return _check("nvcc", "ok", f"{path}: {release}")


@hookimpl
def dspark_doctor_checks():
    return [check_cuda(), check_nvml(), check_cupy(), check_nvcc()]
