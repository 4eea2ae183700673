"""The types a backend plugin hands to the core: a :class:`Backend` with its :class:`DeviceSpec` and a probe.

A *backend* is a kind of device (``cpu``, ``nvidia-h100``, ...). The core never names one; it only sees these
objects, returned by plugins from the ``dspark_register_backends`` hook.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceSpec:
    """Peak figures of one device, each key carrying its unit. ``None`` means the vendor publishes no figure.

    Throughputs are dense (no sparsity), per device. Link bandwidth (scale-up ``link_gb_s``, scale-out
    ``scale_out_gb_s``) is per direction.
    """

    bf16_tflops: float | None = None
    fp8_tflops: float | None = None
    fp4_tflops: float | None = None
    tf32_tflops: float | None = None
    fp32_tflops: float | None = None
    memory_gb: float | None = None
    memory_bandwidth_gb_s: float | None = None
    link_gb_s: float | None = None
    link: str | None = None
    scale_out_gb_s: float | None = None  # the GPU's share of the node's network, per direction
    tdp_w: float | None = None
    cores: int | None = None
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Availability:
    """The answer of a backend's probe: is its device really present here, and if not, why."""

    available: bool
    reason: str = ""
    devices: int = 0

    @classmethod
    def yes(cls, devices: int = 1, reason: str = "") -> "Availability":
        return cls(True, reason, devices)

    @classmethod
    def no(cls, reason: str) -> "Availability":
        return cls(False, reason, 0)


@dataclass(kw_only=True, slots=True)
class Backend:
    """A device kind registered by a plugin.

    ``probe`` is called lazily (never at import) and must not raise: it returns an :class:`Availability`.
    ``torch_device`` is the torch device type the runtime puts tensors on ("cpu", "cuda"). The collectives a
    backend offers come from ``dspark_collective_names``, not from this object.
    """

    name: str
    vendor: str
    spec: DeviceSpec
    probe: Callable[[], Availability]
    torch_device: str = "cpu"
    plugin: str = field(default="")  # filled in by the plugin manager

    def availability(self) -> Availability:
        try:
            return self.probe()
        except Exception as exc:  # a probe must not take the tool down
            return Availability.no(f"probe raised {type(exc).__name__}: {exc}")


def devices_sample(backend: str, devices: list[dict[str, Any]]) -> dict[str, Any]:
    """A device sampler's answer (``dspark_device_sampler``) from one dict per device: the mean utilization and the
    summed memory over the devices, with the per-device dicts kept under ``devices``."""
    return {
        "backend": backend,
        "utilization_pct": sum(d["utilization_pct"] for d in devices) / max(len(devices), 1),
        "memory_used_gb": sum(d["memory_used_gb"] for d in devices),
        "memory_total_gb": sum(d["memory_total_gb"] for d in devices),
        "devices": devices,
    }
