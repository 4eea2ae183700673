"""Spanning-tree packing for broadcast and all-reduce on a link graph, planned against the max-flow bound.

Blink (Wang et al., *Blink: Fast and Generic Collectives for Distributed ML*, MLSys 2020) packs spanning trees
rooted at the broadcast root over the links an allocation really has, instead of assuming a ring of equal links.
The packing problem is an LP over trees: maximise the total rate ``sum_T x_T`` subject to, for every directed link
``e``, ``sum_T load_T(e) x_T <= capacity(e)``. Its dual prices the links, and the cheapest tree under those prices is
a minimum-cost arborescence (Edmonds' algorithm). We:

1. generate candidate trees with a few rounds of multiplicative weights (Blink's method, after Garg and Koenemann:
   link prices grow with the load each chosen tree puts on them, so later trees avoid crowded links);
2. finish by column generation on the LP (HiGHS through scipy) until no tree prices below 1 - ``PRICE_TOL``: the
   fractional optimum, not an approximation of it;
3. keep at most ``2 x devices`` trees (a vertex of the LP has few non-zero rates; if more remain, the smallest tree is
   dropped and the LP re-solved) — Blink's integer step, which keeps the number of NCCL-like streams small.

A tree edge between two devices may be a direct link or a path through switches (an NVSwitch, PCIe switches and
CPUs); switches forward but do not replicate data, so two tree edges through one switch port both load it.

The upper bound for broadcast is Edmonds' theorem: the most a root can send to every device at once is the smallest
over destinations of the max flow from the root (networkx's max-flow). All-reduce is reduce over the reversed
trees plus broadcast over the trees, both at once on opposite link directions, so a tree loads each link by its
forward and its reversed use. ``busbw`` follows the nccl-tests factors (broadcast 1, all-reduce 2(n-1)/n).

The ring reference is the best single ring order, searched exhaustively with branch and bound, used in both
directions for all-reduce (as NCCL does) and as a chain for broadcast. The two directions share link capacity: they
add up only over disjoint directed links (with 2 devices, or through a switch port, they carry what one ring does).
"""

from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
from scipy.optimize import linprog

from dspark_lab.collectives.topology import Topology
from dspark_lab.errors import DSparkError

MAX_DEVICES = 64  # one packing; the ring search is exhaustive only up to RING_EXHAUSTIVE devices
RING_EXHAUSTIVE = 10
MWU_ROUNDS = 40  # candidate trees from multiplicative weights; more rounds leave fewer LP rounds to column generation
MWU_EPSILON = 0.5  # price growth per unit of relative load: larger spreads the candidates faster
PRICE_TOL = 1e-6  # a tree must price below 1 - PRICE_TOL to enter the LP
MAX_COLUMNS = 400  # column-generation rounds, a bound that is never reached on the presets
MAX_PATH_HOPS = 6  # switches between two devices on one tree edge
KEEP_SLACKS = (0.0, 0.01, 0.02, 0.04)  # rate the sparse step may give up, tried in turn, to keep at most 2n trees
KEEP_GOOD = 0.98  # stop trying slacks once the kept trees carry this fraction of the LP optimum
REWEIGHT_ROUNDS = 6


@dataclass(frozen=True, slots=True)
class Tree:
    """Edges ``(parent, child)`` between devices, each with the physical path it takes."""

    edges: tuple[tuple[str, str], ...]
    paths: tuple[tuple[str, ...], ...]


@dataclass(slots=True)
class Plan:
    op: str
    topology: str
    devices: list[str]
    root: str
    trees: list[tuple[Tree, float]]  # (tree, GB/s)
    rate_gb_s: float
    bound_gb_s: float | None
    ring_order: list[str]
    ring_rate_gb_s: float
    plan_ms: float
    notes: list[str] = field(default_factory=list)

    @property
    def algbw_gb_s(self) -> float:
        return self.rate_gb_s

    @property
    def ring_algbw_gb_s(self) -> float:
        n = len(self.devices)
        if self.op == "broadcast":
            return self.ring_rate_gb_s
        return self.ring_rate_gb_s * n / (2 * (n - 1))  # ring_rate already counts both directions

    def bus_factor(self) -> float:
        n = len(self.devices)
        return 1.0 if self.op == "broadcast" else 2 * (n - 1) / n

    def as_dict(self) -> dict[str, Any]:
        factor = self.bus_factor()
        return {
            "op": self.op, "topology": self.topology, "devices": self.devices, "root": self.root,
            "trees": [{"rate_gb_s": round(rate, 4), "edges": [list(e) for e in tree.edges],
                       "paths": [list(p) for p in tree.paths]} for tree, rate in self.trees],
            "algbw_gb_s": round(self.algbw_gb_s, 4), "busbw_gb_s": round(self.algbw_gb_s * factor, 4),
            "max_flow_bound_gb_s": None if self.bound_gb_s is None else round(self.bound_gb_s, 4),
            "fraction_of_bound": None if not self.bound_gb_s else round(self.rate_gb_s / self.bound_gb_s, 4),
            "ring_order": self.ring_order, "ring_algbw_gb_s": round(self.ring_algbw_gb_s, 4),
            "ring_busbw_gb_s": round(self.ring_algbw_gb_s * factor, 4),
            "speedup_over_ring": round(self.algbw_gb_s / self.ring_algbw_gb_s, 4) if self.ring_algbw_gb_s else None,
            "plan_ms": round(self.plan_ms, 2), "notes": self.notes,
        }


def min_arborescence(cost: np.ndarray, root: int) -> np.ndarray:
    """Chu-Liu/Edmonds on a dense cost matrix (``inf`` = no edge): the parent of every node, -1 at the root.

    Dense numpy instead of networkx's general branching code: the packing calls this once per tree it prices, on at
    most MAX_DEVICES nodes, and the dense form is about fifty times faster there.
    """
    n = cost.shape[0]
    cost = cost.astype(float).copy()
    cost[:, root] = np.inf
    np.fill_diagonal(cost, np.inf)
    parent = cost.argmin(axis=0)
    parent[root] = -1
    others_ok = np.isfinite(cost[parent, np.arange(n)])
    others_ok[root] = True
    if not others_ok.all():
        raise DSparkError("no spanning tree reaches every device from the root over these links")
    mark = np.zeros(n, dtype=int)
    cycle = None
    for start in range(n):
        path, u = [], start
        while u != -1 and mark[u] == 0:
            mark[u] = start + 1
            path.append(u)
            u = parent[u]
        if u != -1 and mark[u] == start + 1:
            cycle = path[path.index(u):]
            break
    if cycle is None:
        return parent
    cyc = np.array(cycle)
    in_cycle = np.zeros(n, dtype=bool)
    in_cycle[cyc] = True
    outside = np.flatnonzero(~in_cycle)
    k = len(outside)
    reduced = np.full((k + 1, k + 1), np.inf)
    reduced[:k, :k] = cost[np.ix_(outside, outside)]
    entering = cost[np.ix_(outside, cyc)] - cost[parent[cyc], cyc][None, :]
    reduced[:k, k] = entering.min(axis=1)
    entry_at = cyc[entering.argmin(axis=1)]
    leaving = cost[np.ix_(cyc, outside)]
    reduced[k, :k] = leaving.min(axis=0)
    exit_from = cyc[leaving.argmin(axis=0)]
    new_root = int(np.searchsorted(outside, root)) if not in_cycle[root] else k
    sub = min_arborescence(reduced, new_root)
    full = parent.copy()
    for i, v in enumerate(outside):
        p = sub[i]
        full[v] = -1 if p == -1 else (exit_from[i] if p == k else outside[p])
    into = sub[k]
    if into != -1:  # the contracted cycle's entering edge breaks the cycle at its head
        full[entry_at[into]] = outside[into]
    return full


class _Links:
    """The allocation's physical graph and, per device pair, the switch-only paths a tree edge may take."""

    def __init__(self, graph, devices: list[str]):
        self.graph = graph
        self.devices = devices
        self.edges = list(self.graph.edges)
        self.index = {e: i for i, e in enumerate(self.edges)}
        self.capacity = np.array([self.graph.edges[e]["capacity"] for e in self.edges])
        device_set = set(devices)
        position = {d: i for i, d in enumerate(devices)}
        self.paths: dict[tuple[str, str], list[tuple[str, ...]]] = {}
        path_list, pair_of_path = [], []
        switches_only = self.graph.subgraph([n for n in self.graph if n not in device_set])
        for u in devices:
            for v in devices:
                if u == v:
                    continue
                # intermediates may only be switches: a device on the way would be a tree node of its own
                found = [(u, v)] if self.graph.has_edge(u, v) else []
                for a in self.graph.successors(u):
                    if a in device_set:
                        continue
                    for b in self.graph.predecessors(v):
                        if b in device_set:
                            continue
                        middles = [[a]] if a == b else (
                            nx.all_simple_paths(switches_only, a, b, cutoff=MAX_PATH_HOPS - 1))
                        found += [(u, *m, v) for m in middles]
                if found:
                    self.paths[(u, v)] = found
                    path_list += found
                    pair_of_path += [position[u] * len(devices) + position[v]] * len(found)
        self.path_list = path_list
        self.pair_of_path = np.array(pair_of_path)
        self.forward = np.array([self.path_vector(p) for p in path_list])
        reverse = [self.path_vector(p[::-1]) for p in path_list]
        self.reverse_ok = np.array([r is not None for r in reverse])
        self.reverse = np.array([r if r is not None else np.zeros(len(self.edges)) for r in reverse])

    def path_vector(self, path: tuple[str, ...]) -> np.ndarray | None:
        vec = np.zeros(len(self.edges))
        for hop in zip(path, path[1:]):
            if hop not in self.index:
                return None
            vec[self.index[hop]] += 1
        return vec

    def usage(self, both_directions: bool) -> np.ndarray:
        return self.forward + self.reverse if both_directions else self.forward

    def cheapest_tree(self, root: str, price: np.ndarray, both_directions: bool) -> tuple[np.ndarray, float, tuple]:
        """The minimum-cost arborescence rooted at ``root`` under link prices: (link loads, cost, identity)."""
        n = len(self.devices)
        usage = self.usage(both_directions)
        if not len(self.path_list):
            raise DSparkError("no spanning tree reaches every device from the root over these links")
        cost = usage @ price
        if both_directions:
            cost = np.where(self.reverse_ok, cost, np.inf)
        order = np.lexsort((cost, self.pair_of_path))
        pairs = self.pair_of_path[order]
        first = order[np.r_[True, pairs[1:] != pairs[:-1]]]
        matrix = np.full(n * n, np.inf)
        matrix[self.pair_of_path[first]] = cost[first]
        best_path = np.full(n * n, -1)
        best_path[self.pair_of_path[first]] = first
        parent = min_arborescence(matrix.reshape(n, n), self.devices.index(root))
        chosen = [int(best_path[parent[v] * n + v]) for v in range(n) if parent[v] != -1]
        return usage[chosen].sum(axis=0), float(cost[chosen].sum()), tuple(sorted(chosen))

    def tree(self, identity: tuple) -> Tree:
        paths = tuple(self.path_list[i] for i in identity)
        return Tree(tuple((p[0], p[-1]) for p in paths), paths)


def _solve(columns: list[np.ndarray], capacity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """max sum x s.t. A x <= c, x >= 0; returns rates and the link prices (duals)."""
    a = np.column_stack(columns)
    result = linprog(-np.ones(a.shape[1]), A_ub=a, b_ub=capacity, bounds=(0, None), method="highs-ds")
    if result.status != 0:
        raise DSparkError(f"tree packing LP failed: {result.message}")
    return result.x, -result.ineqlin.marginals


def broadcast_bound(topology: Topology, devices: list[str], root: str) -> float:
    """Edmonds' bound: min over destinations of the max flow from the root, in GB/s."""
    graph = topology.graph(devices)
    return min(nx.maximum_flow_value(graph, root, v, capacity="capacity") for v in devices if v != root)


def pack_trees(links: _Links, root: str, both_directions: bool, max_trees: int) -> list[tuple[Tree, float]]:
    capacity = links.capacity
    identities: list[tuple] = []
    columns: list[np.ndarray] = []

    def add(load: np.ndarray, identity: tuple) -> bool:
        if identity in identities:
            return False
        identities.append(identity)
        columns.append(load)
        return True

    # 1. multiplicative weights: candidate trees that spread over the links
    price = 1.0 / capacity
    for _ in range(MWU_ROUNDS):
        load, _cost, identity = links.cheapest_tree(root, price, both_directions)
        add(load, identity)
        used = load > 0
        bottleneck = float(np.min(capacity[used] / load[used]))
        price = price * (1 + MWU_EPSILON * bottleneck * load / capacity)
    # 2. column generation to the LP optimum
    for _ in range(MAX_COLUMNS):
        rates, duals = _solve(columns, capacity)
        load, cost, identity = links.cheapest_tree(root, np.maximum(duals, 0), both_directions)
        if cost >= 1 - PRICE_TOL or not add(load, identity):
            break
    # 3. keep few trees
    rates, keep = _sparse(np.column_stack(columns), capacity, float(rates.sum()), max_trees)
    return [(links.tree(identities[i]), float(r)) for i, r in zip(keep, rates) if r > 1e-9]


def _sparse(a: np.ndarray, capacity: np.ndarray, optimum: float, max_trees: int) -> tuple[np.ndarray, list[int]]:
    """At most ``max_trees`` columns carrying as much of ``optimum`` as possible.

    Among near-optimal solutions (total >= (1 - slack) x optimum) a reweighted L1 objective (weights 1 / (x + d),
    Candes, Wakin and Boyd 2008) drives small rates to zero; the ``max_trees`` largest survivors are re-solved for the
    most rate. The LP optimum's vertex may use up to one tree per link; this typically keeps 2n with under 2% lost.
    """
    n = a.shape[1]
    rates, _ = _solve([a[:, i] for i in range(n)], capacity)
    if np.count_nonzero(rates > 1e-9) <= max_trees:  # the LP's own vertex is sparse enough
        keep = [int(i) for i in np.argsort(-rates) if rates[i] > 1e-9]
        return rates[keep], keep
    best_rates, best_keep = np.zeros(0), []
    for slack in KEEP_SLACKS:
        weights = np.ones(n)
        x = np.zeros(n)
        for _ in range(REWEIGHT_ROUNDS):
            result = linprog(weights, A_ub=np.vstack([a, -np.ones((1, n))]),
                             b_ub=np.r_[capacity, -(1 - slack) * optimum], bounds=(0, None), method="highs-ds")
            if result.status != 0:
                break
            x = result.x
            weights = 1.0 / (x + 1e-3 * optimum / n)
            if np.count_nonzero(x > 1e-9) <= max_trees:
                break
        keep = [int(i) for i in np.argsort(-x)[:max_trees] if x[i] > 1e-9]
        if not keep:
            continue
        rates, _ = _solve([a[:, i] for i in keep], capacity)
        if rates.sum() > best_rates.sum():
            best_rates, best_keep = rates, keep
        if best_rates.sum() >= KEEP_GOOD * optimum:
            break
    return best_rates, best_keep


def _pack_tiered(graph, devices: list[str], root: str, both_directions: bool,
                 max_trees: int) -> list[tuple[Tree, float]]:
    """Trees on the direct device-to-device links first, then on what they leave (switch paths included).

    Where direct links span the allocation (NVLink meshes), their packing is integral in Edmonds' sense and needs few
    trees; the slower switched paths (PCIe, CPU sockets) then add their share in a few more. A single packing over
    both mixes them into many small trees, which the keep-few step must then cut.
    """
    device_set = set(devices)
    direct = nx.DiGraph()  # built in the graph's own order: every rank must plan the same trees
    direct.add_nodes_from(devices)
    direct.add_edges_from((u, v, data) for u, v, data in graph.edges(data=True) if u in device_set and v in device_set)
    try:
        first = pack_trees(_Links(direct, devices), root, both_directions, max_trees)
    except DSparkError:
        return []  # direct links do not reach every device: the single packing is the only one
    residual = graph.copy()
    for tree, rate in first:
        for path in tree.paths:
            hops = list(zip(path, path[1:]))
            hops += [(b, a) for a, b in hops] if both_directions else []
            for hop in hops:
                residual.edges[hop]["capacity"] -= rate
    residual.remove_edges_from([e for e in residual.edges if residual.edges[e]["capacity"] <= 1e-6])
    left = max_trees - len(first)
    if left <= 0:
        return first
    try:
        second = pack_trees(_Links(residual, devices), root, both_directions, left)
    except DSparkError:
        return first
    return first + second


def _hop_loads(links: _Links) -> dict[tuple[str, str], np.ndarray]:
    """Per ordered device pair, the link uses of its widest path (the one a ring hop takes)."""
    def width(path: tuple[str, ...]) -> float:
        return min(links.capacity[links.index[h]] for h in zip(path, path[1:]))

    return {pair: links.path_vector(max(paths, key=width)) for pair, paths in links.paths.items() if paths}


def _pair_rate(a: np.ndarray, b: np.ndarray, capacity: np.ndarray) -> float:
    """max ``r1 + r2`` subject to ``r1 a(e) + r2 b(e) <= capacity(e)`` on every link, ``r1, r2 >= 0``: the most two
    streams with link uses ``a`` and ``b`` carry together. Two variables, so the optimum is the best feasible vertex:
    an axis point or where two link constraints meet."""
    used = (a > 0) | (b > 0)
    a, b, c = a[used], b[used], capacity[used]
    points = [(float(np.min(c[a > 0] / a[a > 0])) if (a > 0).any() else 0.0, 0.0),
              (0.0, float(np.min(c[b > 0] / b[b > 0])) if (b > 0).any() else 0.0)]
    i, j = np.triu_indices(len(c), k=1)
    det = a[i] * b[j] - a[j] * b[i]
    meet = np.abs(det) > 1e-12
    i, j, det = i[meet], j[meet], det[meet]
    points += zip(((c[i] * b[j] - c[j] * b[i]) / det).tolist(), ((a[i] * c[j] - a[j] * c[i]) / det).tolist())
    slack = 1e-9 * float(c.max())
    return max(x + y for x, y in points if x >= -slack and y >= -slack and np.all(a * x + b * y <= c + slack))


def _ring_load(hops: dict[tuple[str, str], np.ndarray], order: list[str]) -> np.ndarray | None:
    """Link uses of one ring along ``order`` (closing back to its first device); None when a hop has no path."""
    pairs = list(zip(order, order[1:] + order[:1]))
    if any(pair not in hops for pair in pairs):
        return None
    return sum(hops[pair] for pair in pairs)


def _ring_rate(links: _Links, order: list[str]) -> float:
    """Bottleneck rate of one ring order, each hop on its widest path, used in one direction."""
    load = _ring_load(_hop_loads(links), order)
    if load is None:
        return 0.0
    used = load > 0  # a widest path exists in both directions only if links are symmetric
    return float(np.min(links.capacity[used] / load[used]))


def _two_rings_rate(links: _Links, order: list[str], hops: dict | None = None) -> float:
    """The most two rings carry together, one along ``order`` and one along its reverse, sharing link capacity.

    Over disjoint directed links (3 or more devices on direct links) this is the sum of the two rings' rates; with 2
    devices, or where both rings cross a switch's port in the same direction, they share it and are credited once.
    """
    hops = _hop_loads(links) if hops is None else hops
    forward, backward = _ring_load(hops, order), _ring_load(hops, order[::-1])
    if forward is None or backward is None:
        return 0.0
    return _pair_rate(forward, backward, links.capacity)


def best_ring(links: _Links) -> tuple[list[str], float]:
    """The ring order whose two rings (the order and its reverse, as NCCL runs all-reduce) carry the most together
    (``_two_rings_rate``): branch and bound up to RING_EXHAUSTIVE devices, else greedy widest next hop."""
    devices = links.devices
    hops = _hop_loads(links)
    width = {pair: max(min(links.capacity[links.index[h]] for h in zip(p, p[1:])) for p in paths)
             for pair, paths in links.paths.items()}
    position = {d: i for i, d in enumerate(devices)}  # ties broken by device order: every rank finds one ring
    first, rest = devices[0], devices[1:]
    best_order, best = [first, *rest], _two_rings_rate(links, [first, *rest], hops)
    if len(devices) <= RING_EXHAUSTIVE:
        def extend(order: list[str], left: set[str], forward: np.ndarray, backward: np.ndarray) -> None:
            nonlocal best_order, best
            if len(order) > 1 and _pair_rate(forward, backward, links.capacity) <= best:
                return  # the hops so far already cap both rings together at the incumbent
            if not left:
                rate = _two_rings_rate(links, order, hops)
                if rate > best:
                    best_order, best = list(order), rate
                return
            for v in sorted(left, key=lambda v: (-width.get((order[-1], v), 0), position[v])):
                pair, back = (order[-1], v), (v, order[-1])
                if pair in hops and back in hops:
                    order.append(v)
                    extend(order, left - {v}, forward + hops[pair], backward + hops[back])
                    order.pop()

        zeros = np.zeros(len(links.edges))
        extend([first], set(rest), zeros, zeros)
    else:  # greedy widest-next-hop, then 2-opt is left out: large rings are the hierarchical planner's job
        order, left = [first], set(rest)
        while left:
            nxt = max(sorted(left, key=position.get), key=lambda v: width.get((order[-1], v), 0.0))
            order.append(nxt)
            left.discard(nxt)
        rate = _two_rings_rate(links, order, hops)
        if rate > best:
            best_order, best = order, rate
    return best_order, best


def plan(topology: Topology, devices: list[str] | None = None, *, root: str | None = None,
         op: str = "broadcast") -> Plan:
    """Pack trees for ``op`` (broadcast | allreduce) over ``devices`` of ``topology``."""
    if op not in ("broadcast", "allreduce"):
        raise DSparkError(f"--op: {op!r}; allowed: broadcast | allreduce")
    devices = list(devices or topology.devices)
    if not 2 <= len(devices) <= MAX_DEVICES:
        raise DSparkError(f"--ranks: 2..{MAX_DEVICES} devices, got {len(devices)}")
    root = root or devices[0]
    if root not in devices:
        raise DSparkError(f"--root: {root} is not among the allocated devices")
    start = time.perf_counter()
    graph = topology.graph(devices)
    links = _Links(graph, devices)
    both = op == "allreduce"
    max_trees = 2 * len(devices)
    bound = broadcast_bound(topology, devices, root) if op == "broadcast" else None
    trees = _pack_tiered(graph, devices, root, both, max_trees)
    if bound is None or sum(r for _, r in trees) < (1 - 1e-6) * bound:
        trees = max(trees, pack_trees(links, root, both, max_trees), key=lambda found: sum(r for _, r in found))
    rate = sum(r for _, r in trees)
    ring_order, ring_rate = best_ring(links)
    if op == "broadcast":
        ring_rate = _ring_rate(links, ring_order)  # a chain in one direction
    notes = []
    if len(devices) > RING_EXHAUSTIVE:
        notes.append(f"ring order searched greedily (exhaustive up to {RING_EXHAUSTIVE} devices)")
    return Plan(op, topology.name, devices, root, trees, rate, bound, ring_order, ring_rate,
                (time.perf_counter() - start) * 1e3, notes)


def chain_plan(topology: Topology, devices: list[str], order: list[str]) -> Plan:
    """The ring reference as a plan: one tree that is the chain along ``order`` from its first device, each hop on
    its widest path (what a ring broadcast pipelines through)."""
    links = _Links(topology.graph(devices), devices)
    paths = []
    for u, v in zip(order, order[1:]):
        if (u, v) not in links.paths:
            raise DSparkError(f"no path from {u} to {v} in {topology.name}")
        paths.append(max(links.paths[(u, v)],
                         key=lambda p: min(links.capacity[links.index[h]] for h in zip(p, p[1:]))))
    tree = Tree(tuple((p[0], p[-1]) for p in paths), tuple(paths))
    load = sum(links.path_vector(p) for p in paths)
    rate = float(np.min(links.capacity[load > 0] / load[load > 0]))
    return Plan("broadcast", topology.name, list(order), order[0], [(tree, rate)], rate, None, list(order), rate, 0.0)


_NODE_PREFIX = re.compile(r"^(n\d+)-")


def node_groups(devices: list[str]) -> list[list[str]] | None:
    """Devices grouped by node, for names ``n<k>-...`` (the ``nodes:N,gpus:G`` preset's); None unless every device
    is named so and there are at least two nodes. Groups follow the order in which nodes first appear."""
    groups: dict[str, list[str]] = {}
    for device in devices:
        match = _NODE_PREFIX.match(device)
        if match is None:
            return None
        groups.setdefault(match[1], []).append(device)
    return list(groups.values()) if len(groups) >= 2 else None


@dataclass(frozen=True, slots=True)
class Hierarchical:
    """The hierarchical all-reduce's stages in GB/s of algbw: ``inside`` (reduce then broadcast inside a node, the
    slowest node's), ``across`` (all-reduce between nodes, every device leading the slice it carries) and the
    pipelined whole, ``algbw`` = the slower stage."""

    groups: list[list[str]]
    inside_gb_s: float
    across_gb_s: float

    @property
    def algbw_gb_s(self) -> float:
        return min(self.inside_gb_s, self.across_gb_s)

    def as_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "inside_gb_s": round(self.inside_gb_s, 4),
                "across_gb_s": round(self.across_gb_s, 4), "algbw_gb_s": round(self.algbw_gb_s, 4)}


def hierarchical_allreduce(topology: Topology, groups: list[list[str]]) -> Hierarchical:
    """All-reduce as reduce inside each group, all-reduce across groups, broadcast inside, pipelined (the slowest
    stage sets the rate). Inside, a group's packed all-reduce trees run the reduce and the broadcast, on the links
    private to the node (switches every neighbour of which is in the group: the NIC fabric is the across stage's). Across,
    device ``j`` of every group forms a column that all-reduces ``1 / G`` of the data, the columns at once, so the
    across rate is a column's packed all-reduce rate times ``G``. Groups must be of one size."""
    if len(groups) < 2 or len({len(g) for g in groups}) != 1:
        raise DSparkError("hierarchical all-reduce: at least 2 node groups, all with the same number of devices")
    inside = [plan(_private(topology, group), group, op="allreduce").rate_gb_s for group in groups if len(group) > 1]
    columns = [list(column) for column in zip(*groups)]
    across = min(plan(topology, column, op="allreduce").rate_gb_s for column in columns) * len(columns)
    return Hierarchical(groups, min(inside) if inside else math.inf, across)


def _private(topology: Topology, group: list[str]) -> Topology:
    """``topology`` without the switches that reach outside ``group`` (and their links)."""
    members = set(group)
    others = set(topology.devices) - members
    reach: dict[str, set[str]] = {}
    for link in topology.links:
        reach.setdefault(link.src, set()).add(link.dst)
        reach.setdefault(link.dst, set()).add(link.src)
    shared = {s for s in topology.switches if reach.get(s, set()) & others}
    keep = [l for l in topology.links if l.src not in shared and l.dst not in shared]
    return Topology(topology.name, topology.devices, [s for s in topology.switches if s not in shared], keep,
                    topology.source)


def allocations(devices: list[str], sizes: range) -> list[list[str]]:
    """Every allocation of the given sizes (for the benchmark and tests)."""
    return [list(c) for k in sizes for c in itertools.combinations(devices, k)]
