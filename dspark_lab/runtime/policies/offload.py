"""Activation offload: tensors saved for backward go to host buffers during forward and come back before backward.

The scheme is ZeRO-Offload's (Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model Training") and
Capuchin's swapping (Peng et al. 2020): device-to-host copies overlap the forward pass, host-to-device copies
are issued one block ahead of the backward pass. ``host-fp8`` stores the payload as FP8 e4m3 with one scale per
1x128 tile (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", section 3.3.2), quantised on the device so only
the FP8 bytes and the scales cross the bus.

Vocabulary: a *group* is the tensors saved during one call of one block's forward (or between two blocks); groups
are made in forward order, and backward needs them in the reverse order. A *copy engine* moves tensors:

- :class:`CudaCopies` (CUDA tensors): every copy runs on one side stream. Offload: the side stream waits for the
  compute stream (the tensor is produced there), copies into a pinned buffer, and the device tensor is marked as
  used by the side stream (``record_stream``), so the caching allocator gives its memory to later compute work
  only once the copy has read it; the runtime drops its reference at once. Fetch: the copy back is queued on the
  same stream (so it follows the offload of the same buffer) and ends with an event; the compute stream waits on
  that event (a device-side wait, the host never blocks) when the tensor is unpacked.
- :class:`SyncCopies` (CPU tensors): the same calls done at once. Host buffers are then the memory the tensor was
  in, so offload has no memory effect on a CPU backend; the policy says so when applied.

Lag: the compute stream may run ahead of the copies, but when group ``k`` starts it waits (on the device) for the
copies of group ``k - 2``: a memory whose copy has not run cannot be reused, so without this bound a fast forward
would end with every activation still on the device. Where the copies are slower than the compute, forward runs
at the copy rate.

Prefetch: the first unpack of group ``i`` (its block's backward has started) fetches group ``i`` if it is not
on the device yet, then queues the fetch of group ``i - 1``, the one backward needs next. Each tensor is fetched
exactly once per backward. A host buffer goes back to the pool only once the copy that last read it is known to
be done (its event, polled without blocking), so a buffer is never rewritten under an in-flight copy.

Non-finite values in ``host-fp8``: there is no per-tensor check (it would cost a host sync per tensor). The scale
of each tile is taken over its finite values, and an element that is +-inf is stored as e4m3's NaN code with its
sign (``0x7f`` / ``0xff``, which no finite value quantises to) and restored exactly; a NaN comes back as +inf.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from typing import Callable

import torch

from dspark_lab.runtime.module_hooks import RuntimeHook

LAG_GROUPS = 1  # group k's forward starts once group k-2's copies to the host are done (a device-side wait)
FP8_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the FP8 kernels quantise and restore
_NONFINITE_POS, _NONFINITE_NEG = 0x7F, 0xFF  # e4m3fn NaN codes; the largest finite magnitude is 0x7e (448)


class SyncCopies:
    """Copies done at once on the calling thread: the CPU path, and the reference the CUDA engine follows."""

    def to_host(self, sources: list[torch.Tensor], buffers: list[torch.Tensor]):
        for source, buffer in zip(sources, buffers):
            buffer.copy_(source)
        return None

    def to_device(self, buffers: list[torch.Tensor], device: torch.device):
        # a copy even on the CPU: the buffer goes back to the pool while autograd may still hold what get() returned
        return [b.to(device, copy=True) for b in buffers], None

    def use(self, tensors: list[torch.Tensor], ticket) -> None:
        """Make the compute stream wait until ``ticket``'s copies are done before it reads ``tensors``."""

    def wait(self, ticket) -> None:
        """Make the compute stream wait until ``ticket``'s copies are done (a device-side wait)."""

    def release_when_done(self, ticket, release: Callable[[], None]) -> None:
        release()

    def poll(self) -> None:
        """Give back host buffers whose last copy is done (never blocks)."""


class CudaCopies:
    """Copies on one side stream of one device, ordered with the compute stream by events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._releases: deque = deque()  # (event, release) in the order the events were recorded on the stream
        self._lock = threading.Lock()  # backward unpacks (and frees) on autograd's device thread

    def to_host(self, sources: list[torch.Tensor], buffers: list[torch.Tensor]):
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for source, buffer in zip(sources, buffers):
                buffer.copy_(source, non_blocking=True)
                source.record_stream(self.stream)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def to_device(self, buffers: list[torch.Tensor], device: torch.device):
        with torch.cuda.stream(self.stream):
            tensors = [b.to(self.device, non_blocking=True) for b in buffers]
            done = torch.cuda.Event()
            done.record(self.stream)
        return tensors, done

    def use(self, tensors: list[torch.Tensor], ticket) -> None:
        compute = torch.cuda.current_stream(self.device)
        if ticket is not None:
            compute.wait_event(ticket)
        for tensor in tensors:  # allocated on the side stream, read (and freed) on the compute stream
            tensor.record_stream(compute)

    def wait(self, ticket) -> None:
        if ticket is not None:
            torch.cuda.current_stream(self.device).wait_event(ticket)

    def release_when_done(self, ticket, release: Callable[[], None]) -> None:
        with self._lock:
            self._releases.append((ticket, release))
        self.poll()

    def poll(self) -> None:
        # events complete in stream order, so the first one not done ends the scan
        with self._lock:
            while self._releases and (self._releases[0][0] is None or self._releases[0][0].query()):
                self._releases.popleft()[1]()


def fp8_pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` (flattened to one row of 1x128 tiles) on its own device; +-inf kept as signed NaN codes."""
    from dspark_lab.kernels import fp8_quantize

    flat = x.detach().reshape(-1)
    finite = torch.isfinite(flat)
    q, scale = fp8_quantize(torch.where(finite, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)))
    negative, positive = (torch.full((), c, dtype=torch.uint8, device=flat.device)
                          for c in (_NONFINITE_NEG, _NONFINITE_POS))
    codes = torch.where(finite, q.view(torch.uint8), torch.where(flat < 0, negative, positive))
    return codes.view(q.dtype), scale


def fp8_unpack(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """Undo :func:`fp8_pack` on ``q``'s device."""
    from dspark_lab.kernels import fp8_dequantize

    codes = q.view(torch.uint8)
    values = fp8_dequantize(q, scale, dtype)
    special = (codes & 0x7F) == 0x7F
    minus, plus = (torch.full((), v, dtype=dtype, device=q.device) for v in (-float("inf"), float("inf")))
    infinity = torch.where(codes >= 0x80, minus, plus)
    return torch.where(special, infinity, values).reshape(shape)


class Group:
    """The offloaded tensors of one block call (or of the stretch between two), in forward order."""

    __slots__ = ("entries", "previous", "fetched", "serial", "offloaded", "__weakref__")

    def __init__(self, serial: int, previous: "Group | None"):
        self.serial, self.previous = serial, previous
        self.entries: list[weakref.ref] = []
        self.fetched = False
        self.offloaded = None  # (engine, ticket) of its last device-to-host copy (it covers the earlier ones)

    def live(self) -> list["Offloaded"]:
        return [e for e in (ref() for ref in self.entries) if e is not None]


def _no_overlap(tensor: torch.Tensor) -> bool:
    """Whether no two elements of ``tensor`` share memory: each stride, smallest first, passes the last element the
    smaller ones reach (an expand's stride 0 does not)."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape) if sz > 1):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


class Offloaded:
    """One saved tensor in host buffers (``fp8``: quantised), brought back to its device on :meth:`get`."""

    __slots__ = ("source", "buffers", "shape", "stride", "dtype", "device", "pool", "copies", "group", "fp8",
                 "ticket", "fetched", "fetch_ticket", "__weakref__")

    def __init__(self, tensor: torch.Tensor, pool, copies, group: Group, fp8: bool):
        self.source, self.pool, self.copies, self.group = weakref.ref(tensor), pool, copies, group
        self.shape, self.dtype, self.device, self.fp8 = tensor.shape, tensor.dtype, tensor.device, fp8
        # the strides to give it back with: a compiled backward asserts them (a view such as one head of q/k/v);
        # none for a tensor whose elements overlap (an expand), which a copy cannot be written into
        self.stride = tensor.stride() if not tensor.is_contiguous() and _no_overlap(tensor) else None
        sources = list(fp8_pack(tensor)) if fp8 else [tensor.detach()]
        self.buffers = [pool.empty(s.shape, s.dtype) for s in sources]
        self.ticket = copies.to_host(sources, self.buffers)
        group.offloaded = (copies, self.ticket)
        self.fetched: list[torch.Tensor] | None = None
        self.fetch_ticket = None
        group.entries.append(weakref.ref(self))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def fetch(self) -> None:
        """Queue the copy back to the device unless its group's fetch did (a second backward: retain_graph)."""
        if self.fetched is None:
            self.fetched, self.fetch_ticket = self.copies.to_device(self.buffers, self.device)
            self.ticket = self.fetch_ticket

    def get(self) -> torch.Tensor:
        self.fetch()
        tensors, self.fetched = self.fetched, None  # a second backward (retain_graph) fetches again
        self.copies.use(tensors, self.fetch_ticket)
        tensor = fp8_unpack(tensors[0], tensors[1], self.dtype, self.shape) if self.fp8 else tensors[0]
        if self.stride is None:
            return tensor
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device).copy_(tensor)

    def __del__(self):
        pool = self.pool
        for buffer in getattr(self, "buffers", ()):  # none when the constructor failed (pack keeps the tensor)
            self.copies.release_when_done(self.ticket, lambda b=buffer: pool.release(b))


class Offloader:
    """Groups offloaded tensors by block call and prefetches one group ahead of backward."""

    def __init__(self, pool_factory: Callable[[], object], copies_factory: Callable[[torch.device], object] | None):
        self._pool_factory = pool_factory
        self._copies_factory = copies_factory or default_copies
        self._pool = None
        self._copies: dict[torch.device, object] = {}
        self.serial = 0  # bumped when a tracked block's forward starts or ends
        self._group: Group | None = None
        self._in_flight: deque = deque()  # (engine, ticket) of the groups before the current one, oldest first
        self._blocks: list[weakref.ref] = []  # the blocks offloaded tensors are grouped by (track_blocks)
        self._hooks: list = []  # their forward hooks, while offload is on
        self._active = False

    def copies(self, device: torch.device):
        engine = self._copies.get(device)
        if engine is None:
            engine = self._copies[device] = self._copies_factory(device)
        return engine

    def pool(self):
        if self._pool is None:
            self._pool = self._pool_factory()
        return self._pool

    def track_blocks(self, blocks) -> None:
        """Start a new group at the start and at the end of each block's forward. The hooks are on the blocks only
        while offload is on (:meth:`activate`): with it off they would only slow every block's call."""
        self._blocks = [weakref.ref(block) for block in blocks]
        self.activate(self._active)

    def activate(self, on: bool) -> None:
        """Put the grouping hooks on the tracked blocks (offload is on) or take them off (off); idempotent."""
        self._active = on
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for block in (ref() for ref in self._blocks) if on else ():
            if block is not None:
                self._hooks.append(block.register_forward_pre_hook(RuntimeHook(self._bump)))
                self._hooks.append(block.register_forward_hook(RuntimeHook(self._bump)))

    def _bump(self, *_):
        self.serial += 1

    def offload(self, tensor: torch.Tensor, fp8: bool) -> Offloaded:
        copies = self.copies(tensor.device)
        copies.poll()
        group = self._group
        if group is None or group.serial != self.serial:
            # the group before, when it still holds tensors backward has not fetched, is fetched after this one
            previous = group if group is not None and not group.fetched and group.live() else None
            if group is not None and group.offloaded is not None:
                self._in_flight.append(group.offloaded)
            while len(self._in_flight) > LAG_GROUPS:  # bound the device memory still waiting for its copy
                engine, ticket = self._in_flight.popleft()
                engine.wait(ticket)
            group = self._group = Group(self.serial, previous)
        return Offloaded(tensor, self.pool(), copies, group,
                         fp8=fp8 and tensor.dtype in FP8_DTYPES and tensor.numel() > 0)

    def unpack(self, entry: Offloaded) -> torch.Tensor:
        if not self._blocks:  # no blocks known: one tensor at a time, when backward needs it (no overlap)
            return entry.get()
        group = entry.group
        if not group.fetched:  # backward reached a group nothing prefetched (the last one of forward)
            self._fetch(group)
        previous, group.previous = group.previous, None
        if previous is not None and not previous.fetched:
            self._fetch(previous)
        return entry.get()

    @staticmethod
    def _fetch(group: Group) -> None:
        """One copy call and one event per group (and engine): the compute stream waits once per block."""
        group.fetched = True
        by_engine: dict[int, list[Offloaded]] = {}
        for entry in group.live():
            if entry.fetched is None:
                by_engine.setdefault(id(entry.copies), []).append(entry)
        for entries in by_engine.values():
            tensors, ticket = entries[0].copies.to_device([b for e in entries for b in e.buffers], entries[0].device)
            start = 0
            for entry in entries:
                end = start + len(entry.buffers)
                entry.fetched, entry.fetch_ticket, entry.ticket = tensors[start:end], ticket, ticket
                start = end

    def poll(self) -> None:
        for engine in self._copies.values():
            engine.poll()


def default_copies(device: torch.device):
    return CudaCopies(device) if device.type == "cuda" else SyncCopies()
