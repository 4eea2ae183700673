"""Re-placement with a cost for moving experts: trade a little balance for fewer expert weights on the wire.

"Experts moved" counts ``(expert, GPU)`` replica pairs of the new placement that the current one lacks: each is an
expert's weights (and optimizer state, in training) sent to a GPU. Per layer the placement maximising
``balancedness - move_cost * moved / R`` is chosen among:

1. the balance-only placement of :func:`dspark_lab.moe.balance.best_placement`, with its GPUs renumbered (inside
   nodes, nodes as wholes) to overlap the current placement most (:func:`relabel`, an exact assignment):
   relabelling never changes balance;
2. the current placement itself (nothing moves), when it is a valid placement of the same size;
3. every intermediate state of the swap local search started from the current placement (each swap moves at
   most two replicas and lowers the most loaded GPU).

With ``move_cost = 0`` this is the balance-only placement, renumbered so that as few experts as possible move.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from dspark_lab.moe.shape import Shape
from dspark_lab.moe.measures import balancedness_of_loads, duplicates_per_gpu, gpu_loads, presence, replica_counts
from dspark_lab.moe.search import descend


SCORE_TOL = 1e-12  # scores within this are ties (then fewer duplicates, then fewer moves, win)


def check_current(current, shape: Shape) -> np.ndarray:
    """``current`` as an int64 array ``[layers, R_old]`` (GPU-major); ValueError naming ``current`` otherwise."""
    try:
        array = np.asarray(current.cpu().numpy() if hasattr(current, "cpu") else current)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"current must be an integer array [layers, slots]: {exc}") from None
    if array.ndim != 2 or array.shape[0] != shape.layers:
        raise ValueError(f"current must have shape [{shape.layers}, slots], got {list(array.shape)}")
    if array.shape[1] % shape.gpus or array.shape[1] == 0:
        raise ValueError(f"current has {array.shape[1]} slots, not a positive multiple of num_gpus ({shape.gpus})")
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() >= shape.experts:
        raise ValueError(f"current must hold expert ids in 0..{shape.experts - 1}")
    return array.astype(np.int64)


def experts_moved(new: np.ndarray, old_has: np.ndarray, experts: int, gpus: int) -> np.ndarray:
    """``[L]``: (expert, GPU) pairs held in ``new`` and absent from ``old_has [L, G, E]``."""
    return ((presence(new, experts, gpus) > 0) & ~old_has).sum((1, 2))


def relabel(phy2log: np.ndarray, old_has: np.ndarray, shape: Shape) -> np.ndarray:
    """Renumber GPUs of ``phy2log`` to overlap ``old_has [L, G, E]`` most: nodes as wholes (a node-limited
    placement stays node-limited), GPUs inside a node. Exact: the best GPU matching of every (new node, old node)
    pair (:func:`scipy.optimize.linear_sum_assignment`), then the best node matching on those values."""
    layers, domains = shape.layers, shape.domains
    per = shape.gpus // domains
    new_has = presence(phy2log, shape.experts, shape.gpus) > 0
    gpu_overlap = np.einsum("lge,lhe->lgh", new_has.astype(np.float32), old_has.astype(np.float32))
    blocks = gpu_overlap.reshape(layers, domains, per, domains, per)
    gpu_target = np.empty((layers, shape.gpus), dtype=np.int64)                     # new GPU -> old GPU number
    for layer in range(layers):
        inner = np.empty((domains, domains, per), dtype=np.int64)
        value = np.empty((domains, domains))
        for a in range(domains):
            for b in range(domains):
                _, inner[a, b] = linear_sum_assignment(blocks[layer, a, :, b, :], maximize=True)
                value[a, b] = blocks[layer, a, np.arange(per), b, inner[a, b]].sum()
        _, node_target = linear_sum_assignment(value, maximize=True)
        gpu_target[layer] = (inner[np.arange(domains), node_target] + node_target[:, None] * per).ravel()
    slots = phy2log.reshape(layers, shape.gpus, -1)
    out = np.empty_like(slots)
    out[np.arange(layers)[:, None], gpu_target] = slots
    return out.reshape(layers, -1)


def _valid_as_is(current: np.ndarray, shape: Shape) -> bool:
    """Whether ``current`` can be kept: same size, every expert placed, node-limited where that is required."""
    if current.shape[1] != shape.replicas or (replica_counts(current, shape.experts) == 0).any():
        return False
    if not shape.hierarchical:
        return True
    slot_domain = np.arange(shape.replicas) // (shape.replicas // shape.domains)
    group = current // (shape.experts // shape.groups)
    first = np.full((shape.layers, shape.groups), -1)
    np.put_along_axis(first, group, np.broadcast_to(slot_domain, current.shape), 1)
    return bool((np.take_along_axis(first, group, 1) == slot_domain).all())


def place_with_moves(weight: np.ndarray, shape: Shape, current, move_cost: float, balanced: np.ndarray,
                     floor: np.ndarray | None = None) -> np.ndarray:
    """The placement maximising ``balancedness - move_cost * moved / R`` per layer (module docstring).

    ``balanced [L, R]``: the balance-only placement (:func:`dspark_lab.moe.balance.best_placement` of ``weight``),
    one of the candidates.

    ``floor [L]``: instead, the fewest moves among candidates whose balancedness is at least ``floor`` (the
    balance-only placement is always a candidate, so a floor at or under its balancedness is always met; the
    benchmark passes EPLB's balancedness to compare moves at equal balance)."""
    current = check_current(current, shape)
    old_has = presence(current, shape.experts, shape.gpus) > 0

    def score(plan):
        balance = balancedness_of_loads(gpu_loads(weight, plan, shape.gpus))
        moved = experts_moved(plan, old_has, shape.experts, shape.gpus)
        if floor is not None:
            return np.where(balance >= floor - SCORE_TOL, -moved / shape.replicas, -np.inf), moved
        return balance - move_cost * moved / shape.replicas, moved

    best = relabel(balanced, old_has, shape)
    chosen = best.copy()
    chosen_score, chosen_moved = score(best)
    chosen_dups = duplicates_per_gpu(best, shape.gpus).sum(1)

    def offer(plan, rows):
        nonlocal chosen_score, chosen_moved, chosen_dups
        value, moved = score(plan)
        dups = duplicates_per_gpu(plan, shape.gpus).sum(1)
        better = (value > chosen_score + SCORE_TOL) | ((value >= chosen_score - SCORE_TOL) & (
            (dups < chosen_dups) | ((dups == chosen_dups) & (moved < chosen_moved))))
        better &= np.isin(np.arange(shape.layers), rows)
        chosen[better] = plan[better]
        chosen_score = np.where(better, value, chosen_score)
        chosen_moved = np.where(better, moved, chosen_moved)
        chosen_dups = np.where(better, dups, chosen_dups)

    if _valid_as_is(current, shape):
        every = np.arange(shape.layers)
        offer(current, every)
        if move_cost > 0 or floor is not None:
            descend(weight, current, shape, trace=lambda step, rows, plan: offer(plan, rows))
    return chosen
