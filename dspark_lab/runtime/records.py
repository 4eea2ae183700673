"""The run directory: ``run.json``, ``events.jsonl`` and ``metrics.jsonl`` under ``$DSPARK_HOME/runs/<run-id>/``,
a run's state and how a run is found by id or name.

The JSON-lines records are written and read by :mod:`.jsonl`; metrics.jsonl rotates past a size bound
(:mod:`.rotation`). Field meanings are listed in docs/records.md. A run directory is the user's alone (0700, files
0600): it holds command lines, metrics and the control token.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from dspark_lab.errors import DSparkError, RunNotFound
from dspark_lab.output import SCHEMA_VERSION
from dspark_lab.private_files import write_private_text
from dspark_lab.runtime import liveness, rotation
from dspark_lab.runtime.jsonl import FILE_MODE, JsonlWriter, parse, read_all, read_jsonl

RUN_STATES = ("starting", "running", "finished", "failed", "stopped")
LIVE_STATES = ("running", "starting")  # a run in one of these has not ended
ENDED_STATES = tuple(state for state in RUN_STATES if state not in LIVE_STATES)
DIR_MODE = 0o700
RUN_DIR_VARIABLE = "DSPARK_RUN_DIR"  # the supervisor tells every rank and agent its run directory in this
LAUNCH_POLICIES_VARIABLE = "DSPARK_LAUNCH_POLICIES"  # ... the policies `run --set` gave, as one JSON object
CONTROL_HOST_VARIABLE = "DSPARK_CONTROL_HOST"  # ... and the address rank 0's control endpoint binds (default loopback)
RDZV_RUN_PREFIX = "rdzv-"  # a multi-node run's id is this and its --rdzv-id, the same on every node
MAX_RANKS = 1024 * 1024  # run.json's `ranks`: the most `dspark-lab run` or a k8s manifest can make (1024 x 1024)
_bad_fields_said: set[str] = set()  # run.json fields already warned about in this process



def dspark_home() -> Path:
    return Path(os.environ.get("DSPARK_HOME") or Path.home() / ".dspark")


def untrusted(path: Path, *, private: bool = False) -> str | None:
    """Why directory ``path`` is not the user's own, or None when it is: it must be a real directory (not a symbolic
    link), owned by the user and writable by no one else; ``private`` (a run directory) also readable by no one
    else (0700)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    mode = stat.S_IMODE(st.st_mode)
    if private and mode & 0o077:
        return f"its mode is {mode:04o}, not 0700"
    if mode & 0o022:
        return f"its mode is {mode:04o}: others can write in it"
    return None


def check_own_dir(path: Path, what: str, *, private: bool = False) -> Path:
    """``path`` when it is the user's own directory (:func:`untrusted`); else one-line :class:`DSparkError`."""
    why = untrusted(path, private=private)
    if why is not None:
        raise DSparkError(f"{what}: refusing {path}: {why} (records and control tokens are trusted only in a "
                          "directory that is yours alone)")
    return path


def check_home(root: Path | None = None, *, missing_ok: bool = False) -> Path:
    """The runs root, refused in one line unless it (and ``$DSPARK_HOME`` above the default one) is the user's own:
    another user who owns or can write in either could plant runs, swap a run's token or name a pid to signal.
    ``missing_ok`` (a reader): a runs root not made yet passes; the home above it is checked all the same."""
    root = root or runs_root()
    if root == runs_root() and dspark_home().exists():
        home = dspark_home()
        check_own_dir(home.resolve() if home.is_symlink() else home, "DSPARK_HOME")  # ~/.dspark -> /data/me/x
    if missing_ok and not os.path.lexists(root):
        return root
    return check_own_dir(root, "runs")


def trusted_run_dir(path: Path, what: str) -> "RunDir":
    """Run directory ``path`` when it is the user's own 0700 directory right under their own :func:`runs_root`;
    else one-line :class:`DSparkError` (``what`` says where the path came from)."""
    root = runs_root()
    if Path(os.path.realpath(path)).parent != Path(os.path.realpath(root)):
        raise DSparkError(f"{what}: refusing {path}: it is not a directory right under {root} (records and control "
                          "tokens are trusted only in a directory that is yours alone)")
    check_home(root)
    check_own_dir(path, what, private=True)
    return RunDir(path)


def make_private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents as the user's alone (0700, whatever the umask); directories that
    exist already are left as they are, but ``path`` itself is refused in one line unless it is the user's own
    (:func:`check_own_dir`)."""
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
    return check_own_dir(path, str(path.name) or "directory")


def runs_root() -> Path:
    return dspark_home() / "runs"


def new_run_id() -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


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
        check_home(root, missing_ok=True)  # an unsafe home is refused before anything is made in it
        make_private_dir(root)
        check_home(root)  # again: a home someone made meanwhile is left as it is by make_private_dir
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
        info, problem = parse(data, {})
        return (bounded(info, self.run_json) if info is not None else None), problem or ""

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
        """Replace run.json atomically (write a temporary file, then rename), 0600."""
        write_private_text(self.run_json, json.dumps({"schema_version": SCHEMA_VERSION, **info}, indent=2,
                                                     default=str))

    def update_info(self, **changes: Any) -> dict[str, Any]:
        info = {**self.info(), **changes}
        self.write_info(info)
        return info

    def token(self) -> str:
        return self.token_path.read_text().strip()

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.events_path)[0]

    def metrics(self) -> list[dict[str, Any]]:
        """Every metrics record kept, those of metrics.jsonl's moved files first (:mod:`.rotation`)."""
        return read_all(self.metrics_path)

    def metrics_writer(self) -> JsonlWriter:
        """A writer of metrics.jsonl that rotates it past ``DSPARK_METRICS_MAX_MB`` (one line naming it if bad)."""
        return JsonlWriter(self.metrics_path, rotation.max_bytes())


def bounded(info: dict[str, Any], source: Path) -> dict[str, Any]:
    """run.json's fields that size a reader's work, bounded: a ``ranks`` that is not a whole number from 1 to
    :data:`MAX_RANKS` (a crafted ``1000000000`` would freeze a dashboard that draws a line per rank) reads as
    absent, said once per file on stderr."""
    ranks = info.get("ranks")
    if ranks is None or (type(ranks) is int and 1 <= ranks <= MAX_RANKS):
        return info
    if str(source) not in _bad_fields_said:
        _bad_fields_said.add(str(source))
        print(f"dspark-lab: warning: {source}: 'ranks' {str(ranks)[:40]} ignored; allowed: a whole number from 1 "
              f"to {MAX_RANKS}", file=sys.stderr)
    return {**info, "ranks": None}


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
    newest first. A runs root or ``$DSPARK_HOME`` that is not the user's own is refused in one line
    (:func:`check_home`, as by a new run, also before any run made ``runs/``); a run directory in it that is not the
    user's own (:func:`untrusted`) is left out."""
    root = root or runs_root()
    check_home(root, missing_ok=True)
    if not root.is_dir():
        return []
    return sorted((RunDir(p) for p in root.iterdir()
                   if ((p / "run.json").exists() or (p / liveness.CONTROL_FILE).exists())
                   and untrusted(p) is None), key=lambda r: r.id, reverse=True)


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
        _refuse_foreign(root or runs_root(), ref)
        raise RunNotFound(f"run: no run matches {ref!r}; see `dspark-lab jobs`")
    raise RunNotFound(f"run: {ref!r} matches {len(prefixed)} runs ({', '.join(r.id for r in prefixed[:4])}); "
                      "give more of the id")


def _refuse_foreign(root: Path, ref: str) -> None:
    """One line when run ``ref`` exists under ``root`` but :func:`list_runs` left it out as not the user's own."""
    path = root / ref
    if "/" not in ref and ref not in (".", "..") and os.path.lexists(path):
        check_own_dir(path, "run")
