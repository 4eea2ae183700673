"""All-reduce bandwidth of a collective inside an initialized process group, reported as nccl-tests does.

``algbw`` is the tensor's bytes over the time; ``busbw = algbw * 2 (n - 1) / n`` is what each link carries in a
bandwidth-optimal all-reduce, so it can be compared with the link's peak whatever the rank count (NVIDIA
nccl-tests, doc/PERFORMANCE.md). For a compressed collective the bytes are the logical fp32 bytes of the tensor;
``wire_bytes`` says what one rank actually sent.

Every rank must call :func:`measure_all_reduce` with the same arguments. Each repetition starts after a barrier
and counts the slowest rank's time (the collective is done when the last rank is); the row reports the median.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from dspark_lab.collectives.compress import ring_wire_bytes

MB = 1 << 20


@dataclass(frozen=True, kw_only=True, slots=True)
class BandwidthRow:
    name: str
    bytes: int  # logical fp32 bytes of the tensor
    time_s: float  # median over repetitions of the slowest rank's time
    algbw_gb_s: float
    busbw_gb_s: float
    wire_bytes: int  # bytes one rank sent

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bus_factor(world_size: int) -> float:
    return 2 * (world_size - 1) / world_size


def measure_all_reduce(name: str, all_reduce: Callable[[torch.Tensor], Any], sizes_bytes: Sequence[int], *,
                       wire_bytes: Callable[[int], int] | None = None, warmup: int = 2, reps: int = 5,
                       group=None) -> list[BandwidthRow]:
    """Time ``all_reduce(tensor)`` on fp32 tensors of each size in ``sizes_bytes``; one row per size.

    ``wire_bytes(numel)`` gives the bytes a rank sends (default: a ring all-reduce of fp32).
    """
    if warmup < 0 or reps < 1:
        raise ValueError(f"reps: need warmup >= 0 and reps >= 1, got warmup={warmup}, reps={reps}")
    world = dist.get_world_size(group)
    rows = []
    for size in sizes_bytes:
        numel = max(1, size // 4)
        source = torch.randn(numel, generator=torch.Generator().manual_seed(dist.get_rank()))
        tensor = source.clone()
        times = []
        for rep in range(warmup + reps):
            tensor.copy_(source)  # keep values bounded: repeated in-place sums would grow without end
            dist.barrier(group=group)
            start = time.perf_counter()
            all_reduce(tensor)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
            if rep >= warmup:
                times.append(elapsed.item())
        median = statistics.median(times)
        algbw = numel * 4 / median / 1e9
        rows.append(BandwidthRow(
            name=name, bytes=numel * 4, time_s=median, algbw_gb_s=algbw, busbw_gb_s=algbw * bus_factor(world),
            wire_bytes=wire_bytes(numel) if wire_bytes else ring_wire_bytes(numel, world)))
    return rows
