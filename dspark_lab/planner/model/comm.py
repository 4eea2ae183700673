"""Collective costs from link figures: ring, tree and the hierarchical (intra-node, then inter-node) forms.

Alpha-beta model (Thakur, Rabenseifner and Gropp 2005; Calculon, Isaev et al. SC'23, section 3): a ring all-reduce
of ``n`` bytes over ``p`` ranks moves ``2 (p-1)/p n`` bytes per rank in ``2 (p-1)`` steps; reduce-scatter and
all-gather half of that. A (double binary) tree all-reduce takes ``2 log2 p`` latency steps and moves ``2n``. The
hierarchical all-reduce (NCCL's, and Megatron's across nodes) reduce-scatters inside a node, all-reduces
``1/m`` of the data across nodes on each GPU's own NIC, and all-gathers inside the node again.
Bandwidths are per GPU and per direction; ``LINK_EFFICIENCY`` is the fraction of it NCCL's bus bandwidth reaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LINK_EFFICIENCY = 0.8  # NCCL bus bandwidth / link bandwidth on NVLink and InfiniBand (nccl-tests, large messages)
LATENCY_INTRA_S = 5e-6
LATENCY_INTER_S = 10e-6


@dataclass(frozen=True, slots=True)
class Links:
    """Per-GPU, per-direction bandwidth (GB/s) inside a node and across nodes, and the node size."""

    scale_up_gb_s: float
    scale_out_gb_s: float
    gpus_per_node: int


def _ring(kind: str, nbytes: float, p: int, gb_s: float, latency: float) -> float:
    if p <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * (p - 1) if kind == "all_reduce" else p - 1
    return steps * latency + steps / p * nbytes / (gb_s * 1e9 * LINK_EFFICIENCY)


def _tree(kind: str, nbytes: float, p: int, gb_s: float, latency: float) -> float:
    if p <= 1 or nbytes <= 0:
        return 0.0
    factor = 2.0 if kind == "all_reduce" else 1.0
    return factor * math.ceil(math.log2(p)) * latency + factor * nbytes / (gb_s * 1e9 * LINK_EFFICIENCY)


def flat(kind: str, nbytes: float, p: int, gb_s: float, latency: float) -> float:
    """The cheaper of ring and tree (all-reduce only has a tree form in NCCL)."""
    ring = _ring(kind, nbytes, p, gb_s, latency)
    return min(ring, _tree(kind, nbytes, p, gb_s, latency)) if kind == "all_reduce" else ring


def collective(kind: str, nbytes: float, p: int, stride: int, links: Links) -> float:
    """Seconds for ``kind`` (all_reduce | reduce_scatter | all_gather | all_to_all) of ``nbytes`` (the full buffer
    each rank holds before a reduce-scatter / after an all-gather) over ``p`` ranks placed ``stride`` apart."""
    if p <= 1:
        return 0.0
    per_node = max(1, min(p, links.gpus_per_node // stride)) if stride < links.gpus_per_node else 1
    nodes = math.ceil(p / per_node)
    if kind == "all_to_all":
        # Each rank sends (p-1)/p of its buffer; the share leaving the node goes over its NIC.
        inside = (per_node - 1) / p * nbytes / (links.scale_up_gb_s * 1e9 * LINK_EFFICIENCY)
        outside = (p - per_node) / p * nbytes / (links.scale_out_gb_s * 1e9 * LINK_EFFICIENCY)
        return max(inside, outside) + (p - 1) * (LATENCY_INTER_S if nodes > 1 else LATENCY_INTRA_S)
    if nodes == 1:
        return flat(kind, nbytes, p, links.scale_up_gb_s, LATENCY_INTRA_S)
    if per_node == 1:
        return flat(kind, nbytes, p, links.scale_out_gb_s, LATENCY_INTER_S)
    inner_kind = "reduce_scatter" if kind != "all_gather" else "all_gather"
    t = flat(inner_kind, nbytes, per_node, links.scale_up_gb_s, LATENCY_INTRA_S)
    t += flat(kind, nbytes / per_node, nodes, links.scale_out_gb_s, LATENCY_INTER_S)
    if kind == "all_reduce":
        t += flat("all_gather", nbytes, per_node, links.scale_up_gb_s, LATENCY_INTRA_S)
    return t


def p2p(nbytes: float, inter_node: bool, links: Links) -> float:
    gb_s = links.scale_out_gb_s if inter_node else links.scale_up_gb_s
    return (LATENCY_INTER_S if inter_node else LATENCY_INTRA_S) + nbytes / (gb_s * 1e9 * LINK_EFFICIENCY)
