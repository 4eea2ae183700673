"""Measures of an expert placement ``phy2log [L, R]`` (GPU-major): replica counts, per-GPU presence and load,
balancedness (mean / max GPU load, an expert's load split evenly over its replicas) and same-GPU duplicates.

Plain numpy, shared by the balancer, the CLI, the benchmark and the tests.
"""

from __future__ import annotations

import numpy as np



def replica_counts(phy2log: np.ndarray, experts: int) -> np.ndarray:
    """``[L, E]``: how many slots each expert holds."""
    layers = phy2log.shape[0]
    flat = (phy2log + np.arange(layers)[:, None] * experts).ravel()
    return np.bincount(flat, minlength=layers * experts).reshape(layers, experts)


def presence(phy2log: np.ndarray, experts: int, gpus: int) -> np.ndarray:
    """``[L, G, E]``: how many replicas of each expert each GPU holds."""
    layers, slots = phy2log.shape
    gpu = np.arange(slots) // (slots // gpus)
    flat = ((np.arange(layers)[:, None] * gpus + gpu) * experts + phy2log).ravel()
    return np.bincount(flat, minlength=layers * gpus * experts).reshape(layers, gpus, experts)


def gpu_loads(weight: np.ndarray, phy2log: np.ndarray, gpus: int) -> np.ndarray:
    """``[L, G]``: per-GPU load, each expert's load split evenly over its replicas."""
    count = replica_counts(phy2log, weight.shape[1])
    per_replica = np.divide(weight, count, out=np.zeros_like(weight, dtype=np.float64), where=count > 0)
    return np.take_along_axis(per_replica, phy2log, 1).reshape(len(weight), gpus, -1).sum(-1)


def balancedness_of_loads(loads: np.ndarray) -> np.ndarray:
    """Per layer mean / max of ``loads [L, G]``; a layer with no load counts as 1."""
    top = loads.max(1)
    return np.where(top > 0, loads.mean(1) / np.where(top > 0, top, 1), 1.0)


def balancedness(weight, phy2log, num_gpus: int) -> float:
    """Mean over layers of (mean GPU load / max GPU load)."""
    weight, phy2log = np.asarray(weight, dtype=np.float64), np.asarray(phy2log)
    return float(balancedness_of_loads(gpu_loads(weight, phy2log, num_gpus)).mean())


def same_gpu_duplicates(phy2log, num_gpus: int, experts: int | None = None) -> int:
    """Slots that hold an expert its GPU already holds (wasted slots), summed over layers."""
    phy2log = np.asarray(phy2log)
    has = presence(phy2log, experts or int(phy2log.max()) + 1, num_gpus)
    return int(np.maximum(has - 1, 0).sum())


def duplicates_per_gpu(phy2log: np.ndarray, gpus: int) -> np.ndarray:
    """``[L, G]``: slots holding an expert already held by another slot of the same GPU."""
    held = np.sort(phy2log.reshape(len(phy2log), gpus, -1), axis=-1)
    return (held[..., 1:] == held[..., :-1]).sum(-1)


def domains_with_duplicates(phy2log: np.ndarray, gpus: int, domains: int) -> tuple[np.ndarray, np.ndarray]:
    """``(layers, domains)``: every (layer, node) pair of ``phy2log [L, R]`` holding a same-GPU duplicate."""
    dups = duplicates_per_gpu(phy2log, gpus).reshape(len(phy2log), domains, -1).sum(-1)
    return np.nonzero(dups)
