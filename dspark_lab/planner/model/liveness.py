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
def schedule(name: str, pp: int, microbatches: int, vpp: int, runtime: str = "megatron") -> Schedule:
    """The schedule's op lists as ``runtime`` (the layout's ``pp_runtime``) orders them, built once per shape (the
    simulator, the memory walk and the allocation trace share them)."""
    return build(name, pp, microbatches, vpp, runtime)


def _pareto(points: set[tuple[int, frozenset, int]]) -> tuple[tuple[int, frozenset, int], ...]:
    out = []
    for act, grads, kept in sorted(points, key=lambda x: (-x[0], -len(x[1]), -x[2])):
        if not any(a >= act and g >= grads and k >= kept for a, g, k in out):
            out.append((act, grads, kept))
    return tuple(out)


def rank_envelope(schedule: Schedule, rank: int, stage_layers: tuple[int, ...], boundaries: bool = False,
                  outputs: bool = True, reduce_after: int = 0) -> tuple[tuple[int, frozenset, int], ...]:
    """Candidate peaks of one rank: ``(live layer-micro-batches, chunks with gradients, kept boundaries)``,
    Pareto-pruned. ``boundaries`` counts the stage-boundary tensors ``torch.distributed.pipelining`` keeps beyond
    its preallocated receive buffers (``memory.pipeline_buffer_bytes``): every input gradient stays on its receive
    buffer's ``.grad`` (``stage_backward`` runs ``torch.autograd.backward``, which accumulates into the buffer;
    ``clear_runtime_states`` clears it at the next step), and with ``outputs`` (``step(return_outputs=True)`` on
    torch 1963fc8, Dec 2024) every stage's forward output stays in ``output_chunks`` until the next step
    (``forward_one_chunk`` appends it on every stage; the last stage's, its logits, are counted by
    ``memory.kept_output_bytes`` instead); without ``outputs`` each stays only in ``fwd_cache``, to its
    micro-batch's backward. While a micro-batch is in flight on a receiving stage with layers, its receive buffer
    is its first layer's saved input, already counted in the live layers, so one boundary less. Zero when
    ``boundaries`` is false. ``reduce_after``: a chunk's gradients go once it has run that many backwards (FSDP2
    under ``torch.distributed.pipelining``: a stage's last backward, ``last_backward``, runs FSDP's post-backward,
    which reduce-scatters the unsharded gradients and frees them, so a rank's earlier-finished chunk gives its
    gradients back before its other chunk's backwards end); 0 keeps them to the step's end."""
    last = len(stage_layers) - 1
    live = kept = 0
    grads: set[int] = set()
    backwards: dict[int, int] = {}
    points = {(0, frozenset(), 0)}
    for op in schedule.ops[rank]:
        for kind, _, chunk in op.parts():
            stage = schedule.where(rank, chunk)[1]
            layers = stage_layers[stage]
            shared_input = boundaries and 0 < stage and layers > 0
            output = boundaries and stage < last  # this stage's output, sent on
            if kind == "F":
                live += layers
                kept += output - shared_input
                points.add((live, frozenset(grads), kept))
            elif kind in ("B", "Bi"):
                if kind == "B" and chunk not in grads:
                    grads.add(chunk)  # the weight gradient appears while this chunk's activations are still live
                    points.add((live, frozenset(grads), kept))
                live -= layers
                kept += shared_input + (boundaries and stage > 0)  # the buffer is free of the layer; its gradient
                kept -= output and not outputs  # fwd_cache lets the output go
                points.add((live, frozenset(grads), kept))
                backwards[chunk] = backwards.get(chunk, 0) + (kind == "B")  # split backwards (Bi, W): kept
                if reduce_after and backwards[chunk] == reduce_after:
                    grads.discard(chunk)
                    points.add((live, frozenset(grads), kept))
            elif kind == "W" and chunk not in grads:
                grads.add(chunk)
                points.add((live, frozenset(grads), kept))
    return _pareto(points)


@lru_cache(maxsize=1024)
def envelopes(schedule_key: tuple, stage_layers: tuple[int, ...], boundaries: bool = False,
              outputs: bool = True, reduce_after: int = 0) -> tuple:
    """Per rank :func:`rank_envelope` for the schedule ``(name, pp, microbatches, vpp, runtime)``, cached across
    layouts."""
    s = schedule(*schedule_key)
    return tuple(rank_envelope(s, r, stage_layers, boundaries, outputs, reduce_after) for r in range(s.ranks))
