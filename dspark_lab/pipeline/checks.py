"""Whether a schedule is well formed: every op's inputs come before it on its rank, each (micro-batch, chunk) gets
one F, one backward and (after an input-only B) one W, no rank waits forever on another (checked by running the
simulator with unit costs), and the activation memory bound holds."""

from __future__ import annotations

from dspark_lab.pipeline.ir import OP_KINDS, Schedule, ScheduleError, peak_activations
from dspark_lab.pipeline.simulate import Costs, simulate


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless every op's inputs come before it, each (micro-batch, chunk) gets exactly
    one F, one backward and (after a ``full=False`` B) one W, and the memory bound holds on every rank."""
    s = schedule
    if len(s.ops) != s.ranks:
        raise ScheduleError(f"{s.name}: {len(s.ops)} rank op lists for {s.ranks} ranks")
    for r, rank_ops in enumerate(s.ops):
        seen: dict[tuple[str, int, int], int] = {}
        for op in rank_ops:
            if op.kind not in OP_KINDS:
                raise ScheduleError(f"{s.name}: rank {r}: op kind {op.kind!r} not in {OP_KINDS}")
            for kind, mb, chunk in op.parts():
                s.where(r, chunk)
                if not 0 <= mb < s.mb_per_stream:
                    raise ScheduleError(f"{s.name}: rank {r}: micro-batch {mb} outside 0..{s.mb_per_stream - 1}")
                key = ("B" if kind in ("B", "Bi") else kind, mb, chunk)
                if key in seen:
                    raise ScheduleError(f"{s.name}: rank {r}: {kind}{mb}.{chunk} appears twice")
                if kind in ("B", "Bi") and ("F", mb, chunk) not in seen:
                    raise ScheduleError(f"{s.name}: rank {r}: backward of {mb}.{chunk} before its forward")
                if kind == "W" and seen.get(("B", mb, chunk)) != 0:
                    raise ScheduleError(f"{s.name}: rank {r}: W{mb}.{chunk} without an earlier input-only B")
                seen[key] = 0 if kind == "Bi" else 1
        for chunk in range(s.chunks):
            for mb in range(s.mb_per_stream):
                if ("F", mb, chunk) not in seen or ("B", mb, chunk) not in seen:
                    raise ScheduleError(f"{s.name}: rank {r}: micro-batch {mb} chunk {chunk} is missing F or B")
                if seen[("B", mb, chunk)] == 0 and ("W", mb, chunk) not in seen:
                    raise ScheduleError(f"{s.name}: rank {r}: W{mb}.{chunk} is missing")
    # Cross-rank order: the schedule runs to the end with zero costs iff no rank waits on an op queued behind it.
    simulate(s, Costs(f=1.0, b=1.0, w=1.0))
    if s.memory_bound is not None:
        for r, peak in enumerate(peak_activations(s)):
            if peak > s.memory_bound[r]:
                raise ScheduleError(f"{s.name}: rank {r}: peak activations {peak} > bound {s.memory_bound[r]}")
