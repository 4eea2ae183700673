"""The records' JSON-lines files: how they are appended, and read whole, from an offset, from the end or as they grow.

Records are append-only JSON lines, one ``write`` each, so they survive a crash of the job; readers skip a torn
last line, and skip any other line that is not a record of its file (:data:`RECORD_FIELDS`: not UTF-8, not a JSON
object, a ``step`` that is not an int) with a one-line warning per file. Every record carries ``schema_version``.
metrics.jsonl rotates (:mod:`.rotation`): :func:`last_records`, :func:`read_all` and :class:`Follower` read its
moved files too, as one history.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from dspark_lab.output import SCHEMA_VERSION
from dspark_lab.private_files import FILE_MODE
from dspark_lab.runtime import rotation

# What every record of a file must hold, by file name: field -> the types it may have (bool is never an int here).
RECORD_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "metrics.jsonl": {"step": (int,), "rank": (int,)},
    "events.jsonl": {"kind": (str,), "step": (int, type(None)), "rank": (int, type(None))},
}
_MOVED = re.compile(r"\.\d+(?=\.jsonl$)")  # metrics.1.jsonl holds metrics.jsonl's records
_warned: set[str] = set()  # files already warned about in this process
WARN_COUNT_BYTES = 1 << 20  # a warning counts the lines before a read that starts this far into a file, not further

Record = dict[str, Any]


class JsonlWriter:
    """Append JSON objects one per line, each with a single ``write`` on an ``O_APPEND`` descriptor.

    Every rank appends to the same file: one ``write`` per whole line keeps lines from interleaving, and nothing
    is buffered in the process, so a crash loses at most the line being written. With ``rotate_at`` (bytes) the
    file rotates past that size (:mod:`.rotation`).
    """

    def __init__(self, path: Path, rotate_at: int | None = None):
        self.path = Path(path)
        self._file = rotation.Appender(self.path, FILE_MODE, rotate_at)

    def write(self, record: Record) -> None:
        line = json.dumps({"schema_version": SCHEMA_VERSION, **record}, default=str) + "\n"
        self._file.append(line.encode())

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: Path, start: int = 0) -> tuple[list[Record], int]:
    """Records of ``path`` (that file alone) from byte offset ``start``; returns them and the offset after the last
    complete line.

    A line without its newline (a write in progress, or torn by a crash) is not returned and not consumed,
    so a follower calling again with the returned offset reads it once it is whole. A complete line that is not a
    record of this file (:data:`RECORD_FIELDS`) is skipped; the first one in each file is named on stderr.
    """
    records: list[Record] = []
    f = _open(Path(path))
    if f is None:
        return records, start
    with f:
        return records, _scan(f, start, records.append)


def _open(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None
    except OSError as exc:  # a directory, no permission: a bad run must not break readers of all runs
        _warn_once(path, f"unreadable ({exc.strerror})")
        return None


def _scan(f: BinaryIO, start: int, keep: Callable[[Record], Any], stop: int | None = None) -> int:
    """Hand each record of the open file ``f`` between byte ``start`` and ``stop`` (a line start; None: the end) to
    ``keep``, one line at a time; returns the offset after the last complete line read."""
    path = Path(f.name)
    fields = RECORD_FIELDS.get(_MOVED.sub("", path.name), {})
    offset = start
    f.seek(start)
    for index, line in enumerate(f):
        if not line.endswith(b"\n") or (stop is not None and offset >= stop):
            break
        offset += len(line)
        if not line.strip():
            continue
        record, problem = parse(line, fields)
        if problem is None:
            keep(record)
        else:
            _warn_once(path, problem, (f, start, index, offset - len(line)))
    return offset


def _line_start(f: BinaryIO, offset: int) -> int:
    """The offset of the first line of ``f`` that starts at or after ``offset`` (its size if none does)."""
    if offset <= 0:
        return 0
    f.seek(offset - 1)
    f.readline()  # the rest of the line the offset cuts, up to the end of the file at most
    return f.tell()


def _lines_end(f: BinaryIO, size: int) -> int:
    """The offset after the last whole line in the first ``size`` bytes of ``f`` (a line being written is left to be
    read once whole), looked for in the last 64 KiB; ``size`` if none ends there."""
    window = min(size, 1 << 16)
    tail = os.pread(f.fileno(), window, size - window)
    newline = tail.rfind(b"\n")
    return size - window + newline + 1 if newline >= 0 or window == size else size


def last_records(path: Path, count: int, max_bytes: int | None = None) -> list[Record]:
    """The last ``count`` records of ``path`` and, when it holds fewer, of its moved files (:mod:`.rotation`), read
    backwards from the end in windows that grow (x4 from 64 KiB) until they hold them, reach the oldest file's start
    or ``max_bytes`` in all: each byte is read once, and the cost follows what is asked, not the history's length.
    Memory holds ``count`` records and one line."""
    files = rotation.open_newest_first(Path(path))
    records: list[Record] = []
    try:
        budget = max_bytes
        for f in files:
            older, read, whole = _last_of(f, count - len(records), budget)
            records = older + records
            budget = None if budget is None else budget - read
            if len(records) >= count or not whole or budget == 0:
                break
    finally:
        for f in files:
            f.close()
    return records


def _last_of(f: BinaryIO, count: int, max_bytes: int | None) -> tuple[list[Record], int, bool]:
    """The last ``count`` records of ``f`` (:func:`last_records`), the bytes read, and whether it was read whole."""
    size = os.fstat(f.fileno()).st_size
    limit = size if max_bytes is None else min(size, max_bytes)
    records: list[Record] = []
    start, window = None, 1 << 16  # start: where the lines read so far begin (None: nothing read yet)
    while count > 0 and len(records) < count and start != 0:
        window = min(window, limit)
        begin = _line_start(f, size - window)
        if start is None or begin < start:
            older: deque[Record] = deque(maxlen=count)
            _scan(f, begin, older.append, stop=start)  # the first window reads on past `size`, as a write lands
            records = [*older, *records][-count:]
            start = begin
        if window >= limit:
            break
        window *= 4
    return records, size - (size if start is None else start), start == 0


def read_all(path: Path) -> list[Record]:
    """Every record of ``path``'s moved files (:mod:`.rotation`), oldest first, then of ``path``."""
    records: list[Record] = []
    for f in reversed(rotation.open_newest_first(Path(path))):
        with f:
            _scan(f, 0, records.append)
    return records


class Follower:
    """The records appended to ``path`` as it grows, across its rotations (:mod:`.rotation`): none lost, none repeated.

    It starts at the first whole line within the last ``lookback`` bytes of ``path`` (0: at its end; a file that does
    not exist yet is read from its start), or with ``lookback=None`` at the start of the oldest moved file. Each
    :meth:`poll` returns the whole records appended since the last.
    """

    def __init__(self, path: Path, lookback: int | None = 0):
        self.path = Path(path)
        self._files: list[BinaryIO] = []  # oldest first; all but the last were moved, so no longer grow
        self._offset = 0  # in the first
        if lookback is None:
            self._files = rotation.open_newest_first(self.path)[::-1]
        elif (f := _open(self.path)) is not None:
            size = os.fstat(f.fileno()).st_size
            self._files, self._offset = [f], _line_start(f, size - lookback) if lookback else _lines_end(f, size)

    def poll(self) -> list[Record]:
        """The whole records appended since the last poll (or the start)."""
        records: list[Record] = []
        while True:
            if not self._files:
                if (f := _open(self.path)) is None:
                    return records
                self._files, self._offset = [f], 0
            current = self._files[0]
            self._offset = _scan(current, self._offset, records.append)
            if len(self._files) == 1:
                newer = self._newer_than(current)
                if newer is None:
                    return records
                # moved: no append lands in it any more, so read what came before the move, then what came after
                self._offset = _scan(current, self._offset, records.append)
                self._files += newer
            current.close()
            self._files.pop(0)
            self._offset = 0

    def _newer_than(self, current: BinaryIO) -> list[BinaryIO] | None:
        """None while ``current`` is still ``path``; else the files written after it, oldest first."""
        mine = os.fstat(current.fileno())
        try:
            if rotation.same_file(os.stat(self.path), mine):
                return None
        except FileNotFoundError:
            pass  # moved, and the new file not made yet: the lock below waits for the rotation to end
        files = rotation.open_newest_first(self.path)  # newest first
        ages = [i for i, f in enumerate(files) if rotation.same_file(os.fstat(f.fileno()), mine)]
        newer, rest = (files[:ages[0]], files[ages[0]:]) if ages else (files, [])
        for f in rest:
            f.close()
        return newer[::-1]

    def follow(self, poll_s: float = 0.5, stop: Callable[[], bool] = lambda: False) -> Iterator[Record]:
        """Yield records as they are appended until ``stop()`` is true; it is asked before each read, so every record
        written before it became true is yielded."""
        try:
            while True:
                ended = stop()  # asked before the read, so the read after the end gets the last records
                yield from self.poll()
                if ended:
                    return
                time.sleep(poll_s)
        finally:
            self.close()

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []


def parse(line: bytes, fields: dict[str, tuple[type, ...]]) -> tuple[Record | None, str | None]:
    """The JSON object ``line`` holds if it has ``fields`` (name -> allowed types), else None and what is wrong."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except ValueError:
        return None, "not JSON (torn by a crash?)"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    for name, types in fields.items():
        value = record.get(name, ...)
        if value is ... or isinstance(value, bool) or not isinstance(value, types):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            return None, f"{name!r} is {'missing' if value is ... else repr(value)[:40]}, not {allowed}"
    return record, None


def _warn_once(path: Path, problem: str, where: tuple[BinaryIO, int, int, int] | None = None) -> None:
    """Say ``problem`` of ``path`` on stderr, once per file and process. ``where`` is (the open file, offset the read
    started at, index of the line from there, the line's offset): the line is named by its number when the read
    started within :data:`WARN_COUNT_BYTES` of the file's start, else by its byte offset (counting would read all
    before it)."""
    key = str(path.resolve())
    if key in _warned:
        return
    _warned.add(key)
    if where is None:
        print(f"dspark-lab: warning: {path}: {problem}", file=sys.stderr)
        return
    f, start, index, offset = where
    if start > WARN_COUNT_BYTES:
        location = f"{path}: the line at byte {offset}"
    else:
        before = os.pread(f.fileno(), start, 0).count(b"\n")
        location = f"{path}:{before + index + 1}"
    print(f"dspark-lab: warning: {location}: skipped, {problem}; later bad lines of this file are skipped silently",
          file=sys.stderr)
