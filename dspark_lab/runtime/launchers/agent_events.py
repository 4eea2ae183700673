"""What torchrun's agent adds to a node's events: each restart of the group with the rank that caused it,
and each rank that ended without a word of its own.

A rank that fails says why itself (:mod:`dspark_lab.runtime.bootstrap`: an ``error`` event with its reason and exit
code). A rank killed by a signal (``kill -9``, the OOM killer) or one that left through ``os._exit`` writes nothing,
so the first error in the events was a surviving rank's (gloo's ``Connection closed by peer``). torchrun's agent
sees every rank's exit status: the agent entry (:mod:`.agent`, behind :mod:`.loopback` on one node) passes the
failures torchrun reports to :func:`record_failures`, which writes an ``error`` event (``source: "agent"``,
``signal`` for a signal, exit code 128 + the signal as a shell reports it) for each failed rank with none of its own
in the group; the supervisor's :func:`~dspark_lab.runtime.launch.ending` then names that rank. A restart under
``--max-restarts`` does the same for the group it ends, and its ``restart`` event names the rank
(:func:`record_restart`), so ``dspark-lab events`` says ``restart 1: rank 1: killed by signal 9 (SIGKILL)``. On
several nodes the other nodes' agents relay such events to rank 0's node (:mod:`.node_agent`). Imports nothing
heavy: the supervisor reads it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Iterable, Mapping

from dspark_lab.runtime.records import RUN_DIR_VARIABLE, JsonlWriter, RunDir

RESTART = "restart"  # a run-level event: torchrun started the group again
SOURCE = "agent"  # the ``source`` of an error event the agent wrote for a rank
LATE_SIGNAL_S = 5.0  # a rank killed this long after another rank's error: torchrun's SIGKILL, 30 s after its SIGTERM


def group_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events since the group last (re)started: a failure of an earlier group is not why this one ended.

    An event with a ``group`` (another node's agent numbers its relayed ``error`` events: :mod:`.node_agent`) below
    the last restart's number belongs to an earlier group, however late it came in, and is left out."""
    last = max((i for i, e in enumerate(events) if e.get("kind") == RESTART and e.get("rank") is None), default=-1)
    current = events[last].get("restart") if last >= 0 else 0
    if type(current) is not int:
        current = 0
    return [e for e in events[last + 1:] if type(e.get("group")) is not int or e["group"] >= current]


def exit_status(exitcode: int) -> tuple[int, int | None, str]:
    """(exit code as a shell reports it, signal or None, reason) of a rank's exit code as torchrun reports it
    (a signal as its negative number)."""
    if exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        return 128 + number, number, f"killed by signal {number} ({name})"
    return exitcode, None, f"exited with code {exitcode} without an error of its own (os._exit, or before the runtime)"


def _run_dir() -> RunDir | None:
    path = os.environ.get(RUN_DIR_VARIABLE)
    return RunDir(path) if path else None


def _write(run_dir: RunDir, events: list[dict[str, Any]]) -> None:
    """Append ``events``; a disk that cannot take them costs the records, never the restart or torchrun's exit."""
    try:
        writer = JsonlWriter(run_dir.events_path)
        try:
            for event in events:
                writer.write(event)
        finally:
            writer.close()
    except OSError as exc:
        print(f"dspark-lab: warning: {run_dir.events_path}: {len(events)} event(s) not written: {exc.strerror}",
              file=sys.stderr)


def record_restart(restart: int, failures: Mapping[int, Any] | None = None,
                   others: Iterable[int] = ()) -> dict[str, Any] | None:
    """A ``restart`` event: the group's workers start again (``restart`` counts from 1), naming why.

    ``failures`` are what torchrun restarted over (global rank -> ``ProcessFailure``, :mod:`.failures`): each
    failed rank that said nothing gets its ``error`` event first, as when a run fails, and the restart names the
    rank that ended the group (:func:`first_cause`) in ``failed_rank``, ``exit_code``, ``signal`` and its reason
    (``restart 1: rank 1: killed by signal 9 (SIGKILL); ...``), every failed rank in ``failed_ranks``. The errors
    of ``others`` (ranks of other nodes, relayed here: :mod:`.node_agent`) count as this group's too."""
    run_dir = _run_dir()
    if run_dir is None:
        return None
    failures = failures or {}
    others = set(others)
    silent, first, failed = [], None, set(failures)
    if failures or others:  # else nothing is read: the event goes out whatever the records hold
        silent = _failure_events(run_dir, failures)
        errors = [e for e in group_events(run_dir.events()) + silent if e.get("kind") == "error"
                  and (e.get("rank") in failures or e.get("rank") in others)
                  and isinstance(e.get("exit_code"), int) and e["exit_code"]]
        failed |= {e["rank"] for e in errors}
        first = first_cause(errors)
    cause = cause_text(first) if first else "a rank had ended"
    event = {"time": time.time(), "step": None, "rank": None, "kind": RESTART, "restart": restart,
             "failed_rank": first and first["rank"], "exit_code": first and first["exit_code"],
             "signal": first and first.get("signal"), "failed_ranks": sorted(failed),
             "reason": f"restart {restart}: {cause}; torchrun started every rank again"}
    _write(run_dir, [*silent, event])
    return event


def cause_text(failure: dict[str, Any]) -> str:
    """``rank 1: killed by signal 9 (SIGKILL)``: a failed rank's ``error`` event as a run's end or restart names it."""
    return f"rank {failure['rank']}: {failure['reason']}"


def record_failures(failures: Mapping[int, Any], group: int | None = None) -> list[dict[str, Any]]:
    """An ``error`` event for each failed rank (global rank -> torchrun's ``ProcessFailure``) that said nothing
    itself in this group; returns them. ``group``, when given, is written into each (the group they belong to, for
    the events another node relays: :func:`group_events`)."""
    run_dir = _run_dir()
    if run_dir is None:
        return []
    events = _failure_events(run_dir, failures)
    if group is not None:
        for event in events:
            event["group"] = group
    _write(run_dir, events)
    return events


def _failure_events(run_dir: RunDir, failures: Mapping[int, Any]) -> list[dict[str, Any]]:
    """The ``error`` events of the failed ranks that said nothing themselves in this group (not written).

    A rank torchrun ended with SIGTERM because another had failed says so (:func:`after_peer`), as a rank that failed
    on its peer's closed connection does."""
    group = group_events(run_dir.events())
    spoke = {e.get("rank") for e in group if e.get("kind") == "error"}
    events = []
    for rank, failure in failures.items():
        if failure.exitcode != 0 and rank not in spoke:
            code, number, reason = exit_status(failure.exitcode)
            events.append({"time": float(failure.timestamp), "step": None, "rank": rank, "kind": "error",
                           "reason": reason, "exit_code": code, "signal": number, "pid": failure.pid,
                           "source": SOURCE})
    earlier = group + [e for e in events if e["signal"] != signal.SIGTERM]
    for event in events:
        if event["signal"] == signal.SIGTERM:
            event["reason"] = after_peer(earlier, event["rank"], event["reason"])
    return events


def after_peer(events: list[dict[str, Any]], rank: int, reason: str) -> str:
    """``reason``, saying so when another rank failed first in this group (``events``, in order: the first with an
    exit code counts): a rank whose peer died mostly fails on a closed connection or torchrun's SIGTERM, which is not
    why the run failed."""
    first = next((e for e in group_events(events) if e.get("kind") == "error" and e.get("exit_code")
                  and e.get("rank") not in (None, rank)), None)
    return reason if first is None else f"peer rank {first['rank']} failed first ({first['reason']}); here: {reason}"


def first_cause(failures: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The failure that ended the group, from its ranks' ``error`` events with an exit code.

    A rank that ended without a word (an agent's event) and not by SIGTERM is the cause: the ranks that said why
    then mostly failed on its closed connection. SIGTERM is what torchrun sends the other ranks once one failed, so
    such a rank is named only when no rank said anything; and a signal :data:`LATE_SIGNAL_S` after the first rank's
    own error is torchrun's SIGKILL of a rank that ignored its SIGTERM.
    """
    failures = list(failures)
    own = [e for e in failures if e.get("source") != SOURCE]
    spoke = {e.get("rank") for e in own}
    silent = [e for e in failures if e.get("source") == SOURCE and e.get("rank") not in spoke]
    first_own = min((e.get("time") or 0.0 for e in own), default=None)
    killed = [e for e in silent if e.get("signal") != signal.SIGTERM
              and (first_own is None or (e.get("time") or 0.0) <= first_own + LATE_SIGNAL_S)]
    for group in (killed, own, silent):
        if group:
            return min(group, key=lambda e: e.get("time") or 0.0)
    return None
