"""The AMD backend: ``amd-mi300x``.

Availability is probed with AMD SMI (the ``amdsmi`` Python bindings shipped with ROCm) or, failing that, the
``rocm-smi`` command; neither is touched at import.

Peak figures (dense, per GPU, from the AMD Instinct MI300X data sheet) are in ``data/gpu_parts.json``. The link
graph (``dspark_topology``) is read from ``amd-smi topology`` or ``rocm-smi --showtopo`` and parsed by
:func:`dspark_lab.backends.topology.smi_topology`.
"""

from __future__ import annotations

import shutil
import subprocess

from dspark_lab import hookimpl
from dspark_lab.allocator import HostPool
from dspark_lab.backend import Availability, Backend, devices_sample
from dspark_lab.backends import parts
from dspark_lab.backends.topology import smi_topology
from dspark_lab.collectives import STANDARD_NAMES, make_standard

NAME = "amd-mi300x"
MARKER = "MI300X"
MI300X = parts.spec(parts.backend_parts("amd-")[NAME])


def _amdsmi():
    try:
        import amdsmi
    except ImportError:
        return None
    return amdsmi


def device_names() -> list[str]:
    """Names of the AMD GPUs present. Raises RuntimeError with the reason when neither tool can tell."""
    amdsmi = _amdsmi()
    if amdsmi is not None:
        try:
            amdsmi.amdsmi_init()
        except Exception as exc:
            raise RuntimeError(f"amdsmi could not start ({exc}): no ROCm driver on this machine") from None
        try:
            return [amdsmi.amdsmi_get_gpu_asic_info(h).get("market_name", "")
                    for h in amdsmi.amdsmi_get_processor_handles()]
        finally:
            amdsmi.amdsmi_shut_down()
    if shutil.which("rocm-smi"):
        try:
            out = subprocess.run(["rocm-smi", "--showproductname"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"rocm-smi failed: {exc}") from None
        # "Card series" in older rocm-smi, "Card Series" in newer (ROCm 6): match either.
        return [line.split(":", 2)[-1].strip() for line in out.stdout.splitlines() if "card series" in line.lower()]
    raise RuntimeError("neither amdsmi (ROCm's Python bindings) nor rocm-smi is installed")


def _torch_view() -> str:
    import torch

    return "torch is not a ROCm build" if torch.version.hip is None else f"torch HIP {torch.version.hip}"


def probe() -> Availability:
    try:
        names = device_names()
    except RuntimeError as exc:
        return Availability.no(f"{exc}; {_torch_view()}")
    matching = [n for n in names if MARKER in n]
    if not matching:
        return Availability.no(f"no {MARKER} among AMD devices ({', '.join(names) or 'none'}); {_torch_view()}")
    return Availability.yes(len(matching), f"{len(matching)} x {matching[0]}; {_torch_view()}")


def make_sampler():
    """An amdsmi sampler (activity, VRAM, power, temperature); amdsmi is started here, once."""
    amdsmi = _amdsmi()
    if amdsmi is None:
        return None
    amdsmi.amdsmi_init()
    handles = amdsmi.amdsmi_get_processor_handles()

    def optional(fn, *args):
        try:
            return fn(*args)
        except Exception:
            return None

    def sample() -> dict:
        devices = []
        for index, handle in enumerate(handles):
            vram = amdsmi.amdsmi_get_gpu_vram_usage(handle)
            power = optional(amdsmi.amdsmi_get_power_info, handle) or {}
            devices.append({
                "index": index,
                "name": NAME,
                "utilization_pct": float(amdsmi.amdsmi_get_gpu_activity(handle)["gfx_activity"]),
                "memory_used_gb": vram["vram_used"] / 1e3,  # amdsmi reports MB
                "memory_total_gb": vram["vram_total"] / 1e3,
                "power_w": power.get("average_socket_power"),
                "temperature_c": optional(amdsmi.amdsmi_get_temp_metric, handle,
                                          amdsmi.AmdSmiTemperatureType.HOTSPOT,
                                          amdsmi.AmdSmiTemperatureMetric.CURRENT),
            })
        return devices_sample(NAME, devices)

    return sample


@hookimpl
def dspark_register_backends():
    return [Backend(name=NAME, vendor="amd", spec=MI300X, probe=probe, torch_device="cuda")]


@hookimpl
def dspark_collective_names(backend):
    return list(STANDARD_NAMES) if backend.name == NAME else None


@hookimpl
def dspark_make_collective(backend, name, group):
    return make_standard(name, group) if backend.name == NAME else None


@hookimpl
def dspark_make_allocator(backend, config):
    if backend.name != NAME:
        return None
    return HostPool(pinned=config.get("pinned", True), pool_mb=config.get("pool_mb", 4096))


@hookimpl
def dspark_device_sampler(backend):
    if backend.name != NAME or not backend.availability().available:
        return None
    return make_sampler()


def topology_text() -> str | None:
    """The output of ``amd-smi topology`` or, failing that, ``rocm-smi --showtopo``; None if neither runs."""
    for command in (["amd-smi", "topology"], ["rocm-smi", "--showtopo"]):
        if not shutil.which(command[0]):
            continue
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout
    return None


@hookimpl
def dspark_topology(backend, devices):
    if backend.name != NAME or not backend.availability().available:
        return None
    text = topology_text()
    return None if text is None else smi_topology(text, list(devices))


def doctor_checks() -> list:
    """torch's ROCm (HIP) build and the AMD driver, through amdsmi or rocm-smi."""
    import torch

    from dspark_lab.doctor import Check

    if torch.version.hip:
        checks = [Check("rocm", "ok", f"torch HIP {torch.version.hip}")]
    else:
        checks = [Check("rocm", "missing", "torch is not a ROCm build",
                        "fine without AMD GPUs; MI300X runs need torch built for ROCm")]
    try:
        names = device_names()
    except RuntimeError as exc:
        checks.append(Check("amd driver", "missing", str(exc), "install ROCm (amdsmi) on an AMD GPU machine"))
    else:
        checks.append(Check("amd driver", "ok", f"{len(names)} AMD GPU(s): {', '.join(names) or 'none'}"))
    return checks


@hookimpl
def dspark_doctor_checks():
    return doctor_checks()
