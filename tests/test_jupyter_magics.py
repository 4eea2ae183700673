"""``%dspark`` through a real IPython shell (``run_line_magic`` / ``run_cell``), as ipyparallel tests its magics.

Verbs that need a live run get the command model swapped for a recorder (the transport), so the parsing, dispatch and
error handling under test are the shipped ones; tests/test_notebooks.py drives the real runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import time
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from dspark_lab import commands
from dspark_lab.cli import build_parser
from dspark_lab.runtime import commands as runtime_commands
from dspark_lab.errors import PolicyError, RunNotFound
from dspark_lab.jupyter import magics
from dspark_lab.output import SCHEMA_VERSION, Report
from dspark_lab.runtime.records import JsonlWriter, RunDir


@pytest.fixture(scope="module")
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "dspark_lab")
    return shell


@pytest.fixture
def recorder(monkeypatch, tmp_path):
    """Replace the runtime verbs of the command model with ones that record their arguments."""
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    calls = []

    def fake(name, result=None, error=None):
        def verb(*args, **kwargs):
            calls.append((name, args, kwargs))
            if error:
                raise error
            return result if result is not None else Report(name, {"args": list(args)})
        monkeypatch.setattr(runtime_commands, name, verb, raising=False)

    fake.calls = calls
    return fake


def test_table_verbs_return_the_same_report_as_the_cli(ip):
    report = ip.run_line_magic("dspark", "backends")
    assert isinstance(report, Report) and report.kind == "backends"
    assert report.to_dict()["backends"] == commands.backends().to_dict()["backends"]
    assert "<table" in report._repr_html_() and "cpu" in repr(report)  # HTML in a notebook, text in a terminal
    assert ip.run_line_magic("dspark", "doctor").kind == "doctor"
    assert ip.run_line_magic("dspark", "kernels").kind == "kernels"


def cli_verbs() -> list[str]:
    """Every verb of the dspark-lab parser, read from the parser itself."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_help_lists_every_cli_verb_and_the_widget_verbs(ip, capsys):
    assert ip.run_line_magic("dspark", "") is None
    listing = capsys.readouterr().out
    for verb in [*cli_verbs(), "watch", "devices"]:
        assert verb in listing
    ip.run_line_magic("dspark", "set -h")
    out = capsys.readouterr().out
    assert "usage: %dspark set" in out and "KEY=VALUE" in out and "--no-wait" in out


def arguments(parser: argparse.ArgumentParser) -> list[tuple]:
    """What a parser accepts: each argument's option strings, destination, count, type and default."""
    return [(tuple(a.option_strings), a.dest, a.nargs, getattr(a.type, "__name__", a.type), a.default)
            for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]


def subparser(parser: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]


@pytest.mark.parametrize("verb", cli_verbs())
def test_every_cli_verb_is_a_magic_with_the_cli_arguments(ip, verb, capsys):
    """The magic parses a verb with the CLI's own arguments (run adds only the dashboard switch)."""
    ours, theirs = arguments(subparser(magics.magic_parser(), verb)), arguments(subparser(build_parser(), verb))
    if verb == "run":
        assert [a for a in ours if a not in theirs] == [(("--no-dashboard",), "no_dashboard", 0, None, False)]
        ours = [a for a in ours if a in theirs]
    assert ours == theirs
    assert ip.run_line_magic("dspark", f"{verb} -h") is None
    assert f"usage: %dspark {verb}" in capsys.readouterr().out


def test_verbs_pass_their_arguments(ip, recorder):
    for name in ("jobs", "status", "get", "set_policies", "stop", "metrics", "events", "show"):
        recorder(name)
    ip.run_line_magic("dspark", "jobs")
    ip.run_line_magic("dspark", "status r1")
    ip.run_line_magic("dspark", "get r1")
    ip.run_line_magic("dspark", "get r1 comm.grad_sync")
    ip.run_line_magic("dspark", "set r1 memory.activation_checkpointing=full comm.grad_sync=ring")
    ip.run_line_magic("dspark", "set --no-wait --timeout 5 r1 a.b=1")
    ip.run_line_magic("dspark", "stop r1")
    ip.run_line_magic("dspark", "metrics r1 --tail 3")
    ip.run_line_magic("dspark", "events r1")
    ip.run_line_magic("dspark", "show r1 --html 'my charts.html'")
    assert recorder.calls == [
        ("jobs", (), {}),
        ("status", ("r1",), {}),
        ("get", ("r1", []), {}),
        ("get", ("r1", ["comm.grad_sync"]), {}),
        ("set_policies", ("r1", ["memory.activation_checkpointing=full", "comm.grad_sync=ring"]),
         {"wait": True, "timeout": 60.0}),
        ("set_policies", ("r1", ["a.b=1"]), {"wait": False, "timeout": 5.0}),
        ("stop", ("r1",), {"timeout": 60.0, "force": False}),
        ("metrics", ("r1", 3), {}),
        ("events", ("r1",), {}),
        ("show", ("r1", "my charts.html"), {}),
    ]


def test_verbs_the_old_magics_lacked_run_for_real(ip, tmp_path, monkeypatch):
    """schedule, moe and metrics: the CLI's verbs answer through %dspark with the CLI's reports."""
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    report = ip.run_line_magic("dspark", "schedule simulate 1f1b --ranks 4 --microbatches 8")
    assert report.kind == "schedule.simulate"
    cli_doc = build_parser().parse_args(["schedule", "simulate", "1f1b", "--ranks", "4", "--microbatches", "8"])
    assert report.to_dict() == cli_doc.func(cli_doc).to_dict()
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps([[90, 10, 10, 10, 5, 5, 5, 5]]))
    doc = ip.run_line_magic("dspark", f"moe balance --loads {loads} --replicas 12 --groups 4 --nodes 1 --gpus 4 --json")
    assert (doc["kind"], doc["schema_version"]) == ("moe.balance", SCHEMA_VERSION)
    run = RunDir.create("20260101-000000-abcdef", {"name": "old"}, root=tmp_path / "runs")
    run.update_info(state="finished")
    writer = JsonlWriter(run.metrics_path)
    for step in range(1, 6):
        writer.write({"step": step, "rank": 0, "step_time_s": 0.5})
    assert [r["step"] for r in ip.run_line_magic("dspark", "metrics old --tail 2").rows] == [4, 5]
    assert ip.run_line_magic("dspark", "jobs --json")["jobs"][0]["id"] == run.id


def test_run_parses_script_arguments_and_policies(ip, recorder):
    class Job:
        id = "r9"

    recorder("launch", result=Job())
    job = ip.run_line_magic("dspark", "run --nproc 2 --policy memory.activation_checkpointing=full "
                                      "--policy comm.grad_sync=ring --no-dashboard --nnodes 1 --master-port 29511 "
                                      "train.py --steps 5 --lr 0.1")
    assert job.id == "r9"
    name, args, kwargs = recorder.calls[-1]
    assert (name, args) == ("launch", ("train.py", ["--steps", "5", "--lr", "0.1"]))
    options = kwargs.pop("options")
    assert kwargs == {"nproc": 2, "policies": ("memory.activation_checkpointing=full", "comm.grad_sync=ring"),
                      "name": None, "launcher": None, "module": False}
    assert options["nnodes"] == "1" and options["master_port"] == "29511" and options["rdzv_endpoint"] is None


def test_cell_run_writes_the_body_as_the_script(ip, recorder, tmp_path):
    class Job:
        id = "r10"

    recorder("launch", result=Job())
    body = "import dspark_lab\nprint('training')\n"
    ip.run_cell_magic("dspark", "run --nproc 2 --name cellrun --no-dashboard -- --steps 3", body)
    name, (script, args), kwargs = recorder.calls[-1]
    assert Path(script).read_text() == body and Path(script).is_relative_to(tmp_path)
    assert args == ["--steps", "3"] and kwargs["nproc"] == 2 and kwargs["name"] == "cellrun"


def test_a_cell_script_and_the_folders_it_creates_are_private_whatever_the_umask(ip, recorder, tmp_path,
                                                                                 monkeypatch):
    """Notebook training code may hold credentials: under umask 000 the old code made DSPARK_HOME and scripts/
    0777 and the script 0666."""
    class Job:
        id = "r11"

    home = tmp_path / "fresh-home"
    monkeypatch.setenv("DSPARK_HOME", str(home))
    recorder("launch", result=Job())
    old = os.umask(0)
    try:
        ip.run_cell_magic("dspark", "run --nproc 1 --no-dashboard", "TOKEN = 'secret'\n")
    finally:
        os.umask(old)
    script = Path(recorder.calls[-1][1][0])
    assert script.read_text() == "TOKEN = 'secret'\n"
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in (home, home / "scripts", script)}
    assert modes == {home: 0o700, home / "scripts": 0o700, script: 0o600}
    assert [p.name for p in (home / "scripts").iterdir()] == [script.name]  # no temporary file left


def test_in_a_terminal_watch_policies_and_devices_print_text(ip, recorder, capsys):
    recorder("metrics", result=Report("metrics", {"metrics": []}, rows=[{"step": 3}], columns=("step",)))
    recorder("policies")
    assert ip.run_line_magic("dspark", "watch r1") is None
    assert capsys.readouterr().out.splitlines()[0].strip() == "step"
    assert ip.run_line_magic("dspark", "policies r1").kind == "policies"
    devices = ip.run_line_magic("dspark", "devices")
    assert devices.kind == "devices" and devices.rows[0]["backend"] == "cpu"


@pytest.mark.parametrize("line, message", [
    ("bogus", "argument COMMAND: invalid choice: 'bogus' (choose from 'backends', 'kernels'"),
    ("status", "%dspark status: the following arguments are required: run"),
    ("run --nproc 0 x.py", "argument --nproc/--nproc-per-node: must be an integer in [1, 1024], got '0'"),
    ("run --nproc two x.py", "argument --nproc/--nproc-per-node: must be an integer in [1, 1024], got 'two'"),
    ("run", "script: required: the script to run"),
    ("metrics r1 --tail -1", "argument --tail: must be an integer in [0, 100000], got '-1'"),
    ("watch r1 --hz 100", "hz: must be within [0.05, 20], got 100"),
    ("devices --hz 0", "hz: must be within [0.05, 20], got 0"),
    ("status 'r1", "line: No closing quotation"),
])
def test_user_mistakes_are_one_usage_line(ip, line, message):
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("dspark", line)
    assert message in str(info.value) and "\n" not in str(info.value).strip()


def test_command_errors_become_usage_errors_without_traceback(ip, recorder, capsys):
    recorder("status", error=RunNotFound("run: no run matches 'zz'; see `dspark-lab jobs`"))
    recorder("set_policies", error=PolicyError("comm.grad_sync: 'x' is not allowed; allowed: ddp | ring"))
    result = ip.run_cell("%dspark status zz")
    assert isinstance(result.error_in_exec, UsageError)
    result = ip.run_cell("%dspark set r1 comm.grad_sync=x")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        "UsageError: run: no run matches 'zz'; see `dspark-lab jobs`",
        "UsageError: comm.grad_sync: 'x' is not allowed; allowed: ddp | ring",
    ]


def test_run_takes_a_module_as_the_cli_does_and_a_cell_is_a_script_not_a_module(ip, recorder):
    class Job:
        id = "r11"

    recorder("launch", result=Job())
    ip.run_line_magic("dspark", "run --nproc 2 --no-dashboard -m torchtitan.train --job.config_file x.toml")
    name, args, kwargs = recorder.calls[-1]
    assert args == ("torchtitan.train", ["--job.config_file", "x.toml"]) and kwargs["module"] is True
    with pytest.raises(UsageError, match="the cell is the script; give a script or -m and a module, not both"):
        ip.run_cell_magic("dspark", "run --nproc 2 -m pkg.train", "x = 1")


def test_only_run_takes_a_cell_body(ip):
    with pytest.raises(UsageError, match="only `%%dspark run` takes a cell body"):
        ip.run_cell_magic("dspark", "jobs", "x = 1")


NANOGPT = Path(__file__).resolve().parent / "real_jobs" / "nanogpt_train.py"


@pytest.mark.slow
def test_run_with_the_python_launcher_then_status_and_profile_through_the_magics(ip, tmp_path, monkeypatch):
    """nanoGPT's shape through `%dspark run --launcher python` (no torchrun variables reach it, even when the
    shell has some), its job through `%dspark status`, and two profiled steps through `%dspark profile`."""
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    monkeypatch.setenv("RANK", "3")  # a shell left with torchrun's variables must not make it a DDP run
    monkeypatch.setenv("WORLD_SIZE", "4")
    job = ip.run_line_magic("dspark", f"run --launcher python --no-dashboard --name nano {NANOGPT} "
                                      "--device=cpu --compile=False --max_iters=400 --step_sleep=0.05")
    try:
        deadline = time.monotonic() + 120
        while not any(m["step"] >= 3 for m in job.run_dir.metrics()) and time.monotonic() < deadline:
            assert job.poll() is None, (job.run_dir.path / "output.log").read_text()[-2000:]
            time.sleep(0.2)
        status = {r["field"]: r["value"] for r in ip.run_line_magic("dspark", f"status {job.id}").rows}
        assert status["blocks"] == "3 x Block at model.transformer.h" and status["data parallel"] == "none"
        report = ip.run_line_magic("dspark", f"profile {job.id} --steps 2 --wait --timeout 120")
        assert report.kind == "profile" and len(report.data["files"]) == 1
        assert report.data["analysis"]["ranks"][0]["compute_ms"] > 0
        ip.run_line_magic("dspark", f"stop {job.id}")
        assert job.wait(60) == 0
    finally:
        if job.poll() is None:
            job.process.kill()
            job.process.wait()
    info = job.run_dir.info()
    assert info["launcher"] == "python" and info["state"] == "stopped"
    assert "ddp=False" in (job.run_dir.path / "output.log").read_text().splitlines()


def test_a_closed_widget_is_forgotten_so_its_data_can_go(monkeypatch):
    import ipywidgets

    import IPython.display

    from dspark_lab.jupyter import magics

    monkeypatch.setattr(IPython.display, "display", lambda *objects: None)
    monkeypatch.setattr(magics, "OPEN", [])
    kept, closed = ipywidgets.HTML("kept"), ipywidgets.HTML("closed")
    magics._display_widget(kept)
    magics._display_widget(closed)
    closed.close()  # what a view's close button does
    assert magics.OPEN == [kept]
    assert magics.close_all() == 1 and magics.OPEN == [] and kept.comm is None
