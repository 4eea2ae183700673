"""The schedule IR: per rank, the ordered compute ops, and the validator every generator is checked with.

Vocabulary (used across ``dspark_lab.pipeline``):

- **stage**: a contiguous piece of the model; the model is a sequence of stages.
- **chunk**: one stage copy held by a rank (``chunk`` indexes the copies on that rank).
- **stream**: one path through the stages that micro-batches follow, as a list of ``(rank, chunk)`` positions in
  stage order. Every schedule has one stream except DualPipe, which has two (direction 0 enters at rank 0,
  direction 1 at the last rank) and holds every stage twice.
- **micro-batch** (``mb``): one slice of the batch, numbered within its stream.

Op kinds: ``F`` forward; ``B`` backward, ``full=True`` computes input and weight gradients, ``full=False`` only input
gradients (a later ``W`` of the same micro-batch and chunk does the weights); ``FB`` a forward and a full backward
overlapped, as in DualPipe (DeepSeek-V3 technical report, 2024).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

OP_KINDS = ("F", "B", "W", "FB")


@dataclass(frozen=True, slots=True)
class Op:
    """One compute op on one rank. For ``FB``, ``mb``/``chunk`` are the forward half and ``b_mb``/``b_chunk``
    the (full) backward half."""

    kind: str
    mb: int
    chunk: int = 0
    full: bool = True
    b_mb: int = -1
    b_chunk: int = -1

    def as_dict(self) -> dict[str, Any]:
        if self.kind == "FB":
            return {"op": "FB", "f_mb": self.mb, "f_chunk": self.chunk, "b_mb": self.b_mb, "b_chunk": self.b_chunk}
        out: dict[str, Any] = {"op": self.kind, "mb": self.mb, "chunk": self.chunk}
        if self.kind == "B":
            out["full"] = self.full
        return out

    def parts(self) -> Iterator[tuple[str, int, int]]:
        """The atomic passes of this op as ``(kind, mb, chunk)``, kind in F, B (full), Bi (input only), W."""
        if self.kind == "FB":
            yield "F", self.mb, self.chunk
            yield "B", self.b_mb, self.b_chunk
        elif self.kind == "B":
            yield ("B" if self.full else "Bi"), self.mb, self.chunk
        else:
            yield self.kind, self.mb, self.chunk

    def label(self) -> str:
        if self.kind == "FB":
            return f"F{self.mb}.{self.chunk}/B{self.b_mb}.{self.b_chunk}"
        return f"{self.kind}{self.mb}.{self.chunk}"


def F(mb: int, chunk: int = 0) -> Op:
    return Op("F", mb, chunk)


def B(mb: int, chunk: int = 0, full: bool = True) -> Op:
    return Op("B", mb, chunk, full)


def W(mb: int, chunk: int = 0) -> Op:
    return Op("W", mb, chunk)


def FB(f_mb: int, f_chunk: int, b_mb: int, b_chunk: int) -> Op:
    return Op("FB", f_mb, f_chunk, True, b_mb, b_chunk)


@dataclass(slots=True)
class Schedule:
    """A pipeline schedule: ``ops[rank]`` in execution order, and ``streams`` (the ``(rank, chunk)`` path each
    micro-batch of a stream follows, in stage order). ``memory_bound`` is the documented per-rank limit on live
    activations (micro-batch-chunk units) that :func:`dspark_lab.pipeline.checks.validate` checks."""

    name: str
    ranks: int
    microbatches: int
    chunks: int
    ops: list[list[Op]]
    streams: list[list[tuple[int, int]]]
    memory_bound: list[int] | None = None
    _where: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for s, path in enumerate(self.streams):
            for stage, pos in enumerate(path):
                self._where[pos] = (s, stage)

    @property
    def stages(self) -> int:
        """Number of model stages (the length of a stream)."""
        return len(self.streams[0])

    @property
    def mb_per_stream(self) -> int:
        return self.microbatches // len(self.streams)

    def where(self, rank: int, chunk: int) -> tuple[int, int]:
        """``(stream, stage)`` of the chunk ``chunk`` on ``rank``."""
        try:
            return self._where[(rank, chunk)]
        except KeyError:
            raise ValueError(f"chunk {chunk} is not held by rank {rank} in {self.name}") from None

    def layout(self) -> tuple:
        """What a rank must hold to run this schedule: two schedules with one layout can swap between steps."""
        return (self.ranks, self.microbatches, tuple(tuple(p) for p in self.streams))

    def ops_json(self) -> list[list[dict[str, Any]]]:
        return [[op.as_dict() for op in rank_ops] for rank_ops in self.ops]


class ScheduleError(ValueError):
    """A schedule that breaks a rule: missing or repeated ops, an op before its inputs, or too much memory."""


def live_activations(rank_ops: list[Op]) -> list[int]:
    """Live micro-batch-chunks after each pass of one rank (F adds one; any backward of it frees it)."""
    live, trace = 0, []
    for op in rank_ops:
        for kind, _, _ in op.parts():
            if kind == "F":
                live += 1
            elif kind in ("B", "Bi"):
                live -= 1
            trace.append(live)
    return trace


def peak_activations(schedule: Schedule) -> list[int]:
    return [max(live_activations(ops), default=0) for ops in schedule.ops]
