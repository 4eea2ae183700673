"""``packed-trees``: broadcast and all-reduce over the spanning trees the planner packed, on point-to-point messages.

The tensor is split across the trees in proportion to their planned rates; each tree's part is cut into chunks
that are pipelined (:class:`~dspark_lab.collectives.tree.TreeCollective`'s reduce-up and broadcast-down, which
forward chunk ``i`` while chunk ``i + 1`` arrives). All-reduce is a reduction over the reversed trees and a broadcast
over the trees (Blink, Wang et al., MLSys 2020); the trees are interleaved chunk by chunk so they run at once.

Ranks map to the topology's devices in order (group rank ``r`` is device ``r`` of the allocation). The plan is made
once per collective by every rank from the same inputs (the planner is deterministic), so no rank has to send it.

**Emulated links** (``emulate=scale``): on a machine without the hardware, every message is paced by the modelled
rate of the tree edge it crosses, times ``scale``. The sender of edge ``u -> v`` keeps that edge's timeline: a
message of ``b`` bytes handed over at ``t`` has crossed at ``due = max(t, edge free) + b / rate``; a small header
carries ``due`` (``time.monotonic``, one clock for every process on the host) and the receiver holds the data until
then. So a rank with several incoming edges receives on all of them at once, as links do. Each directed tree edge has
one sender, so the timeline is exact per edge; two edges that share a switch port are paced independently (the
port's sharing is not modelled, though the planner's loads count it).
"""

from __future__ import annotations

import threading
import time
import torch
import torch.distributed as dist

from dspark_lab.collectives.base import flat_view, in_place
from dspark_lab.collectives.packing import Plan, plan
from dspark_lab.collectives.topology import Topology
from dspark_lab.collectives.tree import TreeCollective, TreePosition

DEFAULT_CHUNK_BYTES = 1 << 20


class PacedLinks:
    """Per-path timelines kept by each tree edge's sender (see the module docstring)."""

    def __init__(self, scale: float):
        self.scale = scale
        self.free: dict[tuple[str, ...], float] = {}

    def due(self, path: tuple[str, ...], gb_s: float, nbytes: int) -> float:
        """When a message of ``nbytes`` handed to ``path`` (bottleneck ``gb_s``) now has crossed it."""
        start = max(time.monotonic(), self.free.get(path, 0.0))
        self.free[path] = start + nbytes / (gb_s * self.scale * 1e9)
        return self.free[path]


def positions(plan_: Plan, devices: list[str], rank: int, to_global) -> list[TreePosition]:
    """This rank's parent, children and subtrees in every planned tree (group ranks mapped to global)."""
    index = {d: i for i, d in enumerate(devices)}
    me = devices[rank]
    out = []
    for tree, _rate in plan_.trees:
        children: dict[str, list[str]] = {}
        parent = {}
        for a, b in tree.edges:
            children.setdefault(a, []).append(b)
            parent[b] = a

        def below(node: str) -> list[int]:
            return [index[node], *[r for c in children.get(node, []) for r in below(c)]]

        kids = sorted(children.get(me, []), key=index.get)
        out.append(TreePosition(
            parent=None if me not in parent else to_global(index[parent[me]]),
            children=tuple(to_global(index[c]) for c in kids),
            subtrees=tuple(tuple(sorted(below(c))) for c in kids)))
    return out


class PackedTreesCollective(TreeCollective):
    name = "packed-trees"

    def __init__(self, topology: Topology, group=None, *, op: str = "allreduce", emulate: float | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, fixed_plan: Plan | None = None):
        """``emulate``: pace messages at the modelled link rates times this scale (None: run at full speed).
        ``fixed_plan``: run these trees instead of planning (the benchmark runs the ring's chain this way)."""
        super().__init__(group, trees=1, chunk_bytes=chunk_bytes)
        if emulate is not None and not 0 < emulate <= 1e3:
            raise ValueError(f"emulate: a rate scale in (0, 1000], got {emulate!r}")
        self.topology = topology
        self.op = op
        self.emulate = emulate
        self._fixed = fixed_plan
        self._plan: Plan | None = None

    # --- the plan ----------------------------------------------------------------------------------------------

    @property
    def devices(self) -> list[str]:
        if self.world_size > len(self.topology.devices):
            raise ValueError(f"packed-trees: {self.world_size} ranks but topology {self.topology.name} has "
                             f"{len(self.topology.devices)} devices")
        return self.topology.devices[: self.world_size]

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            self._plan = self._fixed or plan(self.topology, self.devices, op=self.op)
            self._positions = positions(self._plan, self.devices, self.rank, self.global_rank)
            # per tree, each tree edge's physical path (both directions) and its bottleneck rate, for pacing
            index = {d: i for i, d in enumerate(self.devices)}
            capacity = self.topology.capacity()
            self._edges = []
            for tree, _ in self._plan.trees:
                edges = {}
                for path in tree.paths:
                    a, b = self.global_rank(index[path[0]]), self.global_rank(index[path[-1]])
                    back = path[::-1]
                    edges[(a, b)] = (path, min(capacity[h] for h in zip(path, path[1:])))
                    edges[(b, a)] = (back, min(capacity.get(h, 0.0) for h in zip(back, back[1:])) or edges[(a, b)][1])
                self._edges.append(edges)
            self._paced = PacedLinks(self.emulate) if self.emulate else None
        return self._plan

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The tensor cut across the trees in proportion to their rates (every element in exactly one part)."""
        rates = [rate for _, rate in self.plan.trees]
        total = sum(rates)
        cuts, acc = [], 0.0
        for rate in rates[:-1]:
            acc += rate
            cuts.append(round(flat.numel() * acc / total))
        return list(torch.tensor_split(flat, cuts))

    def _work(self, flat: torch.Tensor) -> list[tuple[TreePosition, torch.Tensor]]:
        """Every tree's chunks in the order their planned links finish them (chunk i of a tree at rate r at
        (i + 1) / r): a rank then never holds a fast tree's chunk back behind a slow tree's, which would pace
        the fast tree at the slow one's rate."""
        timed = []
        for t, part in enumerate(self._split(flat)):
            rate = self.plan.trees[t][1]
            timed += [((i + 1) * c.numel() / rate, t, i, (self._positions[t], c, t))
                      for i, c in enumerate(self._chunks(part))]
        return [item for *_, item in sorted(timed, key=lambda x: x[:3])]

    # --- execution: every tree's chunks, one thread per tree --------------------------------------------------------

    def _receive(self, tree: int, buffers: list[torch.Tensor], sources: list[int]) -> tuple[list, list]:
        """Post the receives of one chunk (and, with emulated links, its headers) from ``sources``."""
        headers = [torch.empty(1, dtype=torch.float64) for _ in sources] if self._paced else []
        works = [dist.irecv(h, s, group=self.group, tag=tree) for h, s in zip(headers, sources)]
        works += [dist.irecv(b, s, group=self.group, tag=tree) for b, s in zip(buffers, sources)]
        return works, headers

    def _send(self, chunk: torch.Tensor, dst: int, tree: int, tag: int) -> list:
        """Post ``chunk`` to ``dst``; with emulated links, a header first says when it will have crossed the link."""
        works = []
        if self._paced is not None:
            path, gb_s = self._edges[tree][(dist.get_rank(), dst)]
            due = self._paced.due(path, gb_s, chunk.numel() * chunk.element_size())
            works.append(dist.isend(torch.tensor([due], dtype=torch.float64), dst, group=self.group, tag=tag))
        works.append(dist.isend(chunk, dst, group=self.group, tag=tag))
        return works

    def _run(self, work, reduce: bool, broadcast: bool) -> None:
        """Move every chunk up its tree (``reduce``: receive from the children, add, send to the parent), down it
        (``broadcast``: receive from the parent, send to the children), or both at once.

        Trees are independent (disjoint slices of the tensor, their own message tags), and within a tree the two
        directions use opposite link directions, so each (tree, direction) runs in its own thread: a chunk goes down
        as soon as it has been reduced and sent up (Blink's overlapped reduce and broadcast), and a slow tree never
        holds a fast one back. gloo's receive cannot be polled, only waited on, hence threads. The two directions of
        a tree use two tags: gloo pairs one tag's sends and receives across a connection, whichever way they go.
        """
        chunks: dict[int, list[torch.Tensor]] = {}
        where: dict[int, TreePosition] = {}
        for position, chunk, *tree in work:
            t = tree[0] if tree else 0
            chunks.setdefault(t, []).append(chunk)
            where[t] = position
        failures: list[BaseException] = []
        abort = threading.Event()

        def guarded(fn):
            def run(*args):
                try:
                    fn(*args)
                except BaseException as exc:  # re-raised on the calling thread
                    failures.append(exc)
                    abort.set()
            return run

        jobs = []
        for t, parts in chunks.items():
            reduced = [threading.Event() for _ in parts] if reduce and broadcast else None
            sent: list[list] = [[] for _ in parts]
            if reduce:
                jobs.append((guarded(self._up), (t, parts, where[t], reduced, sent)))
            if broadcast:
                jobs.append((guarded(self._down), (t, parts, where[t], reduced, sent, abort)))
        if len(jobs) == 1:
            jobs[0][0](*jobs[0][1])
        else:
            threads = [threading.Thread(target=fn, args=args, daemon=True) for fn, args in jobs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        if failures:
            raise failures[0]

    def _hold(self, headers: list[torch.Tensor]) -> None:
        """Emulated links: keep the data until the last of its messages has crossed its link."""
        if headers:
            delay = max(float(h[0]) for h in headers) - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def _up(self, t: int, parts, position: TreePosition, reduced, sent) -> None:
        tag = 2 * t
        scratch = [torch.empty(max(c.numel() for c in parts), dtype=parts[0].dtype, device=parts[0].device)
                   for _ in position.children]
        sends = []
        for i, chunk in enumerate(parts):
            buffers = [b[: chunk.numel()] for b in scratch]
            works, headers = self._receive(tag, buffers, list(position.children))
            for w in works:
                w.wait()
            self._hold(headers)
            for buffer in buffers:
                chunk.add_(buffer)
            if position.parent is not None:
                sent[i] = self._send(chunk, position.parent, t, tag)
                sends += sent[i]
            if reduced is not None:
                reduced[i].set()
        if reduced is None:  # else the broadcast thread waits each send (a gloo Work is waited by one thread)
            for send in sends:
                send.wait()

    def _down(self, t: int, parts, position: TreePosition, reduced, sent, abort) -> None:
        tag = 2 * t + 1
        sends = []
        for i, chunk in enumerate(parts):
            if reduced is not None:
                while not reduced[i].wait(0.05):  # chunk i is this rank's sum only once it has been reduced
                    if abort.is_set():
                        return
                for send in sent[i]:  # ... and it must have left for the parent before the result overwrites it
                    send.wait()
            if position.parent is not None:
                works, headers = self._receive(tag, [chunk], [position.parent])
                for w in works:
                    w.wait()
                self._hold(headers)
            for child in position.children:
                sends += self._send(chunk, child, t, tag)
        for send in sends:
            send.wait()

    def _reduce_up(self, work) -> None:
        self._run(work, reduce=True, broadcast=False)

    def _broadcast_down(self, work) -> None:
        self._run(work, reduce=False, broadcast=True)

    # --- the collective ----------------------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor

        return in_place(tensor, lambda flat: self._run(self._work(flat), reduce=True, broadcast=True))

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy the root's (group rank 0's) ``tensor`` to every rank, in place."""
        if self.world_size == 1:
            return tensor
        return in_place(tensor, lambda flat: self._broadcast_down(self._work(flat)))

    def _position(self, tree: int) -> TreePosition:  # all_gather (inherited) gathers up the first tree
        _ = self.plan
        return self._positions[0]

