"""Replica counts: how many of a node's slots each of its experts gets (placing the replicas on GPUs comes after).

All functions work on a batch of nodes: ``weight [K, n]`` (the loads of each node's ``n`` experts), ``slots`` per
node and ``gpus`` per node. No expert gets more replicas than the node has GPUs unless ``n * gpus < slots`` forces
it (a replica beyond that would share a GPU with another replica of its expert).

EPLB gives every extra replica to the expert with the highest load per replica. Capped at the GPU count that still
stacks hot experts: two experts with 5 replicas each on 8 GPUs put two hot replicas on some GPU, where 4 + 3
replicas would not. :func:`bounded_counts` therefore chooses how far to follow that greedy order by a lower bound on
the maximum GPU load (:func:`pair_bound`) and spreads the remaining slots over cold experts
(:func:`fill_coldest`), where they cost nearly nothing.
"""

from __future__ import annotations

import numpy as np


def replica_cap(experts: int, gpus: int, slots: int) -> int:
    """Most replicas an expert may get: one per GPU, unless ``experts * gpus < slots`` forces duplicates."""
    return gpus if experts * gpus >= slots else slots


def fill_coldest(weight: np.ndarray, counts: np.ndarray, gpus: int, slots: int) -> np.ndarray:
    """``counts`` topped up to ``slots`` per row, one replica at a time to the expert with the fewest replicas,
    then the least load, among those below :func:`replica_cap`: cold experts absorb the slots, none of them many
    times."""
    counts = counts.copy()
    n = weight.shape[1]
    cap = replica_cap(n, gpus, slots)
    big = weight.max(1, keepdims=True) + 1
    while (short := slots - counts.sum(1)).any():
        key = np.where(counts < cap, counts * big + weight, np.inf)
        order = np.argsort(key, 1, kind="stable")
        ranked = np.take_along_axis(counts, order, 1)
        level = np.where(counts < cap, counts, slots).min(1, keepdims=True)    # fewest replicas first, a level
        add = (np.arange(n) < short[:, None]) & (ranked == level) & np.isfinite(np.take_along_axis(key, order, 1))
        np.put_along_axis(counts, order, ranked + add, 1)
    return counts


def pair_bound(value: np.ndarray, count: np.ndarray, gpus: int) -> np.ndarray:
    """Lower bound on the maximum GPU load for replicas of ``value [..., H]`` (load per replica, sorted
    descending) held ``count [..., H]`` times: the largest replica, and the ``P``-th plus the ``(P+1)``-th largest
    (``P = gpus``: two of the ``P + 1`` largest share a GPU; the bound of Graham's LPT analysis, 1969)."""
    cum = np.cumsum(count, -1)
    width = value.shape[-1]
    at_p = (cum < gpus).sum(-1, keepdims=True)
    at_q = (cum < gpus + 1).sum(-1, keepdims=True)
    v_p = np.where(at_p < width, np.take_along_axis(value, np.minimum(at_p, width - 1), -1), 0.0)
    v_q = np.where(at_q < width, np.take_along_axis(value, np.minimum(at_q, width - 1), -1), 0.0)
    return np.maximum(value[..., 0], (v_p + v_q)[..., 0])


def sorted_pair_bound(weight: np.ndarray, counts: np.ndarray, gpus: int) -> np.ndarray:
    """:func:`pair_bound` of count vectors ``counts [..., n]`` for loads ``weight`` (broadcast), in any order."""
    value = weight / counts
    order = np.argsort(-value, -1)
    return pair_bound(np.take_along_axis(value, order, -1), np.take_along_axis(counts, order, -1), gpus)


# counts_bound screens count vectors on this many hottest experts of a row: wider is exact more often and slower.
SCREEN_WIDTH = 24


def counts_bound(weight: np.ndarray, counts: np.ndarray, gpus: int, width: int = SCREEN_WIDTH) -> np.ndarray:
    """:func:`pair_bound` of each row's count vector, over the ``width`` hottest experts of the row (a screen:
    exact unless a colder expert holds a replica among the ``gpus + 1`` largest)."""
    if weight.shape[1] > width:
        top = np.argpartition(-weight, width - 1, axis=1)[:, :width]
        weight, counts = np.take_along_axis(weight, top, 1), np.take_along_axis(counts, top, 1)
    return sorted_pair_bound(weight, counts, gpus)


def bounded_counts(weight: np.ndarray, slots: int, gpus: int, finest: bool = False) -> np.ndarray:
    """Counts that follow EPLB's greedy order (next replica to the highest load per replica, capped) for the
    number of steps that minimises :func:`pair_bound`, the other slots filled by :func:`fill_coldest`.

    ``finest=False`` takes the first step count at the minimum (fewest hot replicas); ``finest=True`` the last
    one whose bound is within the minimum or the mean GPU load, whichever is higher (most hot replicas that cost
    nothing in the bound: smaller pieces pack more tightly when the node is nearly full).
    """
    rows, n = weight.shape
    extra = slots - n
    cap = replica_cap(n, gpus, slots)
    counts = np.ones((rows, n), dtype=np.int64)
    if extra == 0:
        return counts
    # Only the hottest experts matter: the greedy's first `extra` steps go to a prefix of the experts by load, and
    # the P + 1 largest replicas lie among that prefix and the next P + 1 experts.
    width = min(n, extra + gpus + 1)
    top = np.argsort(-weight, 1, kind="stable")[:, :width]
    w = np.take_along_axis(weight, top, 1)
    steps = np.empty((rows, extra + 1, width), dtype=np.int64)              # counts after each greedy step
    steps[:, 0] = 1
    row = np.arange(rows)
    for k in range(extra):
        current = steps[:, k]
        pick = np.where(current < cap, w / current, -1.0).argmax(1)
        steps[:, k + 1] = current
        steps[row, k + 1, pick] += 1
    bound = sorted_pair_bound(w[:, None, :], steps, gpus)                   # [rows, extra + 1]
    if finest:
        bound = np.maximum(bound, weight.sum(1, keepdims=True) / gpus)
        best = extra - bound[:, ::-1].argmin(1)
    else:
        best = bound.argmin(1)
    np.put_along_axis(counts, top, steps[row, best], 1)
    return fill_coldest(weight, counts, gpus, slots)


def capped_counts(weight: np.ndarray, counts: np.ndarray, gpus: int, slots: int) -> np.ndarray:
    """``counts`` with none above ``gpus``, the freed slots filled by :func:`fill_coldest`."""
    return fill_coldest(weight, np.minimum(counts, gpus), gpus, slots)


def fewest_counts(weight: np.ndarray, limit: np.ndarray, gpus: int, slots: int) -> np.ndarray:
    """The fewest replicas that keep each replica under ``limit [K]`` (at most ``gpus``; one each where those
    exceed ``slots``), the other slots filled by :func:`fill_coldest`."""
    fewest = np.clip(np.ceil(weight / np.maximum(limit[:, None], 1e-300) - 1e-12), 1, gpus).astype(np.int64)
    fewest[fewest.sum(1) > slots] = 1
    return fill_coldest(weight, fewest, gpus, slots)
