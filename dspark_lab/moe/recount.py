"""Replica-count search for nodes the swap search leaves with a same-GPU duplicate.

Swaps never change how many replicas an expert has, and the duplicate-removal moves change one count at a time
around the duplicate, so a node can keep a duplicate when the fix is a different count vector altogether
(typically: fewer replicas of a very hot expert, so they fit on distinct GPUs, and more of some middling or cold
ones to fill the freed slots). Here the counts themselves are searched: from a start, every move of one replica
from one expert to another (one of the two among the hottest) is packed (:func:`dspark_lab.moe.search.deal`,
then :func:`dspark_lab.moe.search.descend`), all moves of all nodes in one batch, and each node takes its best
move (out of the limit first, then fewest duplicates, then lowest maximum) while that improves. Two starts: the
node's current counts capped at its GPU count, and the fewest replicas that keep each expert under the limit.
What this misses goes to the exact solve (:mod:`dspark_lab.moe.exact`).
"""

from __future__ import annotations

import numpy as np

from dspark_lab.moe.measures import domains_with_duplicates, duplicates_per_gpu, gpu_loads, replica_counts
from dspark_lab.moe.search import REL_TOL, deal, descend
from dspark_lab.moe.shape import Shape

HOT = 12      # moves involve one of this many hottest experts of the node
ROUNDS = 20   # improving moves per start
SCREEN = 16   # count vectors per node and round that get the local search after dealing


def _measure(weight: np.ndarray, local: np.ndarray, gpus: int) -> tuple[np.ndarray, np.ndarray]:
    return gpu_loads(weight, local, gpus).max(1), duplicates_per_gpu(local, gpus).sum(1)


def _pack(weight: np.ndarray, counts: np.ndarray, gpus: int, screen: np.ndarray | None = None):
    """Deal, then descend, all rows at once: ``(rows kept, local placement, max GPU load, duplicates)``.

    With ``screen`` (the owner of each row), only the ``SCREEN`` rows per owner that look best after dealing
    (fewest duplicates, then lowest maximum) go on to the local search, which costs far more than dealing."""
    local = deal(weight, counts, gpus)
    keep = np.arange(len(weight))
    if screen is not None:
        top, dups = _measure(weight, local, gpus)
        order = np.lexsort((top, dups, screen))
        rank = np.arange(len(order)) - np.searchsorted(screen[order], screen[order])
        keep = np.sort(order[rank < SCREEN])
    shape = Shape(layers=len(keep), experts=weight.shape[1], replicas=int(counts[0].sum()), groups=1, nodes=1,
                  gpus=gpus)
    local = descend(weight[keep], local[keep], shape)
    return (keep, local, *_measure(weight[keep], local, gpus))


def _capped(weight: np.ndarray, counts: np.ndarray, gpus: int, slots: int) -> np.ndarray:
    """``counts`` with none above ``gpus``, topped up to ``slots``: each freed slot goes to the expert holding the
    least load (load x replicas) among those below ``gpus``, since a cold replica is small filler."""
    counts = np.minimum(counts, gpus)
    rows = np.arange(len(counts))
    while (short := counts.sum(1) < slots).any():
        pick = np.where(counts < gpus, weight * counts, np.inf).argmin(1)
        counts[rows[short], pick[short]] += 1
    return counts


def fewest_counts(weight: np.ndarray, limit: np.ndarray, gpus: int, slots: int) -> np.ndarray:
    """Per row of ``weight [K, n]``: the fewest replicas that keep each under ``limit [K]`` (at most ``gpus``),
    topped up to ``slots`` by :func:`_capped` (from one replica each where the fewest already exceed ``slots``)."""
    fewest = np.clip(np.ceil(weight / np.maximum(limit[:, None], 1e-300) - 1e-12), 1, gpus).astype(np.int64)
    fewest[fewest.sum(1) > slots] = 1
    return _capped(weight, fewest, gpus, slots)


def _moves(weight: np.ndarray, counts: np.ndarray, gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """``(from, to)`` expert pairs of every one-replica move: from an expert with several, to one below ``gpus``."""
    n = len(weight)
    hot = np.zeros(n, dtype=bool)
    hot[np.argsort(-weight, kind="stable")[:HOT]] = True
    allowed = (counts[:, None] > 1) & (counts[None, :] < gpus) & (hot[:, None] | hot[None, :])
    np.fill_diagonal(allowed, False)
    return np.nonzero(allowed)


def _search(weight: np.ndarray, counts: np.ndarray, gpus: int, limit: np.ndarray):
    """Improve the count vectors of ``weight [D, n]`` from ``counts [D, n]``; returns (local placements, fits [D])."""
    bound = limit * (1 + REL_TOL)
    _, local, top, dups = _pack(weight, counts, gpus)
    key = [(top[d] > bound[d], dups[d], top[d]) for d in range(len(weight))]
    active = np.array([k[0] or k[1] > 0 for k in key])
    for _ in range(ROUNDS):
        owner, trial = [], []
        for d in np.flatnonzero(active):
            source, target = _moves(weight[d], counts[d], gpus)
            moved = np.repeat(counts[d][None], len(source), 0)
            moved[np.arange(len(source)), source] -= 1
            moved[np.arange(len(source)), target] += 1
            owner.append(np.full(len(source), d))
            trial.append(moved)
        if not sum(map(len, owner)):
            break
        owner, trial = np.concatenate(owner), np.concatenate(trial)
        keep, trial_local, trial_top, trial_dups = _pack(weight[owner], trial, gpus, screen=owner)
        owner, trial = owner[keep], trial[keep]
        over = trial_top > bound[owner]
        order = np.lexsort((trial_top, trial_dups, over))
        nodes, first = np.unique(owner[order], return_index=True)
        for d, i in zip(nodes, order[first]):
            candidate = (over[i], trial_dups[i], trial_top[i])
            if candidate < key[d]:
                key[d], counts[d], local[d] = candidate, trial[i], trial_local[i]
            else:
                active[d] = False
            if not candidate[0] and candidate[1] == 0:
                active[d] = False
        active[np.setdiff1d(np.flatnonzero(active), nodes)] = False
    fits = np.array([not k[0] and k[1] == 0 for k in key])
    return local, fits


def place_by_recount(weight: np.ndarray, phy2log: np.ndarray, shape: Shape, limit: np.ndarray) -> np.ndarray:
    """Replace every domain of ``phy2log [L, R]`` holding a same-GPU duplicate by a duplicate-free placement of the
    same experts within ``limit [L]`` found by searching replica counts, where the search finds one."""
    out = phy2log.copy()
    per_domain = shape.replicas // shape.domains
    gpus = shape.gpus // shape.domains
    layers, domains = domains_with_duplicates(phy2log, shape.gpus, shape.domains)
    if not len(layers) or (shape.experts // shape.domains) * gpus < per_domain:
        return out  # nothing to fix, or duplicates forced: fewer (expert, GPU) pairs than slots
    held = phy2log.reshape(len(phy2log), shape.domains, per_domain)[layers, domains]       # [K, slots]
    members = np.stack([np.unique(row) for row in held])                                  # [K, n]
    weight_k = np.take_along_axis(weight[layers], members, 1)
    current = np.take_along_axis(replica_counts(held, shape.experts), members, 1)
    found = np.zeros(len(layers), dtype=bool)
    local = np.zeros_like(held)
    starts = (lambda rows: _capped(weight_k[rows], current[rows], gpus, per_domain),
              lambda rows: fewest_counts(weight_k[rows], limit[layers[rows]], gpus, per_domain))
    for start in starts:
        todo = np.flatnonzero(~found)
        if not len(todo):
            break
        counts = start(todo)
        placed, fits = _search(weight_k[todo], counts, gpus, limit[layers[todo]])
        local[todo[fits]] = placed[fits]
        found[todo[fits]] = True
    for k in np.flatnonzero(found):
        out[layers[k], domains[k] * per_domain:(domains[k] + 1) * per_domain] = members[k][local[k]]
    return out
