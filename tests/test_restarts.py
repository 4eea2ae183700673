"""One-node restarts under ``dspark-lab run --max-restarts``: a rank killed after a live change restarts the group
with the change in force (the loopback rendezvous gives each round its own store; the runtime keeps the first)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "runtime_fixtures" / "restart_train.py"
CLI = [sys.executable, "-m", "dspark_lab.cli"]
STEPS = 20  # of the restarted group
KEY = "memory.activation_checkpointing"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def groups_of(records: list[dict]) -> list[list[dict]]:
    """One rank's metrics split into its groups of workers (the step count starts again after a restart)."""
    groups: list[list[dict]] = []
    for record in records:
        if not groups or record["step"] <= groups[-1][-1]["step"]:
            groups.append([])
        groups[-1].append(record)
    return groups


def kill_ranks(log: Path) -> None:
    """The ranks of a hung run: torchrun starts them in sessions of their own, so killing its group misses them."""
    import psutil

    for path in log.glob("rank*.jsonl"):
        for record in read_jsonl(path):
            try:
                rank = psutil.Process(record.get("pid", -1))
                if str(SCRIPT) in rank.cmdline():
                    rank.kill()
            except (psutil.Error, ValueError):
                pass


def test_a_killed_rank_restarts_a_one_node_group_with_the_live_change_in_force(tmp_path):
    home, log = tmp_path / "home", tmp_path / "ranks"
    log.mkdir()
    env = {**os.environ, "DSPARK_HOME": str(home), "RESTART_LOG": str(log), "DSPARK_MEMORY_EVERY": "1"}
    with open(tmp_path / "output.log", "wb") as output:
        run = subprocess.Popen([*CLI, "run", "--nproc", "2", "--max-restarts", "1", "--name", "restarts", str(SCRIPT),
                                str(STEPS), "0.05"], env=env, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while sum("step" in r for r in read_jsonl(log / "rank1.jsonl")) < 3 and time.monotonic() < deadline:
            assert run.poll() is None, (tmp_path / "output.log").read_text()[-3000:]
            time.sleep(0.2)
        done = subprocess.run([*CLI, "set", "restarts", f"{KEY}=full", "--json"], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["state"] == "applied"
        try:
            code = run.wait(180)
        except subprocess.TimeoutExpired:
            raise AssertionError("the restarted group hung: " + (tmp_path / "output.log").read_text()[-3000:])
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            kill_ranks(log)
    output = (tmp_path / "output.log").read_text()
    assert code == 0, output[-3000:]
    run_dir = next((home / "runs").iterdir())
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["state"], info["exit_code"], info["error"]) == ("finished", 0, None)

    ranks = {rank: read_jsonl(log / f"rank{rank}.jsonl") for rank in (0, 1)}
    starts = {rank: [r["group"] for r in records if r.get("start")] for rank, records in ranks.items()}
    assert starts == {0: [0, 1], 1: [0, 1]}  # both ranks ran again: the group restarted once
    for rank, records in ranks.items():  # every step of the restarted group, with the change in force throughout
        second = [r for r in records if r["group"] == 1 and "step" in r]
        assert [r["step"] for r in second] == list(range(1, STEPS + 1)), rank
        assert {r["policies"][KEY] for r in second} == {"full"}, rank

    events = read_jsonl(run_dir / "events.jsonl")
    assert sorted(e["rank"] for e in events if e["kind"] == "start") == [0, 0, 1, 1]
    restarts = [i for i, e in enumerate(events) if e["kind"] == "restart"]
    assert [(events[i]["rank"], events[i]["restart"]) for i in restarts] == [(None, 1)]  # torchrun's agent says so
    restart = events[restarts[0]]  # ...and names the rank that ended the first group, and how
    assert (restart["failed_rank"], restart["exit_code"], restart["signal"]) == (1, 137, 9), restart
    assert restart["reason"].startswith("restart 1: rank 1: killed by signal 9 (SIGKILL); "), restart
    killed = [e for e in events[:restarts[0]] if e["kind"] == "error" and e.get("source") == "agent"]
    # in the first group's events; rank 0 may be there too, with torchrun's SIGTERM of the survivors (never the cause)
    assert (1, 9) in [(e["rank"], e["signal"]) for e in killed], events
    assert all(e["signal"] == 15 for e in killed if e["rank"] != 1), events
    shown = subprocess.run([*CLI, "events", "restarts"], env=env, capture_output=True, text=True, timeout=60)
    assert "restart 1: rank 1: killed by signal 9 (SIGKILL)" in shown.stdout, shown.stdout[-2000:]
    assert [e["rank"] for e in events[restarts[0]:] if e["kind"] == "start"] in ([0, 1], [1, 0])
    reapply = [e for e in events if e["kind"] == "reapply"]
    assert sorted(e["rank"] for e in reapply) == [0, 1], events
    assert all(e["changes"] == {KEY: "full"} and e["version"] == 1 and "restarted" in e["reason"] for e in reapply)
    applies = [e for e in events if e["kind"] == "apply" and e["key"] == KEY]
    assert sorted(e["rank"] for e in applies) == [0, 0, 1, 1]  # the live change, then once more in the new group

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    for rank in (0, 1):  # checkpointing really holds less for backward in the restarted group (from step 2 on)
        first, second = groups_of([m for m in metrics if m["rank"] == rank])
        before = first[0]["peak_activation_bytes"]
        assert [m["step"] for m in second] == list(range(1, STEPS + 1))
        assert all(m["peak_activation_bytes"] < before / 2 for m in second[1:]), (before, second)
