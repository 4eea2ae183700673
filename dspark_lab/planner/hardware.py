"""The device a prediction runs on, read from a registered backend's :class:`~dspark_lab.backend.DeviceSpec`
(``dspark_lab.plugins.get_manager().backends()``), so a third-party backend plugin is planned on unchanged.
A cluster may override figures for a variant of the part (memory, HBM bandwidth, a power cap)."""

from __future__ import annotations

from dataclasses import dataclass

from dspark_lab.errors import DSparkError
from dspark_lab.planner.model.comm import Links
from dspark_lab.planner.model.config import Cluster


@dataclass(frozen=True, slots=True)
class Device:
    backend: str
    bf16_tflops: float
    fp8_tflops: float | None
    memory_gb: float
    hbm_gb_s: float
    links: Links
    tdp_w: float | None
    clock_factor: float  # < 1 under a power cap

    def peak_flops(self, precision: str) -> float:
        tflops = self.fp8_tflops if precision == "fp8" and self.fp8_tflops else self.bf16_tflops
        return tflops * 1e12 * self.clock_factor


def device(cluster: Cluster, manager=None) -> Device:
    from dspark_lab.plugins import get_manager

    manager = manager or get_manager()
    backend = manager.backend(cluster.gpu)  # raises "backend: unknown backend ..., registered: ..."
    spec = backend.spec
    missing = [k for k in ("bf16_tflops", "memory_gb", "memory_bandwidth_gb_s", "link_gb_s")
               if getattr(spec, k) is None]
    if missing:
        raise DSparkError(f"cluster.gpu: backend {cluster.gpu!r} has no {', '.join(missing)} in its spec; "
                          "the planner needs dense peaks, memory, HBM and link figures")
    scale_out = cluster.scale_out_gb_s or spec.scale_out_gb_s or 25.0
    clock = 1.0
    if cluster.power_limit_w and spec.tdp_w and cluster.power_limit_w < spec.tdp_w:
        # Dynamic power ~ f^3 at fixed voltage-frequency slope; sustained GEMM clock ~ (cap / TDP)^(1/3).
        clock = (cluster.power_limit_w / spec.tdp_w) ** (1 / 3)
    return Device(backend=backend.name, bf16_tflops=spec.bf16_tflops, fp8_tflops=spec.fp8_tflops,
                  memory_gb=cluster.memory_gb or spec.memory_gb,
                  hbm_gb_s=cluster.hbm_gb_s or spec.memory_bandwidth_gb_s,
                  links=Links(spec.link_gb_s, scale_out, cluster.gpus_per_node), tdp_w=spec.tdp_w,
                  clock_factor=clock)
