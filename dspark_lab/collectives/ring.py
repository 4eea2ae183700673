"""``ring``: the bandwidth-optimal ring all-reduce on point-to-point send/recv.

Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations", JPDC 69(2), 2009. The
flat tensor is cut into ``world`` segments (``torch.tensor_split``: sizes differ by at most one element, so any
numel works, even one smaller than the group). A reduce-scatter of ``world - 1`` steps, each rank sending one
segment to its right neighbour and adding the one that arrives from its left, leaves group rank ``r`` holding the
full sum of segment ``r``; an all-gather of ``world - 1`` steps passes the finished segments around the ring. Each
rank sends and receives ``2 (world - 1) / world`` times the tensor, the lower bound for all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dspark_lab.collectives.base import Collective, flat_view, in_place, shard_size


def exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, group) -> None:
    """Send ``send`` to global rank ``dst`` while receiving ``recv`` from ``src``; empty buffers are skipped.

    The receive is posted before the send is waited on: a gloo send does not complete until its peer receives.
    Both ends know every segment's size, so they skip an empty one together.
    """
    works = []
    if recv.numel():
        works.append(dist.irecv(recv, src, group=group))
    if send.numel():
        works.append(dist.isend(send, dst, group=group))
    for work in works:
        work.wait()


class RingCollective(Collective):
    name = "ring"

    def _neighbours(self) -> tuple[int, int]:
        n, r = self.world_size, self.rank
        return self.global_rank((r + 1) % n), self.global_rank((r - 1) % n)

    def _reduce_scatter_segments(self, segments: tuple[torch.Tensor, ...]) -> None:
        """Sum every rank's ``segments`` in place so that group rank ``r`` ends with the full sum of segment ``r``."""
        n, r = self.world_size, self.rank
        right, left = self._neighbours()
        scratch = torch.empty(max(s.numel() for s in segments), dtype=segments[0].dtype, device=segments[0].device)
        for step in range(n - 1):
            outgoing, incoming = segments[(r - step - 1) % n], segments[(r - step - 2) % n]
            buffer = scratch[: incoming.numel()]
            exchange(outgoing, right, buffer, left, self.group)
            incoming.add_(buffer)

    def _all_gather_segments(self, segments: tuple[torch.Tensor, ...]) -> None:
        """Starting from group rank ``r`` holding segment ``r``, pass segments around until every rank has all."""
        n, r = self.world_size, self.rank
        right, left = self._neighbours()
        for step in range(n - 1):
            exchange(segments[(r - step) % n], right, segments[(r - step - 1) % n], left, self.group)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor

        def ring(flat: torch.Tensor) -> None:
            segments = torch.tensor_split(flat, self.world_size)
            self._reduce_scatter_segments(segments)
            self._all_gather_segments(segments)

        return in_place(tensor, ring)

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        work = flat_view(tensor).clone()
        size = shard_size(work.numel(), self.world_size)
        if self.world_size > 1:
            self._reduce_scatter_segments(torch.split(work, size))
        return work[self.rank * size: (self.rank + 1) * size].clone()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = flat_view(tensor)
        out = torch.empty(flat.numel() * self.world_size, dtype=flat.dtype, device=flat.device)
        segments = torch.split(out, flat.numel()) if flat.numel() else (out,) * self.world_size
        segments[self.rank].copy_(flat)
        self._all_gather_segments(segments)
        return out
