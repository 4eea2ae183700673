"""Local search over expert placements, all layers at once (rows of ``phy2log [L, R]``, GPU-major).

``descend`` swaps a replica on the most loaded GPU with one on another GPU of the same node (domain) while that
lowers the larger of the two loads: the classic pairwise-interchange improvement for makespan scheduling, here with
a fixed number of slots per GPU and no two replicas of one expert on one GPU. ``remove_duplicates`` swaps away
same-GPU duplicates where that keeps the layer's maximum; swaps never change replica counts.
``reassign_duplicates`` also gives a duplicate slot to another expert of its node, which changes two replica counts
(and so the load of every replica of both experts), and repairs such moves by ``descend`` where they overshoot.
"""

from __future__ import annotations

import numpy as np

from dspark_lab.moe.measures import duplicates_per_gpu, gpu_loads, presence, replica_counts
from dspark_lab.moe.shape import Shape

REL_TOL = 1e-12  # relative: a swap must lower a load by more than this to count as an improvement


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

    def partners(self, rows, slots):
        """For slots ``[A, K]`` on GPU ``g [A]``: every slot of the same domain, with its value, expert and GPU."""
        gpu = slots[:, 0] // self.S
        domain = gpu // self.gpus_per_domain
        others = domain[:, None] * self.slots_per_domain + np.arange(self.slots_per_domain)
        return gpu, others, self.value[rows[:, None], others], self.assign[rows[:, None], others], others // self.S

    def best_swaps(self, rows, slots, limit):
        """Best swap partner for each of ``slots [A, K]`` (all on one GPU per row) keeping both GPUs under
        ``limit [A]`` and creating no same-GPU duplicate. Returns (ok [A], slot_a [A], slot_b [A], pair max [A])."""
        gpu, others, b, eb, h = self.partners(rows, slots)
        a = self.value[rows[:, None], slots]
        ea = self.assign[rows[:, None], slots]
        here = self.loads[rows, gpu]
        delta = a[:, :, None] - b[:, None, :]
        pair = np.maximum(here[:, None, None] - delta, self.loads[rows[:, None], h][:, None, :] + delta)
        ok = ((h != gpu[:, None])[:, None, :]
              & (self.has[rows[:, None], gpu[:, None], eb] == 0)[:, None, :]
              & (self.has[rows[:, None, None], h[:, None, :], ea[:, :, None]] == 0)
              & (ea[:, :, None] != eb[:, None, :]))
        pair = np.where(ok & (pair < limit[:, None, None]), pair, np.inf)
        flat = pair.reshape(len(rows), -1).argmin(1)
        best = pair.reshape(len(rows), -1)[np.arange(len(rows)), flat]
        i, j = np.divmod(flat, others.shape[1])
        return np.isfinite(best), slots[np.arange(len(rows)), i], others[np.arange(len(rows)), j], best


def descend(weight: np.ndarray, phy2log: np.ndarray, shape: Shape, max_steps: int | None = None,
            trace=None) -> np.ndarray:
    """Swap replicas off the most loaded GPU while that lowers it; returns the improved ``phy2log``.

    ``trace(step, rows, assign)`` is called after each step with the rows that changed (used for move costs).
    """
    state = _State(weight, phy2log, shape)
    active = np.arange(len(weight))
    steps = max_steps if max_steps is not None else 4 * shape.replicas
    for step in range(steps):
        if not len(active):
            break
        gpu = state.loads[active].argmax(1)
        top = state.loads[active, gpu]
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


def _domain_state(weight: np.ndarray, sub: np.ndarray, gpus: int):
    """Local view of one domain's slots ``sub [slots]``: its experts, their loads and counts, presence, GPU loads."""
    seen = np.zeros(len(weight), dtype=np.int64)
    seen[sub] = 1
    experts = np.flatnonzero(seen)
    local = (np.cumsum(seen) - 1)[sub]
    w = weight[experts]
    count = np.bincount(local, minlength=len(experts))
    gpu = np.arange(len(sub)) // (len(sub) // gpus)
    has = np.zeros((gpus, len(experts)), dtype=np.int64)
    np.add.at(has, (gpu, local), 1)
    loads = np.bincount(gpu, weights=w[local] / count[local], minlength=gpus)
    return experts, local, w, count, gpu, has, loads


def _best_fix(weight: np.ndarray, sub: np.ndarray, gpus: int, slot: int, keep: int = 3):
    """Best move removing the same-GPU duplicate in ``slot`` of one domain's slots ``sub``.

    The duplicate holds expert ``e``, held ``k >= 2`` times by its GPU ``g`` and ``c`` times in all. Moves:
    give the slot to another expert ``f`` of the domain (``c_e -> c - 1``, ``c_f -> c_f + 1``), then optionally
    swap it with a slot ``t`` on another GPU ``h``; or (``f = e``) only the swap. Exact effect of giving the slot
    away: ``g``'s load from ``e`` goes from ``k w/c`` to ``(k-1) w/(c-1)`` (never up, as ``k <= c``), every other
    GPU holding ``e`` gains ``w/(c-1) - w/c`` per replica, every GPU holding ``f`` loses ``w_f/c_f - w_f/(c_f+1)``
    per replica and ``g`` gains ``w_f/(c_f+1)``. Moves are scored by the domain's new maximum GPU load.

    Returns ``(new max, new sub)`` of the best move (``(inf, None)`` if none), then, as starting points for a
    repair by local search, the ``keep`` experts ``f`` (global ids) whose plain reassignment gives the lowest
    maxima and the ``keep`` slots (domain-local) whose swap alone gives the lowest maxima.
    """
    experts, local, w, count, gpu, has, loads = _domain_state(weight, sub, gpus)
    if gpus == 1:
        return np.inf, None, experts[:0], experts[:0]  # every expert of the domain is on its one GPU: nothing to move to
    n, e, g = len(experts), local[slot], gpu[slot]
    per = w / count
    given = w[e] / (count[e] - 1)                                            # e's load per replica after giving one
    f = np.concatenate([[e], np.delete(np.arange(n), e)])                   # row 0: no reassignment
    slot_value = np.where(f == e, per[e], w[f] / (count[f] + 1))             # value of the slot once it holds f
    loads1 = np.repeat(loads[None, :], n, 0)
    loads1[1:] += has[:, e] * (given - per[e]) + has[:, f[1:]].T * (slot_value[1:, None] - per[f[1:], None])
    loads1[1:, g] += slot_value[1:] - given
    # Without a swap (f != e, f not on g yet).
    plain = np.where((np.arange(n) > 0) & (has[g, f] == 0), loads1.max(1), np.inf)
    # With a swap of the slot against slot t on GPU h != g holding x (x not e or f, not on g; f not on h).
    x, h = local, gpu
    vx = np.where(x[None, :] == f[:, None], np.inf, per[x][None, :])
    new_g = loads1[:, g, None] - slot_value[:, None] + vx
    new_h = loads1[np.arange(n)[:, None], h[None, :]] + slot_value[:, None] - vx
    rest = loads1.copy()
    rest[:, g] = -np.inf
    order = np.argsort(-rest, axis=1)[:, :2]
    top = np.take_along_axis(rest, order, 1)
    rest_max = np.where(order[:, [0]] == h[None, :], top[:, [1]], top[:, [0]])   # max over GPUs other than g, h
    ok = ((h != g)[None, :] & (x != e)[None, :] & (x[None, :] != f[:, None]) & (has[g, x] == 0)[None, :]
          & (has[h[None, :], f[:, None]] == 0))
    swapped = np.where(ok, np.maximum(np.maximum(new_g, new_h), rest_max), np.inf)
    ranked = np.argsort(plain)[:keep]
    ranked = experts[f[ranked[np.isfinite(plain[ranked])]]]
    partners = np.argsort(swapped[0])[:keep]                                 # swaps alone (f = e), by new max
    partners = partners[np.isfinite(swapped[0, partners])]
    best_plain, best_swap = plain.argmin(), swapped.argmin()
    i, t = np.divmod(best_swap, len(sub))
    out = sub.copy()
    if plain[best_plain] <= swapped[i, t] and np.isfinite(plain[best_plain]):
        out[slot] = experts[f[best_plain]]
        return plain[best_plain], out, ranked, partners
    if np.isfinite(swapped[i, t]):
        out[slot], out[t] = experts[x[t]], experts[f[i]]
        return swapped[i, t], out, ranked, partners
    return np.inf, None, ranked, partners


def _collapse(weight: np.ndarray, sub: np.ndarray, gpus: int, slots) -> np.ndarray:
    """Give each of ``slots`` that is still a same-GPU duplicate to the expert whose plain reassignment gives the
    lowest domain maximum, limit or not (a start for a repair by local search)."""
    sub = sub.copy()
    for slot in slots:
        _, local, _, _, gpu, has, _ = _domain_state(weight, sub, gpus)
        if has[gpu[slot], local[slot]] > 1:
            ranked = _best_fix(weight, sub, gpus, slot, keep=1)[2]
            if len(ranked):
                sub[slot] = ranked[0]
    return sub


def _fix_row(weight: np.ndarray, row: np.ndarray, shape: Shape, bound: float) -> tuple[np.ndarray, list]:
    """Apply :func:`_best_fix` moves to one layer until none fits under ``bound``; returns the row and, for the
    duplicates left, starting rows for a repair by local search: each promising single reassignment, each
    expert's duplicates all reassigned, and all duplicates reassigned."""
    per_domain = shape.replicas // shape.domains
    gpus = shape.gpus // shape.domains
    row = row.copy()
    singles, collapsed = [], {}
    for start in range(0, shape.replicas, per_domain):
        sub = row[start:start + per_domain]
        if not duplicates_per_gpu(sub[None], gpus).any():
            continue
        while True:
            leads, fixed_one = [], False
            _, local, _, _, gpu, has, _ = _domain_state(weight, sub, gpus)
            stuck = np.flatnonzero(has[gpu, local] > 1)
            stuck = stuck[np.unique(gpu[stuck] * len(sub) + local[stuck], return_index=True)[1]]  # one per pair
            for slot in stuck:
                value, fixed, ranked, partners = _best_fix(weight, sub, gpus, slot)
                if value <= bound:
                    sub, fixed_one = fixed, True
                    break  # state changed: start over
                leads += [((start + slot,), (f,)) for f in ranked]
                leads += [((start + slot, start + t), (sub[t], sub[slot])) for t in partners]
            if not fixed_one:
                break
        row[start:start + per_domain] = sub
        singles += leads
        experts = sub[stuck]
        for expert in np.unique(experts):  # an expert's several duplicates at once (one alone is a single start)
            if (experts == expert).sum() > 1:
                collapsed[(start, expert)] = _collapse(weight, sub, gpus, stuck[experts == expert])
        if len(np.unique(experts)) > 1:
            collapsed[(start, -1)] = _collapse(weight, sub, gpus, stuck)
    starts = []
    for slots, experts in singles:
        starts.append(row.copy())
        starts[-1][list(slots)] = experts
    for (start, *_), sub in collapsed.items():
        starts.append(row.copy())
        starts[-1][start:start + per_domain] = sub
    return row, starts


def reassign_duplicates(weight: np.ndarray, phy2log: np.ndarray, shape: Shape, limit: np.ndarray,
                        rounds: int = 4) -> np.ndarray:
    """Remove same-GPU duplicates while every GPU stays at or under ``limit [L]`` and the expert-to-domain split
    (node-limited placement) is kept.

    Per layer, exact single moves first (:func:`_best_fix`: give the slot to another expert, optionally with a
    swap, or only a swap). For duplicates no single move removes, moves that go over the limit (a few single
    reassignments and swaps, one expert's duplicates at once, all at once) are repaired by :func:`descend` (all
    starts of all layers in one batch) and the best one that ends under the limit with fewer duplicates is kept.
    Repeats while that removes duplicates, at most ``rounds`` times. What this leaves, a count vector of another
    shape altogether, is :mod:`dspark_lab.moe.recount`'s job.
    """
    assign = phy2log.copy()
    bound = limit * (1 + REL_TOL)
    rows = np.flatnonzero(duplicates_per_gpu(assign, shape.gpus).any(1))
    for _ in range(rounds):
        owner, starts = [], []
        for row in rows:
            assign[row], row_starts = _fix_row(weight[row], assign[row], shape, bound[row])
            owner += [row] * len(row_starts)
            starts += row_starts
        if not starts:
            break
        owner = np.array(owner)
        trial = descend(weight[owner], np.stack(starts), shape)
        top = gpu_loads(weight[owner], trial, shape.gpus).max(1)
        dups = duplicates_per_gpu(trial, shape.gpus).sum(1)
        good = (top <= bound[owner]) & (dups < duplicates_per_gpu(assign[owner], shape.gpus).sum(1))
        if not good.any():
            break
        order = np.lexsort((top, dups))  # per layer: fewest duplicates, then lowest maximum
        order = order[good[order]]
        rows, first = np.unique(owner[order], return_index=True)
        assign[rows] = trial[order[first]]
    return assign
