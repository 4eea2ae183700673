"""What the step boundary reads without stalling the device: the loss one step late, memory counters now and then.

Reading a CUDA loss with ``.item()`` at every boundary would make the host wait for the device each step (the
host could no longer queue step k+1 while the device runs step k). Instead the boundary of step k starts a
non-blocking copy of the loss into pinned host memory and records an event; the record of step k, which carries
step k's own loss, is written at a later boundary once that event is done (polled, never waited on), or at the
latest when more than :data:`MAX_PENDING` records wait (then the oldest is waited for), and at the job's end (:meth:`LateLoss.flush`, also run at exit).
A loss on the CPU is read at once, unless ``DSPARK_LOSS_READ=late`` asks for the late path there too (how the CPU
tests exercise it).

Memory counters (``rss_bytes``; on CUDA ``memory_allocated_bytes`` and ``memory_peak_bytes``, whose peak is reset
after each read) are read on step 1, then every ``DSPARK_MEMORY_EVERY`` steps (default 10), and on every step
while something asks for them (an effect being measured, a tune with a memory cap); other records carry ``None``.
"""

from __future__ import annotations

import atexit
import os
from collections import deque
from typing import Any, Callable

import torch

from dspark_lab.errors import DSparkError

LOSS_READ_ENV = "DSPARK_LOSS_READ"
LOSS_READS = ("auto", "late")
MEMORY_EVERY_ENV = "DSPARK_MEMORY_EVERY"
MEMORY_EVERY_DEFAULT, MEMORY_EVERY_MAX = 10, 100_000
MAX_PENDING = 8


def loss_read() -> str:
    value = os.environ.get(LOSS_READ_ENV, "").strip().lower() or "auto"
    if value not in LOSS_READS:
        raise DSparkError(f"{LOSS_READ_ENV}: {value!r} is not allowed; allowed: {' | '.join(LOSS_READS)}")
    return value


def memory_every() -> int:
    text = os.environ.get(MEMORY_EVERY_ENV, "").strip() or str(MEMORY_EVERY_DEFAULT)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MEMORY_EVERY_MAX:
        raise DSparkError(f"{MEMORY_EVERY_ENV}: {text!r} is not allowed; allowed: an integer in "
                          f"[1, {MEMORY_EVERY_MAX}]")
    return value


class LateLoss:
    """Metrics records waiting for their step's loss to reach the host; written in step order."""

    def __init__(self, write: Callable[[dict[str, Any]], None], *, late_on_cpu: bool = False):
        self._write = write
        self.late_on_cpu = late_on_cpu
        self._pending: deque = deque()  # (record, loss tensor or None, event or None)
        self._exit_flush = False

    def put(self, record: dict[str, Any], loss: torch.Tensor | None) -> None:
        """Write ``record`` with ``loss`` (a 1-element tensor of its step) now, or once the loss is on the host."""
        self.drain(block=False)  # the records of earlier steps first
        if loss is None or (loss.device.type == "cpu" and not self.late_on_cpu):
            record["loss"] = float(loss.item()) if loss is not None else None
            held = None
        elif loss.device.type == "cuda":
            held = loss.detach().to("cpu", non_blocking=True)  # torch pins the destination of such a copy
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(loss.device))
            self._pending.append((record, held, event))
        else:  # the CPU (forced late) or another device: read at the next boundary
            held = loss.detach().clone()
            self._pending.append((record, held, None))
        if held is None:
            if self._pending:
                self._pending.append((record, None, None))
            else:
                self._write(record)
        elif not self._exit_flush:
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
            if held is not None:
                record["loss"] = float(held.item())
            self._pending.popleft()
            self._write(record)

    def flush(self) -> None:
        """Write every waiting record (the job's end)."""
        self.drain(block=True)

    @property
    def pending(self) -> int:
        return len(self._pending)
