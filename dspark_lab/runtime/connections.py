"""The control endpoint's connections: each request's deadline, and the slots connections hold.

A request (line, headers and body) must arrive in full within :data:`~.limits.REQUEST_DEADLINE_S` of its
connection being accepted, however it trickles in (:class:`DeadlineReader`); later, it is answered ``408`` and
closed. At most :data:`~.limits.MAX_CONNECTIONS` connections are served at once (:class:`Slots`); when all are
taken, the connection that has waited longest for its request head is closed (``503``) to make room, so clients
without the token holding connections open cannot lock out one that has it. A request whose head has arrived is
never closed to make room.
"""

from __future__ import annotations

import socket
import threading
import time

EVICT_WAIT_S = 1.0  # how long a new connection waits for the slot of the one closed to make room


class RequestTimeout(TimeoutError):
    """The request did not arrive in full within its deadline."""


class Evicted(ConnectionError):
    """The connection was closed to make room for another while its request head was still arriving."""


class DeadlineReader(socket.SocketIO):
    """A connection's reads, each waiting at most what is left of the request's deadline."""

    def __init__(self, sock: socket.socket, deadline_s: float, write_timeout_s: float):
        super().__init__(sock, "rb")
        self.deadline_s = deadline_s
        self.deadline = time.monotonic() + deadline_s
        self.write_timeout_s = write_timeout_s
        self.evicted = False

    def readinto(self, buffer) -> int | None:
        if self.evicted:
            raise Evicted("closed to make room")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeout(f"not in full within {self.deadline_s:g} s")
        self._sock.settimeout(left)
        try:
            count = super().readinto(buffer)
        except TimeoutError:
            raise RequestTimeout(f"not in full within {self.deadline_s:g} s") from None
        finally:
            self._sock.settimeout(self.write_timeout_s)  # the reply is written under its own timeout
        if not count and self.evicted:
            raise Evicted("closed to make room")
        return count

    def evict(self) -> None:
        """Wake the read in progress (it sees the end of the stream) and make every later one raise Evicted."""
        self.evicted = True
        try:
            self._sock.shutdown(socket.SHUT_RD)
        except OSError:  # already closed by its client or its thread
            pass


class Slots:
    """At most ``size`` connections at once; when all are taken, one still sending its head makes room."""

    def __init__(self, size: int):
        self.size = size
        self._free = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._heads: dict[DeadlineReader, None] = {}  # connections whose head is arriving, oldest first

    def take(self) -> bool:
        """A slot for a new connection: a free one, else the one of the oldest connection still sending its head
        (closed, :class:`Evicted`); False when every connection holds a request whose head has arrived."""
        if self._free.acquire(blocking=False):
            return True
        with self._lock:
            oldest = next(iter(self._heads), None)
            if oldest is None:
                return False
            del self._heads[oldest]
            oldest.evict()  # under the lock: head_arrived sees either the connection listed or it evicted
        return self._free.acquire(timeout=EVICT_WAIT_S)

    def release(self) -> None:
        self._free.release()

    def head_arriving(self, reader: DeadlineReader) -> None:
        with self._lock:
            self._heads[reader] = None

    def head_arrived(self, reader: DeadlineReader) -> None:
        """The head is in: the connection can no longer be closed to make room; Evicted if it already was."""
        self.forget(reader)
        if reader.evicted:
            raise Evicted("closed to make room")

    def forget(self, reader: DeadlineReader) -> None:
        with self._lock:
            self._heads.pop(reader, None)
