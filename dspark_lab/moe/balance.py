"""MoE expert placement: replicate hot experts and place the replicas on GPUs so that GPU loads are even.

Interface and output follow DeepSeek's EPLB (github.com/deepseek-ai/EPLB, ``eplb.py``; DeepSeek-V3 report, section
3.4 "redundant experts"): ``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)`` returns
``phy2log [L, R]``, ``log2phy [L, E, X]`` (padded with -1) and ``logcnt [L, E]``. Physical slots are GPU-major:
GPU ``g`` holds slots ``g*S .. (g+1)*S - 1`` with ``S = R / num_gpus``. When ``num_groups % num_nodes == 0`` the
placement is node-limited (every replica of a group's experts sits on one node), otherwise global.

The algorithm is our own; it keeps EPLB's plan as one candidate so it is never worse:

1. Candidates per layer. (a) EPLB's plan, computed by the same greedy steps with a vectorised packer.
   (b) Ours, on the same group-to-node split: replica counts from :func:`dspark_lab.moe.counts.bounded_counts`
   (EPLB's greedy order, stopped where a lower bound on the maximum GPU load is lowest, at most one replica of an
   expert per GPU, the other slots spread over cold experts), dealt heaviest first to the lightest GPU that has
   room and does not hold the expert yet.
2. Local search (:mod:`dspark_lab.moe.search`), all layers at once: swap a replica on the most loaded GPU with one
   on another GPU of the same node while that lowers the larger of the two loads; then swap away any same-GPU
   duplicate of ours where that stays within EPLB's layer maximum. EPLB's plan gets the first search only on
   layers where ours is still worse than EPLB's plan.
3. Per layer keep a candidate whose maximum is within EPLB's layer maximum, preferring no same-GPU duplicates,
   then the lower maximum. Balancedness is mean / max GPU load and the mean does not depend on placement, so this
   is never below EPLB's balancedness and is above it wherever EPLB's greedy steps leave slack.
4. On a node where a same-GPU duplicate is left (EPLB's plan was the only one within its maximum), search the
   replica counts themselves (:mod:`dspark_lab.moe.recount`): three count vectors dealt and searched, then
   one-replica moves between experts, every node in one batch. Duplicates it leaves stay; the tests prove with
   :mod:`dspark_lab.moe.exact` (a mixed-integer model) that they are forced on their shapes.

The ablation in ``benchmarks/moe_balance.py`` measures what each stage buys (docs/moe.md); a node-by-node pick and
an exact solve as a fifth stage were measured there, bought almost nothing (one wasted slot in 96 small runs)
and were removed.

With a current placement and ``move_cost > 0`` (:mod:`dspark_lab.moe.moves`), candidates are scored as
``balancedness - move_cost * moved / R`` so that a placement which moves few experts can win.
"""

from __future__ import annotations

import numpy as np
import torch

from dspark_lab.moe import eplb_reference
from dspark_lab.moe.counts import bounded_counts
from dspark_lab.moe.measures import (balancedness, balancedness_of_loads, duplicates_per_gpu, gpu_loads, presence,
                                     replica_counts, same_gpu_duplicates)
from dspark_lab.moe.moves import place_with_moves
from dspark_lab.moe.recount import place_by_recount
from dspark_lab.moe.search import REL_TOL, deal, descend, remove_duplicates
from dspark_lab.moe.shape import Shape

__all__ = ["Shape", "balancedness", "balancedness_of_loads", "best_placement", "check_shape", "check_weight",
           "descend", "duplicates_per_gpu", "eplb_plan", "gpu_loads", "own_plan", "presence", "rebalance_experts",
           "remove_duplicates", "replica_counts", "same_gpu_duplicates", "STAGES", "vector_packing"]

# The stages of :func:`best_placement` (module docstring), each of which ``skip`` can turn off for the benchmark's
# ablation (benchmarks/moe_balance.py). A per-node pick and an exact MILP stage were measured there and removed.
STAGES = ("candidates", "swap search", "count search")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_weight(weight) -> np.ndarray:
    """``weight`` as a float64 array ``[layers, experts]``; ValueError naming ``weight`` otherwise."""
    try:
        array = weight.detach().cpu().double().numpy() if isinstance(weight, torch.Tensor) else np.asarray(
            weight, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"weight must be a numeric array [layers, experts]: {exc}") from None
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"weight must have shape [layers, experts], got shape {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError("weight must be finite (no NaN or inf)")
    if (array < 0).any():
        raise ValueError("weight must be non-negative (loads are token counts)")
    return array


def check_shape(weight: np.ndarray, num_replicas, num_groups, num_nodes, num_gpus) -> Shape:
    """Validate the counts against each other; ValueError naming the argument at fault."""
    replicas = _positive_int("num_replicas", num_replicas)
    groups = _positive_int("num_groups", num_groups)
    nodes = _positive_int("num_nodes", num_nodes)
    gpus = _positive_int("num_gpus", num_gpus)
    layers, experts = weight.shape
    if gpus % nodes:
        raise ValueError(f"num_gpus ({gpus}) must be a multiple of num_nodes ({nodes})")
    if replicas % gpus:
        raise ValueError(f"num_replicas ({replicas}) must be a multiple of num_gpus ({gpus})")
    if replicas < experts:
        raise ValueError(f"num_replicas ({replicas}) must be at least the number of experts ({experts})")
    if groups % nodes == 0 and experts % groups:
        raise ValueError(f"num_groups ({groups}) must divide the number of experts ({experts})")
    return Shape(layers=layers, experts=experts, replicas=replicas, groups=groups, nodes=nodes, gpus=gpus)


# ---------------------------------------------------------------------------------------------------------------
# Candidates

def vector_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EPLB's greedy packing, all rows at once: same float32 sums and the same first-lightest tie rule."""
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return eplb_reference.greedy_packing(weight, num_packs)
    order = weight.float().sort(-1, descending=True).indices.numpy()
    values = np.take_along_axis(weight.float().numpy(), order, 1)
    open_sums = np.zeros(rows * num_packs, dtype=np.float32)   # a full pack's sum is inf: never the lightest
    sizes = np.zeros(rows * num_packs, dtype=np.int64)
    target = np.empty((rows, n), dtype=np.int64)
    position = np.empty((rows, n), dtype=np.int64)
    first = np.arange(rows) * num_packs
    for k in range(n):  # item k of every row (heaviest first)
        pick = open_sums.reshape(rows, num_packs).argmin(1) + first
        size = sizes[pick]
        target[:, k], position[:, k] = pick - first, size
        open_sums[pick] = np.where(size + 1 < per_pack, open_sums[pick] + values[:, k], np.float32(np.inf))
        sizes[pick] = size + 1
    pack, slot = np.empty_like(target), np.empty_like(position)
    np.put_along_axis(pack, order, target, 1)
    np.put_along_axis(slot, order, position, 1)
    return torch.from_numpy(pack), torch.from_numpy(slot)


def eplb_plan(weight: np.ndarray, shape: Shape) -> np.ndarray:
    """EPLB's ``phy2log`` (identical to :func:`eplb_reference.rebalance_experts`, faster)."""
    phy2log, _, _ = eplb_reference.rebalance_experts(torch.from_numpy(weight), shape.replicas, shape.groups,
                                                     shape.nodes, shape.gpus, packer=vector_packing)
    return phy2log.numpy()


def own_plan(weight: np.ndarray, shape: Shape, domain_of_expert: np.ndarray) -> np.ndarray:
    """Our candidate on a given expert-to-domain split (``domain_of_expert [L, E]``, E/D experts per domain)."""
    layers, experts = weight.shape
    domains = shape.domains
    per_domain = experts // domains
    slots = shape.replicas // domains
    members = np.argsort(domain_of_expert, axis=1, kind="stable").reshape(layers * domains, per_domain)
    local_weight = np.take_along_axis(weight, members.reshape(layers, -1), 1).reshape(layers * domains, per_domain)
    count = bounded_counts(local_weight, slots, shape.gpus // domains)
    local = deal(local_weight, count, shape.gpus // domains)
    return np.take_along_axis(members, local, 1).reshape(layers, shape.replicas)


# ---------------------------------------------------------------------------------------------------------------
# Entry point

def domain_of_experts(phy2log: np.ndarray, shape: Shape) -> np.ndarray:
    """``[L, E]``: the domain (node, or 0 in global mode) holding each expert in a node-limited ``phy2log``."""
    domain = np.zeros((shape.layers, shape.experts), dtype=np.int64)
    slot_domain = np.arange(shape.replicas) // (shape.replicas // shape.domains)
    np.put_along_axis(domain, phy2log, np.broadcast_to(slot_domain, phy2log.shape), 1)
    return domain


def best_placement(weight: np.ndarray, shape: Shape, skip: frozenset[str] = frozenset()) -> np.ndarray:
    """The balance-only placement: ours after local search, and, on layers where that is not at least as good as
    EPLB's plan, EPLB's plan after the same local search; the better per layer, then same-GPU duplicates removed
    within EPLB's maximum by the count search.

    ``skip``: names from :data:`STAGES` to turn off, for the benchmark's ablation. The result stays valid and at
    least as balanced as EPLB's plan (that plan is always a candidate, and every stage keeps within its maximum);
    it may keep more duplicates or less slack."""
    unknown = set(skip) - set(STAGES)
    if unknown:
        raise ValueError(f"skip: unknown stage {sorted(unknown)}; allowed: {', '.join(STAGES)}")
    search = "swap search" not in skip
    eplb = eplb_plan(weight, shape)
    eplb_max = gpu_loads(weight, eplb, shape.gpus).max(1)
    candidates = []
    if "candidates" not in skip:
        ours = own_plan(weight, shape, domain_of_experts(eplb, shape))
        if search:
            ours = remove_duplicates(weight, descend(weight, ours, shape), shape, eplb_max)
        candidates.append(ours)
        short = np.flatnonzero(gpu_loads(weight, ours, shape.gpus).max(1) > eplb_max * (1 + REL_TOL))
    else:
        short = np.arange(shape.layers)
    improved = eplb.copy()
    if len(short) and search:
        improved[short] = descend(weight[short], eplb[short], shape)
    candidates.append(improved)
    placed = pick(weight, shape, candidates, eplb_max)
    left = np.flatnonzero(duplicates_per_gpu(placed, shape.gpus).any(1))
    if len(left) and "count search" not in skip:
        placed[left] = place_by_recount(weight[left], placed[left], shape, eplb_max[left])
    return placed


def pick(weight: np.ndarray, shape: Shape, candidates: list[np.ndarray], limit: np.ndarray) -> np.ndarray:
    """Per layer, among candidates whose maximum GPU load is within ``max(limit, the lowest maximum)`` (``limit
    [L]``: EPLB's maximum), the one with the fewest same-GPU duplicates, then the lowest maximum."""
    top = np.stack([gpu_loads(weight, c, shape.gpus).max(1) for c in candidates])              # [C, L]
    dups = np.stack([duplicates_per_gpu(c, shape.gpus).sum(1) for c in candidates])           # [C, L]
    eligible = top <= np.maximum(top.min(0), limit) * (1 + REL_TOL)
    key = np.where(eligible, dups * (1.0 + top.max()) + top, np.inf)
    return np.stack(candidates)[key.argmin(0), np.arange(shape.layers)]


def log2phy_of(phy2log: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """``(log2phy [L, E, X] padded with -1, logcnt [L, E])`` for a ``phy2log``; replicas listed in slot order."""
    count = replica_counts(phy2log, experts)
    layers, slots = phy2log.shape
    width = int(count.max())
    order = np.argsort(phy2log, axis=1, kind="stable")
    sorted_expert = np.take_along_axis(phy2log, order, 1)
    start = np.cumsum(count, 1) - count
    rank = np.arange(slots)[None, :] - np.take_along_axis(start, sorted_expert, 1)
    log2phy = np.full((layers, experts, width), -1, dtype=np.int64)
    log2phy[np.arange(layers)[:, None], sorted_expert, rank] = order
    return log2phy, count


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *,
                      current=None, move_cost: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``num_replicas`` expert replicas on ``num_gpus`` GPUs, EPLB's interface (see the module docstring).

    ``weight [layers, experts]``: the load of each expert (tokens routed to it). ``current [layers, R_old]``:
    the placement in use (GPU-major ``phy2log``, ``R_old`` a multiple of ``num_gpus``); with ``move_cost > 0``
    each layer maximises ``balancedness - move_cost * moved / num_replicas``. Returns ``phy2log [L, R]``,
    ``log2phy [L, E, max replicas]`` (padded with -1) and ``logcnt [L, E]`` as int64 tensors.
    """
    array = check_weight(weight)
    shape = check_shape(array, num_replicas, num_groups, num_nodes, num_gpus)
    if not np.isfinite(move_cost) or move_cost < 0:
        raise ValueError(f"move_cost must be a non-negative number, got {move_cost!r}")
    if current is None:
        phy2log = best_placement(array, shape)
    else:
        phy2log = place_with_moves(array, shape, current, move_cost, best_placement(array, shape))
    log2phy, count = log2phy_of(phy2log, shape.experts)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(count)
