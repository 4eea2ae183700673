"""The CLI: --json shapes (schema_version, kind, keys), text output, and the one-line error path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_lab import cli, commands
from dspark_lab.output import SCHEMA_VERSION
from dspark_lab.plugins import make_manager, reset_manager

BACKEND_KEYS = {"name", "vendor", "plugin", "available", "devices", "reason", "torch_device", "collectives", "specs",
                "topology"}
ROOT = Path(__file__).resolve().parents[1]
SPEC_KEYS = {"bf16_tflops", "fp8_tflops", "memory_gb", "memory_bandwidth_gb_s", "link_gb_s", "source"}


def run_json(capsys, *argv) -> dict:
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def builtin_manager(builtin_plugins, use_manager):
    return use_manager(make_manager(builtin_plugins, entry_points=False))


def test_backends_json(builtin_manager, capsys):
    doc = run_json(capsys, "backends")
    assert (doc["schema_version"], doc["kind"]) == (SCHEMA_VERSION, "backends")
    rows = {row["name"]: row for row in doc["backends"]}
    assert {"cpu", "nvidia-a100", "nvidia-h100", "nvidia-h200", "nvidia-b200", "amd-mi300x"} <= set(rows)
    for row in rows.values():
        assert set(row) == BACKEND_KEYS and SPEC_KEYS <= set(row["specs"])
        assert isinstance(row["available"], bool) and isinstance(row["reason"], str)
    assert rows["cpu"]["available"] is True and "ring" in rows["cpu"]["collectives"]
    assert rows["nvidia-h100"]["specs"]["link_gb_s"] == 450 and rows["nvidia-h100"]["plugin"].endswith("nvidia")


def test_backends_text(builtin_manager, capsys):
    assert cli.main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "vendor", "plugin", "available", "bf16_tflops", "memory_gb", "link_gb_s",
                                "topology", "reason"]
    assert any(line.startswith("nvidia-h100 ") and " 989.4 " in line for line in lines)


def test_doctor_json_reports_plugin_problems_with_hints(builtin_plugins, fixture_plugin, use_manager, capsys):
    use_manager(make_manager([*builtin_plugins, fixture_plugin("raises_in_hook"), fixture_plugin("unknown_hook")],
                             entry_points=False))
    doc = run_json(capsys, "doctor")
    assert (doc["schema_version"], doc["kind"]) == (SCHEMA_VERSION, "doctor")
    checks = {c["check"]: c for c in doc["checks"]}
    assert {"torch", "cuda", "nvml", "cupy", "nvcc", "jupyterlab", "ipywidgets", "plugin dspark_lab.backends.cpu"} \
        <= set(checks)
    assert all(set(c) == {"check", "status", "detail", "hint"} for c in doc["checks"])
    assert all(c["hint"] for c in doc["checks"] if c["status"] != "ok"), "every problem carries a fix hint"
    problems = [c for c in doc["checks"] if c["status"] == "problem"]
    assert doc["problems"] == len(problems) == 2
    assert {c["check"] for c in problems} == {"plugin dspark_fixture_raises_in_hook",
                                              "plugin dspark_fixture_unknown_hook"}
    assert any("vendor library crashed" in c["detail"] for c in problems)


@pytest.mark.parametrize("argv, message", [
    (["frobnicate"], "error: dspark-lab: argument COMMAND: invalid choice: 'frobnicate'"),
    (["backends", "--colour"], "error: dspark-lab: unrecognized arguments: --colour"),
])
def test_usage_error_is_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(message)


def test_dspark_error_from_a_command_is_one_line(use_manager, monkeypatch, capsys):
    manager = use_manager(make_manager([], entry_points=False))
    monkeypatch.setattr(commands, "backends", lambda: manager.backend("nvidia-h100"))  # no plugin registers it
    assert cli.main(["backends", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: backend: unknown backend 'nvidia-h100'; registered: none\n"


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "usage: dspark-lab" in capsys.readouterr().out


def test_example_plugin_seen_by_backends(example_plugin_paths, monkeypatch, capsys):
    monkeypatch.delenv("DSPARK_PLUGINS", raising=False)
    reset_manager()
    try:
        doc = run_json(capsys, "backends")
    finally:
        reset_manager()
    gaudi = next(row for row in doc["backends"] if row["name"] == "intel-gaudi3")
    assert (gaudi["plugin"], gaudi["vendor"], gaudi["available"]) == ("gaudi3", "intel", False)
    assert gaudi["specs"]["bf16_tflops"] == 1835 and gaudi["specs"]["link_gb_s"] == 600
    assert "hl-smi" in gaudi["reason"]


def test_installed_console_entry_sees_every_backend(example_plugin_paths):
    """A fresh process, as a user runs it: built-ins and the example plugin through the entry-point group."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*example_plugin_paths, os.environ.get("PYTHONPATH", "")])}
    env.pop("DSPARK_PLUGINS", None)
    out = subprocess.run([sys.executable, "-m", "dspark_lab", "backends", "--json"], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout
    names = {row["name"]: row["plugin"] for row in json.loads(out)["backends"]}
    assert {"cpu": "cpu", "nvidia-h100": "nvidia", "amd-mi300x": "amd", "intel-gaudi3": "gaudi3"}.items() \
        <= names.items()


def write_metrics(home, steps, state="finished"):
    from dspark_lab.runtime.records import JsonlWriter, RunDir

    run = RunDir.create("20260101-000000-f0110e", {"name": "followed"}, root=home / "runs")
    run.update_info(state=state)
    writer = JsonlWriter(run.metrics_path)
    for step in steps:
        writer.write({"step": step, "rank": 0, "step_time_s": 0.25, "loss": 1.0 / step})
    return run


def test_metrics_follow_prints_a_header_and_honours_tail(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    write_metrics(tmp_path, range(1, 8))
    assert cli.main(["metrics", "followed", "--follow", "--tail", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "rank", "step_time_s", "loss", "peak_activation_bytes", "comm_s",
                                "samples_per_s"]
    assert [line.split()[:4] for line in lines[1:]] == [["6", "0", "0.25", "0.1667"], ["7", "0", "0.25", "0.1429"]]
    assert cli.main(["metrics", "followed", "--follow", "--tail", "3", "--json"]) == 0
    assert [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()] == [5, 6, 7]
    assert cli.main(["metrics", "followed", "--follow", "--tail", "0", "--json"]) == 0
    assert capsys.readouterr().out == ""


def test_metrics_follow_prints_records_appended_while_the_run_lives(tmp_path, monkeypatch, capsys):
    import threading

    import psutil

    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    run = write_metrics(tmp_path, [1, 2, 3], state="running")
    me = psutil.Process()
    run.update_info(launcher_pid=me.pid, launcher_start=me.create_time())

    def finish():
        from dspark_lab.runtime.records import JsonlWriter

        writer = JsonlWriter(run.metrics_path)
        for step in (4, 5):
            writer.write({"step": step, "rank": 0})
        run.update_info(state="finished")

    timer = threading.Timer(1.0, finish)
    timer.start()
    try:
        assert cli.main(["metrics", "followed", "--follow", "--tail", "1", "--json"]) == 0
    finally:
        timer.cancel()
    assert [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()] == [3, 4, 5]


@pytest.mark.parametrize("argv", [["jobs"], ["events", "followed"], ["metrics", "followed", "--follow", "--tail", "5"]])
def test_a_reader_that_closed_the_pipe_ends_the_verb_quietly_with_status_141(tmp_path, argv):
    write_metrics(tmp_path, range(1, 8))
    env = {**os.environ, "DSPARK_HOME": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-m", "dspark_lab", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    child.stdout.close()  # before the child prints its first line: `| true`
    err = child.stderr.read().decode()
    assert (child.wait(timeout=120), err) == (141, "")  # 128 + SIGPIPE, no traceback


@pytest.mark.parametrize("argv, message", [
    (["metrics", "x", "--tail", "-3"], "argument --tail: must be an integer in [0, 100000], got '-3'"),
    (["metrics", "x", "--tail", "1e9"], "argument --tail: must be an integer in [0, 100000], got '1e9'"),
    (["run", "--nproc", "5000", "x.py"], "argument --nproc/--nproc-per-node: must be an integer in [1, 1024]"),
])
def test_sizes_are_bounded(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.slow
def test_run_json_prints_one_object_with_id_state_exit_code_and_run_dir(tmp_path):
    script = tmp_path / "hello.py"
    script.write_text("print('hello from the script')\n")
    done = subprocess.run([sys.executable, "-m", "dspark_lab", "run", "--json", "--name", "hello", str(script)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DSPARK_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout[done.stdout.index("{\n"):])
    assert (doc["schema_version"], doc["kind"], doc["state"], doc["exit_code"]) == (SCHEMA_VERSION, "run",
                                                                                     "finished", 0)
    assert doc["run_dir"] == str(tmp_path / "home" / "runs" / doc["id"])
    assert json.loads((tmp_path / "home" / "runs" / doc["id"] / "run.json").read_text())["name"] == "hello"


def test_a_failed_run_says_which_rank_and_why_in_its_last_line_and_its_json(tmp_path, monkeypatch, capsys):
    # the last line of a failed run (after torchrun's own dump) said only "failed (exit code 3)"; the reason was in
    # run.json alone
    from dspark_lab.runtime import launch
    from dspark_lab.runtime.records import RunDir

    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    script = tmp_path / "train.py"
    script.write_text("")
    run_dir = RunDir.create("20260101-000000-abcdef", {"name": "f", "ranks": 2, "state": "running"})

    def supervise(run_dir):
        run_dir.update_info(state="failed", exit_code=3, error="rank 1: script exited with 3")
        return 3

    monkeypatch.setattr(launch, "prepare", lambda *args, **kwargs: run_dir)
    monkeypatch.setattr(launch, "supervise", supervise)
    assert cli.main(["run", "--json", "--nproc", "2", str(script)]) == 3
    out, err = capsys.readouterr()
    assert err.rstrip().splitlines()[-1] == ("dspark-lab: run 20260101-000000-abcdef failed (exit code 3): "
                                            "rank 1: script exited with 3")
    doc = json.loads(out)
    assert (doc["state"], doc["exit_code"], doc["error"]) == ("failed", 3, "rank 1: script exited with 3")


def test_run_takes_torchruns_standalone_as_the_one_node_run_it_already_is(tmp_path, monkeypatch, capsys):
    # `torchrun --standalone --nproc-per-node=2 train.py` is the usual one-node command; `dspark-lab run` refused
    # it ("unrecognized arguments: --standalone"). One node runs on the loopback rendezvous anyway (docs/runtime.md)
    from dspark_lab.runtime import launch
    from dspark_lab.runtime.records import RunDir

    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    script = tmp_path / "train.py"
    script.write_text("")
    run_dir = RunDir.create("20260101-000000-abcdef", {"name": "s", "ranks": 2, "state": "running"})
    seen = []
    monkeypatch.setattr(launch, "prepare", lambda *args, **kwargs: seen.append(kwargs) or run_dir)
    monkeypatch.setattr(launch, "supervise", lambda run_dir: 0)
    assert cli.main(["run", "--standalone", "--nproc-per-node", "2", str(script)]) == 0
    assert cli.main(["run", "--nproc-per-node", "2", str(script)]) == 0
    assert seen[0] == seen[1]  # the same launch as without it
    capsys.readouterr()
    for argv, message in ((["--standalone", "--nnodes", "2"], "--standalone: one node on this machine; it cannot "
                           "go with --nnodes 2"),
                          (["--standalone", "--rdzv-endpoint", "h:29400"], "--standalone: one node on this "
                           "machine; it cannot go with --rdzv-endpoint h:29400"),
                          (["--standalone", "--launcher", "python"], "--standalone: a torchrun option; "
                           "--launcher python takes none (use --launcher torchrun)")):
        assert cli.main(["run", *argv, str(script)]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert len(seen) == 2


@pytest.mark.parametrize("variable, value, message", [
    ("DSPARK_MEMORY_EVERY", "x", "DSPARK_MEMORY_EVERY: 'x' is not allowed; allowed: an integer in [1, 100000]"),
    ("DSPARK_LOSS_READ", "soon", "DSPARK_LOSS_READ: 'soon' is not allowed; allowed: auto | late"),
])
def test_run_refuses_a_bad_step_variable_in_one_line_before_any_rank_starts(tmp_path, monkeypatch, capsys,
                                                                            variable, value, message):
    # every rank died of it instead, and the run said "rank 0: exited with code 1 without an error of its own"
    from dspark_lab.runtime import launch

    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    monkeypatch.setenv(variable, value)
    script = tmp_path / "train.py"
    script.write_text("")
    monkeypatch.setattr(launch, "prepare", lambda *args, **kwargs: pytest.fail("launched"))
    assert cli.main(["run", str(script)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


# --- module mode: `dspark-lab run -m MODULE ARGS` (torchrun's -m) ---------------------------------------------------

def _refused_in_one_line(argv, message, tmp_path, monkeypatch, capsys):
    """``dspark-lab ARGV`` exits 2 with one ``error:`` line holding ``message``, and no run was created."""
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "home" / "runs").exists() or not any((tmp_path / "home" / "runs").iterdir())


@pytest.mark.parametrize("argv, message", [
    (["run", "-m", "train.py", "--lr", "1"], "-m: 'train.py' is a script's path, not a module's name: give a "
                                             "script, or -m and a module, not both"),
    (["run", "--nproc", "2", "--module", "./pkg/train"], "-m: './pkg/train' is a script's path"),
    (["run", "--nproc", "2", "-m"], "-m: give the module's name, then its own arguments"),
    (["run", "-m", "pkg.2train"], "-m: 'pkg.2train' is not a module's name"),
    (["k8s", "manifest", "--image", "img", "--nodes", "1", "-m", "train.py"], "-m: 'train.py' is a script's path"),
])
def test_run_refuses_a_script_and_a_module_both_or_a_module_without_a_name(argv, message, tmp_path, monkeypatch,
                                                                          capsys):
    (tmp_path / "train.py").write_text("")
    _refused_in_one_line(argv, message, tmp_path, monkeypatch, capsys)


def test_run_refuses_a_module_that_does_not_exist_before_any_rank_starts(tmp_path, monkeypatch, capsys):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    _refused_in_one_line(["run", "--nproc", "2", "-m", "no_such_module_xyz.train", "--steps", "3"],
                         "-m: no module named 'no_such_module_xyz'", tmp_path, monkeypatch, capsys)
    _refused_in_one_line(["run", "--nproc", "2", "-m", "mypkg.nope"], "-m: no module named 'mypkg.nope'", tmp_path,
                         monkeypatch, capsys)
    _refused_in_one_line(["run", "-m", "mypkg"], "-m: 'mypkg' is a package and has no __main__ module", tmp_path,
                         monkeypatch, capsys)


def test_a_module_is_found_without_importing_it_or_its_packages(tmp_path, monkeypatch):
    """``torchtitan/__init__.py`` imports torch: the CLI finds ``torchtitan.train`` by its finders alone."""
    from dspark_lab.runtime.program import find_module

    package = tmp_path / "heavy_pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "sub" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "sub" / "train.py").write_text("raise RuntimeError('imported')\n")
    (package / "__main__.py").write_text("")
    monkeypatch.chdir(tmp_path)  # where python -m (and a rank) looks first
    assert find_module("heavy_pkg.sub.train") == str(package / "sub" / "train.py")
    assert find_module("heavy_pkg") == str(package / "__main__.py")  # a package runs its __main__
    assert not any(name.startswith("heavy_pkg") for name in sys.modules)


def test_an_unknown_module_is_refused_without_importing_torch(tmp_path):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "dspark_lab", "run", "--nproc", "2", "-m",
                           "torch.no_such_module_xyz"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "DSPARK_HOME": str(tmp_path / "home")})
    last = done.stderr.splitlines()[-1]
    assert done.returncode == 2 and last == "error: -m: no module named 'torch.no_such_module_xyz'", done.stderr[-500:]
    loaded = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in loaded


def test_every_word_after_the_module_is_the_modules_own_as_under_torchrun_m():
    args = cli.build_parser().parse_args(["run", "--nproc", "2", "-m", "torchtitan.train", "--job.config_file",
                                          "X.toml", "--nproc", "4", "-m", "x"])
    assert (args.module, args.script, args.nproc) == (True, "torchtitan.train", 2)
    assert args.script_args == ["--job.config_file", "X.toml", "--nproc", "4", "-m", "x"]
    script = cli.build_parser().parse_args(["run", "train.py", "-m", "x"])  # a script's -m is the script's own
    assert (script.module, script.script, script.script_args) == (False, "train.py", ["-m", "x"])


@pytest.mark.slow
def test_run_m_finds_and_runs_a_module_from_the_current_directory_as_python_m_does(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "__init__.py").write_text("")
    (tmp_path / "mine" / "__main__.py").write_text(
        "import json, sys\nopen('ran.json', 'w').write(json.dumps([__name__, sys.argv]))\n")
    done = subprocess.run([sys.executable, "-m", "dspark_lab", "run", "--json", "--launcher", "python", "-m", "mine",
                           "--json", "-x"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "DSPARK_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "ran.json").read_text()) == ["__main__", [str(tmp_path / "mine" / "__main__.py"),
                                                                            "--json", "-x"]]
    doc = json.loads(done.stdout[done.stdout.index("{\n"):])
    info = json.loads((Path(doc["run_dir"]) / "run.json").read_text())
    assert (info["script"], info["name"], info["script_args"]) == ("-m mine", "mine", ["--json", "-x"])
