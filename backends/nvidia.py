"""NVIDIA backends: ``nvidia-h100`` and ``nvidia-b200``.

Availability is probed through NVML (the ``nvidia-ml-py`` package, ``[cuda]`` extra), never at import: a machine
without the driver gets an honest "not available" with the reason, not a crash. torch's own view
(``torch.cuda.is_available()``) is added to the reason.

Peak figures are dense (without 2:4 sparsity), per GPU:
- H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet (2023): BF16 989.4 TFLOP/s, FP8 1978.9, TF32 494.7, FP32 66.9;
  80 GB HBM3 at 3.35 TB/s; NVLink 4 at 900 GB/s bidirectional, so 450 GB/s per direction.
- B200: NVIDIA HGX B200 datasheet (2024), 8-GPU figures with sparsity divided by 8 and by 2 for dense: BF16 2250,
  FP8 4500, FP4 9000, TF32 1125; 180 GB HBM3e at 8 TB/s; NVLink 5 at 1.8 TB/s bidirectional, 900 GB/s per direction.
"""

from __future__ import annotations

from dataclasses import dataclass

from dspark_lab import hookimpl
from dspark_lab.allocator import HostPool
from dspark_lab.backend import Availability, Backend, DeviceSpec
from dspark_lab.collectives import STANDARD_NAMES, make_standard

H100 = DeviceSpec(
    bf16_tflops=989.4, fp8_tflops=1978.9, tf32_tflops=494.7, fp32_tflops=66.9,
    memory_gb=80, memory_bandwidth_gb_s=3350, link_gb_s=450, link="NVLink 4",
    source="NVIDIA H100 Tensor Core GPU datasheet, SXM5 column, dense",
)
B200 = DeviceSpec(
    bf16_tflops=2250, fp8_tflops=4500, fp4_tflops=9000, tf32_tflops=1125,
    memory_gb=180, memory_bandwidth_gb_s=8000, link_gb_s=900, link="NVLink 5",
    source="NVIDIA HGX B200 datasheet, per GPU, dense",
)


@dataclass(frozen=True)
class _Model:
    backend: str
    marker: str  # substring of the NVML device name
    spec: DeviceSpec


MODELS = (_Model("nvidia-h100", "H100", H100), _Model("nvidia-b200", "B200", B200))


def _nvml():
    """Import pynvml; raise ImportError with an install hint when nvidia-ml-py is missing."""
    try:
        import pynvml
    except ImportError as exc:
        raise ImportError("nvidia-ml-py is not installed (pip install 'dspark-lab[cuda]')") from exc
    return pynvml


def nvml_devices() -> list[tuple[int, str]]:
    """(index, name) of every GPU NVML sees. Raises with a readable reason when NVML cannot start."""
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


def make_probe(model: _Model):
    def probe() -> Availability:
        try:
            devices = nvml_devices()
        except (ImportError, RuntimeError) as exc:
            return Availability.no(f"{exc}; {_torch_view()}")
        matching = [name for _, name in devices if model.marker in name]
        if not matching:
            seen = ", ".join(name for _, name in devices) or "no GPUs"
            return Availability.no(f"no {model.marker} among NVML devices ({seen}); {_torch_view()}")
        return Availability.yes(len(matching), f"{len(matching)} x {matching[0]}; {_torch_view()}")

    return probe


def make_sampler(model: _Model):
    """An NVML sampler for the GPUs of this model. NVML is started here, once, not at import."""
    pynvml = _nvml()
    pynvml.nvmlInit()
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i, name in nvml_devices_open(pynvml) if model.marker in name]

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
                "name": model.backend,
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
        n = max(len(devices), 1)
        return {
            "backend": model.backend,
            "utilization_pct": sum(d["utilization_pct"] for d in devices) / n,
            "memory_used_gb": sum(d["memory_used_gb"] for d in devices),
            "memory_total_gb": sum(d["memory_total_gb"] for d in devices),
            "devices": devices,
        }

    return sample


def nvml_devices_open(pynvml) -> list[tuple[int, str]]:
    """(index, name) of every GPU, with NVML already started."""
    out = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
        out.append((i, name.decode() if isinstance(name, bytes) else name))
    return out


def _model(backend) -> _Model | None:
    return next((m for m in MODELS if m.backend == backend.name), None)


@hookimpl
def dspark_register_backends():
    return [
        Backend(name=m.backend, vendor="nvidia", spec=m.spec, probe=make_probe(m), torch_device="cuda")
        for m in MODELS
    ]


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
    model = _model(backend)
    if model is None or not backend.availability().available:
        return None
    return make_sampler(model)


@hookimpl
def dspark_register_kernels(backend):
    arch = {"nvidia-h100": "sm_90", "nvidia-b200": "sm_100"}.get(backend.name)
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
