"""The ``cpu`` backend: the host processor, always present.

Peak FP32 throughput is derived from /proc/cpuinfo: physical cores x clock x FLOPs per cycle (hyper-threads share
one core's vector units, so logical cores would double-count). FLOPs per cycle come from the FMA width the flags
prove: AVX2+FMA cores (Haswell and Zen 2 onwards) have two 256-bit FMA pipes, 32 FLOPs; AVX-512 parts have one or
two 512-bit pipes, which no flag tells apart, so one is assumed (32; a part with two reaches 64); without FMA, SSE's
separate add and multiply give 8. The ``source`` field says which rule was used.
"""

from __future__ import annotations

import os
import platform

import psutil

from dspark_lab import hookimpl
from dspark_lab.allocator import HostPool
from dspark_lab.backend import Availability, Backend, DeviceSpec
from dspark_lab.collectives import STANDARD_NAMES, make_standard

NAME = "cpu"


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def flops_per_cycle(flags: set[str]) -> int:
    """FP32 FLOPs per cycle per physical core that the CPU flags prove (an FMA counts two FLOPs)."""
    if "avx512f" in flags:
        return 2 * 16 * 1  # 16 lanes, one 512-bit FMA pipe assumed (flags cannot show a second)
    if "avx2" in flags and "fma" in flags:
        return 2 * 8 * 2  # 8 lanes, two 256-bit FMA pipes
    return 8  # SSE: one 4-wide add and one 4-wide multiply per cycle


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or os.cpu_count() or 1


def _fma_rule(flags: set[str]) -> str:
    if "avx512f" in flags:
        return "AVX-512, one 512-bit FMA pipe assumed"
    if "avx2" in flags and "fma" in flags:
        return "AVX2+FMA, two 256-bit FMA pipes"
    return "no FMA flag, SSE"


def derive_spec() -> DeviceSpec:
    info = _cpuinfo()
    cores = physical_cores()
    mhz = float(info.get("cpu MHz", 0) or 0)
    freq = psutil.cpu_freq() if hasattr(psutil, "cpu_freq") else None
    if freq and freq.max:
        mhz = max(mhz, freq.max)
    flags = set(info.get("flags", "").split())
    peak = cores * mhz * 1e6 * flops_per_cycle(flags) / 1e12 if mhz else None
    return DeviceSpec(
        fp32_tflops=round(peak, 3) if peak else None,
        memory_gb=round(psutil.virtual_memory().total / 1e9, 2),
        cores=cores,
        link="loopback",
        source=f"derived from /proc/cpuinfo ({info.get('model name', platform.processor()) or 'unknown CPU'}: "
               f"{cores} physical cores, {_fma_rule(flags)}) and /proc/meminfo",
    )


def probe() -> Availability:
    return Availability.yes(devices=1, reason=f"{psutil.cpu_count(logical=True)} logical cores")


def sample() -> dict:
    """Live CPU metrics: per-core utilization since the last call, memory, and this process's RSS."""
    per_core = psutil.cpu_percent(percpu=True)
    memory = psutil.virtual_memory()
    return {
        "backend": NAME,
        "utilization_pct": sum(per_core) / max(len(per_core), 1),
        "memory_used_gb": (memory.total - memory.available) / 1e9,
        "memory_total_gb": memory.total / 1e9,
        "process_rss_gb": psutil.Process().memory_info().rss / 1e9,
        "devices": [{"index": i, "name": f"core {i}", "utilization_pct": pct} for i, pct in enumerate(per_core)],
    }


@hookimpl
def dspark_register_backends():
    return [Backend(name=NAME, vendor="generic", spec=derive_spec(), probe=probe, torch_device="cpu")]


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
    # Pinning needs a CUDA driver and buys nothing without a device to copy to.
    return HostPool(pinned=False, pool_mb=config.get("pool_mb", 1024))


@hookimpl
def dspark_device_sampler(backend):
    if backend.name != NAME:
        return None
    psutil.cpu_percent(percpu=True)  # prime: the first reading of cpu_percent is meaningless
    return sample


@hookimpl
def dspark_register_kernels(backend):
    if backend.name != NAME:
        return None
    from dspark_lab.kernels.registry import builtin_kernels  # imports torch: only when kernels are listed

    return builtin_kernels(NAME)
