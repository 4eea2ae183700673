"""What each pipeline rank holds at its memory peak, walked from the schedule's own op order.

Korthikanti et al. 2022 (section 4.2.3) and Narayanan et al. 2021: under 1F1B the first stage holds activations of
``pp`` micro-batches of its ``L/pp`` layers (``L`` layers' worth), and the interleaved schedule raises that by
``1 + (pp-1)/(pp*vpp)``. Rather than use the closed form, each rank's ops (``dspark_lab.pipeline``'s IR, the same
schedule the simulator times) are walked: a forward of a chunk adds that chunk's layers, any backward frees them,
so uneven stages (Llama 3's embedding-only first chunk) and every schedule the project knows are counted exactly.

Gradients are either preallocated (Megatron's contiguous fp32 grad buffer: present all step) or materialised when a
chunk's weight gradient is first produced (PyTorch autograd / FSDP, which Llama 3 used, section 3.3.2). For the
latter the walk keeps the Pareto set of (live layer-micro-batches, chunks whose gradients exist) so the peak of
activations plus gradients is exact for any byte sizes.
"""

from __future__ import annotations

from functools import lru_cache

from dspark_lab.pipeline.ir import Schedule
from dspark_lab.pipeline.schedules import build


@lru_cache(maxsize=256)
def schedule(name: str, pp: int, microbatches: int, vpp: int) -> Schedule:
    """The schedule's op lists, built once per shape (the simulator and the memory walk share them)."""
    return build(name, pp, microbatches, vpp)


def _pareto(points: set[tuple[int, frozenset]]) -> tuple[tuple[int, frozenset], ...]:
    out = []
    for act, grads in sorted(points, key=lambda x: (-x[0], -len(x[1]))):
        if not any(a >= act and g >= grads for a, g in out):
            out.append((act, grads))
    return tuple(out)


def rank_envelope(schedule: Schedule, rank: int, stage_layers: tuple[int, ...]) -> tuple[tuple[int, frozenset], ...]:
    """Candidate peaks of one rank: ``(live layer-micro-batches, chunks with gradients)``, Pareto-pruned."""
    live = 0
    grads: set[int] = set()
    points = {(0, frozenset())}
    for op in schedule.ops[rank]:
        for kind, _, chunk in op.parts():
            layers = stage_layers[schedule.where(rank, chunk)[1]]
            if kind == "F":
                live += layers
                points.add((live, frozenset(grads)))
            elif kind in ("B", "Bi"):
                if kind == "B" and chunk not in grads:
                    grads.add(chunk)  # the weight gradient appears while this chunk's activations are still live
                    points.add((live, frozenset(grads)))
                live -= layers
            elif kind == "W" and chunk not in grads:
                grads.add(chunk)
                points.add((live, frozenset(grads)))
    return _pareto(points)


@lru_cache(maxsize=1024)
def envelopes(schedule_key: tuple, stage_layers: tuple[int, ...]) -> tuple:
    """Per rank :func:`rank_envelope` for the schedule ``(name, pp, microbatches, vpp)``, cached across layouts."""
    s = schedule(*schedule_key)
    return tuple(rank_envelope(s, r, stage_layers) for r in range(s.ranks))


def peak_layers(schedule: Schedule, rank: int, stage_layers: tuple[int, ...]) -> int:
    """Most layer-micro-batches of activations the rank holds at once."""
    return max(a for a, _ in rank_envelope(schedule, rank, stage_layers))
