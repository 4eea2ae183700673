"""``builtin``: torch.distributed's own collectives, the reference the others are measured and tested against.

``reduce_scatter`` and ``all_gather`` call the single-tensor forms (``reduce_scatter_single`` /
``all_gather_single`` since torch 2.13, ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` before). A process
group without a fused reduce-scatter (older gloo) gets an equivalent: all-reduce a copy and keep this rank's shard;
the choice is made once per collective, on the first call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dspark_lab.collectives.base import Collective, flat_view, in_place, shard_size

# torch 2.13 renamed the single-tensor collectives and deprecated the old names.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class BuiltinCollective(Collective):
    name = "builtin"

    def __init__(self, group=None):
        super().__init__(group)
        self._fused_reduce_scatter: bool | None = None  # unknown until the first call

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return in_place(tensor, lambda flat: dist.all_reduce(flat, group=self.group))

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = flat_view(tensor)
        out = torch.empty(shard_size(flat.numel(), self.world_size), dtype=flat.dtype, device=flat.device)
        if self._fused_reduce_scatter is not False:
            try:
                _reduce_scatter_single(out, flat, group=self.group)
                self._fused_reduce_scatter = True
                return out
            except (RuntimeError, NotImplementedError):
                if self._fused_reduce_scatter:  # it worked before: this is a real failure
                    raise
                self._fused_reduce_scatter = False
        total = flat.clone()
        dist.all_reduce(total, group=self.group)
        return out.copy_(total.view(self.world_size, -1)[self.rank])

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = flat_view(tensor)
        out = torch.empty(flat.numel() * self.world_size, dtype=flat.dtype, device=flat.device)
        _all_gather_single(out, flat, group=self.group)
        return out
