"""Record readers survive damaged records (skip the line, warn once per file naming file and line, one bad run never
hides the others), and run directories are the user's alone (0700 directories, 0600 files)."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time

import pytest

from dspark_lab.errors import DSparkError
from dspark_lab.cli import build_parser
from dspark_lab.runtime import commands
from dspark_lab.runtime.jsonl import Follower, last_records
from dspark_lab.runtime.records import JsonlWriter, RunDir, read_jsonl, wait_for_end

GOOD = [{"step": 1, "rank": 0, "loss": 1.0}, {"step": 2, "rank": 0, "loss": 0.5}]
BAD_LINES = [
    b"[1, 2, 3]",                                      # JSON, not an object
    b'{"step": 1, "rank": 0, "note": "\xff\xfe"}',     # not UTF-8
    b'{"step": null, "rank": 0}',                      # step null
    b'{"step": true, "rank": 0}',                      # a bool is not a step
    b'{"rank": 0}',                                    # no step
    b'"just a string"',
    b'{"step": 3, "ra',                                # torn by a crash, then appended to
]


def write_lines(path, lines: list[bytes]) -> None:
    with open(path, "ab") as f:
        f.write(b"".join(line + b"\n" for line in lines))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    return tmp_path


def test_bad_lines_are_skipped_with_one_warning_naming_file_and_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [json.dumps(GOOD[0]).encode(), *BAD_LINES, json.dumps(GOOD[1]).encode()])
    records, offset = read_jsonl(path)
    assert records == GOOD and offset == path.stat().st_size
    [warning] = capsys.readouterr().err.splitlines()
    assert warning == (f"dspark-lab: warning: {path}:2: skipped, a JSON list, not an object; later bad lines of "
                       "this file are skipped silently")
    assert read_jsonl(path)[0] == GOOD and capsys.readouterr().err == ""  # once per file


@pytest.mark.parametrize("line, problem", [
    (BAD_LINES[1], "not UTF-8"),
    (BAD_LINES[2], "'step' is None, not int"),
    (BAD_LINES[3], "'step' is True, not int"),
    (BAD_LINES[4], "'step' is missing, not int"),
    (BAD_LINES[6], "not JSON (torn by a crash?)"),
])
def test_each_kind_of_bad_line_is_named(tmp_path, capsys, line, problem):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [json.dumps(GOOD[0]).encode(), json.dumps(GOOD[1]).encode()])
    offset = path.stat().st_size
    write_lines(path, [line])
    assert read_jsonl(path, offset) == ([], path.stat().st_size)
    assert f"{path}:3: skipped, {problem};" in capsys.readouterr().err  # line numbers count from the file's start


def test_events_may_have_no_step_but_need_a_kind(tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    supervisor_error = {"step": None, "rank": None, "kind": "error", "reason": "killed"}
    write_lines(path, [json.dumps(supervisor_error).encode(), b'{"step": 1, "rank": 0}'])
    assert read_jsonl(path)[0] == [supervisor_error]
    assert "events.jsonl:2: skipped, 'kind' is missing, not str" in capsys.readouterr().err


def test_tail_drops_the_line_its_window_cuts_without_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path)
    for step in range(1, 200):
        writer.write({"step": step, "rank": 0, "loss": 1.0})
    tail = last_records(path, 1000, max_bytes=200)
    assert tail and tail[-1]["step"] == 199 and [r["step"] for r in tail] == list(range(tail[0]["step"], 200))
    assert capsys.readouterr().err == ""
    assert last_records(tmp_path / "missing.jsonl", 5) == []


def test_last_records_skips_bad_lines_and_the_line_its_window_cuts(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [b"\xff\xfe not json", b"[1, 2]", b'{"step": 1, "rank": 0}', b'{"step": 2}',
                       b'{"step": 2, "rank": 0}'])
    with open(path, "ab") as f:
        f.write(b'{"step": 3, "ra')  # a write in progress
    assert [r["step"] for r in last_records(path, 5)] == [1, 2]
    assert [r["step"] for r in last_records(path, 1)] == [2]
    assert last_records(path, 0) == [] and last_records(tmp_path / "missing.jsonl", 3) == []
    assert "metrics.jsonl:1: skipped, not UTF-8" in capsys.readouterr().err


def test_last_records_reads_backwards_each_byte_once_and_stops_at_its_cap(tmp_path, bytes_read, capsys):
    path = tmp_path / "metrics.jsonl"
    line = json.dumps({"step": 0, "rank": 0, "pad": "p" * 200}).encode()
    junk = json.dumps({"not": "a metrics record", "pad": "p" * 2000}).encode()
    write_lines(path, [json.dumps({"step": -1, "rank": 0}).encode(), junk] * 20_000)
    write_lines(path, [line] * 3)
    size = path.stat().st_size
    assert [r["step"] for r in last_records(path, 3)] == [0, 0, 0]
    assert bytes_read[str(path)] < 80 * 1024  # a 64 KiB window (and what buffering reads ahead)
    # the skipped line deep in the file is named by its offset: its line number would take reading all before it
    at = int(re.search(r"metrics.jsonl: the line at byte (\d+): skipped", capsys.readouterr().err)[1])
    with open(path, "rb") as f:
        assert at > size - 80 * 1024 and f.seek(at) and f.readline() == junk + b"\n"
    bytes_read.clear()
    assert len(last_records(path, 20_003)) == 20_003
    assert size <= bytes_read[str(path)] < size + 64 * 1024  # windows of 64 KiB x 4^k, each byte read once
    bytes_read.clear()
    assert len(last_records(path, 20_003, max_bytes=1 << 20)) < 1000
    assert bytes_read[str(path)] < (1 << 20) + 64 * 1024


def test_a_follower_started_while_a_line_is_written_reads_that_line_once_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [json.dumps(GOOD[0]).encode()])
    with open(path, "ab") as f:
        f.write(b'{"step": 2, "rank": 0, "lo')  # a write in progress
    follower = Follower(path)  # from the end
    assert follower.poll() == []
    with open(path, "ab") as f:
        f.write(b'ss": 0.5}\n{"step": 3, "rank": 0}\n')
    assert follower.poll() == [{"step": 2, "rank": 0, "loss": 0.5}, {"step": 3, "rank": 0}]
    assert Follower(tmp_path / "new.jsonl").poll() == []  # a file not made yet is read from its start once it is


def make_run(home, run_id: str, name: str) -> RunDir:
    run = RunDir.create(run_id, {"name": name, "ranks": 1}, root=home / "runs")
    run.update_info(state="finished")
    return run


def test_one_damaged_run_does_not_break_jobs_for_all_runs(home, capsys):
    good = make_run(home, "20260101-000000-aaaaaa", "good")
    JsonlWriter(good.metrics_path).write({"step": 4, "rank": 0})
    nulls = make_run(home, "20260101-000001-bbbbbb", "nulls")
    write_lines(nulls.metrics_path, [b'{"step": null, "rank": 0}', b'{"step": 2, "rank": 0}'])
    make_run(home, "20260101-000002-cccccc", "list").run_json.write_text("[]")
    make_run(home, "20260101-000003-dddddd", "latin").run_json.write_bytes(b'{"name": "caf\xe9"}')
    badpid = make_run(home, "20260101-000004-eeeeee", "badpid")
    badpid.update_info(state="running", launcher_pid="not-a-pid", start_time="yesterday")
    JsonlWriter(badpid.metrics_path).write({"step": 1, "rank": 0})
    rows = {r["id"]: r for r in commands.jobs().data["jobs"]}
    assert len(rows) == 5
    assert (rows[good.id]["name"], rows[good.id]["state"], rows[good.id]["step"]) == ("good", "finished", 4)
    assert rows[nulls.id]["step"] == 2
    for run_id in ("20260101-000002-cccccc", "20260101-000003-dddddd"):
        assert rows[run_id]["state"] == "failed"
    assert rows[badpid.id]["state"] == "failed" and "unreadable record" in rows[badpid.id]["error"]


def test_wait_for_end_returns_the_end_state_once_written_and_none_while_the_run_stays_live(tmp_path):
    run = RunDir.create("20260101-000000-aaaaaa", {"name": "ending"}, root=tmp_path)
    run.update_info(state="running")
    assert wait_for_end(run, 0) is None
    started = time.monotonic()
    assert wait_for_end(run, 0.3) is None
    assert time.monotonic() - started >= 0.3  # it waited the time given
    threading.Timer(0.3, lambda: run.update_info(state="stopped")).start()
    started = time.monotonic()
    assert wait_for_end(run, 30) == "stopped"
    assert time.monotonic() - started < 10  # it answered once the run ended, not at the deadline
    assert wait_for_end(run, 0) == "stopped"


def test_metrics_and_events_verbs_skip_bad_lines(home, capsys):
    run = make_run(home, "20260101-000000-aaaaaa", "damaged")
    write_lines(run.metrics_path, [json.dumps(GOOD[0]).encode(), *BAD_LINES, json.dumps(GOOD[1]).encode()])
    write_lines(run.events_path, [b'{"step": 0, "rank": 0, "kind": "start"}', b"\xff", b"null"])
    assert [r["step"] for r in commands.metrics("damaged").data["metrics"]] == [1, 2]
    assert [e["kind"] for e in commands.events("damaged").data["events"]] == ["start"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "metrics.jsonl:2:" in err[0] and "events.jsonl:2: skipped, not UTF-8" in err[1]


def test_run_directory_is_0700_and_its_files_0600(tmp_path):
    old = os.umask(0)  # the most permissive umask: the modes must not depend on it
    try:
        run = RunDir.create("20260101-000000-abcdef", {"name": "private"}, root=tmp_path / "home" / "runs")
        run.update_info(state="running")
        for path in (run.events_path, run.metrics_path):
            JsonlWriter(path).write({"step": 1, "rank": 0, "kind": "start"})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "home") == mode(tmp_path / "home" / "runs") == mode(run.path) == 0o700
    assert {p.name: mode(p) for p in run.path.iterdir()} == {
        "run.json": 0o600, "token": 0o600, "events.jsonl": 0o600, "metrics.jsonl": 0o600}


def test_metrics_tail_reads_the_end_of_a_long_history_not_all_of_it(home):
    import tracemalloc

    run = make_run(home, "20260101-000000-bbbbbb", "long")
    padding = json.dumps({"step": 0, "rank": 0, "pad": "p" * 1000}).encode()
    write_lines(run.metrics_path, [padding] * 40_000 + [json.dumps(GOOD[0]).encode(), json.dumps(GOOD[1]).encode()])
    tracemalloc.start()
    try:
        records = commands.metrics("long", 2).data["metrics"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["step"] for r in records] == [1, 2]
    assert peak < 2 * 1024 * 1024, f"peak {peak} bytes to show 2 records of a 40 MB history"
    assert len(commands.metrics("long", 500).data["metrics"]) == 500  # the window grows to what is asked


def test_a_name_several_runs_share_finds_the_newest(home):
    from dspark_lab.runtime.records import find_run

    for run_id in ("20260101-000000-aaaaaa", "20260102-000000-bbbbbb", "20251231-000000-cccccc"):
        RunDir.create(run_id, {"name": "mine", "state": "finished"})
    assert find_run("mine").id == "20260102-000000-bbbbbb"


def test_the_events_table_names_what_a_pending_change_changes(home):
    # a `pending` event carries its keys in `changes` only: its row read "pending  -  -  -"
    run = make_run(home, "20260101-000000-aaaaaa", "pend")
    pending = {"step": 5, "rank": None, "kind": "pending", "key": None, "old": None, "new": None, "reason": "",
               "change_id": "c1", "changes": {"memory.activation_checkpointing": "full", "comm.grad_sync": "ring"}}
    write_lines(run.events_path, [json.dumps(pending).encode()])
    report = commands.events("pend")
    row = report.to_text().splitlines()[-1].split()
    assert row[:5] == ["5", "-", "pending", "memory.activation_checkpointing,", "comm.grad_sync"]
    assert row[5:7] == ["-", "full,"] and row[7] == "ring"
    assert report.data["events"] == [pending]  # the JSON is the record as written


def serve_policies(monkeypatch, rows: list[dict]) -> None:
    """Make every run's control endpoint answer ``GET /policies`` with ``rows`` (no job runs)."""

    class Client:
        def __init__(self, run_dir):
            pass

        def request(self, method, path):
            return {"policies": rows}

    monkeypatch.setattr(commands, "_run", lambda run: None)
    monkeypatch.setattr(commands, "ControlClient", Client)


def test_get_shows_a_pending_value_and_its_step_in_the_state_column(monkeypatch):
    # the table said "pending" and nothing of what or when (only --json had pending_value / pending_step)
    row = {"key": "memory.activation_offload", "value": "off", "since_step": 0, "state": "pending",
           "allowed": "off | host | host-fp8", "live": True, "lossless": False, "reason": None, "doc": "",
           "pending_value": "host", "pending_step": 6}
    serve_policies(monkeypatch, [row])
    for report in (commands.get("r"), commands.policies("r")):
        assert "pending: host at step 6" in report.to_text().splitlines()[-1]
        assert report.data["policies"] == [row]


def test_get_takes_several_keys_in_the_order_asked_and_prints_bools_as_set_takes_them(monkeypatch):
    # `get RUN k1 k2` was refused (one key), and a bool in force read "yes" beside `allowed: true | false`
    rows = [{"key": key, "value": value, "since_step": 0, "state": "applied", "allowed": allowed, "live": True,
             "lossless": True, "reason": None, "doc": "", "pending_value": None, "pending_step": None}
            for key, value, allowed in (("comm.grad_sync", "ring", "builtin | ring"),
                                        ("memory.reshard_after_forward", False, "true | false"),
                                        ("comm.bucket_mb", 25, "[1, 1024]"))]
    serve_policies(monkeypatch, rows)
    args = build_parser().parse_args(["get", "r", "comm.bucket_mb", "memory.reshard_after_forward"])
    report = args.func(args)
    assert [r["key"] for r in report.data["policies"]] == ["comm.bucket_mb", "memory.reshard_after_forward"]
    assert report.data["policies"][1]["value"] is False  # the JSON keeps the bool
    assert [line.split()[:2] for line in report.to_text().splitlines()[2:]] == [
        ["comm.bucket_mb", "25"], ["memory.reshard_after_forward", "false"]]
    assert len(commands.get("r").data["policies"]) == 3
    with pytest.raises(DSparkError, match=r"^key: unknown policy 'comm.ring'; known: comm.grad_sync, "
                                          r"memory.reshard_after_forward, comm.bucket_mb$"):
        commands.get("r", ["comm.grad_sync", "comm.ring"])


def test_a_run_json_overwritten_mid_run_is_restored_by_the_supervisor_with_its_name(home, tmp_path):
    """Someone overwrites run.json while the run runs: at its end the supervisor rewrites it from what it wrote, not
    from the unreadable file, so the run keeps its name, ranks and start (and is still found by name), and a
    `restore` event says run.json was unreadable and restored."""
    from dspark_lab.runtime.records import find_run, run_state

    go = tmp_path / "go"
    script = tmp_path / "waits.py"
    script.write_text("import pathlib, sys, time\n"
                      "while not pathlib.Path(sys.argv[1]).exists():\n"
                      "    time.sleep(0.05)\n")
    job = commands.launch(script, [str(go)], name="keepme", launcher="python")
    try:
        launched = job.run_dir.info()
        deadline = time.monotonic() + 120
        while job.run_dir.info().get("state") != "running":  # the supervisor's first write is done
            assert job.poll() is None and time.monotonic() < deadline, (job.run_dir.path / "output.log").read_text()
            time.sleep(0.05)
        job.run_dir.run_json.write_bytes(b"\x00garbage, not a run record")
    finally:
        go.touch()
    assert job.wait(120) == 0, (job.run_dir.path / "output.log").read_text()[-3000:]
    info = json.loads(job.run_dir.run_json.read_text())
    for key in ("id", "name", "command", "script", "start_time", "ranks", "launcher"):
        assert info[key] == launched[key], key
    assert (info["state"], info["exit_code"]) == ("finished", 0)
    assert find_run("keepme").id == job.id and run_state(job.run_dir)["state"] == "finished"
    row = next(r for r in commands.jobs().data["jobs"] if r["id"] == job.id)
    assert (row["name"], row["state"], row["ranks"], row["start_time"]) == ("keepme", "finished", 1,
                                                                            launched["start_time"])
    restored = [e for e in job.run_dir.events() if e["kind"] == "restore"]
    assert len(restored) == 1 and restored[0]["rank"] is None
    assert restored[0]["reason"].startswith("run.json unreadable: ")
    assert restored[0]["reason"].endswith("; restored from the supervisor's copy")
