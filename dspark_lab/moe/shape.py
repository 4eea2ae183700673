"""The counts of one expert-placement problem (EPLB's arguments), shared by the balancer's modules."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """The counts of one balancing problem, validated: L layers, E experts, R slots on G GPUs in N nodes."""

    layers: int
    experts: int
    replicas: int
    groups: int
    nodes: int
    gpus: int

    @property
    def hierarchical(self) -> bool:
        return self.groups % self.nodes == 0

    @property
    def domains(self) -> int:
        """Node-limited domains a replica may not leave: the nodes, or one domain in global mode."""
        return self.nodes if self.hierarchical else 1

    @property
    def slots_per_gpu(self) -> int:
        return self.replicas // self.gpus
