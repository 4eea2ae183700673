"""Event-driven simulation of a :class:`~dspark_lab.pipeline.ir.Schedule` with per-op costs.

Each rank runs its ops in IR order; an op starts when its rank is free and its inputs have arrived (a forward needs
the previous stage's forward of the same micro-batch, a backward the next stage's backward and its own forward, a W
its input-only B). A value crossing ranks arrives ``comm`` after it was produced. All ranks start at time 0 and the
optimizer step is not simulated.

Costs: ``b`` excludes the weight-gradient work ``w``, so a full backward costs ``b + w``; an FB costs ``fb`` (default
``f + b + w``). ``table`` overrides a cost per ``(rank, chunk, kind)`` (kind in F, B, Bi, W, FB; ``B`` is a full
backward, ``Bi`` input-only; FB keys on its forward chunk) — the real-run prediction uses measured costs this way.
"""

from __future__ import annotations

import heapq
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
        kind = op.kind if op.kind != "B" or op.full else "Bi"
        if (rank, op.chunk, kind) in self.table:
            return self.table[(rank, op.chunk, kind)]
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


def simulate(schedule: Schedule, costs: Costs) -> Simulation:
    """Run the schedule on a virtual clock; raise :class:`ScheduleError` if some rank waits forever."""
    s = schedule
    done: dict[tuple, tuple[float, int]] = {}  # value -> (time produced, rank)
    head = [0] * s.ranks
    free = [0.0] * s.ranks
    busy = [0.0] * s.ranks
    timeline: list[list[tuple[float, float, Op]]] = [[] for _ in range(s.ranks)]
    waiting: dict[tuple, list[int]] = {}
    events: list[tuple[float, int]] = [(0.0, r) for r in range(s.ranks)]  # (time a rank may try its next op, rank)
    heapq.heapify(events)
    while events:
        _, r = heapq.heappop(events)
        if head[r] >= len(s.ops[r]):
            continue
        op = s.ops[r][head[r]]
        start, blocked = free[r], None
        for key, producer in _inputs(s, r, op):
            if key not in done:
                blocked = key
                break
            produced, _ = done[key]
            start = max(start, produced + (costs.comm if producer != r else 0.0))
        if blocked is not None:
            waiting.setdefault(blocked, []).append(r)
            continue
        end = start + costs.of(r, op)
        timeline[r].append((start, end, op))
        busy[r] += end - start
        free[r] = end
        head[r] += 1
        for key in _outputs(s, r, op):
            done[key] = (end, r)
            for other in waiting.pop(key, []):
                heapq.heappush(events, (end, other))
        heapq.heappush(events, (end, r))
    stuck = [r for r in range(s.ranks) if head[r] < len(s.ops[r])]
    if stuck:
        where = ", ".join(f"rank {r} at {s.ops[r][head[r]].label()}" for r in stuck)
        raise ScheduleError(f"{s.name}: deadlock, ops wait for inputs that never come: {where}")
    starts = [row[0][0] for row in timeline if row]
    ends = [row[-1][1] for row in timeline if row]
    step_time = max(ends) - min(starts) if ends else 0.0
    return Simulation(s, step_time, busy, timeline, peak_activations(s))
