"""A size-bucketed pool of host buffers for staging and activation offload.

Backends return one from ``dspark_make_allocator``: pinned (page-locked) on CUDA so device-to-host copies can run
asynchronously, plain on CPU. Buffers are reused by exact byte size, so an offload policy that saves the same
shapes every step allocates only on its first step.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on first use: every backend plugin imports this module when it loads
    import torch


class HostPool:
    def __init__(self, *, pinned: bool = False, pool_mb: int = 1024):
        self.pinned = pinned
        self.limit_bytes = int(pool_mb) * 2**20
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()
        self._in_use = 0
        self._pooled = 0
        self._allocations = 0

    def empty(self, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host tensor of ``shape`` and ``dtype`` (default float32; contents undefined), reused from the pool."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        shape = torch.Size(shape)
        nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            bucket = self._free.get(nbytes)
            raw = bucket.pop() if bucket else None
            if raw is not None:
                self._pooled -= nbytes
            self._in_use += nbytes
        if raw is None:
            raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
            self._allocations += 1
        return raw.view(dtype).view(shape)

    def release(self, tensor: torch.Tensor) -> None:
        """Give a buffer from :meth:`empty` back; it is kept for reuse while the pool is under its limit."""
        import torch

        raw = tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor.view(torch.uint8)
        nbytes = raw.numel()
        with self._lock:
            self._in_use -= nbytes
            if self._pooled + nbytes <= self.limit_bytes:
                self._free[nbytes].append(raw)
                self._pooled += nbytes

    def stats(self) -> dict:
        return {"pinned": self.pinned, "bytes_in_use": self._in_use, "bytes_pooled": self._pooled,
                "allocations": self._allocations}
