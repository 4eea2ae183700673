"""What the step boundary reads without stalling the device: the loss one step late, memory counters now and then.

Reading a CUDA loss with ``.item()`` at every boundary would make the host wait for the device each step (the
host could no longer queue step k+1 while the device runs step k). Instead the boundary of step k starts a
non-blocking copy of the loss into pinned host memory and records an event; the record of step k, which carries
step k's own loss, is written at a later boundary once that event is done (polled, never waited on), or at the
latest when more than :data:`MAX_PENDING` records wait (then the oldest is waited for), and at the job's end
(:meth:`LateLoss.flush`, also run at exit).
A loss on the CPU is read at once, unless ``DSPARK_LOSS_READ=late`` asks for the late path there too (how the CPU
tests exercise it). Other per-step device values a record carries (the MoE policy's expert loads) ride on the same
copy-and-event path (:meth:`.metering.Meter.read_later`).

Memory counters (``rss_bytes``; on CUDA ``memory_allocated_bytes`` and ``memory_peak_bytes``, whose peak is reset
after each read) are read on step 1, then every ``DSPARK_MEMORY_EVERY`` steps (default 10), and on every step
while something asks for them (an effect being measured, a tune with a memory cap); other records carry ``None``.
"""

from __future__ import annotations

import atexit
from collections import deque
from typing import Any, Callable

import torch

MAX_PENDING = 8


class LateLoss:
    """Metrics records waiting for their step's loss (and any other late field) to reach the host; written in step
    order.

    Other fields read the same way (a plugin's per-step device counters, e.g. the MoE expert loads) are handed to
    :meth:`put` as ``later``: ``(key, tensor, on_read)`` triples; the record's ``key`` becomes ``tensor.tolist()``
    once it is on the host, and ``on_read(value)`` is called with it then. They share the step's one event.
    """

    def __init__(self, write: Callable[[dict[str, Any]], None], *, late_on_cpu: bool = False):
        self._write = write
        self.late_on_cpu = late_on_cpu
        self._pending: deque = deque()  # (record, [(key, held tensor, convert, on_read)], event or None)
        self._exit_flush = False

    def defers(self, tensor: torch.Tensor) -> bool:
        """Whether a value on ``tensor``'s device is read at a later boundary (else at once, with no sync)."""
        return tensor.device.type != "cpu" or self.late_on_cpu

    def put(self, record: dict[str, Any], loss: torch.Tensor | None, later=()) -> None:
        """Write ``record`` with ``loss`` (a 1-element tensor of its step) and the ``later`` fields now, or once
        they are on the host."""
        self.drain(block=False)  # the records of earlier steps first
        reads = [("loss", loss, _scalar, None)] if loss is not None else []
        reads += [(key, tensor, _listed, on_read) for key, tensor, on_read in later]
        if not any(self.defers(tensor) for _, tensor, _, _ in reads):
            for key, tensor, convert, on_read in reads:
                _land(record, key, convert(tensor), on_read)
            if self._pending:
                self._pending.append((record, [], None))
            else:
                self._write(record)
            return
        held, device = [], None
        for key, tensor, convert, on_read in reads:
            if tensor.device.type == "cuda":
                device = tensor.device
                copy = tensor.detach().to("cpu", non_blocking=True)  # torch pins the destination of such a copy
            else:  # the CPU (forced late) or another device: read at the next boundary
                copy = tensor.detach().clone()
            held.append((key, copy, convert, on_read))
        event = None
        if device is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        self._pending.append((record, held, event))
        if not self._exit_flush:
            self._exit_flush = True
            atexit.register(self.flush)  # a script that attached by itself may never close its job

    def drain(self, *, block: bool) -> None:
        while self._pending:
            record, held, event = self._pending[0]
            ready = event is None or event.query()
            if not ready and not block and len(self._pending) <= MAX_PENDING:
                break
            if not ready:
                event.synchronize()  # the device is more than MAX_PENDING steps behind, or the job ends
            for key, copy, convert, on_read in held:
                _land(record, key, convert(copy), on_read)
            self._pending.popleft()
            self._write(record)

    def flush(self) -> None:
        """Write every waiting record (the job's end)."""
        self.drain(block=True)

    @property
    def pending(self) -> int:
        return len(self._pending)


def _scalar(tensor: torch.Tensor) -> float:
    return float(tensor.item())


def _listed(tensor: torch.Tensor) -> Any:
    return tensor.tolist()


def _land(record: dict[str, Any], key: str, value: Any, on_read) -> None:
    record[key] = value
    if on_read is not None:
        on_read(value)
