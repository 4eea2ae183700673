"""Schedule generators: each returns a :class:`~dspark_lab.pipeline.ir.Schedule` for (ranks, microbatches, chunks).

Sources (the op orders follow them; the code is ours):

- ``gpipe``: GPipe, Huang et al. 2019 — all forwards, then all backwards.
- ``1f1b``: PipeDream-Flush, Narayanan et al. 2021 — warm up with ``p-1-r`` forwards, then alternate.
- ``interleaved-1f1b``: Megatron-LM, Narayanan et al. SC'21 — ``v`` chunks per rank, rank r holds stages
  ``r, r+p, ...``; forwards walk chunks in groups of ``p`` micro-batches.
- ``zb-h1`` / ``zb-h2``: Zero Bubble Pipeline Parallelism, Qi et al. 2023 (ICLR 2024) — the backward is split into
  B (input gradients) and W (weight gradients); W is deferred into bubbles. H1 keeps 1F1B's memory, H2 warms up with
  more forwards (peak ``2p-1``).
- ``zbv``: Pipeline Parallelism with Controllable Memory, Qi et al. 2024 — the hand-crafted ZB-V: two chunks per
  rank in a V (rank r holds stages r and 2p-1-r), B/W split.
- ``dualpipe`` / ``dualpipev``: DeepSeek-V3 technical report (2024) and deepseek-ai/DualPipe — the eight-step op
  order of ``dualpipe.py`` and ``dualpipev.py`` (FB = a forward overlapped with a full backward; W queue FIFO).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from dspark_lab.pipeline.ir import B, F, FB, Op, Schedule, W

Generator = Callable[[int, int, int], Schedule]
SCHEDULES: dict[str, Generator] = {}


def _register(name: str):
    def wrap(fn: Generator) -> Generator:
        SCHEDULES[name] = fn
        return fn
    return wrap


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _line(p: int) -> list[list[tuple[int, int]]]:
    return [[(r, 0) for r in range(p)]]


def _vshape(p: int) -> list[list[tuple[int, int]]]:
    return [[(r, 0) for r in range(p)] + [(r, 1) for r in reversed(range(p))]]


def build(name: str, ranks: int, microbatches: int, chunks: int | None = None,
          runtime: str = "megatron") -> Schedule:
    """The schedule ``name``; ValueError names the bad field and what is allowed. ``runtime``: ``torch`` for the
    op order ``torch.distributed.pipelining`` gives a schedule where it differs from the paper's (:data:`TORCH`)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule: unknown {name!r}; choose from {', '.join(SCHEDULES)}")
    _need(ranks >= 1, f"ranks: must be >= 1, got {ranks}")
    _need(microbatches >= 1, f"microbatches: must be >= 1, got {microbatches}")
    generator = TORCH.get(name, SCHEDULES[name]) if runtime == "torch" else SCHEDULES[name]
    return generator(ranks, microbatches, chunks or default_chunks(name))


def default_chunks(name: str) -> int:
    return 2 if name in ("interleaved-1f1b", "zbv", "dualpipe", "dualpipev") else 1


def _one_chunk(name: str, v: int) -> None:
    _need(v == 1, f"chunks: {name} holds 1 chunk per rank, got {v}")


def _two_chunks(name: str, v: int) -> None:
    _need(v == 2, f"chunks: {name} holds 2 chunks per rank, got {v}")


@_register("gpipe")
def gpipe(p: int, m: int, v: int = 1) -> Schedule:
    _one_chunk("gpipe", v)
    ops = [[F(i) for i in range(m)] + [B(i) for i in range(m)] for _ in range(p)]
    return Schedule("gpipe", p, m, 1, ops, _line(p), memory_bound=[m] * p)


def _one_f_one_b(p: int, m: int, r: int, warmup: int, lag: int | None) -> list[Op]:
    """1F1B on rank r; with ``lag`` the backward is split and W trails its B by ``lag`` backwards (FIFO)."""
    ops: list[Op] = [F(i) for i in range(warmup)]
    pending: deque[int] = deque()

    def backward(i: int) -> None:
        if lag is None:
            ops.append(B(i))
            return
        ops.append(B(i, full=False))
        pending.append(i)
        if len(pending) > lag:
            ops.append(W(pending.popleft()))

    for i in range(m - warmup):
        ops.append(F(warmup + i))
        backward(i)
    for i in range(m - warmup, m):
        backward(i)
    ops.extend(W(i) for i in pending)
    return ops


@_register("1f1b")
def one_f_one_b(p: int, m: int, v: int = 1) -> Schedule:
    _one_chunk("1f1b", v)
    ops = [_one_f_one_b(p, m, r, min(p - 1 - r, m), None) for r in range(p)]
    return Schedule("1f1b", p, m, 1, ops, _line(p), memory_bound=[min(p - r, m) for r in range(p)])


@_register("zb-h1")
def zb_h1(p: int, m: int, v: int = 1) -> Schedule:
    # Rank r keeps r weight passes pending so the last ranks fill the cool-down with W (ZB paper, Fig. 3 top).
    _one_chunk("zb-h1", v)
    ops = [_one_f_one_b(p, m, r, min(p - 1 - r, m), r) for r in range(p)]
    return Schedule("zb-h1", p, m, 1, ops, _line(p), memory_bound=[min(p - r, m) for r in range(p)])


@_register("zb-h2")
def zb_h2(p: int, m: int, v: int = 1) -> Schedule:
    # Warm up with 2(p-1-r) forwards, plus the first steady one: enough to cover the time until the first B
    # returns (ZB paper, Fig. 3 bottom); W passes trail their B by the same lag as in ZB-H1.
    _one_chunk("zb-h2", v)
    ops = [_one_f_one_b(p, m, r, min(2 * (p - 1 - r), m), r) for r in range(p)]
    return Schedule("zb-h2", p, m, 1, ops, _line(p), memory_bound=[min(2 * (p - r) - 1, m) for r in range(p)])


@_register("interleaved-1f1b")
def interleaved_1f1b(p: int, m: int, v: int = 2, all_forward_when_m_is_p: bool = True) -> Schedule:
    """Warm-up of ``2(p-1-r) + (v-1)p`` forwards, capped at all of them. ``all_forward_when_m_is_p``: Megatron-LM
    runs every forward first when there are exactly ``p`` micro-batches; ``ScheduleInterleaved1F1B`` of
    torch.distributed.pipelining (Dec 2024) does not, so its last ranks start alternating after ``(v-1)p + 2(p-1-r)``
    forwards."""
    _need(v >= 1, f"chunks: interleaved-1f1b needs >= 1, got {v}")
    _need(m % p == 0, f"microbatches: interleaved-1f1b needs a multiple of ranks ({p}), got {m}")
    total = m * v

    def position(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // p) % v
        return (k // (p * v)) * p + k % p, (v - 1 - chunk if backward else chunk)

    ops, bound = [], []
    for r in range(p):
        warmup = total if m == p and all_forward_when_m_is_p else min((p - 1 - r) * 2 + (v - 1) * p, total)
        rank_ops = [F(*position(k, False)) for k in range(warmup)]
        for k in range(total - warmup):
            rank_ops += [F(*position(warmup + k, False)), B(*position(k, True))]
        rank_ops += [B(*position(k, True)) for k in range(total - warmup, total)]
        ops.append(rank_ops)
        bound.append(min(warmup + 1, total))
    streams = [[(r, c) for c in range(v) for r in range(p)]]
    return Schedule("interleaved-1f1b", p, m, v, ops, streams, memory_bound=bound)


TORCH: dict[str, Generator] = {
    "interleaved-1f1b": lambda p, m, v: interleaved_1f1b(p, m, v, all_forward_when_m_is_p=False),
}


@_register("zbv")
def zbv(p: int, m: int, v: int = 2) -> Schedule:
    _two_chunks("zbv", v)
    _need(m >= 2 * p - 1, f"microbatches: zbv needs >= 2*ranks-1 ({2 * p - 1}), got {m}")
    ops = []
    for r in range(p):
        nf = [0, 0]  # forwards issued per chunk
        nb = [0, 0]  # backwards issued per chunk
        rank_ops: list[Op] = []

        def fwd(c: int) -> None:
            rank_ops.append(F(nf[c], c))
            nf[c] += 1

        def bwd(c: int, with_w: bool) -> None:
            rank_ops.append(B(nb[c], c, full=False))
            if with_w:
                rank_ops.append(W(nb[c], c))
            nb[c] += 1

        for _ in range(2 * (p - r) - 1):  # fill the down stroke of the V
            fwd(0)
        for _ in range(r):  # forwards alternate chunks until the first B of chunk 1 can run
            fwd(1)
            fwd(0)
        for _ in range(p - r):  # chunk 1 reaches steady state first
            fwd(1)
            bwd(1, True)
        while nf[1] < nf[0] or nf[0] < m:  # steady: F0 B0 W0 F1 B1 W1
            if nf[0] < m:
                fwd(0)
            bwd(0, True)
            fwd(1)
            bwd(1, True)
        w_done = list(nb)
        for _ in range(r):  # cool-down: input grads first, weights deferred
            bwd(0, False)
            bwd(1, False)
        for _ in range(p - r):
            bwd(0, False)
            rank_ops.append(W(w_done[0], 0))
            w_done[0] += 1
        rank_ops += [W(i, 1) for i in range(w_done[1], m)] + [W(i, 0) for i in range(w_done[0], m)]
        ops.append(rank_ops)
    return Schedule("zbv", p, m, 2, ops, _vshape(p), memory_bound=[2 * p] * p)


def _dual(p: int, m: int, v: bool) -> list[list[Op]]:
    """The eight steps of DeepSeek's DualPipe (``v=False``) or DualPipeV (``v=True``), per rank.

    A rank's phase 0 is the chunk whose micro-batches enter on its side of the pipeline, phase 1 the other one.
    For DualPipe the ranks in the second half swap which direction is phase 0.
    """
    all_ops = []
    for rank in range(p):
        if v:
            n, half_rank, middle, swap = p, rank, rank == p - 1, 0
            mbs = m
        else:
            n, half_rank, swap = p // 2, min(rank, p - 1 - rank), int(rank >= p // 2)
            middle = rank in (p // 2 - 1, p // 2)
            mbs = m // 2
        ops: list[Op] = []
        nf, nb = [0, 0], [0, 0]
        weights: deque[tuple[int, int]] = deque()

        def f_next(phase: int) -> tuple[int, int]:
            nf[phase] += 1
            return nf[phase] - 1, phase ^ swap

        def b_next(phase: int) -> tuple[int, int]:
            nb[phase] += 1
            return nb[phase] - 1, phase ^ swap

        def fwd(phase: int) -> None:
            ops.append(F(*f_next(phase)))

        def bwd(phase: int, zb: bool = False) -> None:
            mb, chunk = b_next(phase)
            ops.append(B(mb, chunk, full=not zb))
            if zb:
                weights.append((mb, chunk))

        def weight() -> None:
            ops.append(W(*weights.popleft()))

        def fwd_bwd(phase0: int, phase1: int) -> None:
            ops.append(FB(*f_next(phase0), *b_next(phase1)))

        for _ in range((n - half_rank - 1) * 2):  # 1: nF0
            fwd(0)
        for _ in range(half_rank + 1):  # 2: nF0F1
            fwd(0)
            fwd(1)
        for _ in range(n - half_rank - 1):  # 3: nB1W1F1, zero bubble
            bwd(1, zb=True)
            weight()
            fwd(1)
        steps_4 = (mbs - 2 * n + half_rank + 1) if v else (mbs - p + half_rank + 1)
        for i in range(steps_4):  # 4: nF0B1F1B0, the overlapped main phase
            if i == 0 and middle:  # not overlapped on the middle rank(s), to shrink the bubble
                fwd(0)
                bwd(1)
            else:
                fwd_bwd(0, 1)
            fwd_bwd(1, 0)
        for _ in range(n - half_rank - 1):  # 5: nB1F1B0
            bwd(1)
            fwd_bwd(1, 0)
        zb = False
        steps_6 = half_rank + 1
        for i in range(steps_6):  # 6: nB1B0, the second half with zero bubble
            if i == steps_6 // 2 and half_rank % 2 == 1:
                zb = True
            bwd(1, zb)
            if i == steps_6 // 2 and half_rank % 2 == 0:
                zb = True
            bwd(0, zb)
        for _ in range(n - half_rank - 1):  # 7: nWB0
            weight()
            bwd(0, zb=True)
        while weights:  # 8: nW
            weight()
        all_ops.append(ops)
    return all_ops


@_register("dualpipe")
def dualpipe(p: int, m: int, v: int = 2) -> Schedule:
    _two_chunks("dualpipe", v)
    _need(p % 2 == 0, f"ranks: dualpipe needs an even number, got {p}")
    _need(m % 2 == 0 and m >= 2 * p, f"microbatches: dualpipe needs an even number >= 2*ranks ({2 * p}), got {m}")
    streams = [[(r, 0) for r in range(p)], [(r, 1) for r in reversed(range(p))]]
    # DeepSeek-V3 table 2: activation memory PP+1 (here in micro-batch-chunk units, PP = p).
    return Schedule("dualpipe", p, m, 2, _dual(p, m, False), streams, memory_bound=[p + 1] * p)


@_register("dualpipev")
def dualpipev(p: int, m: int, v: int = 2) -> Schedule:
    _two_chunks("dualpipev", v)
    _need(m >= 2 * p, f"microbatches: dualpipev needs >= 2*ranks ({2 * p}), got {m}")
    # PP+1 with PP = 2p stages.
    return Schedule("dualpipev", p, m, 2, _dual(p, m, True), _vshape(p), memory_bound=[2 * p + 1] * p)
