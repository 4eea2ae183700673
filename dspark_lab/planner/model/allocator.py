"""A model of PyTorch's CUDA caching allocator with expandable segments, to turn an allocation trace into the
memory a job *reserves*, which is what ``torch.cuda.max_memory_reserved()`` and torchtitan's memory column report.

The rules follow c10/cuda/CUDACachingAllocator.cpp with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, which
torchtitan's launch script sets: requests are rounded up to 512 bytes; requests of at most 1 MiB come from the small
pool, larger ones from the large pool; each pool (per stream) is one virtual segment that is mapped from its start
in pages of 2 MiB (small) or 20 MiB (large). ``get_free_block`` takes the smallest cached free block that fits (the
lowest address among equals), except that the last mapped block, whose unmapped rest it could grow into, counts as
that large, so any other fitting block is taken first; a block is split when at least 512 bytes would remain
(``should_split`` under expandable segments, both pools). When no cached block fits, ``try_allocate_expandable_block``
maps just enough pages after the last mapped block, merging it in if it is free. A freed block merges with its free
neighbours and stays mapped (cached) until ``empty_cache`` or an allocation that would otherwise fail. So a freed
block in the middle of the segment serves only requests that fit in it, and the segment's mapped size, not the bytes
allocated, is what the device holds. Streams are not modelled: give one stream's trace (the default stream's).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MIN_BLOCK = 512
SMALL_REQUEST = 1 << 20  # kSmallSize: requests up to here use the small pool
SMALL_PAGE = 2 << 20  # kSmallBuffer: the small pool's mapping granularity
LARGE_PAGE = 20 << 20  # kLargeBuffer: the large pool's mapping granularity


def round_size(nbytes: int) -> int:
    """The allocator's request rounding (``round_size`` without ``roundup_power2_divisions``)."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


@dataclass(slots=True)
class ExpandableSegment:
    """One pool's segment: blocks by address, cached free blocks ordered by (size, address), the mapped end."""

    page: int
    blocks: dict[int, int] = field(default_factory=dict)  # address -> size, allocated or free
    free: list[tuple[int, int]] = field(default_factory=list)  # sorted (size, address) of free blocks
    free_by_end: dict[int, int] = field(default_factory=dict)  # end address -> address, free blocks
    mapped: int = 0
    peak_mapped: int = 0

    def _take(self, addr: int) -> int:
        size = self.blocks[addr]
        del self.free[bisect.bisect_left(self.free, (size, addr))]
        del self.free_by_end[addr + size]
        return size

    def _put(self, addr: int, size: int) -> None:
        self.blocks[addr] = size
        bisect.insort(self.free, (size, addr))
        self.free_by_end[addr + size] = addr

    def allocate(self, size: int) -> tuple[int, int]:
        """Place a rounded request; return (address, block size given)."""
        free = self.free
        i = bisect.bisect_left(free, (size, -1))
        if i < len(free) and free[i][1] + free[i][0] == self.mapped and i + 1 < len(free):
            i += 1  # the growable last block counts as larger than any other that fits
        if i < len(free):
            have, addr = free.pop(i)
            del self.free_by_end[addr + have]
        else:
            tail = self.free_by_end.get(self.mapped)
            addr, have = (tail, self._take(tail)) if tail is not None else (self.mapped, 0)
            grow = -(-(size - have) // self.page) * self.page
            self.mapped += grow
            if self.mapped > self.peak_mapped:
                self.peak_mapped = self.mapped
            have += grow
        if have - size >= MIN_BLOCK:  # should_split, expandable segments
            self._put(addr + size, have - size)
            have = size
        self.blocks[addr] = have
        return addr, have

    def release(self, addr: int) -> None:
        blocks, by_end = self.blocks, self.free_by_end
        size = blocks[addr]
        after = addr + size
        if by_end.get(after + blocks.get(after, 0)) == after:  # the next block is free
            size += self._take(after)
            del blocks[after]
        before = by_end.get(addr)
        if before is not None:
            del blocks[addr]
            size += self._take(before)
            addr = before
        self._put(addr, size)


class CachingAllocator:
    """Replays ``malloc(key, nbytes)`` / ``free(key)`` and tracks allocated and reserved (mapped) bytes."""

    def __init__(self) -> None:
        self.pools = (ExpandableSegment(SMALL_PAGE), ExpandableSegment(LARGE_PAGE))
        self.live: dict[object, tuple[ExpandableSegment, int, int]] = {}  # key -> (pool, address, block size)
        self.allocated = 0
        self.peak_allocated = 0

    def malloc(self, key: object, nbytes: int) -> None:
        self.replay(((key, nbytes),))

    def free(self, key: object) -> None:
        self.replay(((key, 0),))

    def replay(self, events) -> None:
        """Run ``(key, nbytes)`` events in order: ``nbytes > 0`` allocates, ``0`` frees ``key``. One loop with its
        state in locals, because a step's trace is about a million events."""
        live, (small, large) = self.live, self.pools
        allocated, peak = self.allocated, self.peak_allocated
        for key, nbytes in events:
            if nbytes:
                size = round_size(nbytes)
                segment = large if size > SMALL_REQUEST else small
                addr, given = segment.allocate(size)
                live[key] = (segment, addr, given)
                allocated += given
                if allocated > peak:
                    peak = allocated
            else:
                segment, addr, given = live.pop(key)
                allocated -= given
                segment.release(addr)
        self.allocated, self.peak_allocated = allocated, peak

    @property
    def reserved(self) -> int:
        return sum(p.mapped for p in self.pools)

    @property
    def peak_reserved(self) -> int:
        return sum(p.peak_mapped for p in self.pools)
