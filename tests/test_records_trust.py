"""Records are trusted only in directories that are the user's own: a DSPARK_HOME, runs/ or run directory owned by
another user, or that others can write in, is refused in one line; `stop --force` signals only a process of the
user's that has the run's events.jsonl open; a run.json's `ranks` is bounded before anything is sized by it.

Foreign ownership is simulated with ``os.chown`` to uid 65534 (nobody), which needs root: those tests skip, saying
so, when not run as root."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from dspark_lab.errors import DSparkError
from dspark_lab.runtime import commands
from dspark_lab.runtime.records import MAX_RANKS, RunDir, find_run, list_runs

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="simulating another user's directory needs os.chown (root)")


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("DSPARK_HOME", str(home))
    return home


def plant(home, run_id: str = "29991231-235959-ffffff", **info) -> RunDir:
    """What another user who can write in the home does: a run directory with a run.json of their choosing."""
    path = home / "runs" / run_id
    path.mkdir(parents=True, exist_ok=True)
    (path / "run.json").write_text(json.dumps({"schema_version": 1, "id": run_id, "name": "mine", "state": "running",
                                               "ranks": 2, "start_time": time.time(), **info}))
    return RunDir(path)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@as_root
def test_a_dspark_home_owned_by_another_user_is_refused(home):
    plant(home)
    os.chown(home, NOBODY, -1)
    for read in (list_runs, lambda: find_run("mine"), commands.jobs):
        with pytest.raises(DSparkError) as exc:
            read()
        assert one_line(exc) == (f"DSPARK_HOME: refusing {home}: it is owned by uid {NOBODY}, not by you (uid 0) "
                                 "(records and control tokens are trusted only in a directory that is yours alone)")
    with pytest.raises(DSparkError, match=r"^DSPARK_HOME: refusing .* owned by uid 65534"):
        RunDir.create("20260101-000000-abcdef", {"name": "x"})
    assert not (home / "runs" / "20260101-000000-abcdef").exists()


@as_root
def test_a_runs_folder_owned_by_another_user_is_refused(home):
    plant(home)
    os.chown(home / "runs", NOBODY, -1)
    with pytest.raises(DSparkError, match=r"^runs: refusing .*/runs: it is owned by uid 65534, not by you"):
        find_run("mine")


@pytest.mark.parametrize("where", ["home", "runs"])
def test_a_home_or_runs_folder_others_can_write_in_is_refused(home, where):
    plant(home)
    os.chmod(home if where == "home" else home / "runs", 0o777)
    with pytest.raises(DSparkError) as exc:
        list_runs()
    assert "its mode is 0777: others can write in it" in one_line(exc)


def test_a_home_others_can_write_in_is_refused_by_every_reader_before_any_run_made_runs(home, tmp_path, capsys):
    """A fresh unsafe home (no runs/ yet): every reading verb refuses it with the line and exit code of `run`, and
    creates nothing in it."""
    from dspark_lab.cli import main

    os.chmod(home, 0o777)
    refusal = (f"error: DSPARK_HOME: refusing {home}: its mode is 0777: others can write in it (records and control "
               "tokens are trusted only in a directory that is yours alone)\n")
    for verb in (["jobs"], ["status", "mine"], ["stop", "mine"], ["metrics", "mine"], ["events", "mine"],
                 ["get", "mine"]):
        assert main(verb) == 2, verb
        assert capsys.readouterr().err == refusal, verb
    assert os.listdir(home) == []
    script = tmp_path / "hello.py"
    script.write_text("print('hello')\n")
    assert main(["run", "--launcher", "python", str(script)]) == 2  # the line and code the readers must match
    assert capsys.readouterr().err == refusal
    assert os.listdir(home) == []  # run refuses before it makes runs/ (docs/security.md: nothing created in it)


def test_jobs_in_a_fresh_home_of_ones_own_lists_nothing(home, capsys):
    from dspark_lab.cli import main

    assert main(["jobs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"] == []
    assert main(["jobs"]) == 0
    assert capsys.readouterr().out.split() == ["id", "name", "state", "ranks", "step", "start",
                                               "--", "----", "-----", "-----", "----", "-----"]
    assert list_runs() == [] and os.listdir(home) == []


@as_root
def test_a_run_directory_of_another_user_is_neither_listed_nor_found(home):
    ours = RunDir.create("20260101-000000-abcdef", {"name": "mine", "state": "finished"})
    theirs = plant(home)  # sorts newest: it would win the name lookup
    os.chown(theirs.path, NOBODY, -1)
    assert [r.id for r in list_runs()] == [ours.id]
    assert find_run("mine").id == ours.id
    with pytest.raises(DSparkError) as exc:
        find_run(theirs.id)
    assert one_line(exc).startswith(f"run: refusing {theirs.path}: it is owned by uid {NOBODY}")


def sleeper(**popen) -> tuple[subprocess.Popen, float]:
    """An unrelated process (not a run's), and its start time as the records would name it."""
    import psutil

    proc = subprocess.Popen(["sleep", "60"], **popen)
    return proc, psutil.Process(proc.pid).create_time()


def test_a_forced_stop_refuses_a_process_that_is_not_the_runs(home):
    victim, started = sleeper()
    try:
        plant(home, launcher_pid=victim.pid, launcher_start=started)
        os.chmod(home / "runs", 0o700)
        with pytest.raises(DSparkError) as exc:
            commands.stop("mine", timeout=5, force=True)
        assert one_line(exc).startswith(f"run: 29991231-235959-ffffff: refusing to signal pid {victim.pid}: it does "
                                        "not have the run's ")
        time.sleep(0.3)
        assert victim.poll() is None  # not signalled
    finally:
        victim.kill()
        victim.wait()


@as_root
def test_a_forced_stop_refuses_another_users_process(home):
    victim, started = sleeper(user=NOBODY)
    try:
        plant(home, launcher_pid=victim.pid, launcher_start=started)
        with pytest.raises(DSparkError) as exc:
            commands.stop("mine", timeout=5, force=True)
        assert one_line(exc) == (f"run: 29991231-235959-ffffff: refusing to signal pid {victim.pid}: it belongs to "
                                 f"uid {NOBODY}, not to you (uid 0)")
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("ranks", [1_000_000_000, MAX_RANKS + 1, 0, -3, 2.5, "8", True])
def test_a_run_json_ranks_out_of_bounds_reads_as_absent_said_once(home, capsys, ranks):
    run = plant(home, ranks=ranks)
    assert run.info()["ranks"] is None and run.info()["name"] == "mine"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run.run_json}: 'ranks' " in err
    assert err.rstrip().endswith(f"ignored; allowed: a whole number from 1 to {MAX_RANKS}")


def test_a_run_json_ranks_in_bounds_is_kept(home):
    assert plant(home, ranks=MAX_RANKS).info()["ranks"] == MAX_RANKS


def test_a_dashboard_of_a_run_json_with_a_million_ranks_builds_at_once(home):
    """A crafted ``ranks`` (in bounds for run.json) must not make `%dspark watch` draw a line per rank up front."""
    from dspark_lab.jupyter.dashboard import CHART_RANKS, RunWatch

    plant(home, ranks=1_000_000, state="finished")
    started = time.monotonic()
    watch = RunWatch("mine")
    took = time.monotonic() - started
    assert took < 10, took  # 8 ms a rank: a line per rank took minutes
    assert len(watch.charts.sources) == CHART_RANKS and watch.ranks == 1_000_000
    assert watch.summary().endswith(f"| ranks: 1000000 in run.json; the charts start with {CHART_RANKS} ranks' lines "
                                    "and add a rank's when its metrics arrive")


def test_show_of_a_run_json_with_a_million_ranks_draws_the_ranks_it_has(home):
    """``dspark-lab show`` (views.run_charts) bounds the lines it draws up front the same way."""
    from dspark_lab.views import CHART_RANKS, run_charts

    run_dir = plant(home, ranks=1_000_000, state="finished")
    started = time.monotonic()
    charts = run_charts(run_dir)
    assert time.monotonic() - started < 10 and len(charts.sources) == CHART_RANKS
