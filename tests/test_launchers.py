"""Launchers: the plugin interface, the python launcher's refusals and environment, torchrun's loopback store."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import terminal_sigint
from dspark_lab.errors import DSparkError
from dspark_lab.plugins import make_manager
from dspark_lab.runtime import launchers
from dspark_lab.runtime.launchers import builtin, multinode
from dspark_lab.runtime.launchers.base import TORCHRUN_OPTIONS

ROOT = Path(__file__).resolve().parents[1]
REAL_JOBS = Path(__file__).parent / "real_jobs"


@pytest.fixture
def manager():
    return make_manager([builtin], entry_points=False)


def test_builtins_register_through_the_hook(manager):
    assert list(launchers.launchers(manager)) == ["python", "torchrun"]
    assert launchers.get_launcher(None, manager).name == "torchrun"
    with pytest.raises(DSparkError, match=r"^--launcher: unknown launcher 'k8s'; registered: python \| torchrun$"):
        launchers.get_launcher("k8s", manager)


def test_no_launcher_registered_says_how_to_get_the_builtins():
    with pytest.raises(DSparkError, match=r"^--launcher: no launcher is registered; .*entry point 'launchers'"):
        launchers.get_launcher(None, make_manager([], entry_points=False))


def test_a_name_registered_twice_keeps_the_first(manager):
    from dspark_lab import hookimpl
    from dspark_lab.runtime.launchers.python import PythonLauncher

    class Again:
        @hookimpl
        def dspark_launchers(self):
            return [PythonLauncher()]

    class Junk:
        @hookimpl
        def dspark_launchers(self):
            return ["not a launcher"]

    manager.register(Again(), name="again")
    manager.register(Junk(), name="junk")
    assert list(launchers.launchers(manager)) == ["python", "torchrun"]
    reasons = {p.plugin: p.reason for p in manager.problems if p.plugin in ("again", "junk")}
    assert reasons["again"] == "launcher 'python' is already registered"
    assert reasons["junk"].startswith("returned ") and "not a named Launcher" in reasons["junk"], reasons


@pytest.mark.parametrize("option", TORCHRUN_OPTIONS)
def test_python_launcher_refuses_each_torchrun_option_by_name(manager, option):
    flag = "--" + option.replace("_", "-")
    with pytest.raises(DSparkError) as err:
        launchers.get_launcher("python", manager).validate(1, {option: "2"})
    assert str(err.value).startswith(f"{flag}: ") and "\n" not in str(err.value)


def test_python_launcher_refuses_more_than_one_process(manager):
    python = launchers.get_launcher("python", manager)
    with pytest.raises(DSparkError, match=r"^--nproc: --launcher python runs one process, got 2"):
        python.validate(2, {})
    python.validate(1, {name: None for name in TORCHRUN_OPTIONS})  # options not given are fine
    assert python.ranks(1, {}) == 1


def test_python_launcher_runs_the_bootstrap_without_torchrun_variables(manager):
    python = launchers.get_launcher("python", manager)
    assert python.command("/x/train.py", ["--a=1"], 1, {}) == [
        sys.executable, "-m", "dspark_lab.runtime.bootstrap", "/x/train.py", "--a=1"]
    env = python.environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h",
                              "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x", "DSPARK_RUN_DIR": "/r", "PATH": "/b"})
    assert env == {"DSPARK_RUN_DIR": "/r", "PATH": "/b"}


def test_torchrun_single_node_uses_the_loopback_rendezvous(manager):
    torchrun = launchers.get_launcher("torchrun", manager)
    single = torchrun.command("/x/train.py", [], 2, {"max_restarts": "1"})
    assert single[1:3] == ["-m", "dspark_lab.runtime.launchers.loopback"]
    assert {"--rdzv-backend=dspark-loopback", "--rdzv-endpoint=127.0.0.1:0", "--max-restarts=1"} <= set(single)
    assert torchrun.ranks(2, {"nnodes": "1:3"}) == 6
    for bad in ("two", "\u00b2", "1:\u00b2"):  # str.isdigit() takes '²', which int() refuses
        with pytest.raises(DSparkError, match="^--nnodes: "):
            torchrun.validate(1, {"nnodes": bad})
    with pytest.raises(DSparkError, match="^PET_NPROC_PER_NODE: "):
        multinode.from_environment({}, None, {"PET_NPROC_PER_NODE": "\u00b2"})
    with pytest.raises(DSparkError, match="^--nproc: must be 1 to 1024"):
        torchrun.validate(5000, {})
    torchrun.validate(2, {"max_restarts": "100"})  # one node restarts too: a store per round (loopback.py)
    torchrun.validate(2, {"max_restarts": "1", "nnodes": "2", "rdzv_id": "j"})
    for bad in ("-1", "101", "three", "1.5", "\u0663"):
        with pytest.raises(DSparkError, match=rf"^--max-restarts: must be a whole number 0 to 100, got '{bad}'$"):
            torchrun.validate(2, {"max_restarts": bad})


def test_loopback_gives_each_round_a_new_store_and_keeps_the_first_for_the_runtime(monkeypatch, tmp_path):
    """A restarted group must not meet the dead group's gloo keys; the runtime's keys stay in the first store."""
    import socket

    from dspark_lab.runtime.launchers.loopback import LoopbackRendezvous
    from dspark_lab.runtime.records import RunDir

    run_dir = RunDir.create("20260101-000000-c0ffee", {"name": "rounds"}, root=tmp_path)
    monkeypatch.setenv("DSPARK_RUN_DIR", str(run_dir.path))

    def serving(port: int) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    # the handler sets DSPARK_STORE in this process: set it first so monkeypatch removes it afterwards (a delenv
    # of an absent variable records nothing, and later tests' ranks would inherit this dead store's address)
    monkeypatch.setenv("DSPARK_STORE", "")
    monkeypatch.delenv("DSPARK_STORE")
    handler = LoopbackRendezvous("run")
    ports = []
    for _ in range(3):  # the agent holds each round's store only until the next round
        info = handler.next_rendezvous()
        info.store.set("gloo/0", "from this round")
        ports.append(info.bootstrap_store_info.master_port)
        assert os.environ["DSPARK_STORE"] == f"127.0.0.1:{ports[0]}"
        del info
    assert len(set(ports)) == 3
    assert (serving(ports[0]), serving(ports[2])) == (True, True)
    deadline = time.monotonic() + 5
    while serving(ports[1]) and time.monotonic() < deadline:  # its server thread stops soon after
        time.sleep(0.05)
    assert not serving(ports[1])
    later = handler.next_rendezvous().store
    assert not later.check(["gloo/0"])  # a fresh store: nothing of the groups before
    assert [(e["kind"], e["rank"], e["restart"]) for e in run_dir.events()] == [("restart", None, n) for n in (1, 2, 3)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss")
def test_single_node_torchrun_listens_on_loopback_only(tmp_path):
    """Every socket the run listens on (torchrun's store, gloo, the control endpoint) is bound to 127.0.0.1."""
    env = {**os.environ, "DSPARK_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "dspark_lab.cli", "run", "--nproc", "2",
                           str(REAL_JOBS / "listeners.py")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    listening = re.findall(r"^LISTEN\s+\d+\s+\d+\s+(\S+):\d+\s.*\(\"([^\"]+)\"", done.stdout, flags=re.M)
    assert ("127.0.0.1", "pt_elastic") in listening  # torchrun's agent hosts the store
    assert {address for address, _ in listening} == {"127.0.0.1"}, done.stdout


@pytest.mark.parametrize("argv, message", [
    (["--launcher", "python", "--nproc", "2"], "error: --nproc: --launcher python runs one process, got 2"),
    (["--launcher", "python", "--master-port", "29500"], "error: --master-port: a torchrun option"),
    (["--launcher", "k8s"], "error: --launcher: unknown launcher 'k8s'; registered: python | torchrun"),
])
def test_cli_refuses_in_one_line_and_creates_no_run(argv, message, tmp_path, monkeypatch, capsys):
    from dspark_lab.cli import main

    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    monkeypatch.delenv("DSPARK_PLUGINS", raising=False)
    code = main(["run", *argv, str(REAL_JOBS / "nanogpt_train.py"), "--device=cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(message) and "\n" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# A stand-in for torchrun whose ranks have failed: rank 1 first (sys.exit(3)), then rank 0 on the closed connection;
# a plugin's error before them has no exit code (the rank trained on). The launcher itself exits 1.
FAILED_RANKS = """
import json, os, sys
with open(os.path.join(os.environ["DSPARK_RUN_DIR"], "events.jsonl"), "a") as f:
    for time, rank, reason, code in ((1.0, 0, "dspark_job_started: a plugin failed", None),
                                     (2.0, 1, "script exited with 3", 3), (3.0, 0, "RuntimeError: closed", 1)):
        event = {"time": time, "step": 5, "rank": rank, "kind": "error", "reason": reason}
        f.write(json.dumps({**event, **({"exit_code": code} if code else {})}) + "\\n")
sys.exit(1)
"""

# A stand-in for torchrun that says when it runs, then waits to be interrupted.
WAITS = "import time; print('ready', flush=True); time.sleep(60)"


def fake_run(tmp_path, code: str):
    from dspark_lab.runtime.records import RunDir

    return RunDir.create("20260101-000000-c0ffee", {"name": "fake", "launcher": "torchrun", "ranks": 2,
                                                    "command": [sys.executable, "-c", code]}, root=tmp_path)


def test_a_failed_run_reports_the_first_failing_ranks_reason_and_exit_code(tmp_path):
    from dspark_lab.runtime.launch import supervise

    run_dir = fake_run(tmp_path, FAILED_RANKS)
    assert supervise(run_dir) == 3
    info = run_dir.info()
    assert (info["state"], info["exit_code"], info["error"]) == ("failed", 3, "rank 1: script exited with 3")
    assert run_dir.events()[-1]["reason"] == "rank 1: script exited with 3"


def test_a_failed_run_without_a_ranks_word_reports_the_launchers_exit_code(tmp_path):
    from dspark_lab.runtime.launch import supervise

    run_dir = fake_run(tmp_path, "import sys; sys.exit(7)")
    assert supervise(run_dir) == 7
    assert (run_dir.info()["state"], run_dir.info()["error"]) == ("failed", "torchrun exited with code 7")


def own(rank, time, reason="RuntimeError: Connection closed by peer", code=1):
    return {"time": time, "step": 5, "rank": rank, "kind": "error", "reason": reason, "exit_code": code}


def agent(rank, time, signal_number):
    from dspark_lab.runtime.launchers.agent_events import exit_status

    code, number, reason = exit_status(-signal_number)
    return {"time": time, "step": None, "rank": rank, "kind": "error", "reason": reason, "exit_code": code,
            "signal": number, "source": "agent"}


RESTART = {"time": 20.0, "step": None, "rank": None, "kind": "restart", "restart": 1}


@pytest.mark.parametrize("events, expected", [
    # the survivor failed on the closed connection; the agent saw rank 1 end (its time is torchrun's, in whole
    # seconds, after the survivor's): the killed rank is the reason, exit code 128 + 9
    ([own(0, 10.2), agent(1, 11.0, 9)], (137, "rank 1: killed by signal 9 (SIGKILL)")),
    ([own(0, 10.2), agent(1, 10.0, 11)], (139, "rank 1: killed by signal 11 (SIGSEGV)")),
    # torchrun's SIGTERM of the rank it stopped after rank 1 raised is not why
    ([own(1, 10.2, "RuntimeError: boom"), agent(0, 10.0, 15)], (1, "rank 1: RuntimeError: boom")),
    # ... nor its SIGKILL 30 s later of a rank that ignored the SIGTERM
    ([own(1, 10.2, "RuntimeError: boom"), agent(0, 41.0, 9)], (1, "rank 1: RuntimeError: boom")),
    # a SIGTERM is named when no rank said why (someone else's kill)
    ([agent(1, 10.0, 15)], (143, "rank 1: killed by signal 15 (SIGTERM)")),
    # only the last group counts: the first group's failure made torchrun restart it
    ([agent(1, 10.0, 9), own(0, 10.2), RESTART, own(1, 30.0, "RuntimeError: boom")], (1, "rank 1: RuntimeError: boom")),
])
def test_the_runs_reason_is_the_rank_that_ended_its_last_group(events, expected):
    from dspark_lab.runtime.launch import ending

    assert ending(events, "torchrun", 1) == ("failed", *expected)


def test_a_launcher_killed_by_a_signal_says_so_with_128_plus_the_signal():
    from dspark_lab.runtime.launch import ending

    assert ending([], "torchrun", -9) == ("failed", 137, "torchrun was killed by signal 9 (SIGKILL)")


def test_the_agent_names_only_the_ranks_that_said_nothing_in_their_group(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from dspark_lab.runtime.launchers.agent_events import record_failures
    from dspark_lab.runtime.records import JsonlWriter, RunDir

    run_dir = RunDir.create("20260101-000000-c0ffee", {"name": "agent"}, root=tmp_path)
    monkeypatch.setenv("DSPARK_RUN_DIR", str(run_dir.path))
    writer = JsonlWriter(run_dir.events_path)
    for event in (own(1, 1.0, "RuntimeError: an earlier group's"), RESTART, own(0, 30.0)):
        writer.write(event)
    writer.close()
    failures = {0: ProcessFailure(0, 100, 1, "<N/A>"), 1: ProcessFailure(1, 101, -9, "<N/A>"),
                2: ProcessFailure(2, 102, 0, "<N/A>"), 3: ProcessFailure(3, 103, 7, "<N/A>")}
    record_failures(failures)
    written = [(e["rank"], e["exit_code"], e["signal"], e["pid"], e["reason"]) for e in run_dir.events()[3:]]
    assert written == [(1, 137, 9, 101, "killed by signal 9 (SIGKILL)"),
                       (3, 7, None, 103, "exited with code 7 without an error of its own (os._exit, or before the "
                                         "runtime)")]


@pytest.mark.parametrize("before, failures, expected", [
    # rank 1 said why; torchrun then stopped rank 0 with SIGTERM
    ([own(1, 1.0, "RuntimeError: boom")], {0: -15},
     {0: "peer rank 1 failed first (RuntimeError: boom); here: killed by signal 15 (SIGTERM)"}),
    # rank 1 was killed silently in the same group torchrun then stopped
    ([], {1: -9, 0: -15}, {1: "killed by signal 9 (SIGKILL)",
                           0: "peer rank 1 failed first (killed by signal 9 (SIGKILL)); here: killed by signal 15 "
                              "(SIGTERM)"}),
    # a SIGTERM with no peer's failure before it (someone else's kill) says only that
    ([], {1: -15}, {1: "killed by signal 15 (SIGTERM)"}),
    # an earlier group's failure is not this group's peer
    ([own(1, 1.0, "RuntimeError: an earlier group's"), RESTART], {0: -15}, {0: "killed by signal 15 (SIGTERM)"}),
])
def test_a_rank_torchrun_stopped_after_a_peer_failed_says_which_peer(tmp_path, monkeypatch, before, failures,
                                                                     expected):
    """Before, the stopped rank's event said only "killed by signal 15 (SIGTERM)", as if that were a failure."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from dspark_lab.runtime.launchers.agent_events import record_failures
    from dspark_lab.runtime.records import JsonlWriter, RunDir

    run_dir = RunDir.create("20260101-000000-c0ffed", {"name": "agent"}, root=tmp_path)
    monkeypatch.setenv("DSPARK_RUN_DIR", str(run_dir.path))
    writer = JsonlWriter(run_dir.events_path)
    for event in before:
        writer.write(event)
    writer.close()
    record_failures({rank: ProcessFailure(rank, 100 + rank, code, "<N/A>") for rank, code in failures.items()})
    assert {e["rank"]: e["reason"] for e in run_dir.events()[len(before):]} == expected


def test_a_restart_names_the_rank_that_ended_the_group_before(tmp_path, monkeypatch):
    """Before, every restart event said only "torchrun restarted the group (restart 1): a rank had ended"."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from dspark_lab.runtime.launchers.agent_events import record_restart
    from dspark_lab.runtime.records import JsonlWriter, RunDir

    run_dir = RunDir.create("20260101-000000-c0ffef", {"name": "agent"}, root=tmp_path)
    monkeypatch.setenv("DSPARK_RUN_DIR", str(run_dir.path))
    writer = JsonlWriter(run_dir.events_path)
    writer.write(own(0, time.time()))  # the survivor said why: the closed connection
    writer.close()
    record_restart(1, {0: ProcessFailure(0, 100, 1, "<N/A>"), 1: ProcessFailure(1, 101, -9, "<N/A>")})
    killed, restart = run_dir.events()[1:]
    assert (killed["kind"], killed["rank"], killed["signal"], killed["source"]) == ("error", 1, 9, "agent")
    assert (restart["kind"], restart["rank"], restart["failed_rank"], restart["exit_code"], restart["signal"],
            restart["failed_ranks"]) == ("restart", None, 1, 137, 9, [0, 1])
    assert restart["reason"] == "restart 1: rank 1: killed by signal 9 (SIGKILL); torchrun started every rank again"
    record_restart(2)  # a restart torchrun saw no failure for (a node joined or left)
    assert run_dir.events()[-1]["reason"] == "restart 2: a rank had ended; torchrun started every rank again"


def test_ctrl_c_stops_the_run_with_exit_code_130_and_a_one_line_reason(tmp_path):
    run_dir = fake_run(tmp_path, WAITS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    supervisor = subprocess.Popen([sys.executable, "-m", "dspark_lab.runtime.launch", str(run_dir.path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  start_new_session=True, preexec_fn=terminal_sigint)
    assert supervisor.stdout.readline() == "ready\n"
    os.killpg(supervisor.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    assert supervisor.wait(timeout=60) == 130, supervisor.stderr.read()[-2000:]
    info = run_dir.info()
    assert (info["state"], info["exit_code"], info["error"]) == ("stopped", 130, "interrupted (SIGINT, Ctrl-C)")
    assert run_dir.events()[-1]["kind"] == "stop"


def test_a_forced_stop_ends_a_run_that_never_reaches_a_step_boundary(tmp_path, monkeypatch):
    from dspark_lab.runtime import commands

    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    run_dir = fake_run(tmp_path / "runs", WAITS)  # a job that never steps: no boundary for a plain stop
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    supervisor = subprocess.Popen([sys.executable, "-m", "dspark_lab.runtime.launch", str(run_dir.path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  start_new_session=True)
    assert supervisor.stdout.readline() == "ready\n"
    started = time.monotonic()
    report = commands.stop(run_dir.id, timeout=30, force=True)
    assert time.monotonic() - started < 20 and supervisor.wait(timeout=30) != 0
    assert (report.data["state"], report.data["exit_code"], report.data["forced"]) == ("stopped", 0, True)
    info = run_dir.info()
    assert info["state"] == "stopped" and info["error"].startswith("forced: dspark-lab stop --force")
    with pytest.raises(DSparkError, match="is stopped: there is nothing to stop"):
        commands.stop(run_dir.id, timeout=5, force=True)


def test_events_the_agent_cannot_write_cost_the_records_not_the_restart(tmp_path, monkeypatch, capsys):
    from dspark_lab.runtime.launchers.agent_events import record_restart

    (tmp_path / "events.jsonl").mkdir()  # a write fails as on a full or read-only disk
    monkeypatch.setenv("DSPARK_RUN_DIR", str(tmp_path))
    record_restart(1)
    assert capsys.readouterr().err.startswith(f"dspark-lab: warning: {tmp_path / 'events.jsonl'}: 1 event(s) not "
                                              "written: ")


def test_builtins_run_a_module_through_the_bootstrap_as_python_m_does(manager):
    python = launchers.get_launcher("python", manager)
    assert python.module_command("pkg.train", ["--a=1"], 1, {}) == [
        sys.executable, "-m", "dspark_lab.runtime.bootstrap", "-m", "pkg.train", "--a=1"]
    torchrun = launchers.get_launcher("torchrun", manager)
    single = torchrun.module_command("pkg.train", ["--job.config_file", "x.toml"], 2, {})
    assert single[1:3] == ["-m", "dspark_lab.runtime.launchers.loopback"] and "--nproc-per-node=2" in single
    assert single[-6:] == ["-m", "dspark_lab.runtime.bootstrap", "-m", "pkg.train", "--job.config_file", "x.toml"]
    several = torchrun.module_command("pkg.train", [], 2, {"nnodes": "2", "rdzv_id": "j", "rdzv_endpoint": "h:1"})
    assert several[1:3] == ["-m", "dspark_lab.runtime.launchers.agent"] and several[-2:] == ["-m", "pkg.train"]


def test_a_plugin_launcher_written_before_module_mode_keeps_running_scripts_and_refuses_a_module(tmp_path,
                                                                                               monkeypatch,
                                                                                               use_manager):
    """A third party's launcher implements ``command`` only: scripts run as before; ``-m`` is one line naming it."""
    from dspark_lab import hookimpl
    from dspark_lab.runtime.launch import prepare
    from dspark_lab.runtime.launchers.base import BOOTSTRAP, Launcher

    class Old(Launcher):
        name = "old"

        def validate(self, nproc, options):
            pass

        def ranks(self, nproc, options):
            return nproc

        def command(self, script, script_args, nproc, options):
            return ["ssh", "host", "python", *BOOTSTRAP, script, *script_args]

    class Plugin:
        @hookimpl
        def dspark_launchers(self):
            return [Old()]

    use_manager(make_manager([builtin, Plugin()], entry_points=False))
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    script = tmp_path / "train.py"
    script.write_text("")
    run_dir = prepare(str(script), ["--x"], launcher="old")
    assert run_dir.info()["command"] == ["ssh", "host", "python", *BOOTSTRAP, str(script), "--x"]
    with pytest.raises(DSparkError) as err:
        prepare("json.tool", launcher="old", module=True)
    assert str(err.value).startswith("-m: --launcher old runs a script's path only") and "\n" not in str(err.value)
    ran = prepare("json.tool", ["--indent", "2"], launcher="python", module=True).info()
    assert (ran["script"], ran["module"], ran["name"], ran["script_args"]) == (
        "-m json.tool", "json.tool", "json.tool", ["--indent", "2"])
    assert ran["command"][-4:] == ["-m", "json.tool", "--indent", "2"]
