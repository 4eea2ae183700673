"""The run directory: ``run.json``, ``events.jsonl`` and ``metrics.jsonl`` under ``$DSPARK_HOME/runs/<run-id>/``.

Records are append-only JSON lines, flushed per line so they survive a crash of the job; readers skip a torn last
line, and skip any other line that is not a record of its file (not UTF-8, not a JSON object, a ``step`` that is
not an int) with a one-line warning per file. Every record carries ``schema_version``. Field meanings are listed in
docs/records.md. A run directory is the user's alone (0700, files 0600): it holds command lines, metrics and the
control token.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

from dspark_lab.errors import RunNotFound
from dspark_lab.output import SCHEMA_VERSION
from dspark_lab.runtime import liveness

RUN_STATES = ("starting", "running", "finished", "failed", "stopped")
LIVE_STATES = ("running", "starting")  # a run in one of these has not ended
DIR_MODE, FILE_MODE = 0o700, 0o600
RDZV_RUN_PREFIX = "rdzv-"  # a multi-node run's id is this and its --rdzv-id, the same on every node

# What every record of a file must hold, by file name: field -> the types it may have (bool is never an int here).
RECORD_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "metrics.jsonl": {"step": (int,), "rank": (int,)},
    "events.jsonl": {"kind": (str,), "step": (int, type(None)), "rank": (int, type(None))},
}
_warned: set[str] = set()  # files already warned about in this process
WARN_COUNT_BYTES = 1 << 20  # a warning counts the lines before a read that starts this far into a file, not further


def dspark_home() -> Path:
    return Path(os.environ.get("DSPARK_HOME") or Path.home() / ".dspark")


def make_private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents as the user's alone (0700, whatever the umask); directories that
    exist already are left as they are."""
    missing, parent = [], path
    while not parent.is_dir():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:  # another process made it meanwhile
            continue
        os.chmod(directory, DIR_MODE)
    return path


def runs_root() -> Path:
    return dspark_home() / "runs"


def new_run_id() -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


class JsonlWriter:
    """Append JSON objects one per line, each with a single ``write`` on an ``O_APPEND`` descriptor.

    Every rank appends to the same file: one ``write`` per whole line keeps lines from interleaving, and nothing
    is buffered in the process, so a crash loses at most the line being written.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"schema_version": SCHEMA_VERSION, **record}, default=str) + "\n"
        os.write(self._fd, line.encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_jsonl(path: Path, start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Records from byte offset ``start``; returns them and the offset after the last complete line.

    A line without its newline (a write in progress, or torn by a crash) is not returned and not consumed,
    so a follower calling again with the returned offset reads it once it is whole. A complete line that is not a
    record of this file (:data:`RECORD_FIELDS`) is skipped; the first one in each file is named on stderr.
    """
    records: list[dict[str, Any]] = []
    return records, _scan(Path(path), start, records.append)


def _scan(path: Path, start: int, keep: Callable[[dict[str, Any]], Any], stop: int | None = None) -> int:
    """Hand each record of ``path`` between byte ``start`` and ``stop`` (a line start; None: the end) to ``keep``,
    one line at a time; returns the offset after the last complete line read."""
    offset = start
    fields = RECORD_FIELDS.get(path.name, {})
    try:
        with open(path, "rb") as f:
            f.seek(start)
            for index, line in enumerate(f):
                if not line.endswith(b"\n") or (stop is not None and offset >= stop):
                    break
                offset += len(line)
                if not line.strip():
                    continue
                record, problem = _parse(line, fields)
                if problem is None:
                    keep(record)
                else:
                    _warn_once(path, problem, (start, index, offset - len(line)))
    except FileNotFoundError:
        pass
    except OSError as exc:  # a directory, no permission: a bad run must not break readers of all runs
        _warn_once(path, f"unreadable ({exc.strerror})")
    return offset


def _line_start(path: Path, offset: int) -> int:
    """The offset of the first line of ``path`` that starts at or after ``offset`` (its size if none does)."""
    if offset <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(offset - 1)
        f.readline()  # the rest of the line the offset cuts, up to the end of the file at most
        return f.tell()


def tail_records(path: Path, max_bytes: int = 65536) -> list[dict[str, Any]]:
    """The whole records in the last ``max_bytes`` of ``path`` (the line cut by the window is dropped silently)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return []
    return read_jsonl(path, _line_start(Path(path), size - max_bytes))[0]


def last_records(path: Path, count: int, max_bytes: int | None = None) -> list[dict[str, Any]]:
    """The last ``count`` records of ``path``, read backwards from its end in windows that grow (x4 from 64 KiB)
    until they hold them, reach the file's start or ``max_bytes``: each byte is read once, and the cost follows what
    is asked, not the file's length. Memory holds ``count`` records and one line."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        return []
    limit = size if max_bytes is None else min(size, max_bytes)
    records: list[dict[str, Any]] = []
    start, window = None, 1 << 16  # start: where the lines read so far begin (None: nothing read yet)
    while count > 0 and len(records) < count and start != 0:
        window = min(window, limit)
        begin = _line_start(path, size - window)
        if start is None or begin < start:
            older: deque[dict[str, Any]] = deque(maxlen=count)
            _scan(path, begin, older.append, stop=start)  # the first window reads on past `size`, as a write lands
            records = [*older, *records][-count:]
            start = begin
        if window >= limit:
            break
        window *= 4
    return records


def _parse(line: bytes, fields: dict[str, tuple[type, ...]]) -> tuple[dict[str, Any] | None, str | None]:
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


def _warn_once(path: Path, problem: str, where: tuple[int, int, int] | None = None) -> None:
    """Say ``problem`` of ``path`` on stderr, once per file and process. ``where`` is (offset the read started at,
    index of the line from there, the line's offset): the line is named by its number when the read started within
    :data:`WARN_COUNT_BYTES` of the file's start, else by its byte offset (counting would read all before it)."""
    key = str(path.resolve())
    if key in _warned:
        return
    _warned.add(key)
    if where is None:
        print(f"dspark-lab: warning: {path}: {problem}", file=sys.stderr)
        return
    start, index, offset = where
    if start > WARN_COUNT_BYTES:
        location = f"{path}: the line at byte {offset}"
    else:
        with open(path, "rb") as f:
            before = f.read(start).count(b"\n")
        location = f"{path}:{before + index + 1}"
    print(f"dspark-lab: warning: {location}: skipped, {problem}; later bad lines of this file are skipped silently",
          file=sys.stderr)


class RunDir:
    """One run's directory and the files in it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    run_json = property(lambda self: self.path / "run.json")
    events_path = property(lambda self: self.path / "events.jsonl")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    token_path = property(lambda self: self.path / "token")

    @classmethod
    def create(cls, run_id: str, info: dict[str, Any], root: Path | None = None,
               token: str | None = None) -> "RunDir":
        """A new run directory; ``token`` is the run's control token when given at launch (multi-node), else new."""
        root = root or runs_root()
        make_private_dir(root)
        path = root / run_id
        path.mkdir(mode=DIR_MODE)
        os.chmod(path, DIR_MODE)  # mkdir's mode is masked by the umask; the run directory is the user's alone
        run = cls(path)
        token = token or secrets.token_urlsafe(24)
        fd = os.open(run.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        run.write_info({"id": run_id, "state": "starting", **info})
        return run

    def read_info(self) -> tuple[dict[str, Any] | None, str]:
        """run.json, or None and why it cannot be read (missing, not UTF-8, not JSON, not an object)."""
        try:
            data = self.run_json.read_bytes()
        except OSError as exc:
            return None, "missing" if isinstance(exc, FileNotFoundError) else exc.strerror or type(exc).__name__
        info, problem = _parse(data, {})
        return info, problem or ""

    def info(self) -> dict[str, Any]:
        """run.json; one that is missing, unreadable or not a JSON object reads as failed (:func:`run_state` asks the
        ranks too)."""
        info, problem = self.read_info()
        if info is None:
            return {"id": self.id, "state": "failed", "error": f"run.json unreadable: {problem}"}
        return info

    def name(self) -> str | None:
        """The run's name: run.json's, or, when that cannot be read, the one rank 0 published in control.json."""
        info, _ = self.read_info()
        return (info if info is not None else liveness.read_endpoint(self.path) or {}).get("name")

    def write_info(self, info: dict[str, Any]) -> None:
        """Replace run.json atomically (write a temporary file, then rename)."""
        tmp = self.run_json.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, FILE_MODE)  # a temporary file left by a crash may have other bits
            f.write(json.dumps({"schema_version": SCHEMA_VERSION, **info}, indent=2, default=str))
        os.replace(tmp, self.run_json)

    def update_info(self, **changes: Any) -> dict[str, Any]:
        info = {**self.info(), **changes}
        self.write_info(info)
        return info

    def token(self) -> str:
        return self.token_path.read_text().strip()

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.events_path)[0]

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)[0]


def run_state(run_dir: RunDir) -> dict[str, Any]:
    """run.json as a reader should see it, with the ranks' word when the supervisor is gone or run.json unreadable.

    A 'running' run whose supervisor died still runs while rank 0's heartbeat is fresh (:mod:`.liveness`); once
    rank 0 has ended too, the run reads as its last beat says ('stopped'), or as failed. So does a run whose run.json
    someone else damaged (its name then comes from control.json): a live one stays listed, found and controlled. A
    read never writes: only the supervisor (:mod:`.launch`) writes run.json.
    """
    info, problem = run_dir.read_info()
    if info is None:
        unreadable = f"run.json unreadable: {problem}"
        return _ranks_word(run_dir, {"id": run_dir.id, "name": run_dir.name(), "supervisor": "unknown",
                                     "error": unreadable}, unreadable, unreadable)
    if info.get("state") in LIVE_STATES and info.get("launcher_pid"):
        if not process_alive(info["launcher_pid"], info.get("launcher_start")):
            info = _ranks_word(run_dir, {**info, "supervisor": "gone"}, "the supervisor is gone",
                               "the launcher process is gone (killed?)")
    return info


def _ranks_word(run_dir: RunDir, info: dict[str, Any], why: str, failed: str) -> dict[str, Any]:
    """``info`` in the state rank 0's heartbeat says, since its supervisor cannot (``why``): running while it beats,
    then as its last beat says ('stopped'), else failed (``failed`` says why)."""
    beat = liveness.read_heartbeat(run_dir.path)
    if liveness.beating(beat):
        return {**info, "state": "running", "note": f"{why}; rank 0 (pid {beat['pid']}) is alive and training"}
    if beat and beat.get("state") == "stopped":
        return {**info, "state": "stopped", "control": None}
    return {**info, "state": "failed", "control": None, "error": failed}


def wait_for_end(run_dir: RunDir, seconds: float) -> str | None:
    """The run's end state (as :func:`run_state` reads it) once it has ended, waiting up to ``seconds`` for that;
    None if it still reads live (or has no state) by then. ``seconds`` <= 0 reads once."""
    deadline = time.monotonic() + seconds
    while True:
        state = run_state(run_dir).get("state")
        if state not in LIVE_STATES:
            return state
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def process_alive(pid: int, started: float | None) -> bool:
    """Whether process ``pid`` lives and is the one started at ``started`` (not a later one given its pid)."""
    try:
        proc = psutil.Process(pid)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and (
            started is None or abs(proc.create_time() - started) < 1.0)
    except psutil.Error:
        return False


def list_runs(root: Path | None = None) -> list[RunDir]:
    """Every run directory (with a run.json, or with a control endpoint: a live rank 0 whose run.json was deleted),
    newest first."""
    root = root or runs_root()
    if not root.is_dir():
        return []
    return sorted((RunDir(p) for p in root.iterdir()
                   if (p / "run.json").exists() or (p / liveness.CONTROL_FILE).exists()), key=lambda r: r.id,
                  reverse=True)


def find_run(ref: str, root: Path | None = None) -> RunDir:
    """A run by id, rendezvous id (a multi-node run's ``--rdzv-id``), name or unique id prefix;
    :class:`RunNotFound` in one line otherwise."""
    runs = list_runs(root)
    exact = ([r for r in runs if r.id == ref] or [r for r in runs if r.id == RDZV_RUN_PREFIX + ref]
             or [r for r in runs if r.name() == ref])
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        return exact[0]  # several runs with one name: the newest
    prefixed = [r for r in runs if r.id.startswith(ref)]
    if len(prefixed) == 1:
        return prefixed[0]
    if not prefixed:
        raise RunNotFound(f"run: no run matches {ref!r}; see `dspark-lab jobs`")
    raise RunNotFound(f"run: {ref!r} matches {len(prefixed)} runs ({', '.join(r.id for r in prefixed[:4])}); "
                      "give more of the id")


def iter_follow(path: Path, poll_s: float = 0.5, stop=lambda: False, start: int = 0) -> Iterator[dict[str, Any]]:
    """Yield records as they are appended to ``path`` (from byte ``start``) until ``stop()`` is true."""
    offset = start
    while True:
        records, offset = read_jsonl(path, offset)
        yield from records
        if stop():
            return
        time.sleep(poll_s)
