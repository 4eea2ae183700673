"""MoE expert placement: replicate hot experts and place the replicas on GPUs so that GPU loads are even.

Interface and output follow DeepSeek's EPLB (github.com/deepseek-ai/EPLB, ``eplb.py``; DeepSeek-V3 report, section
3.4 "redundant experts"): ``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)`` returns
``phy2log [L, R]``, ``log2phy [L, E, X]`` (padded with -1) and ``logcnt [L, E]``. Physical slots are GPU-major:
GPU ``g`` holds slots ``g*S .. (g+1)*S - 1`` with ``S = R / num_gpus``. When ``num_groups % num_nodes == 0`` the
placement is node-limited (every replica of a group's experts sits on one node), otherwise global.

The algorithm is our own; it keeps EPLB's plan as one candidate so it is never worse:

1. Candidates per layer. (a) EPLB's plan, computed by the same greedy steps with a vectorised packer.
   (b) Ours: on the same group-to-node split, replica counts by largest load per replica (as EPLB) but capped at the
   number of GPUs of the node, so no expert needs two replicas on one GPU; replicas dealt heaviest first to the
   lightest GPU that has room and does not hold the expert yet.
2. Local search on every candidate, all layers at once: swap a replica on the most loaded GPU with a lighter one on
   another GPU of the same node whenever that lowers the pair's larger load; then remove same-GPU duplicates by
   swaps that do not raise the layer's maximum.
3. Per layer keep the candidate with the lowest maximum GPU load (ties: fewer same-GPU duplicates). Balancedness is
   mean / max GPU load and the mean does not depend on placement, so a lower maximum is a higher balancedness.

With a current placement and ``move_cost > 0`` (:mod:`dspark_lab.moe.moves`), candidates are scored as
``balancedness - move_cost * moved / R`` so that a placement which moves few experts can win.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dspark_lab.moe import eplb_reference

_REL_TOL = 1e-12


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """The counts of one balancing problem, validated: L layers, E experts, R slots on G GPUs in N nodes."""

    layers: int
    experts: int
    replicas: int
    groups: int
    nodes: int
    gpus: int

    @property
    def hierarchical(self) -> bool:
        return self.groups % self.nodes == 0

    @property
    def domains(self) -> int:
        """Node-limited domains a replica may not leave: the nodes, or one domain in global mode."""
        return self.nodes if self.hierarchical else 1

    @property
    def slots_per_gpu(self) -> int:
        return self.replicas // self.gpus


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
# Measures (plain numpy, also used by the CLI, the benchmark and the tests)

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


# ---------------------------------------------------------------------------------------------------------------
# Candidates

def _vector_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EPLB's greedy packing, all rows at once: same float32 sums and the same first-lightest tie rule."""
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return eplb_reference.greedy_packing(weight, num_packs)
    order = weight.float().sort(-1, descending=True).indices.numpy()
    values = weight.float().numpy()
    sums = np.zeros((rows, num_packs), dtype=np.float32)
    sizes = np.zeros((rows, num_packs), dtype=np.int64)
    pack = np.empty((rows, n), dtype=np.int64)
    position = np.empty((rows, n), dtype=np.int64)
    row = np.arange(rows)
    for k in range(n):
        item = order[:, k]
        target = np.where(sizes < per_pack, sums, np.float32(np.inf)).argmin(1)
        pack[row, item] = target
        position[row, item] = sizes[row, target]
        sums[row, target] += values[row, item]
        sizes[row, target] += 1
    return torch.from_numpy(pack), torch.from_numpy(position)


def eplb_plan(weight: np.ndarray, shape: Shape) -> np.ndarray:
    """EPLB's ``phy2log`` (identical to :func:`eplb_reference.rebalance_experts`, faster)."""
    phy2log, _, _ = eplb_reference.rebalance_experts(torch.from_numpy(weight), shape.replicas, shape.groups,
                                                     shape.nodes, shape.gpus, packer=_vector_packing)
    return phy2log.numpy()


def _capped_counts(weight: np.ndarray, slots: int, cap: int) -> np.ndarray:
    """Replica counts per row summing to ``slots``: each extra replica to the highest load per replica, at most
    ``cap`` replicas per expert while the cap leaves room for every slot."""
    rows, n = weight.shape
    count = np.ones((rows, n), dtype=np.int64)
    row = np.arange(rows)
    if n * cap < slots:
        cap = slots  # duplicates on a GPU are forced: no cap
    for _ in range(slots - n):
        score = np.where(count < cap, weight / count, -1.0)
        pick = score.argmax(1)
        count[row, pick] += 1
    return count


def _deal(weight: np.ndarray, count: np.ndarray, gpus: int) -> np.ndarray:
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


def own_plan(weight: np.ndarray, shape: Shape, domain_of_expert: np.ndarray) -> np.ndarray:
    """Our candidate on a given expert-to-domain split (``domain_of_expert [L, E]``, E/D experts per domain)."""
    layers, experts = weight.shape
    domains = shape.domains
    per_domain = experts // domains
    slots = shape.replicas // domains
    members = np.argsort(domain_of_expert, axis=1, kind="stable").reshape(layers * domains, per_domain)
    local_weight = np.take_along_axis(weight, members.reshape(layers, -1), 1).reshape(layers * domains, per_domain)
    count = _capped_counts(local_weight, slots, shape.gpus // domains)
    local = _deal(local_weight, count, shape.gpus // domains)
    return np.take_along_axis(members, local, 1).reshape(layers, shape.replicas)


# ---------------------------------------------------------------------------------------------------------------
# Local search

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
        ok, slot_a, slot_b, _ = state.best_swaps(active, slots, top * (1 - _REL_TOL))
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
    limit = (state.loads.max(1) if limit is None else np.maximum(limit, state.loads.max(1))) * (1 + _REL_TOL)
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


# ---------------------------------------------------------------------------------------------------------------
# Entry point

def domain_of_experts(phy2log: np.ndarray, shape: Shape) -> np.ndarray:
    """``[L, E]``: the domain (node, or 0 in global mode) holding each expert in a node-limited ``phy2log``."""
    domain = np.zeros((shape.layers, shape.experts), dtype=np.int64)
    slot_domain = np.arange(shape.replicas) // (shape.replicas // shape.domains)
    np.put_along_axis(domain, phy2log, np.broadcast_to(slot_domain, phy2log.shape), 1)
    return domain


def best_placement(weight: np.ndarray, shape: Shape) -> np.ndarray:
    """The balance-only placement: ours after local search, and, on layers where that is not at least as good as
    EPLB's plan, EPLB's plan after the same local search; combined node by node."""
    eplb = eplb_plan(weight, shape)
    eplb_max = gpu_loads(weight, eplb, shape.gpus).max(1)
    ours = descend(weight, own_plan(weight, shape, domain_of_experts(eplb, shape)), shape)
    if duplicates_per_gpu(ours, shape.gpus).any():
        ours = remove_duplicates(weight, ours, shape, eplb_max)
    short = np.flatnonzero(gpu_loads(weight, ours, shape.gpus).max(1) > eplb_max * (1 + _REL_TOL))
    improved = eplb.copy()
    if len(short):
        improved[short] = remove_duplicates(weight[short], descend(weight[short], eplb[short], shape), shape,
                                            eplb_max[short])
    return pick_per_domain(weight, shape, [ours, improved], limit=eplb_max)


def duplicates_per_gpu(phy2log: np.ndarray, gpus: int) -> np.ndarray:
    """``[L, G]``: slots holding an expert already held by another slot of the same GPU."""
    held = np.sort(phy2log.reshape(len(phy2log), gpus, -1), axis=-1)
    return (held[..., 1:] == held[..., :-1]).sum(-1)


def pick_per_domain(weight: np.ndarray, shape: Shape, candidates: list[np.ndarray],
                    limit: np.ndarray | None = None) -> np.ndarray:
    """Assemble each layer node by node from candidates that share one expert-to-node split.

    A layer's maximum is its worst node's, so the best reachable maximum is ``M = max over nodes of (min over
    candidates of the node's maximum)``. Each node then takes, among candidates whose node maximum is within
    ``max(M, limit)`` (``limit [L]``: EPLB's maximum), the one with the fewest same-GPU duplicates, then the lowest
    maximum: a duplicate-free node is preferred as long as the layer stays at least as balanced as EPLB.
    """
    layers, domains = shape.layers, shape.domains
    gpus_per_domain = shape.gpus // domains
    top = np.stack([gpu_loads(weight, c, shape.gpus).reshape(layers, domains, gpus_per_domain).max(-1)
                    for c in candidates])                                   # [C, L, D]
    dups = np.stack([duplicates_per_gpu(c, shape.gpus).reshape(layers, domains, -1).sum(-1) for c in candidates])
    reachable = top.min(0).max(1)                                           # [L]
    if limit is not None:
        reachable = np.maximum(reachable, limit)
    eligible = top <= (reachable * (1 + _REL_TOL))[None, :, None]
    key = np.where(eligible, dups * (1.0 + top.max()) + top, np.inf)       # fewest duplicates, then lowest max
    choice = key.argmin(0)                                                  # [L, D]
    stacked = np.stack(candidates).reshape(len(candidates), layers, domains, -1)
    return stacked[choice, np.arange(layers)[:, None], np.arange(domains)[None, :]].reshape(layers, -1)


def pick(weight: np.ndarray, shape: Shape, candidates: list[np.ndarray], extra_cost=None) -> np.ndarray:
    """Per layer the candidate with the highest balancedness (minus ``extra_cost [C, L]``), then fewest
    duplicates; earlier candidates win exact ties."""
    score = np.stack([balancedness_of_loads(gpu_loads(weight, c, shape.gpus)) for c in candidates])
    if extra_cost is not None:
        score = score - extra_cost
    dups = np.stack([duplicates_per_gpu(c, shape.gpus).sum(1) for c in candidates])
    best = score.max(0)
    choice = np.where(score >= best - 1e-12, -dups, -np.inf).argmax(0)
    return np.stack(candidates)[choice, np.arange(shape.layers)]


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
        from dspark_lab.moe.moves import place_with_moves

        phy2log = place_with_moves(array, shape, current, move_cost)
    log2phy, count = log2phy_of(phy2log, shape.experts)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(count)
