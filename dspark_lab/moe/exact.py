"""Exact duplicate-free placement of one node's experts, as a mixed-integer feasibility problem (HiGHS through
:func:`scipy.optimize.milp`).

The balancer's search fixes replica counts first and then packs, so a layer can keep a same-GPU duplicate that
other replica counts would avoid (typically: a very hot expert whose count should spread evenly over the node's
GPUs, with the freed slots going to a few middling experts). This module answers the question exactly for one
domain (a node, or all GPUs in global mode): is there a placement with no expert twice on one GPU and every GPU
load at most ``limit``? If yes it returns one; if the model is infeasible the duplicates are forced for this
domain's experts. The balancer runs it only on the rare domains its search leaves with a duplicate.

Model (replica counts are variables, so the per-replica load ``w_e / k`` stays linear): for each expert ``e``
and each allowed count ``k`` (``ceil(w_e / limit) <= k <= GPUs``), ``y[e,k] = 1`` if ``e`` gets ``k`` replicas,
and ``z[e,k,g] = 1`` if it then has a replica on GPU ``g``::

    sum_k y[e,k] = 1                        every expert gets one count
    sum_g z[e,k,g] = k * y[e,k]             k replicas ...
    sum_k z[e,k,g] <= 1                     ... on k distinct GPUs
    sum_{e,k} z[e,k,g] = S                  every GPU has exactly S slots
    sum_{e,k} (w_e / k) z[e,k,g] <= limit   every GPU within the limit

GPUs of a domain are interchangeable, so without help the solver wades through mirror images of one placement.
Two cuts keep one image of each: the hottest expert's ``k`` replicas sit on GPUs ``0..k-1``; inside each of the
two blocks this makes (GPUs with it, GPUs without), the second hottest expert takes the first GPUs. On the
benchmark's small shapes this takes the slowest solve from about 7 s to under 1 s.

It is makespan scheduling on identical machines with a fixed number of jobs per machine, where a job (expert) may
be split into equal parts on distinct machines; the split is the "redundant experts" of the DeepSeek-V3 report
(arXiv:2412.19437, section 3.4).
"""

from __future__ import annotations

import time

import numpy as np

from dspark_lab.moe.measures import domains_with_duplicates, gpu_loads
from dspark_lab.moe.shape import Shape

TIME_LIMIT_S = 10.0   # for all domains of one call together: placement runs at a training step boundary, so its
                      # time is bounded; a domain whose solve runs out, or is not reached, keeps its duplicates
_CHECK_TOL = 1e-12    # relative: a solution's exact float64 loads must be within the limit by this much
_RETRY_MARGIN = 1e-6  # HiGHS accepts rows up to its 1e-7 tolerance over; a second solve aims this far under


def _constraints(w: np.ndarray, slots: int, gpus: int, bound: float):
    """The model for loads ``w`` already divided by the limit: ``((row, column, value) of the sparse matrix, lower,
    upper, number of variables, expert of each (e, k) pair, k of each pair, z's index [pairs, gpus])``, or None
    when some expert cannot fit."""
    n = len(w)
    low = np.maximum(np.ceil(w / bound - 1e-12), 1).astype(np.int64) if bound > 0 else np.ones(n, np.int64)
    high = min(gpus, slots - n + 1)
    if (low > high).any() or (bound == 0 and w.any()):
        return None
    expert = np.repeat(np.arange(n), high - low + 1)                        # one entry per (e, k) pair
    count = np.concatenate([np.arange(lo, high + 1) for lo in low])
    pairs = len(expert)
    y = np.arange(pairs)
    z = pairs + np.arange(pairs)[:, None] * gpus + np.arange(gpus)
    gpu = np.broadcast_to(np.arange(gpus), z.shape)
    parts = []  # (row indices, column indices, values, lower, upper) per block of rows

    def rows(r, c, v, lower, upper, height):
        c = np.asarray(c)
        parts.append((np.asarray(r).ravel(), c.ravel(), np.broadcast_to(v, c.shape).ravel().astype(np.float64),
                      np.full(height, lower, dtype=np.float64), np.full(height, upper, dtype=np.float64)))

    rows(expert, y, 1.0, 1.0, 1.0, n)
    rows(np.concatenate([np.repeat(np.arange(pairs), gpus), np.arange(pairs)]), np.concatenate([z.ravel(), y]),
         np.concatenate([np.ones(z.size), -count]), 0.0, 0.0, pairs)
    x = pairs * (gpus + 1) + np.arange(n * gpus)
    rows(np.concatenate([(expert[:, None] * gpus + gpu).ravel(), np.arange(n * gpus)]),
         np.concatenate([z.ravel(), x]), np.concatenate([np.ones(z.size), -np.ones(n * gpus)]), 0.0, 0.0, n * gpus)
    rows(gpu, z, 1.0, slots // gpus, slots // gpus, gpus)
    rows(gpu, z, (w[expert] / count)[:, None], -np.inf, bound, gpus)
    # Symmetry cut 1: z[hot,k,g] = y[hot,k] for g < k.
    rank = np.argsort(-w, kind="stable")
    hot = np.flatnonzero(expert == rank[0])
    pair, first = np.nonzero(gpu[hot] < count[hot, None])
    tie = np.arange(len(pair))
    rows(np.concatenate([tie, tie]), np.concatenate([z[hot[pair], first], y[hot[pair]]]),
         np.repeat([1.0, -1.0], len(pair)), 0.0, 0.0, len(pair))
    if n > 1 and gpus > 2:
        # Symmetry cut 2: x2[g] - x2[g+1] + y[hot, g+1] >= 0, with x2[g] = sum_k z[second,k,g]; the y term lifts the
        # row at the boundary between the two blocks.
        second = np.flatnonzero(expert == rank[1])
        g = np.arange(gpus - 1)
        edge = hot[count[hot] < gpus]
        rows(np.concatenate([np.tile(g, len(second)), np.tile(g, len(second)), count[edge] - 1]),
             np.concatenate([z[second, :-1].ravel(), z[second, 1:].ravel(), y[edge]]),
             np.concatenate([np.repeat([1.0, -1.0], len(second) * (gpus - 1)), np.ones(len(edge))]),
             0.0, np.inf, gpus - 1)
    offsets = np.cumsum([0] + [len(p[3]) for p in parts])
    r = np.concatenate([p[0] + o for p, o in zip(parts, offsets)])
    c, v = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
    lower, upper = np.concatenate([p[3] for p in parts]), np.concatenate([p[4] for p in parts])
    return (r, c, v), lower, upper, pairs * (gpus + 1) + n * gpus, expert, count, z


def _solve(w: np.ndarray, slots: int, gpus: int, bound: float, time_limit: float):
    from scipy.optimize import Bounds, LinearConstraint, milp  # imported here: scipy is slow to import
    from scipy.sparse import coo_matrix

    model = _constraints(w, slots, gpus, bound)
    if model is None:
        return "forced", None
    (r, c, v), lower, upper, size, expert, _, z = model
    matrix = coo_matrix((v, (r, c)), shape=(len(lower), size)).tocsr()
    result = milp(np.zeros(size), integrality=np.ones(size), bounds=Bounds(0, 1),
                  constraints=LinearConstraint(matrix, lower, upper),
                  options={"time_limit": float(time_limit), "presolve": True})
    if result.x is None:
        return ("forced" if result.status == 2 else "unknown"), None
    held = result.x[z] > 0.5
    return "found", np.concatenate([expert[held[:, g]] for g in range(gpus)])


def duplicate_free(weight, slots: int, gpus: int, limit: float,
                   time_limit: float = TIME_LIMIT_S) -> tuple[str, np.ndarray | None]:
    """A placement of ``weight [n]`` (one domain's experts) on ``gpus`` GPUs of ``slots / gpus`` slots each, every
    expert at least once, no expert twice on a GPU and every GPU load at most ``limit``.

    Returns ``("found", sub)`` with ``sub [slots]`` the local expert index of each slot (GPU-major),
    ``("forced", None)`` when no such placement exists, or ``("unknown", None)`` when the time limit ran out.
    """
    w = np.asarray(weight, dtype=np.float64)
    n = len(w)
    if n * gpus < slots or slots < n:
        return "forced", None  # too few (expert, GPU) pairs to fill the slots, or too few slots for the experts
    scale = limit if limit > 0 else 1.0
    deadline = time.monotonic() + time_limit
    for bound in (1.0, 1.0 - _RETRY_MARGIN):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        status, sub = _solve(w / scale, slots, gpus, bound if limit > 0 else 0.0, left)
        if sub is None:
            return status, None
        if gpu_loads(w[None], sub[None], gpus).max() <= limit * (1 + _CHECK_TOL):
            return status, sub
    return "unknown", None


def place_without_duplicates(weight: np.ndarray, phy2log: np.ndarray, shape: Shape, limit: np.ndarray,
                             time_limit: float = TIME_LIMIT_S) -> np.ndarray:
    """Replace every domain of ``phy2log [L, R]`` that holds a same-GPU duplicate by an exact duplicate-free
    placement of the same experts within ``limit [L]``, where one exists; the expert-to-domain split is kept.
    Domains where the model is infeasible (duplicates forced), or that ``time_limit`` (seconds, for all domains
    together) does not cover, stay as they are.
    """
    out = phy2log.copy()
    per_domain = shape.replicas // shape.domains
    gpus = shape.gpus // shape.domains
    deadline = time.monotonic() + time_limit
    for layer, domain in zip(*domains_with_duplicates(phy2log, shape.gpus, shape.domains)):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        held = slice(domain * per_domain, (domain + 1) * per_domain)
        members = np.unique(phy2log[layer, held])
        _, local = duplicate_free(weight[layer, members], per_domain, gpus, float(limit[layer]), left)
        if local is not None:
            out[layer, held] = members[local]
    return out
