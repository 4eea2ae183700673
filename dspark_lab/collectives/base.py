"""The collective interface every ``dspark_make_collective`` answer implements.

Tensors are treated as flat. ``all_reduce`` sums in place across the group; ``reduce_scatter`` sums and returns
this rank's contiguous shard (``numel`` must divide by the group size); ``all_gather`` returns every rank's tensor
concatenated in rank order. Implementations may run synchronously (gloo point-to-point does).
"""

from __future__ import annotations

import abc

import torch
import torch.distributed as dist


class Collective(abc.ABC):
    name: str = ""

    def __init__(self, group=None):
        self.group = group

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def global_rank(self, group_rank: int) -> int:
        """The world rank of ``group_rank`` (send/recv address ranks globally)."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group, in place; returns it."""

    @abc.abstractmethod
    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group and return this rank's shard (a new flat tensor of numel / world)."""

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return every rank's ``tensor`` flattened and concatenated in rank order."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
