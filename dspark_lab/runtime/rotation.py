"""metrics.jsonl's rotation: once it passes a size bound, its writer moves it to ``metrics.1.jsonl`` (the older ones
to ``.2``, ``.3``; the oldest past :data:`KEEP` is dropped) and starts a new one.

Every rank of a node appends to the same file through its own ``O_APPEND`` descriptor (and rank 0's collector adds
other nodes' records), so a rename alone would leave the other ranks writing into the moved file. The files are
guarded by a ``flock`` on the run directory instead: an append holds it shared while it checks that its descriptor
is still the file named metrics.jsonl (reopening it when another rank rotated) and writes; a rotation holds it
exclusive. Any rank may rotate, the one whose append passed the bound, if the file is still past the bound (no other
rank rotated it meanwhile). Up to :data:`SLACK` past the bound it rotates only if it gets the lock at once (a step
does not wait for other ranks' appends: the next append tries again); past that, which takes many ranks appending
at once, it waits for the appends in flight, so a file never grows more than the slack and one append per rank past
the bound. One file per rank would need no lock, but every reader and docs/records.md read one file per node.

Since no append lands in a file once it has been moved, a follower that sees a new metrics.jsonl can read the moved
one to its end and go on with the new one, losing and repeating nothing. Readers take the lock (shared) only to open
the files at one instant, so a rotation never waits for a reader.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path
from typing import BinaryIO, Iterator

from dspark_lab.errors import DSparkError

MAX_MB_ENV = "DSPARK_METRICS_MAX_MB"
MAX_MB_DEFAULT, MAX_MB_RANGE = 256, (1, 1 << 20)
KEEP = 3  # moved files kept beside the current one: metrics.1.jsonl (newest) .. metrics.3.jsonl
SLACK = 16  # past the bound by 1/SLACK of it, a rotation waits for the lock instead of trying the next append


def max_bytes() -> int:
    """The size at which metrics.jsonl rotates, from :data:`MAX_MB_ENV` (MiB); one line naming it when out of range."""
    text = os.environ.get(MAX_MB_ENV, "").strip() or str(MAX_MB_DEFAULT)
    low, high = MAX_MB_RANGE
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise DSparkError(f"{MAX_MB_ENV}: {text[:40]!r} is not allowed; allowed: a whole number of MiB in "
                          f"[{low}, {high}]")
    return value << 20


def generation(path: Path, age: int) -> Path:
    """``path`` itself (age 0) or its ``age``-th moved file: metrics.jsonl -> metrics.1.jsonl."""
    return path if age == 0 else path.with_name(f"{path.stem}.{age}{path.suffix}")


@contextlib.contextmanager
def _shared(path: Path) -> Iterator[None]:
    """Hold the lock of ``path``'s files shared (a flock on its directory); nothing when it cannot be opened."""
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # no flock here: then no writer rotates either (Appender)
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # and so the flock


def _lockable(directory: Path) -> int:
    """A descriptor of ``directory`` to flock, or -1 when it cannot be opened or locked."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:  # a rotation holds it: flock works
        pass
    except OSError:
        os.close(fd)
        return -1
    return fd


def open_newest_first(path: Path) -> list[BinaryIO]:
    """``path`` and its kept moved files that exist, newest first, opened for reading at one instant (no rotation
    moves them in between)."""
    files = []
    with _shared(path):
        for age in range(KEEP + 1):
            try:
                files.append(open(generation(path, age), "rb"))
            except FileNotFoundError:
                continue
    return files


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Appender:
    """Appends whole lines to ``path``, each with one ``write`` on an ``O_APPEND`` descriptor (lines of several
    processes never interleave); with ``rotate_at`` (bytes), under the protocol of this module."""

    def __init__(self, path: Path, mode: int, rotate_at: int | None = None):
        self.path, self.mode, self.rotate_at = Path(path), mode, rotate_at
        self._guard = threading.Lock()  # a process's threads share the descriptor they may reopen
        self._dir = _lockable(self.path.parent) if rotate_at is not None else -1
        if self._dir < 0:  # a file system without flock: several writers could not rotate one file safely
            self.rotate_at = None
        self._fd = -1
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.mode)
        self._stat = os.fstat(self._fd)

    def append(self, data: bytes) -> None:
        if self.rotate_at is None:
            os.write(self._fd, data)
            return
        with self._guard:
            fcntl.flock(self._dir, fcntl.LOCK_SH)
            try:
                try:
                    now = os.stat(self.path)
                except FileNotFoundError:  # deleted by hand: start it again
                    now = None
                if now is None or not same_file(now, self._stat):  # another rank rotated it
                    os.close(self._fd)
                    self._open()
                    now = self._stat
                os.write(self._fd, data)
            finally:
                fcntl.flock(self._dir, fcntl.LOCK_UN)
            size = now.st_size + len(data)
            if size >= self.rotate_at:
                self._rotate(wait=size >= self.rotate_at + self.rotate_at // SLACK)

    def _rotate(self, wait: bool) -> None:
        try:
            fcntl.flock(self._dir, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another rank appends or rotates: the next append tries again
            return
        try:
            if os.stat(self.path).st_size < self.rotate_at:  # another rank rotated it meanwhile
                return
            for age in range(KEEP, 0, -1):  # the oldest is replaced, so dropped
                with contextlib.suppress(FileNotFoundError):
                    os.replace(generation(self.path, age - 1), generation(self.path, age))
            os.close(self._fd)
            self._open()
        except FileNotFoundError:
            return
        finally:
            fcntl.flock(self._dir, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._fd, self._dir):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dir = -1
