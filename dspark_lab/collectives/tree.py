"""``tree``: all-reduce as a reduction up a binary tree and a broadcast back down, on point-to-point send/recv.

One binary tree sends the whole tensor through its root, and its leaves, half the ranks, never send what they
receive, so a single tree uses half the links' bandwidth. Sanders, Speck & Träff ("Two-tree algorithms for full
bandwidth broadcast, reduction and scan", Parallel Computing 35(12), 2009) run two trees at once, each over half
of the data, built so that a leaf of one is an inner node of the other; NCCL's double binary tree (NCCL 2.4) does
the same. Here tree 0 is the heap-ordered binary tree over group ranks (the parent of ``v`` is ``(v - 1) // 2``)
and tree 1 is its mirror image (rank ``r`` sits at position ``world - 1 - r``): tree 0's inner nodes are the low
ranks, tree 1's the high ranks. With two ranks the two trees are the two directions of the one link, which moves
the same bytes as the ring.

Each half is cut into chunks (``chunk_bytes``) that are pipelined: a node forwards chunk ``i`` to its parent
(non-blocking) while it waits for chunk ``i + 1`` from its children, so a deep tree costs one chunk per level, not
one tensor. ``reduce_scatter`` all-reduces a copy and keeps the shard (a tree reduces whole tensors; NCCL too runs
reduce-scatter on rings); ``all_gather`` gathers the pieces up tree 0 and broadcasts the result down it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dspark_lab.collectives.base import Collective, flat_view, in_place, shard_size

DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class TreePosition:
    """Where this rank sits in one tree: its parent and children as global ranks, and the group ranks below it."""

    parent: int | None
    children: tuple[int, ...]
    subtrees: tuple[tuple[int, ...], ...]  # group ranks under each child, in rank order


def tree_position(rank: int, world: int, mirrored: bool, to_global) -> TreePosition:
    """This rank's place in the heap-ordered binary tree over ``world`` ranks (or its mirror image)."""
    position = (lambda r: world - 1 - r) if mirrored else (lambda r: r)  # self-inverse: also position -> rank

    def below(v: int) -> list[int]:
        return [] if v >= world else [v, *below(2 * v + 1), *below(2 * v + 2)]

    v = position(rank)
    kids = [c for c in (2 * v + 1, 2 * v + 2) if c < world]
    return TreePosition(
        parent=None if v == 0 else to_global(position((v - 1) // 2)),
        children=tuple(to_global(position(c)) for c in kids),
        subtrees=tuple(tuple(sorted(position(u) for u in below(c))) for c in kids),
    )


class TreeCollective(Collective):
    name = "tree"

    def __init__(self, group=None, *, trees: int = 2, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__(group)
        if trees not in (1, 2):
            raise ValueError(f"trees: {trees!r} is not allowed; allowed: 1 | 2")
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes: must be a positive number of bytes, got {chunk_bytes!r}")
        self.trees = trees
        self.chunk_bytes = chunk_bytes

    def _position(self, tree: int) -> TreePosition:
        return tree_position(self.rank, self.world_size, mirrored=tree == 1, to_global=self.global_rank)

    def _chunks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        step = max(1, self.chunk_bytes // flat.element_size())
        return [c for c in torch.split(flat, step) if c.numel()]

    def _reduce_up(self, work: list[tuple[TreePosition, torch.Tensor]]) -> None:
        """Sum each chunk over its tree into the tree's root, chunk by chunk; sends stay in flight meanwhile."""
        if not work:
            return
        widest = max(c.numel() for _, c in work)
        scratch = [torch.empty(widest, dtype=work[0][1].dtype, device=work[0][1].device) for _ in range(2)]
        sends = []
        for position, chunk in work:
            buffers = [scratch[i][: chunk.numel()] for i in range(len(position.children))]
            for recv in [dist.irecv(b, child, group=self.group) for b, child in zip(buffers, position.children)]:
                recv.wait()
            for buffer in buffers:
                chunk.add_(buffer)
            if position.parent is not None:
                sends.append(dist.isend(chunk, position.parent, group=self.group))
        for send in sends:  # a chunk must have left before the broadcast overwrites it
            send.wait()

    def _broadcast_down(self, work: list[tuple[TreePosition, torch.Tensor]]) -> None:
        """Copy each chunk from its tree's root to every rank, chunk by chunk."""
        sends = []
        for position, chunk in work:
            if position.parent is not None:
                dist.irecv(chunk, position.parent, group=self.group).wait()
            sends.extend(dist.isend(chunk, child, group=self.group) for child in position.children)
        for send in sends:
            send.wait()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor

        def two_trees(flat: torch.Tensor) -> None:
            positions = [self._position(t) for t in range(self.trees)]
            per_tree = [[(positions[t], c) for c in self._chunks(half)]
                        for t, half in enumerate(torch.tensor_split(flat, self.trees))]
            # Interleave the trees' chunks so both trees (both directions of every link) are busy at once.
            work = [item for group in itertools.zip_longest(*per_tree) for item in group if item is not None]
            self._reduce_up(work)
            self._broadcast_down(work)

        return in_place(tensor, two_trees)

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        size = shard_size(tensor.numel(), self.world_size)
        total = self.all_reduce(flat_view(tensor).clone())
        return total[self.rank * size: (self.rank + 1) * size].clone()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = flat_view(tensor)
        m, n = flat.numel(), self.world_size
        out = torch.empty(m * n, dtype=flat.dtype, device=flat.device)
        out[self.rank * m: (self.rank + 1) * m].copy_(flat)
        if n == 1 or m == 0:
            return out
        position = self._position(0)
        slots = out.view(n, m)
        for child, ranks in zip(position.children, position.subtrees):
            packed = torch.empty(len(ranks), m, dtype=flat.dtype, device=flat.device)
            dist.irecv(packed, child, group=self.group).wait()
            slots[list(ranks)] = packed
        if position.parent is not None:
            mine = sorted([self.rank, *itertools.chain.from_iterable(position.subtrees)])
            dist.isend(slots[mine].contiguous(), position.parent, group=self.group).wait()
        self._broadcast_down([(position, c) for c in self._chunks(out)])
        return out
