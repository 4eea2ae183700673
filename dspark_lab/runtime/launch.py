"""``dspark-lab run``: launch an unmodified script with the runtime attached to every rank.

A launcher (:mod:`.launchers`: ``torchrun`` by default, ``python`` for one plain process, or a plugin's) builds
the command; every rank it starts runs ``-m dspark_lab.runtime.bootstrap`` in front of the script (or of ``-m
MODULE``: :mod:`.program`). The process
that runs this module supervises the launcher: it owns ``run.json``'s state from start to finish (finished /
failed / stopped), so a crashed rank or a killed job never looks alive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import psutil

from dspark_lab.errors import DSparkError
from dspark_lab.plugins import get_manager
from dspark_lab.policy import parse_assignments
from dspark_lab.runtime import program
from dspark_lab.runtime.control import ControlClient
from dspark_lab.runtime.launchers import TORCHRUN_OPTIONS, get_launcher  # noqa: F401 (runtime/cli.py reads it)
from dspark_lab.runtime.launchers import agent_events, multinode
from dspark_lab.runtime.records import (CONTROL_HOST_VARIABLE, FILE_MODE, LAUNCH_POLICIES_VARIABLE, RUN_DIR_VARIABLE,
                                        JsonlWriter, RunDir, new_run_id, runs_root)

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


def parse_policies(assignments: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` validated against the registered schemas (launch-only keys allowed)."""
    specs = get_manager().policies()
    parsed = {}
    for key, value in parse_assignments(assignments).items():
        if key not in specs:
            raise DSparkError(f"--policy: unknown policy {key!r}; known: {', '.join(specs)}")
        parsed[key] = specs[key].validate(value)
    return parsed


def torchrun_command(script: str, script_args: Sequence[str], nproc: int, options: dict[str, Any]) -> list[str]:
    """The default launcher's command line (kept for callers that build one without a run)."""
    return get_launcher("torchrun").command(script, script_args, nproc, options)


def prepare(script: str, script_args: Sequence[str] = (), *, nproc: int | None = None,
            policies: Sequence[str] = (), name: str | None = None, options: dict[str, Any] | None = None,
            run_id: str | None = None, launcher: str | None = None, token_file: str | None = None,
            control_host: str | None = None, module: bool = False) -> RunDir:
    """Validate, create the run directory and write run.json; nothing is started yet.

    With ``module``, ``script`` is a module's name, run as ``python -m`` runs it (torchrun's ``-m``): it must be
    found from here, without importing it (:mod:`.program`), and the launcher's ``module_command`` builds the command.

    Under torchrun, options not given come from torchrun's ``PET_*`` variables (a Kubeflow pod). A run of several
    nodes takes its id from ``--rdzv-id`` and its token from ``--token-file`` (:mod:`.launchers.multinode`).
    """
    if module:
        program.find_module(script)  # one line naming -m, before any rank starts
    else:
        path = Path(script)
        if not path.is_file():
            raise DSparkError(f"script: {script} is not a file")
        script = str(path.resolve())
    chosen = get_launcher(launcher)
    options = options or {}
    if chosen.name == "torchrun":
        options, nproc = multinode.from_environment(options, nproc)
    nproc = 1 if nproc is None else nproc
    if nproc < 1:
        raise DSparkError(f"--nproc: must be at least 1, got {nproc}")
    chosen.validate(nproc, options)
    multinode.check(options, token_file)
    token = multinode.read_token_file(token_file) if token_file else None
    multinode.check_control_host(control_host)
    launch_policies = parse_policies(policies)
    command = (chosen.module_command if module else chosen.command)(script, script_args, nproc, options)
    if run_id is None and options.get("rdzv_id") and multinode.max_nodes(options) > 1:
        run_id = multinode.run_id_for(str(options["rdzv_id"]))
        if (runs_root() / run_id).exists():
            raise DSparkError(f"--rdzv-id: run {run_id} already exists under {runs_root()}; every launch of a new "
                              "multi-node run needs a new --rdzv-id")
    return RunDir.create(run_id or new_run_id(), {
        "name": name or (script if module else Path(script).stem), "command": command,
        "script": program.shown(script, module), **({"module": script} if module else {}),
        "script_args": list(script_args), "cwd": os.getcwd(), "start_time": time.time(),
        "ranks": chosen.ranks(nproc, options), "launcher": chosen.name, "launch_policies": launch_policies,
        "nodes": multinode.max_nodes(options) if chosen.name == "torchrun" else 1,
        "control_host": control_host, "options": {k: v for k, v in options.items() if v is not None},
    }, token=token)


def supervise(run_dir: RunDir, *, output=None) -> int:
    """Run the launcher's command for ``run_dir`` to completion, keeping run.json's state true; returns the run's
    exit code (:func:`ending`)."""
    info = run_dir.info()
    launcher = get_launcher(info.get("launcher"))
    env = launcher.environment({**os.environ, RUN_DIR_VARIABLE: str(run_dir.path),
                                LAUNCH_POLICIES_VARIABLE: json.dumps(info.get("launch_policies") or {}),
                                CONTROL_HOST_VARIABLE: info.get("control_host") or "",
                                **multinode.store_environment(info.get("options") or {}, os.environ)})
    me = psutil.Process()
    events = JsonlWriter(run_dir.events_path)
    info = rewrite_info(run_dir, info, events, state="running", launcher_pid=me.pid, launcher_start=me.create_time())
    proc = subprocess.Popen(info["command"], env=env, stdout=output, stderr=subprocess.STDOUT if output else None)

    def forward(signum, frame):
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    interrupted = False
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C: the ranks got the SIGINT too; let the launcher wind them down
        interrupted = True
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip run.json's end
        proc.send_signal(signal.SIGINT)
        code = proc.wait()
        signal.signal(signal.SIGINT, interrupt)
    finally:
        signal.signal(signal.SIGTERM, previous)
    state, code, error = ending(run_dir.events(), launcher.name, code, interrupted=interrupted)
    rewrite_info(run_dir, info, events, state=state, end_time=time.time(), exit_code=code, error=error, control=None)
    if code != 0:
        events.write({"time": time.time(), "step": None, "rank": None, "reason": error,
                      "kind": "stop" if interrupted else "error"})
    events.close()
    return code


def rewrite_info(run_dir: RunDir, kept: dict[str, Any], events: JsonlWriter, **changes: Any) -> dict[str, Any]:
    """run.json with ``changes``, written by the supervisor; returns what it wrote, its copy for the next write.

    When run.json cannot be read (someone truncated or overwrote it), it is rewritten from ``kept`` (what this
    supervisor wrote last) rather than from the unreadable file, so the run keeps its name, ranks and start, and a
    ``restore`` event says so."""
    info, problem = run_dir.read_info()
    if info is None:
        info = kept
        events.write({"time": time.time(), "step": None, "rank": None, "kind": "restore",
                      "reason": f"run.json unreadable: {problem}; restored from the supervisor's copy"})
    info = {**info, **changes}
    run_dir.write_info(info)
    return info


def ending(events: list[dict[str, Any]], launcher: str, code: int, *,
           interrupted: bool = False) -> tuple[str, int, str | None]:
    """How a run ended: its state, exit code and one-line reason (``None`` when the exit code is 0).

    A Ctrl-C stops the run like ``dspark-lab stop`` (exit 130). A failed launcher reports the rank that ended its
    last group of workers, with that rank's exit code: a rank killed by a signal, as torchrun's agent saw it
    (``rank 1: killed by signal 9 (SIGKILL)``, exit 137 as a shell says it; :mod:`.launchers.agent_events`), else
    the first rank that said why in its own words (the ranks' ``error`` events, written by :mod:`.bootstrap`); the
    launcher's own code when no rank failed (128 + N when a signal N ended the launcher itself).
    """
    if interrupted:
        return "stopped", INTERRUPTED_EXIT, "interrupted (SIGINT, Ctrl-C)"
    stopped = any(e.get("kind") == "stop" for e in events)
    if code == 0:
        return ("stopped" if stopped else "finished"), 0, None
    failures = [e for e in agent_events.group_events(events) if e.get("kind") == "error" and e.get("rank") is not None
                and isinstance(e.get("exit_code"), int) and e["exit_code"] != 0]
    first = agent_events.first_cause(failures)
    if first is None:  # no rank said why: a forced stop's own reason, else the launcher's code
        forced = next((e.get("reason") for e in reversed(events) if e.get("kind") == "stop" and e.get("rank") is None
                       and e.get("reason")), None) if stopped else None
        if code < 0:  # the launcher itself was killed
            code, _, killed = agent_events.exit_status(code)
            return ("stopped" if stopped else "failed"), code, forced or f"{launcher} was {killed}"
        return ("stopped" if stopped else "failed"), code, forced or f"{launcher} exited with code {code}"
    return ("stopped" if stopped else "failed"), first["exit_code"], agent_events.cause_text(first)


@dataclass
class BackgroundRun:
    """A run started in the background (``commands.launch`` / ``%dspark run``)."""

    id: str
    run_dir: RunDir
    process: subprocess.Popen

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        try:
            ControlClient(self.run_dir, timeout=timeout + 5).request("POST", "/stop", {"timeout": timeout})
            self.process.wait(timeout)
        except (DSparkError, subprocess.TimeoutExpired):
            self.process.terminate()
            self.process.wait(timeout)

    def __repr__(self) -> str:
        state = "running" if self.poll() is None else f"exited {self.poll()}"
        return f"<dspark-lab run {self.id} ({state}) {self.run_dir.path}>"


def launch_background(script: str, script_args: Sequence[str] = (), *, nproc: int | None = None,
                      policies: Sequence[str] = (), name: str | None = None,
                      options: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                      launcher: str | None = None, module: bool = False) -> BackgroundRun:
    """Start a supervised run in a child process and return at once; output goes to the run's output.log.
    ``module``: ``script`` is a module's name (:func:`prepare`)."""
    run_dir = prepare(script, script_args, nproc=nproc, policies=policies, name=name, options=options,
                      launcher=launcher, module=module)
    log = os.fdopen(os.open(run_dir.path / "output.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE), "ab")
    process = subprocess.Popen([sys.executable, "-m", "dspark_lab.runtime.launch", str(run_dir.path)],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, **(env or {})}, start_new_session=True)
    log.close()
    return BackgroundRun(run_dir.id, run_dir, process)


if __name__ == "__main__":  # the background supervisor: python -m dspark_lab.runtime.launch RUN_DIR
    raise SystemExit(supervise(RunDir(sys.argv[1])))
