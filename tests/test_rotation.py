"""metrics.jsonl rotates at DSPARK_METRICS_MAX_MB and keeps at most rotation.KEEP moved files; its readers (the
tail, --follow, the dashboards' feed, read_all) read across a rotation, losing and repeating nothing, also while
several processes append to it (runtime/rotation.py). Every test first checks that the file did rotate."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from dspark_lab.cli import main as cli_main
from dspark_lab.errors import DSparkError
from dspark_lab.runtime import commands, rotation
from dspark_lab.runtime.jsonl import Follower, last_records
from dspark_lab.runtime.records import RunDir
from dspark_lab.views import RunFeed

MIB = 1 << 20
PAD = "p" * 10_000  # about 100 records per MiB


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    monkeypatch.setenv(rotation.MAX_MB_ENV, "1")
    return RunDir.create("20260101-000000-0a0a0a", {"name": "rotating", "ranks": 1}, root=tmp_path / "runs")


def record(step: int, rank: int = 0) -> dict:
    return {"step": step, "rank": rank, "pad": PAD}


def moved(run) -> list[str]:
    return sorted(p.name for p in run.path.glob("metrics.*.jsonl"))


def steps(records) -> list[int]:
    return [r["step"] for r in records]


def test_metrics_rotate_at_the_bound_and_keep_at_most_keep_moved_files(run):
    writer = run.metrics_writer()
    step = 0
    while not moved(run):
        size = run.metrics_path.stat().st_size if run.metrics_path.exists() else 0
        assert size < MIB, "passed the bound without rotating"
        step += 1
        writer.write(record(step))
    first = run.path / "metrics.1.jsonl"
    assert MIB <= first.stat().st_size < MIB + 11_000  # moved by the append that passed the bound
    assert run.metrics_path.stat().st_size == 0  # a new one started
    assert steps(json.loads(line) for line in first.read_text().splitlines()) == list(range(1, step + 1))
    while step < 700:  # about 7 MiB
        step += 1
        writer.write(record(step))
    assert moved(run) == ["metrics.1.jsonl", "metrics.2.jsonl", "metrics.3.jsonl"] and rotation.KEEP == 3
    for age in (1, 2, 3):
        assert MIB <= (run.path / f"metrics.{age}.jsonl").stat().st_size < MIB + 11_000
    kept = steps(run.metrics())  # oldest first, without a gap, up to the last record written
    assert kept == list(range(kept[0], 701)) and 300 < len(kept) < 420


def test_tail_reads_into_the_moved_files_when_the_current_holds_fewer(run, bytes_read):
    writer = run.metrics_writer()
    for step in range(1, 260):  # 2 rotations, then a few records in the new file
        writer.write(record(step))
    assert moved(run) == ["metrics.1.jsonl", "metrics.2.jsonl"]
    current = steps(json.loads(line) for line in run.metrics_path.read_text().splitlines())
    assert 0 < len(current) < 100
    assert steps(last_records(run.metrics_path, 150)) == list(range(110, 260))
    assert steps(commands.metrics("rotating", 150).data["metrics"]) == list(range(110, 260))
    assert steps(last_records(run.metrics_path, 10_000)) == list(range(1, 260))  # all that is kept
    bytes_read.clear()
    capped = last_records(run.metrics_path, 10_000, max_bytes=MIB + MIB // 2)
    assert 120 < len(capped) < 160 and steps(capped)[-1] == 259
    assert sum(bytes_read.values()) < 2 * MIB  # the cap holds across files


def test_follow_across_rotations_returns_every_record_once(run):
    writer = run.metrics_writer()
    for step in range(1, 51):
        writer.write(record(step))
    follower = Follower(run.metrics_path)  # from the end
    everything = Follower(run.metrics_path, lookback=None)  # from the oldest kept file, as the dashboards read
    seen, seen_all, step = [], [], 50
    for batch in (30, 80, 5, 150, 1, 250, 60):  # polls between rotations, and after one, two and three of them
        for _ in range(batch):
            step += 1
            writer.write(record(step))
        seen += steps(follower.poll())
        seen_all += steps(everything.poll())
    assert moved(run) == ["metrics.1.jsonl", "metrics.2.jsonl", "metrics.3.jsonl"]
    assert seen == list(range(51, step + 1))
    assert seen_all == list(range(1, step + 1))
    feed = RunFeed(run)  # a dashboard opened now shows what is kept
    assert steps(feed.poll()[0]) == steps(run.metrics()) and steps(run.metrics())[-1] == step


def test_metrics_follow_prints_each_record_once_across_a_rotation(run, capsys):
    import psutil

    writer = run.metrics_writer()
    for step in range(1, 91):
        writer.write(record(step))
    me = psutil.Process()
    run.update_info(state="running", launcher_pid=me.pid, launcher_start=me.create_time())

    def train():
        for step in range(91, 400):  # 3 rotations while it follows
            writer.write(record(step))
            if step % 50 == 0:
                time.sleep(0.3)
        run.update_info(state="finished")

    trainer = threading.Timer(0.5, train)  # once the command follows (else its tail starts later: checked below)
    trainer.start()
    try:
        assert cli_main(["metrics", "rotating", "--follow", "--tail", "5", "--json"]) == 0
    finally:
        trainer.join()
    assert moved(run) == ["metrics.1.jsonl", "metrics.2.jsonl", "metrics.3.jsonl"]
    printed = [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()]
    assert printed == list(range(printed[0], 400)) and 86 <= printed[0] < 300


WRITER = """
import os, sys, time
from dspark_lab.runtime.records import RunDir
path, rank, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
writer = RunDir(path).metrics_writer()
while not os.path.exists(os.path.join(path, "go")):
    time.sleep(0.001)
for step in range(count):
    writer.write({"step": step, "rank": rank, "pad": "p" * 5000})
    time.sleep(0.001)
"""


def test_ranks_appending_to_one_file_lose_and_repeat_nothing_when_it_rotates(run):
    follower = Follower(run.metrics_path, lookback=None)
    ranks = [subprocess.Popen([sys.executable, "-c", WRITER, str(run.path), str(rank), "150"]) for rank in range(4)]
    time.sleep(1.0)  # the interpreters start
    (run.path / "go").touch()
    seen = []
    while any(p.poll() is None for p in ranks):
        seen += follower.poll()
        time.sleep(0.005)
    assert [p.returncode for p in ranks] == [0, 0, 0, 0]
    seen += follower.poll()
    assert len(moved(run)) == 2  # about 3 MiB: two rotations, nothing dropped yet
    kept = run.metrics()
    switches = sum(a["rank"] != b["rank"] for a, b in zip(kept, kept[1:]))
    assert switches > 50, "the ranks did not write at the same time"
    for records in (kept, seen):
        for rank in range(4):
            assert [r["step"] for r in records if r["rank"] == rank] == list(range(150)), rank
    assert [(r["step"], r["rank"]) for r in seen] == [(r["step"], r["rank"]) for r in kept]
    sizes = [(run.path / name).stat().st_size for name in moved(run)]
    # past the bound, at most the slack (where a rotation waits for the lock) and one append per rank
    assert all(MIB <= size < MIB + MIB // rotation.SLACK + 4 * 5100 for size in sizes), sizes


def test_a_rotation_that_cannot_get_the_lock_lets_the_step_go_on_until_the_slack_then_waits(run):
    held = os.open(run.path, os.O_RDONLY)  # another rank's append in flight, for as long as the test says
    fcntl.flock(held, fcntl.LOCK_SH)
    writer = run.metrics_writer()
    slack_end = MIB + MIB // rotation.SLACK
    step = 0
    while step == 0 or run.metrics_path.stat().st_size < slack_end - 11_000:
        step += 1
        writer.write(record(step))  # past the bound: the rotation does not wait, the step goes on
    assert not moved(run) and run.metrics_path.stat().st_size > MIB
    release = threading.Timer(0.5, os.close, [held])
    started = time.monotonic()
    release.start()
    while not moved(run) and step < 1000:
        step += 1
        writer.write(record(step))
    waited = time.monotonic() - started
    release.join()
    assert moved(run) == ["metrics.1.jsonl"], f"still not rotated {step} records on"
    assert slack_end <= (run.path / "metrics.1.jsonl").stat().st_size < slack_end + 11_000
    assert waited >= 0.4  # the append past the slack waited for the lock


@pytest.mark.parametrize("value", ["0", "abc", str((1 << 20) + 1), "-5", "1.5"])
def test_a_bad_bound_is_one_line_naming_the_variable(value, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(rotation.MAX_MB_ENV, value)
    with pytest.raises(DSparkError, match=rf"^DSPARK_METRICS_MAX_MB: '{value}' is not allowed; allowed: a whole "
                                          r"number of MiB in \[1, 1048576\]$"):
        rotation.max_bytes()
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    script = tmp_path / "train.py"
    script.write_text("print('never runs')\n")
    assert cli_main(["run", str(script)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DSPARK_METRICS_MAX_MB" in err[0]
    assert not (tmp_path / "runs").exists()  # refused before anything was launched


def test_the_default_bound_is_256_mib(monkeypatch):
    monkeypatch.delenv(rotation.MAX_MB_ENV, raising=False)
    assert rotation.max_bytes() == 256 * MIB
