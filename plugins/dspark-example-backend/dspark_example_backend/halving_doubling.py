"""Recursive halving-doubling all-reduce on ``torch.distributed`` point-to-point (any backend, gloo included).

Rabenseifner's algorithm as described by Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication
Operations in MPICH" (IJHPCA 2005), section 4: a reduce-scatter by recursive halving (log2 p steps, each rank
exchanging half of what it still holds with the partner ``rank ^ mask``), then an all-gather by recursive doubling
that retraces those steps. Each rank sends about 2n(p-1)/p elements in 2 log2 p messages, against 2(p-1) for a ring.

A group whose size is not a power of two first folds its first ``2r`` ranks in pairs (``r = p - 2**floor(log2 p)``):
each even one hands its tensor to its odd neighbour and waits for the result at the end (the paper's pre-step).
``reduce_scatter`` and ``all_gather`` use halving and doubling directly on a power of two; on other sizes they go
through the all-reduce (correct, with more traffic), which keeps this example short.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dspark_example_backend.names import COLLECTIVE
from dspark_lab.collectives.base import Collective


class HalvingDoublingCollective(Collective):
    name = COLLECTIVE

    # --- point-to-point on group ranks --------------------------------------------------------------------------

    def _exchange(self, peer: int, send: torch.Tensor, recv: torch.Tensor) -> None:
        """Send ``send`` to and receive ``recv`` from group rank ``peer`` at once (no ordering deadlock)."""
        dst = self.global_rank(peer)
        # Sizes mirror the partner's, so both sides skip an empty message alike.
        ops = ([dist.isend(send.contiguous(), dst, group=self.group)] if send.numel() else []) + \
              ([dist.irecv(recv, dst, group=self.group)] if recv.numel() else [])
        for op in ops:
            op.wait()

    # --- the collectives ----------------------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        size = self.world_size
        if size == 1 or tensor.numel() == 0:
            return tensor
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1).clone()
        rank, pof2 = self.rank, 1 << (size.bit_length() - 1)
        extra = size - pof2
        # Pre-step: ranks below 2*extra pair up; the even one of each pair sits out the halving-doubling.
        if rank < 2 * extra:
            if rank % 2 == 0:
                dist.send(flat.contiguous(), self.global_rank(rank + 1), group=self.group)
                dist.recv(flat, self.global_rank(rank + 1), group=self.group)
                return _write_back(tensor, flat)
            incoming = torch.empty_like(flat)
            dist.recv(incoming, self.global_rank(rank - 1), group=self.group)
            flat += incoming
            vrank = rank // 2
        else:
            vrank = rank - extra
        real = lambda v: 2 * v + 1 if v < extra else v + extra  # noqa: E731  virtual rank -> group rank

        # Reduce-scatter by recursive halving: keep one half of the current range, send the other.
        lo, hi, steps = 0, flat.numel(), []
        mask = pof2 >> 1
        while mask:
            mid = (lo + hi) // 2
            keep_low = not vrank & mask
            keep, give = ((lo, mid), (mid, hi)) if keep_low else ((mid, hi), (lo, mid))
            incoming = flat.new_empty(keep[1] - keep[0])
            self._exchange(real(vrank ^ mask), flat[give[0]:give[1]], incoming)
            flat[keep[0]:keep[1]] += incoming
            steps.append((keep, give))
            lo, hi = keep
            mask >>= 1
        # All-gather by recursive doubling: retrace the steps, swapping the reduced halves back.
        mask = 1
        for keep, give in reversed(steps):
            self._exchange(real(vrank ^ mask), flat[keep[0]:keep[1]].clone(), flat[give[0]:give[1]])
            mask <<= 1

        if rank < 2 * extra:  # hand the result back to the even partner of the pre-step
            dist.send(flat.contiguous(), self.global_rank(rank - 1), group=self.group)
        return _write_back(tensor, flat)

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        size, rank = self.world_size, self.rank
        if tensor.numel() % size:
            raise ValueError(f"reduce_scatter: numel {tensor.numel()} must divide by the group size {size}")
        shard = tensor.numel() // size
        if size & (size - 1):
            reduced = self.all_reduce(tensor.reshape(-1).clone())
            return reduced[rank * shard:(rank + 1) * shard].clone()
        flat = tensor.reshape(-1).clone()
        lo, hi, mask = 0, flat.numel(), size >> 1
        while mask:
            mid = (lo + hi) // 2
            keep, give = ((lo, mid), (mid, hi)) if not rank & mask else ((mid, hi), (lo, mid))
            incoming = flat.new_empty(keep[1] - keep[0])
            self._exchange(rank ^ mask, flat[give[0]:give[1]], incoming)
            flat[keep[0]:keep[1]] += incoming
            lo, hi = keep
            mask >>= 1
        return flat[lo:hi].clone()  # the halving leaves block ``rank`` of ``size`` equal blocks here

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        size, rank = self.world_size, self.rank
        part = tensor.reshape(-1)
        n = part.numel()
        out = part.new_zeros(size * n)
        out[rank * n:(rank + 1) * n] = part
        if size & (size - 1):
            return self.all_reduce(out)  # every other block is zero, so the sum is the concatenation
        mask = 1
        while mask < size:
            mine, theirs = (rank // mask) * mask, ((rank ^ mask) // mask) * mask  # first block of each group
            self._exchange(rank ^ mask, out[mine * n:(mine + mask) * n].clone(), out[theirs * n:(theirs + mask) * n])
            mask <<= 1
        return out


def _write_back(tensor: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    if flat.data_ptr() != tensor.data_ptr():
        tensor.copy_(flat.view_as(tensor))
    return tensor
