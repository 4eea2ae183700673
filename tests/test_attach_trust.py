"""A script that attaches by itself under plain torchrun takes its run directory from nothing another user can
write: not from torchrun's store (unauthenticated, and listening on every interface under --standalone), and not
from a directory that is not the user's own 0700 one under their runs root."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import plain_torchrun

from dspark_lab.errors import DSparkError
from dspark_lab.runtime import attach
from dspark_lab.runtime.records import RunDir

ROOT = Path(__file__).resolve().parent.parent
FORGED = ROOT / "tests" / "runtime_fixtures" / "attach_forged_store.py"


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("DSPARK_HOME", str(home))
    monkeypatch.delenv("DSPARK_RUN_DIR", raising=False)
    return home


@pytest.mark.slow
def test_a_run_dir_forged_in_torchruns_store_is_not_used(home, tmp_path):
    evil = tmp_path / "evil"  # the other user's directory, with a token of their choosing
    evil.mkdir(mode=0o777)
    (evil / "token").write_text("attackerTOKENattackerTOKEN123")
    done = plain_torchrun([FORGED, evil], nproc=2, timeout=240)  # tried again if gloo aborts an exit (conftest)
    dirs = dict(re.findall(r"^rank (\d) run dir (\S+)$", done.stdout, re.M))
    assert sorted(dirs) == ["0", "1"], done.stdout + done.stderr[-3000:]
    assert dirs["1"] == dirs["0"] and Path(dirs["0"]).parent == home / "runs", dirs
    assert sorted(os.listdir(evil)) == ["token"]  # no events, metrics or heartbeat written there
    events = RunDir(Path(dirs["0"])).events()
    assert sorted(e["rank"] for e in events if e["kind"] == "start") == [0, 1]
    assert done.returncode == 0, done.stderr[-3000:]


def attach_env(monkeypatch, rank: int, **extra: str) -> None:
    for key, value in {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29999", "TORCHELASTIC_RUN_ID": "none", **extra}.items():
        monkeypatch.setenv(key, value)


def test_every_rank_derives_the_same_run_id_and_a_restart_a_new_one(home, monkeypatch):
    attach_env(monkeypatch, 0)
    first = attach._shared_run_id(2)
    attach_env(monkeypatch, 1)
    assert attach._shared_run_id(2) == first
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", first)
    attach_env(monkeypatch, 1, TORCHELASTIC_RESTART_COUNT="1")
    assert attach._shared_run_id(2) != first
    attach_env(monkeypatch, 1, MASTER_PORT="29998")
    assert attach._shared_run_id(2) != first


def test_several_nodes_need_a_rendezvous_id(home, monkeypatch):
    attach_env(monkeypatch, 3, LOCAL_WORLD_SIZE="1", WORLD_SIZE="4")
    with pytest.raises(DSparkError, match=r"^attach: a run of several nodes needs torchrun's --rdzv-id"):
        attach._shared_run_id(4)
    attach_env(monkeypatch, 3, LOCAL_WORLD_SIZE="1", TORCHELASTIC_RUN_ID="job7")
    assert attach._shared_run_id(4) == "rdzv-job7"


def test_a_rank_waits_for_rank_0s_directory_and_checks_it(home, monkeypatch):
    monkeypatch.setattr(attach, "ATTACH_WAIT_S", 0.3)
    with pytest.raises(DSparkError, match=r"^attach: rank 0 did not create the run directory .*/runs/x within 0.3 s"):
        attach._await_run_dir(home / "runs" / "x")
    made = RunDir.create("20260101-000000-abcdef", {"name": "r"})
    assert attach._await_run_dir(made.path).path == made.path
    os.chmod(made.path, 0o755)
    with pytest.raises(DSparkError, match=r"^attach: refusing .*abcdef: its mode is 0755, not 0700"):
        attach._await_run_dir(made.path)


@pytest.mark.parametrize("where", ["outside", "symlink"])
def test_a_dspark_run_dir_outside_the_runs_root_is_refused(home, tmp_path, monkeypatch, where):
    outside = RunDir.create("20260101-000000-abcdef", {"name": "r"}, root=tmp_path / "elsewhere").path
    path = outside
    if where == "symlink":
        path = home / "runs" / "20260101-000000-fedcba"
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.symlink_to(outside)
    monkeypatch.setenv("DSPARK_RUN_DIR", str(path))
    with pytest.raises(DSparkError, match=rf"^DSPARK_RUN_DIR: refusing {re.escape(str(path))}: it is not a "
                                          rf"directory right under {re.escape(str(home / 'runs'))} "):
        attach._own_run_dir("x", {})
