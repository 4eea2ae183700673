"""The collective interface every ``dspark_make_collective`` answer implements.

Tensors are treated as flat. ``all_reduce`` sums in place across the group; ``reduce_scatter`` sums and returns
this rank's contiguous shard (``numel`` must divide by the group size); ``all_gather`` returns every rank's tensor
concatenated in rank order. Implementations may run synchronously (gloo point-to-point does).
"""

from __future__ import annotations

import abc
from typing import Callable

import torch
import torch.distributed as dist


def flat_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a flat contiguous tensor: a view when it is contiguous, else a copy."""
    return tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)


def in_place(tensor: torch.Tensor, reduce_flat: Callable[[torch.Tensor], object]) -> torch.Tensor:
    """Run ``reduce_flat`` on a flat contiguous view of ``tensor`` and make the result land in ``tensor``."""
    flat = flat_view(tensor)
    reduce_flat(flat)
    if not tensor.is_contiguous():
        tensor.copy_(flat.view(tensor.shape))
    return tensor


def shard_size(numel: int, world_size: int) -> int:
    """The numel of one ``reduce_scatter`` shard; ``ValueError`` when ``numel`` does not divide by the group."""
    if numel % world_size:
        raise ValueError(f"reduce_scatter: numel {numel} must be divisible by the group size {world_size}")
    return numel // world_size


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
