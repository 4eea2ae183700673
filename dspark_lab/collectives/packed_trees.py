"""``packed-trees``: broadcast and all-reduce over the spanning trees the planner packed, on point-to-point messages.

The tensor is split across the trees in proportion to their planned rates; each tree's part is cut into chunks
that are pipelined (:class:`~dspark_lab.collectives.tree.TreeCollective`'s reduce-up and broadcast-down, which
forward chunk ``i`` while chunk ``i + 1`` arrives). All-reduce is a reduction over the reversed trees and a broadcast
over the trees (Blink, Wang et al., MLSys 2020), overlapped chunk by chunk: a thread per tree and direction, so a
chunk goes down its tree as soon as it has been reduced at the root while later chunks still go up.

Ranks map to the topology's devices in order (group rank ``r`` is device ``r`` of the allocation). The plan is made
once per collective by every rank from the same inputs (the planner is deterministic), so no rank has to send it.

**Emulated links** (``emulate=scale``): on a machine without the hardware, every message is paced by the modelled
rate of the link it crosses, times ``scale`` (:class:`PacedLinks`). The sender of a tree edge reckons when the
message has crossed the link and sends that time with the data (an 8-byte frame, ``time.monotonic``: one clock for
every process on the host); the receiver holds the data until then. Times are reckoned on the *emulated* clock: a
chunk's data exists when its inputs have crossed their links (at the root of a broadcast, when the call began), not
when the thread got to it, so a thread the host's scheduler delayed or a sleep that overslept does not slow the
emulated link down for every later chunk; the host's lateness shows only where it is on the critical path (at the
end). The emulator then measures the schedule, not the host, as long as the host keeps up: its own CPU use grows
with messages per emulated second (``scale x rate / chunk``), which is why the tests and the benchmark emulate slow
links (``2e-4``). Two edges that share a switch port but take different paths are paced independently (the port's
sharing is not modelled, though the planner's loads count it).

:meth:`PackedTreesCollective.expected_seconds` is the alpha-beta time the measurement is held to: the bytes at the
planned rate plus the pipeline's fill (one chunk over every hop of the deepest path, twice for all-reduce).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
import torch
import torch.distributed as dist

from dspark_lab.collectives.base import in_place
from dspark_lab.collectives.packing import Plan, plan
from dspark_lab.collectives.topology import Topology
from dspark_lab.collectives.tree import TreeCollective, TreePosition

DEFAULT_CHUNK_BYTES = 1 << 20


class PacedLinks:
    """The emulated links of one rank's outgoing tree edges (see the module docstring).

    Two constraints pace a message. Its tree is a stream planned at a rate (the tree's share of every link it
    crosses), so the tree's messages on one edge start at most that fast; and the path is a link shared by every
    tree, with a calendar of busy intervals at the link's full rate, so streams that together ask more than the link
    has are slowed down (a plan that overfills a link measures below its rate). A message fills the calendar's free
    time from when its data existed, gap by gap, as a link interleaves the packets of its streams: a chunk that
    reaches its sender late in wall-clock time (its thread was descheduled) still crosses when the link would have
    carried it, and small gaps are not lost to whole-chunk reservations.
    """

    HORIZON_S = 2.0  # intervals that ended this long before a new message's data existed are forgotten

    def __init__(self, scale: float):
        self.scale = scale
        self.busy: dict[tuple[str, ...], list[tuple[float, float]]] = {}
        self.stream_free: dict[tuple, float] = {}
        self.lock = threading.Lock()  # a rank's threads (trees, directions) may send on one path

    def due(self, path: tuple[str, ...], gb_s: float, nbytes: int, ready: float,
            stream: tuple, stream_gb_s: float) -> float:
        """When a message of ``nbytes`` of ``stream`` (planned at ``stream_gb_s``), whose data existed at ``ready``,
        has crossed ``path`` (bottleneck ``gb_s``)."""
        length = nbytes / (gb_s * self.scale * 1e9)
        with self.lock:
            ready = max(ready, self.stream_free.get(stream, 0.0))
            self.stream_free[stream] = ready + nbytes / (stream_gb_s * self.scale * 1e9)
            intervals = self.busy.setdefault(path, [])
            while intervals and intervals[0][1] < ready - self.HORIZON_S:
                intervals.pop(0)
            # fill the free time from ``ready`` on, gap by gap, as a link interleaves its streams' packets
            pieces, t, left = [], ready, length
            i = max(0, bisect.bisect_left(intervals, (ready,)) - 1)
            while left > 1e-12:
                if i < len(intervals) and intervals[i][0] <= t:
                    t = max(t, intervals[i][1])
                    i += 1
                    continue
                gap = (intervals[i][0] if i < len(intervals) else math.inf) - t
                take = min(left, gap)
                pieces.append((t, t + take))
                t, left = t + take, left - take
            merged: list[tuple[float, float]] = []
            for start, end in sorted(intervals + pieces):
                if merged and start <= merged[-1][1] + 1e-12:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], end))
                else:
                    merged.append((start, end))
            self.busy[path] = merged
            return t


FRAME_BYTES = 8  # an emulated message: the float64 time it has crossed its link, then the chunk's bytes


def frame(due: float, chunk: torch.Tensor) -> torch.Tensor:
    message = torch.empty(FRAME_BYTES + chunk.numel() * chunk.element_size(), dtype=torch.uint8)
    message[:FRAME_BYTES].view(torch.float64)[0] = due
    message[FRAME_BYTES:].copy_(chunk.reshape(-1).view(torch.uint8))
    return message


def unframe(message: torch.Tensor, like: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The crossing time and the payload (a view of ``message`` with ``like``'s dtype) of a framed message."""
    return float(message[:FRAME_BYTES].view(torch.float64)[0]), message[FRAME_BYTES:].view(like.dtype)


def wait_all(sends: list) -> None:
    for work, _message in sends:
        work.wait()


class Handover:
    """What a tree's reduce thread tells its broadcast thread, per chunk: reduced (an event), when it was on the
    emulated clock, and the sends up that must finish before the result overwrites it."""

    def __init__(self, parts: list, reduced: list[threading.Event] | None, start: float):
        self.reduced = reduced
        self.start = start
        self.ready = [start] * len(parts)
        self.sent: list[list] = [[] for _ in parts]

    def done(self, i: int, ready: float) -> None:
        self.ready[i] = ready
        if self.reduced is not None:
            self.reduced[i].set()


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

    def _cuts(self, numel: int) -> list[int]:
        """Where the tensor is cut across the trees, in proportion to their rates."""
        rates = [rate for _, rate in self.plan.trees]
        total = sum(rates)
        cuts, acc = [], 0.0
        for rate in rates[:-1]:
            acc += rate
            cuts.append(round(numel * acc / total))
        return cuts

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The tensor cut across the trees (every element in exactly one part)."""
        return list(torch.tensor_split(flat, self._cuts(flat.numel())))

    def _chunk_elements(self, tree: int, element_size: int) -> int:
        """A tree's chunk: ``chunk_bytes`` for the fastest tree, smaller in proportion to a slower tree's rate, so
        every tree's chunk takes one time to cross its links: a slow tree's chunks neither hold a shared link in
        long bursts nor make its pipeline's fill (one chunk per hop) longer than the fast trees'."""
        fastest = max(rate for _, rate in self.plan.trees)
        return max(1, int(self.chunk_bytes * self.plan.trees[tree][1] / fastest) // element_size)

    def expected_seconds(self, numel: int, op: str, element_size: int = 4) -> float:
        """The alpha-beta time of ``op`` (broadcast | allreduce) over ``numel`` elements on the modelled links (times the emulation scale, if any):
        per tree, its part's bytes at the tree's rate plus the pipeline's fill, one chunk crossing every hop of the
        deepest root-to-leaf path at that hop's link rate (down for broadcast; up then down for all-reduce). The
        slowest tree sets the time. The plan's rate is the limit of ``nbytes / expected_seconds`` for large tensors."""
        scale = (self.emulate or 1.0) * 1e9
        capacity = self.topology.capacity()
        passes = {"broadcast": 1, "allreduce": 2}[op]
        worst = 0.0
        bounds = [0, *self._cuts(numel), numel]
        for t, (tree, rate) in enumerate(self.plan.trees):
            part = bounds[t + 1] - bounds[t]
            if not part:
                continue
            chunk = min(self._chunk_elements(t, element_size), part) * element_size
            hop = {(p[0], p[-1]): chunk / (min(capacity[h] for h in zip(p, p[1:])) * scale) for p in tree.paths}
            parent = {b: a for a, b in tree.edges}

            def latency(node: str) -> float:
                return 0.0 if node not in parent else hop[(parent[node], node)] + latency(parent[node])

            fill = max(latency(node) for node in parent)
            worst = max(worst, (part * element_size - chunk) / (rate * scale) + passes * fill)
        return worst

    def _work(self, flat: torch.Tensor) -> list[tuple[TreePosition, torch.Tensor]]:
        """Every tree's chunks in the order their planned links finish them (chunk i of a tree at rate r at
        (i + 1) / r): a rank then never holds a fast tree's chunk back behind a slow tree's, which would pace
        the fast tree at the slow one's rate."""
        timed = []
        for t, part in enumerate(self._split(flat)):
            rate = self.plan.trees[t][1]
            timed += [((i + 1) * c.numel() / rate, t, i, (self._positions[t], c, t))
                      for i, c in enumerate(torch.split(part, self._chunk_elements(t, part.element_size())))
                      if c.numel()]
        return [item for *_, item in sorted(timed, key=lambda x: x[:3])]

    # --- execution: every tree's chunks, a thread per tree and direction ----------------------------------------

    def _receive(self, tag: int, buffers: list[torch.Tensor], sources: list[int]) -> tuple[list, list[torch.Tensor]]:
        """Post the receives of one chunk from ``sources`` into ``buffers``. With emulated links each message is
        framed (:func:`frame`), so it arrives in a scratch buffer whose payload the caller reads with :func:`unframe`."""
        if self._paced is not None:
            buffers = [torch.empty(FRAME_BYTES + b.numel() * b.element_size(), dtype=torch.uint8) for b in buffers]
        return [dist.irecv(b, s, group=self.group, tag=tag) for b, s in zip(buffers, sources)], buffers

    def _send(self, chunk: torch.Tensor, dst: int, tree: int, tag: int, ready: float) -> list:
        """Post ``chunk`` to ``dst``. With emulated links the message is framed with the time it will have crossed
        the link, reckoned from ``ready`` (when the data existed on the emulated clock, see the module docstring); a
        framed chunk is a copy, so the caller may overwrite ``chunk`` at once."""
        if self._paced is None:
            return [(dist.isend(chunk, dst, group=self.group, tag=tag), chunk)]
        path, gb_s = self._edges[tree][(dist.get_rank(), dst)]
        due = self._paced.due(path, gb_s, chunk.numel() * chunk.element_size(), ready, (tree, tag, dst),
                              self.plan.trees[tree][1])
        message = frame(due, chunk)
        return [(dist.isend(message, dst, group=self.group, tag=tag), message)]  # the message lives until waited

    def _arrived(self, works: list, buffers: list[torch.Tensor], like: torch.Tensor,
                 ready: float) -> tuple[list[torch.Tensor], float]:
        """Wait for one chunk's receives; with emulated links hold the data until the last message has crossed its
        link, and return the payloads and that time (else the buffers themselves and ``ready``)."""
        for work in works:
            work.wait()
        if self._paced is None:
            return buffers, ready
        framed = [unframe(b, like) for b in buffers]
        due = max([ready, *(d for d, _ in framed)])
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return [payload for _, payload in framed], due

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
        start = time.monotonic()  # this rank's data exists from now on the emulated clock

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
            hand_over = Handover(parts, reduced, start)
            if reduce:
                jobs.append((guarded(self._up), (t, parts, where[t], hand_over)))
            if broadcast:
                jobs.append((guarded(self._down), (t, parts, where[t], hand_over, abort)))
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

    def _up(self, t: int, parts, position: TreePosition, hand_over: Handover) -> None:
        tag = 2 * t
        scratch = [torch.empty(max(c.numel() for c in parts), dtype=parts[0].dtype, device=parts[0].device)
                   for _ in position.children]
        sends = []
        for i, chunk in enumerate(parts):
            works, buffers = self._receive(tag, [b[: chunk.numel()] for b in scratch], list(position.children))
            payloads, ready = self._arrived(works, buffers, chunk, hand_over.start)
            for payload in payloads:
                chunk.add_(payload)
            if position.parent is not None:
                hand_over.sent[i] = self._send(chunk, position.parent, t, tag, ready)
                sends += hand_over.sent[i]
            hand_over.done(i, ready)
        if hand_over.reduced is None:  # else the broadcast thread waits each send (a gloo Work is waited by one thread)
            wait_all(sends)

    def _down(self, t: int, parts, position: TreePosition, hand_over: Handover, abort) -> None:
        tag = 2 * t + 1
        sends = []
        for i, chunk in enumerate(parts):
            ready = hand_over.start
            if hand_over.reduced is not None:
                while not hand_over.reduced[i].wait(0.05):  # chunk i is this rank's sum only once it is reduced
                    if abort.is_set():
                        return
                wait_all(hand_over.sent[i])  # ... and has left for the parent before the result overwrites it
                ready = hand_over.ready[i]
            if position.parent is not None:
                works, buffers = self._receive(tag, [chunk], [position.parent])
                (payload,), ready = self._arrived(works, buffers, chunk, ready)
                if payload is not chunk:
                    chunk.copy_(payload)
            for child in position.children:
                sends += self._send(chunk, child, t, tag, ready)
        wait_all(sends)

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

