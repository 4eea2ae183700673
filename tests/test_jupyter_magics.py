"""``%dspark`` through a real IPython shell (``run_line_magic`` / ``run_cell``), as ipyparallel tests its magics.

Verbs that need a live run get the command model swapped for a recorder (the transport), so the parsing, dispatch and
error handling under test are the shipped ones; tests/test_notebooks.py drives the real runtime.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from dspark_lab import commands
from dspark_lab.runtime import commands as runtime_commands
from dspark_lab.errors import PolicyError, RunNotFound
from dspark_lab.jupyter import magics
from dspark_lab.output import Report


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


def test_help_lists_every_verb(ip, capsys):
    usage = ip.run_line_magic("dspark", "")
    assert [r["verb"] for r in usage.rows] == list(magics.VERBS)
    ip.run_line_magic("dspark", "set -h")
    assert "KEY=VALUE" in capsys.readouterr().out


def test_verbs_pass_their_arguments(ip, recorder):
    for name in ("jobs", "status", "get", "set_policies", "stop", "metrics"):
        recorder(name)
    ip.run_line_magic("dspark", "jobs")
    ip.run_line_magic("dspark", "status r1")
    ip.run_line_magic("dspark", "get r1")
    ip.run_line_magic("dspark", "get r1 comm.grad_sync")
    ip.run_line_magic("dspark", "set r1 memory.activation_checkpointing=full comm.grad_sync=ring")
    ip.run_line_magic("dspark", "set --no-wait --timeout 5 r1 a.b=1")
    ip.run_line_magic("dspark", "stop r1")
    assert recorder.calls == [
        ("jobs", (), {}),
        ("status", ("r1",), {}),
        ("get", ("r1", None), {}),
        ("get", ("r1", "comm.grad_sync"), {}),
        ("set_policies", ("r1", ["memory.activation_checkpointing=full", "comm.grad_sync=ring"]),
         {"wait": True, "timeout": 60.0}),
        ("set_policies", ("r1", ["a.b=1"]), {"wait": False, "timeout": 5.0}),
        ("stop", ("r1",), {}),
    ]


def test_run_parses_script_arguments_and_policies(ip, recorder):
    class Job:
        id = "r9"

    recorder("launch", result=Job())
    job = ip.run_line_magic("dspark", "run --nproc 2 --policy memory.activation_checkpointing=full "
                                      "--policy comm.grad_sync=ring --no-dashboard train.py --steps 5 --lr 0.1")
    assert job.id == "r9"
    assert recorder.calls[-1] == ("launch", ("train.py", ["--steps", "5", "--lr", "0.1"]),
                                  {"nproc": 2, "policies": ("memory.activation_checkpointing=full",
                                                            "comm.grad_sync=ring"), "name": None})


def test_cell_run_writes_the_body_as_the_script(ip, recorder, tmp_path):
    class Job:
        id = "r10"

    recorder("launch", result=Job())
    body = "import dspark_lab\nprint('training')\n"
    ip.run_cell_magic("dspark", "run --nproc 2 --name cellrun --no-dashboard -- --steps 3", body)
    name, (script, args), kwargs = recorder.calls[-1]
    assert Path(script).read_text() == body and Path(script).is_relative_to(tmp_path)
    assert args == ["--steps", "3"] and kwargs["nproc"] == 2 and kwargs["name"] == "cellrun"


def test_in_a_terminal_watch_policies_and_devices_print_text(ip, recorder, capsys):
    recorder("metrics", result=Report("metrics", {"metrics": []}, rows=[{"step": 3}], columns=("step",)))
    recorder("policies")
    assert ip.run_line_magic("dspark", "watch r1") is None
    assert capsys.readouterr().out.splitlines()[0].strip() == "step"
    assert ip.run_line_magic("dspark", "policies r1").kind == "policies"
    devices = ip.run_line_magic("dspark", "devices")
    assert devices.kind == "devices" and devices.rows[0]["backend"] == "cpu"


@pytest.mark.parametrize("line, message", [
    ("bogus", "verb: unknown 'bogus'; allowed: backends | kernels"),
    ("status", "the following arguments are required: run"),
    ("run --nproc 0 x.py", "nproc: must be at least 1, got 0"),
    ("run --nproc two x.py", "argument --nproc: invalid int value: 'two'"),
    ("run", "script: give a script path"),
    ("watch r1 --hz 100", "hz: must be within [0.05, 20], got 100"),
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


def test_only_run_takes_a_cell_body(ip):
    with pytest.raises(UsageError, match="only `%%dspark run` takes a cell body"):
        ip.run_cell_magic("dspark", "jobs", "x = 1")
