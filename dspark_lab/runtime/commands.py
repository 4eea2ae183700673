"""The live runtime's verbs: jobs, status, policies, get, set, metrics, events, stop, show, and a background launch.

Each returns a :class:`~dspark_lab.output.Report`; ``runtime/cli.py`` and the ``%dspark`` magics call them. Reads
come from the run directory (:mod:`.records`); changes go to rank 0's control endpoint (:mod:`.control`).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from dspark_lab.errors import DSparkError, PolicyError
from dspark_lab.output import Report, cell
from dspark_lab.policy import parse_assignments
from dspark_lab.runtime import jobtext
from dspark_lab.runtime.control import ControlClient
from dspark_lab.runtime.launch import launch_background
from dspark_lab.runtime.limits import check_timeout
from dspark_lab.runtime.liveness import read_heartbeat
from dspark_lab.runtime.jsonl import JsonlWriter, last_records
from dspark_lab.runtime.records import LIVE_STATES, find_run, list_runs, process_alive, run_state, wait_for_end


LAST_STEP_RECORDS = 128  # the newest records a run's step is read from (ranks write theirs a moment apart)


def _run(ref: str):
    return find_run(ref)


def _last_step(run_dir) -> int | None:
    return max((r["step"] for r in last_records(run_dir.metrics_path, LAST_STEP_RECORDS)), default=None)


def jobs() -> Report:
    """Every run under $DSPARK_HOME, newest first, with its state (from its supervisor, or its ranks' heartbeat)."""
    rows = []
    for run_dir in list_runs():
        try:
            info = run_state(run_dir)
            row = {"id": run_dir.id, "name": info.get("name"), "state": info.get("state"),
                   "ranks": info.get("ranks"), "step": _last_step(run_dir), "start_time": info.get("start_time")}
            if info.get("supervisor") == "unknown":  # run.json unreadable: the state is rank 0's word
                row["error"] = info["error"]
            _clock(row["start_time"])
        except (OSError, ValueError, TypeError, OverflowError) as exc:  # one damaged run must not hide the others
            row = {"id": run_dir.id, "name": None, "state": "failed", "ranks": None, "step": None,
                   "start_time": None, "error": f"unreadable record: {type(exc).__name__}: {exc}"[:200]}
        rows.append(row)
    table = [{**r, "start": _clock(r["start_time"]),
              "state": f"{r['state']} ({r['error']})" if r.get("error") else r["state"]} for r in rows]
    return Report("jobs", {"jobs": rows}, rows=table, columns=("id", "name", "state", "ranks", "step", "start"))


def status(run: str) -> Report:
    """One run: run.json, its current step and, while it runs, what rank 0 says (the job: blocks, parallelism,
    the policies that cannot apply and why)."""
    run_dir = _run(run)
    info = {**run_state(run_dir), "step": _last_step(run_dir)}
    if info.get("state") == "running":
        try:
            info["live"] = ControlClient(run_dir, timeout=5).request("GET", "/status")
        except DSparkError as exc:
            info["live_error"] = str(exc)
    rows = [{"field": k, "value": info[k]} for k in ("id", "name", "state", "ranks", "step", "script", "error")
            if info.get(k) is not None]
    rows += [{"field": field, "value": text} for field, text in jobtext.rows((info.get("live") or {}).get("job"))]
    return Report("status", {"run": info}, rows=rows, columns=("field", "value"),
                  lines=[f"records: {run_dir.path}"])


# reason: why a policy is not_applicable to this job (no FSDP2 to reshard, the script's own DDP comm hook, ...)
_POLICY_COLUMNS = ("key", "value", "since_step", "state", "allowed", "live", "lossless", "reason")


def policies(run: str) -> Report:
    """Every policy of a running job: schema, value in force, since which step, pending changes."""
    rows = ControlClient(_run(run)).request("GET", "/policies")["policies"]
    return Report("policies", {"policies": rows}, rows=[_policy_row(r) for r in rows],
                  columns=_POLICY_COLUMNS + ("doc",))


def _policy_value(value):
    """A policy value as `set` takes it: a bool reads true / false (as its ``allowed`` says), not the tables'
    yes / no."""
    return str(value).lower() if isinstance(value, bool) else value


def _policy_row(row: dict) -> dict:
    """A table row of one policy: a pending change says its value and step in the state column."""
    shown = {**row, "value": _policy_value(row.get("value"))}
    if row.get("state") != "pending":
        return shown
    pending = cell(_policy_value(row.get("pending_value")))
    return {**shown, "state": f"pending: {pending} at step {cell(row.get('pending_step'))}"}


def get(run: str, keys: str | list[str] | None = None) -> Report:
    """The value in force of some policies (all without ``keys``), in the order asked, and since which step."""
    report = policies(run)
    rows = report.data["policies"]
    if keys:
        by_key = {r["key"]: r for r in rows}
        asked = [keys] if isinstance(keys, str) else list(dict.fromkeys(keys))
        unknown = [k for k in asked if k not in by_key]
        if unknown:
            raise DSparkError(f"key: unknown policy {unknown[0]!r}; known: {', '.join(by_key)}")
        rows = [by_key[k] for k in asked]
    return Report("get", {"policies": rows}, rows=[_policy_row(r) for r in rows], columns=_POLICY_COLUMNS)


# How `dspark-lab set` and `stop` exit (docs/cli.md): the state the request ended in. A refusal (bad key or value,
# or a change the run can no longer apply) raises DSparkError, which the CLI prints as one `error:` line, exit 2.
EXIT_CODES = {"applied": 0, "pending": 0, "stopped": 0, "refused": 2, "rolled_back": 3, "timed_out": 4}


def set_policies(run: str, assignments, wait: bool = True, timeout: float = 60.0) -> Report:
    """Change policies of a running job; all keys apply together at one step, or none do.

    The report's ``exit_code`` says how it ended: applied (0), rolled back (3) or timed out (4); a refusal raises.
    """
    if not assignments:
        raise DSparkError("set: give at least one KEY=VALUE")
    timeout = check_timeout(timeout, "--timeout")
    changes = parse_assignments(assignments)
    reply = ControlClient(_run(run), timeout=timeout + 5).request(
        "POST", "/set", {"changes": changes, "wait": wait, "timeout": timeout})
    if reply["state"] == "refused":
        raise PolicyError(reply["reason"])
    rows = [{**c, "step": reply["step"], "state": reply["state"]} for c in reply["changes"]]
    words = {"applied": f"applied at step {reply['step']}", "pending": f"pending: applies at step {reply['step']}",
             "rolled_back": f"rolled back at step {reply['step']}: {reply['reason']}",
             "timed_out": f"timed out: {reply['reason']}"}
    line = words.get(reply["state"], f"{reply['state']}: {reply['reason']}")
    if reply.get("waited"):  # the job was busy (a profile capture): the change was held until it ended
        line += f" ({reply['waited']})"
    return Report("set", {**reply, "exit_code": EXIT_CODES.get(reply["state"], 1)}, rows=rows,
                  columns=("key", "old", "new", "step", "state"), lines=[line])


def metrics(run: str, tail: int = 20) -> Report:
    """The last ``tail`` metric records of a run (read from its records, live or not)."""
    records = last_records(_run(run).metrics_path, tail)
    columns = ("step", "rank", "step_time_s", "loss", "peak_activation_bytes", "comm_s", "samples_per_s")
    return Report("metrics", {"metrics": records}, rows=records, columns=columns)


def events(run: str) -> Report:
    """Every event of a run: starts, applied / refused / rolled-back changes, stops and errors."""
    records = _run(run).events()
    return Report("events", {"events": records}, rows=[_event_row(r) for r in records],
                  columns=("step", "rank", "kind", "key", "old", "new", "reason"))


def _event_row(record: dict) -> dict:
    """A table row of one event: one that names its keys only in ``changes`` (``pending``) shows them too."""
    changes = record.get("changes")
    if record.get("key") is not None or not isinstance(changes, dict) or not changes:
        return record
    return {**record, "key": ", ".join(map(str, changes)), "new": ", ".join(str(v) for v in changes.values())}


def stop(run: str, timeout: float = 60.0, force: bool = False) -> Report:
    """Stop every rank at the next step boundary; answers once the ranks stopped (exit_code 4 if not in time).
    ``force``: end the run now, without waiting for a boundary (:func:`_force_stop`)."""
    timeout = check_timeout(timeout, "--timeout")
    run_dir = _run(run)
    state = run_state(run_dir).get("state")
    if state not in LIVE_STATES:
        raise DSparkError(f"run: {run_dir.id} is {state}: there is nothing to stop")
    if force:
        return _force_stop(run_dir, timeout)
    started = time.monotonic()
    reply = ControlClient(run_dir, timeout=timeout + 5).request("POST", "/stop", {"timeout": timeout})
    if reply["state"] == "stopped":  # the ranks stopped: wait for the supervisor to record the run's end too,
        wait_for_end(run_dir, started + timeout - time.monotonic())  # so `jobs` right after agrees
    words = {"stopped": f"run {run_dir.id} stopped after step {reply['step']}",
             "ended": f"run {run_dir.id} ended by itself at step {reply['step']} before the stop applied",
             "timed_out": f"run {run_dir.id}: {reply['reason']} (last step {reply['step']})",
             "rolled_back": f"run {run_dir.id}: the stop did not apply at step {reply['step']}, no rank stopped: "
                            f"{reply['reason']}"}
    return Report("stop", {"id": run_dir.id, **reply, "exit_code": EXIT_CODES.get(reply["state"], 0)},
                  lines=[words.get(reply["state"], f"run {run_dir.id} {reply['state']}")])


def _force_stop(run_dir, timeout: float) -> Report:
    """End a run that may never reach a step boundary (a hung collective, workers the script spawned itself):
    SIGTERM to its supervisor, which passes it to the launcher and so to every rank; the run ends ``stopped``
    with this reason. Only the run's own process is signalled: the pid and start time its records name, and only
    when that process is the user's and holds the run's events.jsonl open (:func:`_check_run_process`)."""
    info = run_state(run_dir)
    if info.get("supervisor") in ("gone", "unknown"):  # killed, or run.json unreadable: rank 0 is left to signal
        beat = read_heartbeat(run_dir.path) or {}
        pid, started_at = beat.get("pid"), beat.get("start")
    else:
        pid, started_at = info.get("launcher_pid"), info.get("launcher_start")
    if not isinstance(pid, int) or not process_alive(pid, started_at):
        raise DSparkError(f"run: {run_dir.id} has no live process of its own to signal")
    _check_run_process(run_dir, pid)
    reason = "forced: dspark-lab stop --force (SIGTERM, no step boundary awaited)"
    JsonlWriter(run_dir.events_path).write({"time": time.time(), "step": _last_step(run_dir), "rank": None,
                                            "kind": "stop", "reason": reason})
    os.kill(pid, signal.SIGTERM)
    state = wait_for_end(run_dir, timeout) or run_state(run_dir).get("state")
    ended = state not in LIVE_STATES
    step = _last_step(run_dir)
    data = {"id": run_dir.id, "state": "stopped" if ended else "timed_out", "forced": True, "step": step,
            "reason": reason if ended else f"SIGTERM sent; the run still reads {state} after {timeout:g} s",
            "exit_code": 0 if ended else EXIT_CODES["timed_out"]}
    at = f"after step {step}" if step is not None else "before its first step"
    words = f"run {run_dir.id} stopped (forced) {at}" if ended else f"run {run_dir.id}: {data['reason']} ({at})"
    return Report("stop", data, lines=[words])


def _check_run_process(run_dir, pid: int) -> None:
    """Refuse in one line to signal ``pid`` unless it is the user's and has this run's events.jsonl open: the
    supervisor (``dspark-lab run``) and rank 0 (also a script that attached by itself) keep it open for the whole
    run, an unrelated process with a pid and start time copied into a planted run.json does not."""
    try:
        proc = psutil.Process(pid)
        owner = proc.uids().real
        if owner != os.getuid():
            raise DSparkError(f"run: {run_dir.id}: refusing to signal pid {pid}: it belongs to uid {owner}, not to "
                              f"you (uid {os.getuid()})")
        events = os.path.realpath(run_dir.events_path)
        holds = any(f.path == events for f in proc.open_files())
    except psutil.Error as exc:
        raise DSparkError(f"run: {run_dir.id}: refusing to signal pid {pid}: cannot inspect it "
                          f"({type(exc).__name__})") from None
    if not holds:
        raise DSparkError(f"run: {run_dir.id}: refusing to signal pid {pid}: it does not have the run's "
                          f"{run_dir.events_path} open, so it is not this run's supervisor or rank 0")


def launch(script, args=(), *, nproc: int = 1, policies=(), name: str | None = None, options=None, env=None,
           launcher: str | None = None, module: bool = False):
    """Start ``script`` under the runtime in the background; returns a BackgroundRun handle at once.

    ``launcher`` is ``dspark-lab run --launcher``: ``torchrun`` (default), ``python`` (one process, no torchrun
    environment) or a plugin's. ``module``: ``script`` is a module's name, run as ``python -m`` runs it
    (``dspark-lab run -m``).
    """
    return launch_background(str(script), list(args), nproc=nproc, policies=list(policies), name=name,
                             options=options, env=env, launcher=launcher, module=module)


def _clock(t) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else None


def show(run: str, html: str | None = None) -> Report:
    """Write a run's charts (step time, throughput, memory, utilization, comm, loss, change markers) as HTML."""
    from dspark_lab.views import save_run_html

    run_dir = _run(run)
    path = save_run_html(run_dir, Path(html) if html else run_dir.path / "charts.html")
    return Report("show", {"id": run_dir.id, "html": str(path)}, lines=[f"wrote {path} (BokehJS inlined)"])
