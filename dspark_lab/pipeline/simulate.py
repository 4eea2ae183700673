"""Simulation of a :class:`~dspark_lab.pipeline.ir.Schedule` with per-op costs.

Each rank runs its ops in IR order; an op starts when its rank is free and its inputs have arrived (a forward needs
the previous stage's forward of the same micro-batch, a backward the next stage's backward and its own forward, a W
its input-only B). A value crossing ranks arrives ``comm`` after it was produced. All ranks start at time 0 and the
optimizer step is not simulated.

Costs: ``b`` excludes the weight-gradient work ``w``, so a full backward costs ``b + w``; an FB costs ``fb`` (default
``f + b + w``). ``table`` overrides a cost per ``(rank, chunk, kind)`` (kind in F, B, Bi, W, FB; ``B`` is a full
backward, ``Bi`` input-only; FB keys on its forward chunk) — the real-run prediction uses measured costs this way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dspark_lab.pipeline.ir import Op, Schedule, ScheduleError, peak_activations


@dataclass(kw_only=True, slots=True)
class Costs:
    f: float
    b: float
    w: float
    fb: float | None = None
    comm: float = 0.0
    table: dict[tuple[int, int, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "fb", "comm"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"cost {name} must be >= 0, got {value}")

    def of(self, rank: int, op: Op) -> float:
        kind = _cost_key(rank, op)[2]
        cost = self.table.get((rank, op.chunk, kind))
        if cost is not None:
            return cost
        if kind == "F":
            return self.f
        if kind == "B":  # a whole backward is its two halves, measured per rank when a split schedule ran
            split = (self.table.get((rank, op.chunk, "Bi")), self.table.get((rank, op.chunk, "W")))
            return split[0] + split[1] if None not in split else self.b + self.w
        if kind == "Bi":
            return self.b
        if kind == "W":
            return self.w
        return self.fb if self.fb is not None else self.f + self.b + self.w


@dataclass(slots=True)
class Simulation:
    schedule: Schedule
    step_time: float
    busy: list[float]
    timeline: list[list[tuple[float, float, Op]]]  # per rank: (start, end, op)
    peak: list[int]

    @property
    def bubble(self) -> list[float]:
        return [self.step_time - b for b in self.busy]

    @property
    def bubble_fraction(self) -> float:
        return max(self.bubble) / self.step_time if self.step_time else 0.0

    def as_dict(self) -> dict[str, Any]:
        s = self.schedule
        return {
            "schedule": s.name, "ranks": s.ranks, "microbatches": s.microbatches, "chunks": s.chunks,
            "step_time": self.step_time, "bubble_time": self.bubble, "bubble_fraction": self.bubble_fraction,
            "busy_time": self.busy, "peak_activations": self.peak, "ops": s.ops_json(),
            "timeline": [[{**op.as_dict(), "start": a, "end": b} for a, b, op in row] for row in self.timeline],
        }


def _inputs(s: Schedule, rank: int, op: Op) -> list[tuple[tuple, int]]:
    """The values an op waits for, as ``(key, producing rank)``; keys are ``(pass, stream, stage, mb)``."""
    needs = []
    for kind, mb, chunk in op.parts():
        stream, stage = s.where(rank, chunk)
        path = s.streams[stream]
        if kind == "F" and stage > 0:
            needs.append((("F", stream, stage - 1, mb), path[stage - 1][0]))
        elif kind in ("B", "Bi"):
            needs.append((("F", stream, stage, mb), rank))
            if stage < len(path) - 1:
                needs.append((("B", stream, stage + 1, mb), path[stage + 1][0]))
        elif kind == "W":
            needs.append((("B", stream, stage, mb), rank))
    return needs


def _outputs(s: Schedule, rank: int, op: Op) -> list[tuple]:
    out = []
    for kind, mb, chunk in op.parts():
        stream, stage = s.where(rank, chunk)
        if kind in ("F", "W"):
            out.append((kind, stream, stage, mb))
        else:
            out.append(("B", stream, stage, mb))
    return out


@dataclass(frozen=True, slots=True)
class Graph:
    """A schedule's ops as a dependency graph: ``nodes`` are ``(rank, op index)`` in an order where each comes
    after the op before it on its rank and after the ops producing its inputs; ``inputs[n]`` are
    ``(producing node's place in nodes, crosses ranks)``. ``stuck`` names each rank's first op that can never run
    (empty when none). Built once per schedule and reused for any costs (the planner times one schedule with
    many)."""

    schedule: Schedule
    nodes: tuple[tuple[int, int], ...]
    inputs: tuple[tuple[tuple[int, bool], ...], ...]
    cost_keys: tuple[tuple[int, int, str], ...]  # per node, its key in Costs.table
    stuck: tuple[tuple[int, int], ...]
    peak: tuple[int, ...]


def dependency_graph(schedule: Schedule) -> Graph:
    """Order the ops so every op follows its inputs: each rank walks its ops until one waits for a value not yet
    produced, and resumes when that value is."""
    s = schedule
    produced: dict[tuple, int] = {}  # value -> place of the op producing it
    nodes: list[tuple[int, int]] = []
    inputs: list[tuple[tuple[int, bool], ...]] = []
    head = [0] * s.ranks
    waiting: dict[tuple, list[int]] = {}
    ready = list(range(s.ranks))
    while ready:
        r = ready.pop()
        ops, i = s.ops[r], head[r]
        while i < len(ops):
            deps = []
            for key, rank in _inputs(s, r, ops[i]):
                place = produced.get(key)
                if place is None:
                    waiting.setdefault(key, []).append(r)
                    break
                deps.append((place, rank != r))
            else:
                place = len(nodes)
                nodes.append((r, i))
                inputs.append(tuple(deps))
                for key in _outputs(s, r, ops[i]):
                    produced[key] = place
                    ready.extend(waiting.pop(key, ()))
                i += 1
                continue
            break
        head[r] = i
    stuck = tuple((r, head[r]) for r in range(s.ranks) if head[r] < len(s.ops[r]))
    return Graph(s, tuple(nodes), tuple(inputs), tuple(_cost_key(r, s.ops[r][i]) for r, i in nodes), stuck,
                 tuple(peak_activations(s)))


def _cost_key(rank: int, op: Op) -> tuple[int, int, str]:
    return rank, op.chunk, op.kind if op.kind != "B" or op.full else "Bi"


def simulate(schedule: Schedule, costs: Costs, graph: Graph | None = None) -> Simulation:
    """Run the schedule on a virtual clock; raise :class:`ScheduleError` if some rank waits forever. ``graph``:
    the schedule's :func:`dependency_graph`, where the caller keeps one. Each op starts at the latest of its
    rank's previous end and its inputs' arrivals, so one pass in dependency order times the whole step."""
    s = schedule
    g = graph if graph is not None else dependency_graph(s)
    if g.schedule is not s:
        raise ValueError(f"the dependency graph given is another schedule's, not {s.name}'s")
    if g.stuck:
        where = ", ".join(f"rank {r} at {s.ops[r][i].label()}" for r, i in g.stuck)
        raise ScheduleError(f"{s.name}: deadlock, ops wait for inputs that never come: {where}")
    free = [0.0] * s.ranks
    busy = [0.0] * s.ranks
    timeline: list[list[tuple[float, float, Op]]] = [[] for _ in range(s.ranks)]
    ends = [0.0] * len(g.nodes)
    comm, table = costs.comm, costs.table
    for n, (r, i) in enumerate(g.nodes):
        start = free[r]
        for d, crosses in g.inputs[n]:
            arrival = ends[d] + (comm if crosses else 0.0)
            if arrival > start:
                start = arrival
        op = s.ops[r][i]
        cost = table.get(g.cost_keys[n])
        end = start + (cost if cost is not None else costs.of(r, op))
        ends[n] = end
        timeline[r].append((start, end, op))
        busy[r] += end - start
        free[r] = end
    starts = [row[0][0] for row in timeline if row]
    last = [row[-1][1] for row in timeline if row]
    step_time = max(last) - min(starts) if last else 0.0
    return Simulation(s, step_time, busy, timeline, list(g.peak))
