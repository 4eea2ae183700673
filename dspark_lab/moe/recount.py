"""Replica-count search for nodes that still hold a same-GPU duplicate after the candidates are combined.

Swaps never change how many replicas an expert has, so a node keeps a duplicate when the fix is another count
vector: typically fewer replicas of a very hot expert, so that they fit on distinct GPUs, and more of some middling
or cold ones. All nodes of all layers are searched in one batch:

1. Starts. Three count vectors per node, dealt (:func:`dspark_lab.moe.search.deal`), improved by the swap search
   (:func:`dspark_lab.moe.search.descend`) and cleared of duplicates where a swap does it within the limit
   (:func:`dspark_lab.moe.search.remove_duplicates`): the node's counts capped at its GPU count; the fewest
   replicas that keep each replica under the limit; and :func:`dspark_lab.moe.counts.bounded_counts` with the
   finest pieces. Most nodes are done here.
2. Rounds, on nodes no start fits. Every move of one replica from one expert to another (one of the two among the
   ``HOT`` hottest, or the first holding a duplicate) is scored exactly, applied to the slot it frees, and the best
   few per row go on; the same moves as count vectors are dealt afresh, and the best few of those go on. All of
   them get the swap search (until they are within the limit); each row takes its best while that improves, ranked
   by (over the limit, duplicates, maximum load). A node stops as soon as one of its rows fits.
3. Two passes of rounds. ``NARROW``: rows from the capped and the finest starts, 4 single moves and, of the 8
   count vectors with the lowest :func:`dspark_lab.moe.counts.counts_bound` among moves between two of the
   ``DEALT_HOT`` hottest, 2 dealt ones per row (fast: at DeepSeek-V3 scale this pass leaves nothing). ``WIDE``, on
   the nodes ``NARROW`` leaves: every row, the node's own placement (duplicates and all) included, 16 single moves
   and 16 of all moves dealt.

What this misses goes to the exact solve (:mod:`dspark_lab.moe.exact`).
"""

from __future__ import annotations

import numpy as np

from dspark_lab.moe.counts import bounded_counts, capped_counts, counts_bound, fewest_counts
from dspark_lab.moe.measures import domains_with_duplicates, duplicates_per_gpu, gpu_loads, presence, replica_counts
from dspark_lab.moe.search import REL_TOL, deal, descend, remove_duplicates
from dspark_lab.moe.shape import Shape

HOT = 12         # single moves involve one of this many hottest experts of the node (or a duplicated one);
                 # more: more moves scored per round (time) for rarely a fit the rounds would not find
DEALT_HOT = 16   # narrow pass: count vectors dealt afresh only for moves between two of this many hottest experts
                 # (colder moves barely change the bound; more: more deals per round)
ROUNDS = 20      # improving moves per row at most (bounds the time of a node that never fits)
# Per row and round: single moves that get the swap search, count vectors dealt afresh, and how many of those get
# the swap search. The wide pass runs only on nodes the narrow one leaves.
NARROW = (4, 8, 2)
WIDE = (16, None, 16)


def _node_shape(rows: int, weight: np.ndarray, slots: int, gpus: int) -> Shape:
    return Shape(layers=rows, experts=weight.shape[1], replicas=slots, groups=1, nodes=1, gpus=gpus)


def _key(weight: np.ndarray, local: np.ndarray, gpus: int, bound: np.ndarray) -> np.ndarray:
    """``[3, rows]``: (over ``bound``, same-GPU duplicates, maximum GPU load), compared in that order."""
    top = gpu_loads(weight, local, gpus).max(1)
    return np.stack([top > bound, duplicates_per_gpu(local, gpus).sum(1), top])


def _fits(key: np.ndarray) -> np.ndarray:
    """Rows whose key is within the limit and free of duplicates."""
    return (key[0] == 0) & (key[1] == 0)


def _solved(key: np.ndarray, node: np.ndarray, nodes: int) -> np.ndarray:
    """``[nodes]``: whether any row of the node fits."""
    solved = np.zeros(nodes, dtype=bool)
    np.logical_or.at(solved, node, _fits(key))
    return solved


def _load_rank(weight: np.ndarray) -> np.ndarray:
    """Each expert's place in its row by load, hottest 0."""
    return np.argsort(np.argsort(-weight, 1), 1)


def _single_moves(weight: np.ndarray, local: np.ndarray, gpus: int, rank: np.ndarray | None = None):
    """Every move of one replica from expert ``a`` to expert ``b`` of each row, applied to the slot of ``a`` on the
    GPU holding most copies of ``a`` (then the most loaded) among those without ``b``.

    Returns ``(owner row, slot, b, maximum GPU load after, duplicates after)``. The loads are exact: every GPU
    holding ``a`` gains ``w_a/(c_a-1) - w_a/c_a`` per replica, every GPU holding ``b`` loses
    ``w_b/c_b - w_b/(c_b+1)`` per replica, and the slot's GPU swaps one replica of ``a`` for one of ``b``.
    ``rank``: :func:`_load_rank` of ``weight``, when the caller has it already.
    """
    n = weight.shape[1]
    per_gpu = local.shape[1] // gpus
    count = replica_counts(local, n)
    has = presence(local, n, gpus)
    loads = gpu_loads(weight, local, gpus)
    hot = (_load_rank(weight) if rank is None else rank) < HOT
    duplicated = (has > 1).any(1)
    allowed = ((count[:, :, None] > 1) & (count[:, None, :] < gpus)
               & (hot[:, :, None] | hot[:, None, :] | duplicated[:, :, None]))
    allowed[:, np.arange(n), np.arange(n)] = False
    owner, a, b = np.nonzero(allowed)
    has_a, has_b = has[owner, :, a], has[owner, :, b]                            # [M, G]
    preference = np.where((has_a > 0) & (has_b == 0), has_a * (loads.max() * 4 + 1) + loads[owner], -np.inf)
    gpu = preference.argmax(1)
    fits = np.isfinite(preference[np.arange(len(gpu)), gpu])
    owner, a, b, gpu, has_a, has_b = owner[fits], a[fits], b[fits], gpu[fits], has_a[fits], has_b[fits]
    move = np.arange(len(owner))
    w_a, w_b, c_a, c_b = weight[owner, a], weight[owner, b], count[owner, a], count[owner, b]
    after_a, after_b = w_a / (c_a - 1), w_b / (c_b + 1)
    new_loads = loads[owner] + has_a * (after_a - w_a / c_a)[:, None] + has_b * (after_b - w_b / c_b)[:, None]
    new_loads[move, gpu] += after_b - after_a
    dups = duplicates_per_gpu(local, gpus).sum(1)[owner] - (has_a[move, gpu] > 1)
    block = local[owner[:, None], gpu[:, None] * per_gpu + np.arange(per_gpu)]
    slot = gpu * per_gpu + (block == a[:, None]).argmax(1)
    return owner, slot, b, new_loads.max(1), dups


def _best_per_owner(owner: np.ndarray, keys: list[np.ndarray], keep: int) -> np.ndarray:
    """Indices of the ``keep`` entries per owner that sort first by ``keys`` (most significant first)."""
    order = np.lexsort(tuple(reversed(keys)) + (owner,))
    rank = np.arange(len(order)) - np.searchsorted(owner[order], owner[order])
    return order[rank < keep]


def _trials(weight: np.ndarray, local: np.ndarray, gpus: int, bound: np.ndarray, widths: tuple):
    """One round's trial placements for the rows of ``local``: ``(owner row, placements)`` before the swap search."""
    screen, dealt_screen, dealt_kept = widths
    rank = _load_rank(weight)
    owner, slot, expert, top, dups = _single_moves(weight, local, gpus, rank)
    if not len(owner):
        return owner, local[:0]
    chosen = _best_per_owner(owner, [top > bound[owner], dups, top], screen)
    moved = local[owner[chosen]]
    moved[np.arange(len(chosen)), slot[chosen]] = expert[chosen]
    # The same moves as count vectors, dealt afresh: a move the freed slot cannot host well may pack well.
    # Narrow: only moves between two of the DEALT_HOT hottest, the best by bound.
    # Wide (``dealt_screen`` None): every move.
    source = local[owner, slot]
    if dealt_screen is None:
        pairs = np.arange(len(owner))
    else:
        pairs = np.flatnonzero((rank[owner, source] < DEALT_HOT) & (rank[owner, expert] < DEALT_HOT))
    if not len(pairs) or dealt_screen == 0:
        return owner[chosen], moved
    counts = replica_counts(local, weight.shape[1])[owner[pairs]]
    counts[np.arange(len(pairs)), source[pairs]] -= 1
    counts[np.arange(len(pairs)), expert[pairs]] += 1
    dealt_owner = owner[pairs]
    if dealt_screen is not None:
        screened = _best_per_owner(dealt_owner, [counts_bound(weight[dealt_owner], counts, gpus)], dealt_screen)
        dealt_owner, counts = dealt_owner[screened], counts[screened]
    dealt = deal(weight[dealt_owner], counts, gpus)
    dealt_key = _key(weight[dealt_owner], dealt, gpus, bound[dealt_owner])
    # fewest duplicates first, over the limit or not: the swap search that follows lowers the maximum, not duplicates
    kept = _best_per_owner(dealt_owner, [dealt_key[1], dealt_key[2]], dealt_kept)
    return np.concatenate([owner[chosen], dealt_owner[kept]]), np.concatenate([moved, dealt[kept]])


def _improves(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Column-wise: key ``new [3, k]`` sorts before ``old [3, k]``."""
    return (new[0] < old[0]) | ((new[0] == old[0]) & (
        (new[1] < old[1]) | ((new[1] == old[1]) & (new[2] < old[2] * (1 - REL_TOL)))))


def _search(weight: np.ndarray, local: np.ndarray, gpus: int, bound: np.ndarray, node: np.ndarray,
            searched: np.ndarray, widths: tuple):
    """Improve rows ``local [rows, slots]`` (``node [rows]``: which node each row places) by a move per round and
    row, the ``searched [rows]`` ones only (the others count only as fits); returns the rows and their keys."""
    local = local.copy()
    key = _key(weight, local, gpus, bound)
    active = searched.copy()
    for _ in range(ROUNDS):
        active &= ~_solved(key, node, node.max() + 1)[node]
        rows = np.flatnonzero(active)
        if not len(rows):
            break
        owner, trial = _trials(weight[rows], local[rows], gpus, bound[rows], widths)
        if not len(owner):
            break
        # A trial only has to fit: its swap search stops at the limit.
        trial = descend(weight[rows[owner]], trial, _node_shape(len(trial), weight, local.shape[1], gpus),
                        good_enough=bound[rows[owner]])
        trial_key = _key(weight[rows[owner]], trial, gpus, bound[rows[owner]])
        best = _best_per_owner(owner, list(trial_key), 1)
        better = _improves(trial_key[:, best], key[:, rows[owner[best]]])
        improved = rows[owner[best[better]]]
        active[np.setdiff1d(rows, improved)] = False
        local[improved] = trial[best[better]]
        key[:, improved] = trial_key[:, best[better]]
    return local, key


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
    nodes = len(layers)
    weight_k = np.take_along_axis(weight[layers], members, 1)
    current = np.take_along_axis(replica_counts(held, shape.experts), members, 1)
    limit_k = limit[layers]
    starts = [capped_counts(weight_k, current, gpus, per_domain),
              fewest_counts(weight_k, limit_k, gpus, per_domain),
              bounded_counts(weight_k, per_domain, gpus, finest=True)]
    weight_s = np.tile(weight_k, (len(starts) + 1, 1))
    limit_s = np.tile(limit_k, len(starts) + 1)
    shape_s = _node_shape(len(starts) * nodes, weight_k, per_domain, gpus)
    local = deal(weight_s[nodes:], np.concatenate(starts), gpus)
    local = remove_duplicates(weight_s[nodes:], descend(weight_s[nodes:], local, shape_s), shape_s, limit_s[nodes:])
    local = np.concatenate([np.stack([np.searchsorted(m, h) for m, h in zip(members, held)]), local])
    node = np.tile(np.arange(nodes), len(starts) + 1)
    # Searched rows per pass: the capped and the finest starts (moves from the fewest-counts start rarely fit),
    # then also the node's own placement, duplicates and all (one move from it often fits on small nodes).
    searched = {NARROW: np.repeat([False, True, False, True], nodes), WIDE: np.ones(4 * nodes, dtype=bool)}
    for widths in (NARROW, WIDE):
        local, key = _search(weight_s, local, gpus, limit_s * (1 + REL_TOL), node, searched[widths], widths)
        solved = _solved(key, node, nodes)
        if solved.all():
            break
        searched[WIDE] &= ~solved[node]
    fits = np.flatnonzero(_fits(key))
    for row in _best_per_owner(node[fits], [key[2, fits]], 1):
        k = node[fits[row]]
        out[layers[k], domains[k] * per_domain:(domains[k] + 1) * per_domain] = members[k][local[fits[row]]]
    return out
