"""Local search over expert placements, all layers at once (rows of ``phy2log [L, R]``, GPU-major).

``descend`` swaps a replica on the most loaded GPU with one on another GPU of the same node (domain) while that
lowers the larger of the two loads: the classic pairwise-interchange improvement for makespan scheduling, here with
a fixed number of slots per GPU and no two replicas of one expert on one GPU. ``remove_duplicates`` swaps away
same-GPU duplicates where that keeps the layer's maximum; swaps never change replica counts (changing them is
:mod:`dspark_lab.moe.recount`'s job). ``deal`` packs given replica counts onto GPUs (the start of a search).
"""

from __future__ import annotations

import numpy as np

from dspark_lab.moe.measures import presence, replica_counts
from dspark_lab.moe.shape import Shape

REL_TOL = 1e-12  # relative: a swap must lower a load by more than this to count as an improvement
# Swap steps per slot in one descend call at most: each step lowers a layer's top GPU, so a search stops on its own
# long before this; the cap bounds the time of a step boundary on adversarial loads (more steps: more time, and
# rarely a lower maximum).
STEPS_PER_SLOT = 4


def deal(weight: np.ndarray, count: np.ndarray, gpus: int) -> np.ndarray:
    """Replicas heaviest first onto the lightest GPU with room, avoiding GPUs that already hold the expert.
    Returns the local expert of each slot ``[rows, slots]``, GPU-major."""
    rows, n = weight.shape
    slots = int(count[0].sum())
    per_gpu = slots // gpus
    expert = np.repeat(np.tile(np.arange(n), rows), count.ravel()).reshape(rows, slots)
    value = np.take_along_axis(weight / count, expert, 1)
    order = np.argsort(-value, axis=1, kind="stable")
    expert = np.take_along_axis(expert, order, 1)
    value = np.take_along_axis(value, order, 1)
    loads = np.zeros((rows, gpus))
    fill = np.zeros((rows, gpus), dtype=np.int64)
    has = np.zeros((rows, gpus, n), dtype=bool)
    out = np.empty((rows, slots), dtype=np.int64)
    row = np.arange(rows)
    penalty = weight.sum(1, keepdims=True) * 2 + 1  # above any load: a GPU holding the expert is a last resort
    for k in range(slots):
        e = expert[:, k]
        key = loads + has[row, :, e] * penalty
        key[fill >= per_gpu] = np.inf
        g = key.argmin(1)
        out[row, g * per_gpu + fill[row, g]] = e
        loads[row, g] += value[:, k]
        fill[row, g] += 1
        has[row, g, e] = True
    return out


class _State:
    """A batch of placements (one row per layer) with the per-slot loads and per-GPU presence kept current."""

    def __init__(self, weight: np.ndarray, phy2log: np.ndarray, shape: Shape):
        self.weight = weight
        self.shape = shape
        self.assign = phy2log.copy()
        self.S = shape.slots_per_gpu
        self.gpus = shape.gpus
        self.slots_per_domain = shape.replicas // shape.domains
        self.gpus_per_domain = shape.gpus // shape.domains
        self.value = self.has = self.loads = None
        self.refresh(slice(None))

    def refresh(self, rows) -> None:
        """Recompute slot loads, presence and GPU loads of ``rows`` from ``assign`` (after replica counts change)."""
        if isinstance(rows, np.ndarray) and not len(rows):
            return
        assign, weight = self.assign[rows], self.weight[rows]
        per_replica = weight / np.maximum(replica_counts(assign, self.shape.experts), 1)
        value = np.take_along_axis(per_replica, assign, 1)
        has = presence(assign, self.shape.experts, self.gpus)
        loads = value.reshape(len(weight), self.gpus, -1).sum(-1)
        if self.value is None:
            self.value, self.has, self.loads = value, has, loads
        else:
            self.value[rows], self.has[rows], self.loads[rows] = value, has, loads

    def swap(self, rows, slot_a, slot_b) -> None:
        ga, gb = slot_a // self.S, slot_b // self.S
        ea, eb = self.assign[rows, slot_a], self.assign[rows, slot_b]
        va, vb = self.value[rows, slot_a], self.value[rows, slot_b]
        self.assign[rows, slot_a], self.assign[rows, slot_b] = eb, ea
        self.value[rows, slot_a], self.value[rows, slot_b] = vb, va
        np.subtract.at(self.has, (rows, ga, ea), 1)
        np.add.at(self.has, (rows, ga, eb), 1)
        np.subtract.at(self.has, (rows, gb, eb), 1)
        np.add.at(self.has, (rows, gb, ea), 1)
        self.loads[rows, ga] += vb - va
        self.loads[rows, gb] += va - vb

    def best_swaps(self, rows, slots, limit):
        """Best swap partner for each of ``slots [A, K]`` (all on one GPU per row) keeping both GPUs under
        ``limit [A]`` and creating no same-GPU duplicate. Returns (ok [A], slot_a [A], slot_b [A], pair max [A]).

        Partners are every slot of the same domain. A partner on the slot's own GPU, or holding the same expert, is
        ruled out by the duplicate test: its GPU already holds the slot's expert."""
        per_domain = self.gpus_per_domain
        gpu = slots[:, 0] // self.S
        first_gpu = gpu // per_domain * per_domain
        others = first_gpu[:, None] * self.S + np.arange(self.slots_per_domain)            # [A, D] partner slots
        a, ea = self.value[rows[:, None], slots], self.assign[rows[:, None], slots]          # [A, K]
        b, eb = self.value[rows[:, None], others], self.assign[rows[:, None], others]        # [A, D]
        domain_gpus = first_gpu[:, None] + np.arange(per_domain)                             # [A, P]
        # per domain GPU, then repeated over its S slots (partner slots are GPU-major)
        their_load = np.repeat(self.loads[rows[:, None], domain_gpus], self.S, axis=1)      # [A, D]
        ea_there = np.repeat(self.has[rows[:, None, None], domain_gpus[:, None, :], ea[:, :, None]], self.S, axis=2)
        eb_here = self.has[rows[:, None], gpu[:, None], eb]                                  # [A, D]
        delta = a[:, :, None] - b[:, None, :]
        pair = np.maximum(self.loads[rows, gpu][:, None, None] - delta, their_load[:, None, :] + delta)
        blocked = (ea_there > 0) | (eb_here > 0)[:, None, :] | (pair >= limit[:, None, None])
        pair[blocked] = np.inf
        flat = pair.reshape(len(rows), -1).argmin(1)
        best = pair.reshape(len(rows), -1)[np.arange(len(rows)), flat]
        i, j = np.divmod(flat, others.shape[1])
        return np.isfinite(best), slots[np.arange(len(rows)), i], others[np.arange(len(rows)), j], best


def descend(weight: np.ndarray, phy2log: np.ndarray, shape: Shape, max_steps: int | None = None,
            trace=None, good_enough: np.ndarray | None = None) -> np.ndarray:
    """Swap replicas off the most loaded GPU while that lowers it; returns the improved ``phy2log``.

    ``trace(step, rows, assign)`` is called after each step with the rows that changed (used for move costs).
    ``good_enough [rows]``: a row stops once its maximum load is at or under this.
    """
    state = _State(weight, phy2log, shape)
    active = np.arange(len(weight))
    steps = max_steps if max_steps is not None else STEPS_PER_SLOT * shape.replicas
    for step in range(steps):
        if not len(active):
            break
        gpu = state.loads[active].argmax(1)
        top = state.loads[active, gpu]
        if good_enough is not None:
            going = top > good_enough[active]
            active, gpu, top = active[going], gpu[going], top[going]
            if not len(active):
                break
        slots = gpu[:, None] * state.S + np.arange(state.S)
        ok, slot_a, slot_b, _ = state.best_swaps(active, slots, top * (1 - REL_TOL))
        active = active[ok]
        state.swap(active, slot_a[ok], slot_b[ok])
        if trace is not None and len(active):
            trace(step, active, state.assign)
    return state.assign


def remove_duplicates(weight: np.ndarray, phy2log: np.ndarray, shape: Shape,
                      limit: np.ndarray | None = None) -> np.ndarray:
    """Swap away same-GPU duplicates where a swap keeps both GPUs at or under ``limit [L]`` (default: the
    layer's maximum load)."""
    state = _State(weight, phy2log, shape)
    layers = len(weight)
    stuck = np.zeros_like(phy2log, dtype=bool)
    gpu_of_slot = np.arange(shape.replicas) // state.S
    limit = (state.loads.max(1) if limit is None else np.maximum(limit, state.loads.max(1))) * (1 + REL_TOL)
    for _ in range(shape.replicas):
        dup = (state.has[np.arange(layers)[:, None], gpu_of_slot, state.assign] > 1) & ~stuck
        rows = np.flatnonzero(dup.any(1))
        if not len(rows):
            break
        first = dup[rows].argmax(1)
        ok, slot_a, slot_b, _ = state.best_swaps(rows, first[:, None], limit[rows])
        stuck[rows[~ok], first[~ok]] = True
        state.swap(rows[ok], slot_a[ok], slot_b[ok])
    return state.assign
