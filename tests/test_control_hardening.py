"""The control endpoint's limits and replies, in process: a one-rank Job trains on a thread behind a real
ControlServer on loopback, and every request goes over real HTTP. Multi-rank cases are in test_control_live.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn as nn

from dspark_lab import hookimpl
from dspark_lab.cli import main as cli_main
from dspark_lab.plugins import make_manager
from dspark_lab.policy import PolicySpec
from dspark_lab.runtime import commands, control, limits, liveness
from dspark_lab.runtime.attach import Job
from dspark_lab.runtime.coordinator import StopRun
from dspark_lab.runtime.records import RunDir, find_run, run_state


class KnobPlugin:
    """``test.knob``: applies, except the value ``fail``, whose apply raises (so the change rolls back)."""

    @hookimpl
    def dspark_register_policies(self):
        return [PolicySpec(key="test.knob", type="enum", choices=("a", "b", "fail"), default="a", doc="a knob")]

    @hookimpl
    def dspark_apply_policy(self, job, key, value, old):
        if key != "test.knob":
            return None
        if value == "fail":
            raise RuntimeError("this knob breaks on purpose")
        return ""


class LiveJob:
    """A Job with a ControlServer, stepping on a thread every ``period`` s while ``running`` is set."""

    def __init__(self, run_dir: RunDir, period: float = 0.01, paused: bool = False):
        from dspark_lab.backends import cpu
        from dspark_lab.runtime.policies import builtin

        manager = make_manager([cpu, builtin, KnobPlugin()], entry_points=False)
        self.job = Job(run_dir, rank=0, world=1, manager=manager)
        self.job.server = control.ControlServer(self.job)
        self.run_dir, self.period = run_dir, period
        self.running = threading.Event()
        self._between = threading.Condition()  # guards ``held``: the thread waits for ``running`` between two steps
        self.held = False
        if not paused:
            self.running.set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self):
        block = lambda: nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))  # noqa: E731
        model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(*[block() for _ in range(4)]), nn.Linear(8, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        try:
            while not self.stopped.is_set():
                with self._between:  # running is read here, under the lock pause() clears it under
                    while not self.running.is_set() and not self.stopped.is_set():
                        self.held = True
                        self._between.notify_all()
                        self._between.wait(0.02)
                    self.held = False
                if self.stopped.is_set():
                    break
                model(torch.randn(2, 4)).sum().backward()
                optimizer.step()
                self.job.on_step_end(optimizer)
                time.sleep(self.period)
        except StopRun:
            pass
        finally:
            self.stopped.set()

    def pause(self, timeout: float = 20) -> None:
        """Hold the job between two steps, and return once it is held (a step under way ends first; on a loaded
        machine that can take longer than any fixed sleep)."""
        with self._between:
            self.running.clear()
            assert self._between.wait_for(lambda: self.held, timeout), "the job did not stop between two steps"

    def wait_step(self, step: int, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while self.job.step < step:
            assert time.monotonic() < deadline, f"step {step} not reached"
            time.sleep(0.01)

    def close(self):
        self.stopped.set()
        self.running.set()
        self.thread.join(10)
        self.job.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One job for the tests that leave it training; ``fresh`` gives a test its own, to stop or end."""
    root = tmp_path_factory.mktemp("control_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSPARK_HOME", str(root))
        job = LiveJob(RunDir.create("20260101-000000-c0c0c0", {"name": "inproc"}, root=root / "runs"))
        job.wait_step(2)
        yield job
        job.close()


@pytest.fixture
def fresh(home):
    job = LiveJob(RunDir.create("20260101-000000-c0c0c1", {"name": "fresh"}, root=home / "runs"))
    job.wait_step(2)
    yield job
    job.close()


def wait_until(condition, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def url_of(live) -> str:
    endpoint = liveness.read_endpoint(live.run_dir.path)
    return f"http://{endpoint['host']}:{endpoint['port']}"


def call(live, method, path, data=None, headers=None, token=True, timeout=10):
    """(status, parsed body, raw body) of one request; never raises for an HTTP status."""
    hdrs = {"Authorization": f"Bearer {live.run_dir.token()}"} if token else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url_of(live) + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw), raw
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw), raw


def raw_request(live, payload: bytes, timeout=10) -> bytes:
    endpoint = liveness.read_endpoint(live.run_dir.path)
    with socket.create_connection((endpoint["host"], endpoint["port"]), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def set_body(changes, **extra) -> bytes:
    return json.dumps({"changes": changes, **extra}).encode()


# --- authentication and 4xx answers -----------------------------------------------------------------------------


def test_token_is_accepted_only_with_the_bearer_prefix(live):
    token = live.run_dir.token()
    for header in (token, f"bearer {token}", f"Basic {token}", f"Bearer{token}", f"Bearer {token}x"):
        status, body, _ = call(live, "GET", "/status", headers={"Authorization": header}, token=False)
        assert status == 401 and "token" in body["error"], header
    assert call(live, "GET", "/status")[0] == 200


@pytest.mark.parametrize("path", ["/metrics?tail=abc", "/metrics?tail=0", "/metrics?tail=-3", "/metrics?tail=1001",
                                  "/metrics?tail=1e3", "/metrics?tail=%ff", "/metrics?a&&==",
                                  "/metrics?tail=%C2%B2", "/metrics?tail=%D9%A3", "/metrics?tail=" + "9" * 2000])
def test_bad_query_values_answer_400_in_one_line(live, path):
    status, body, raw = call(live, "GET", path)
    assert status == 400 and b"\n" not in raw and body["error"].startswith("tail:" if "tail" in path else "request:")


@pytest.mark.parametrize("header", [b"abc", b"-1", b"1.5", b"1 2", b"\xb2", "\u0663".encode(), b"9" * 4400])
def test_bad_content_length_answers_400(live, header):
    reply = raw_request(live, f"POST /set HTTP/1.0\r\nAuthorization: Bearer {live.run_dir.token()}\r\n".encode()
                        + b"Content-Length: " + header + b"\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.0 400") and b'"error": "Content-Length:' in reply


def test_a_body_shorter_than_announced_answers_408(live, monkeypatch):
    monkeypatch.setattr(limits, "REQUEST_DEADLINE_S", 0.5)
    reply = raw_request(live, f"POST /set HTTP/1.0\r\nAuthorization: Bearer {live.run_dir.token()}\r\n"
                              f"Content-Length: 12\r\n\r\n{{}}".encode())
    assert reply.startswith(b"HTTP/1.0 408")


@pytest.mark.parametrize("timeout", ["inf", "nan", "-1", "0", "3601", "soon", "true"])
def test_request_timeout_must_be_finite_and_positive(live, timeout):
    value = json.loads(timeout) if timeout in ("true",) else timeout
    events_before, knob = len(live.run_dir.events()), live.job.policies["test.knob"]
    status, body, _ = call(live, "POST", "/set", set_body({"test.knob": "fail" if knob != "fail" else "a"},
                                                          timeout=value))
    assert status == 400 and body["error"].startswith("timeout:")
    status, body, _ = call(live, "POST", "/set", b'{"changes": {"test.knob": "b"}, "timeout": Infinity}')
    assert status == 400 and "Infinity" in body["error"]
    assert len(live.run_dir.events()) == events_before  # nothing was queued
    assert live.job.policies["test.knob"] == knob


def test_unknown_methods_and_paths_get_one_line_4xx(live):
    for method, path, code in (("PUT", "/set", 405), ("DELETE", "/status", 405), ("GET", "/nope", 404),
                               ("BREW", "/status", 405), ("POST", "/status", 405)):
        status, body, raw = call(live, method, path, data=b"{}" if method != "GET" else None)
        assert status == code and b"\n" not in raw, (method, path, status)
    reply = raw_request(live, b"GARBAGE\r\n\r\n")  # http.server answers a request line this bad as HTTP/0.9
    assert json.loads(reply)["error"].startswith("request: Bad request syntax") and b"\n" not in reply
    reply = raw_request(live, b"GET /status HTTP/1.0\r\n" + b"X-Big: " + b"h" * 70000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 431") and reply.split(b"\r\n\r\n", 1)[1].count(b"\n") == 0


@pytest.fixture
def server_reads(live, monkeypatch):
    """Bytes the control server read from its connections (socket reads on sockets bound to its port), by any
    thread, read-ahead included: what a request made rank 0 take in."""
    port = liveness.read_endpoint(live.run_dir.path)["port"]
    reads = []
    real_readinto = socket.SocketIO.readinto

    def counting_readinto(self, buffer):
        count = real_readinto(self, buffer)
        try:
            if count and self._sock.getsockname()[1] == port:
                reads.append(count)
        except OSError:
            pass
        return count

    monkeypatch.setattr(socket.SocketIO, "readinto", counting_readinto)
    return reads


def send_and_read(live, payload: bytes) -> bytes:
    """What the server answers while ``payload`` is still being sent (it may stop reading and close early)."""
    endpoint = liveness.read_endpoint(live.run_dir.path)
    with socket.create_connection((endpoint["host"], endpoint["port"]), timeout=10) as sock:
        def send():
            try:
                sock.sendall(payload)
            except OSError:  # the server answered and closed before reading it all: what is checked
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        sender.join(10)
    return b"".join(chunks)


@pytest.mark.parametrize("lines, size", [(98, 65000), (40, 300), (limits.MAX_HEADERS + 1, 10)])
def test_an_oversized_header_block_gets_431_after_reading_only_its_bound(live, server_reads, lines, size):
    """hdrspam's request (98 lines of 65 KB, no token) cost rank 0 6.4 MB read and parsed under its GIL before
    the 401; now it reads at most the bounds (plus one buffer of read-ahead) and answers 431 in one line."""
    payload = (b"GET /status HTTP/1.1\r\nHost: x\r\n" + (b"X-A: " + b"a" * size + b"\r\n") * lines + b"\r\n")
    reply = send_and_read(live, payload)
    status_line, _, body = reply.partition(b"\r\n\r\n")
    assert status_line.startswith(b"HTTP/1.0 431") and b"\n" not in body, reply[:200]
    assert json.loads(body)["error"].startswith("request: headers over the bound")
    assert sum(server_reads) <= limits.MAX_REQUEST_LINE + limits.MAX_HEADER_BYTES + 8192, sum(server_reads)


def test_a_long_request_line_gets_414_after_reading_only_its_bound(live, server_reads):
    reply = send_and_read(live, b"GET /metrics?tail=" + b"1" * 200_000 + b" HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 414") and b"request line" in reply
    assert sum(server_reads) <= limits.MAX_REQUEST_LINE + 8192, sum(server_reads)


def test_a_head_within_the_bounds_is_served(live):
    filler = {f"X-F{i}": "f" * 100 for i in range(limits.MAX_HEADERS - 6)}  # urllib adds Host, Connection, ...
    status, body, _ = call(live, "GET", "/status", headers=filler)
    assert status == 200 and body["step"] >= 1


# --- sizes ----------------------------------------------------------------------------------------------------


def test_an_oversized_body_is_refused_unread_and_nothing_is_logged(live):
    size_before = live.run_dir.events_path.stat().st_size
    big = set_body({"test.knob": "x" * (limits.MAX_BODY_BYTES + 10)})
    status, body, _ = call(live, "POST", "/set", big)
    assert status == 413 and str(limits.MAX_BODY_BYTES) in body["error"]
    long_value = set_body({"test.knob": "y" * 5000})
    status, body, _ = call(live, "POST", "/set", long_value)
    assert status == 400 and len(body["error"]) < 200
    many = set_body({f"test.k{i}": "a" for i in range(limits.MAX_KEYS + 1)})
    assert call(live, "POST", "/set", many)[0] == 400
    assert live.run_dir.events_path.stat().st_size == size_before
    assert live.thread.is_alive()


def test_a_refused_value_is_logged_once_and_truncated(live):
    value = "z" * 250  # under the request bound, still refused by the schema
    status, body, _ = call(live, "POST", "/set", set_body({"test.knob": value}))
    assert status == 400 and "\n" not in body["error"]
    lines = [line for line in live.run_dir.events_path.read_text().splitlines() if "zzzz" in line]
    assert len(lines) == 1  # once, and cut: the reason to 300 characters, the value to LOG_CHARS (not 2 x 250)
    assert lines[0].count("z") <= 300 + limits.LOG_CHARS and len(lines[0]) < 1000


def test_metrics_tail_reads_the_end_of_the_file_not_all_of_it(live, bytes_read):
    live.wait_step(5)
    with open(live.run_dir.metrics_path, "rb") as f:
        expected = [json.loads(line) for line in f.read().splitlines()[-3:]]
    status, body, _ = call(live, "GET", "/metrics?tail=3")
    assert status == 200 and [r["step"] for r in body["metrics"]][-1] >= expected[-1]["step"]
    # a history of 40 MB: the endpoint must not read it whole inside rank 0. What it read is counted per file (not
    # by tracemalloc, which also counts whatever the job's other threads allocate meanwhile).
    live.pause()
    padding = json.dumps({"step": -1, "rank": 0, "pad": "p" * 1000}) + "\n"
    with open(live.run_dir.metrics_path, "a") as f:
        f.write(padding * 40_000)
        f.write(json.dumps({"step": 10**6, "rank": 0}) + "\n")
    bytes_read.clear()
    try:
        status, body, _ = call(live, "GET", "/metrics?tail=2")
    finally:
        live.running.set()
    assert status == 200 and [r["step"] for r in body["metrics"]] == [-1, 10**6]
    read = bytes_read[str(live.run_dir.metrics_path)]
    assert 0 < read < 256 * 1024, f"read {read} bytes of a 40 MB history to serve a tail of 2"


def test_metrics_tail_reads_at_most_its_cap_when_the_end_holds_no_records(live, bytes_read):
    """The endpoint's window grows until it holds the records asked, but never past limits.MAX_TAIL_BYTES."""
    live.pause()
    junk = json.dumps({"note": "not a metrics record: no step, no rank", "pad": "p" * 1000}) + "\n"
    with open(live.run_dir.metrics_path, "a") as f:
        f.write(junk * (2 * limits.MAX_TAIL_BYTES // len(junk)))
    bytes_read.clear()
    try:
        status, body, _ = call(live, "GET", "/metrics?tail=5")
    finally:
        live.running.set()
    assert status == 200 and body["metrics"] == []
    read = bytes_read[str(live.run_dir.metrics_path)]
    assert limits.MAX_TAIL_BYTES // 2 < read <= limits.MAX_TAIL_BYTES + 128 * 1024, read  # + read-ahead


# --- connections ----------------------------------------------------------------------------------------------


def open_connections(live, count: int) -> list[socket.socket]:
    endpoint = liveness.read_endpoint(live.run_dir.path)
    return [socket.create_connection((endpoint["host"], endpoint["port"]), timeout=10) for _ in range(count)]


def trickle(sock: socket.socket, data: bytes, every_s: float, stop: threading.Event) -> None:
    """Send ``data`` one byte every ``every_s`` seconds (well inside any idle timeout) until told to stop."""
    for byte in data:
        if stop.wait(every_s):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # the server closed the connection: what is checked
            return


def read_all(sock: socket.socket, timeout: float = 5) -> bytes:
    """What the server sends until it closes the connection."""
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


@pytest.mark.parametrize("part", ["head", "body"])
def test_a_client_trickling_its_request_gets_408_within_the_deadline_while_the_owner_is_served(live, monkeypatch,
                                                                                               part):
    """Before, a request trickled one byte at a time (each inside the 10 s idle timeout, the whole within the size
    bounds) held a handler thread for as long as it went on: 8 KiB of headers at one byte every 9 s is 20 hours."""
    monkeypatch.setattr(limits, "REQUEST_DEADLINE_S", 1.0)
    token = live.run_dir.token()
    head = b"GET /status HTTP/1.0\r\n" + b"X-Slow: " + b"s" * 200 + b"\r\n\r\n"
    if part == "body":
        head = f"POST /set HTTP/1.0\r\nAuthorization: Bearer {token}\r\nContent-Length: 300\r\n\r\n".encode()
    (sock,), stop = open_connections(live, 1), threading.Event()
    started = time.monotonic()
    if part == "body":
        sock.sendall(head)
    sender = threading.Thread(target=trickle, args=(sock, head if part == "head" else b" " * 300, 0.05, stop))
    sender.start()
    try:
        status, body, _ = call(live, "GET", "/status", timeout=5)  # the owner, meanwhile
        assert status == 200 and time.monotonic() - started < 1.0
        knob = "b" if live.job.policies["test.knob"] != "b" else "a"
        status, body, _ = call(live, "POST", "/set", set_body({"test.knob": knob}, timeout=5), timeout=10)
        assert status == 200 and body["state"] == "applied"
        reply = read_all(sock)
        took = time.monotonic() - started
    finally:
        stop.set()
        sender.join(5)
        sock.close()
    assert reply.startswith(b"HTTP/1.0 408") and took < 2.5, (reply[:120], took)
    error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
    assert error.startswith("request: did not arrive in full within 1 s") and "\n" not in error


def test_a_silent_connection_gets_408_at_the_deadline(live, monkeypatch):
    monkeypatch.setattr(limits, "REQUEST_DEADLINE_S", 0.5)
    (sock,) = open_connections(live, 1)
    with sock:
        sock.sendall(b"GET /status HTTP/1.0\r\n")  # ...and never the rest
        started = time.monotonic()
        assert sock.recv(100).startswith(b"HTTP/1.0 408")
        assert time.monotonic() - started < 3


def test_connections_without_a_request_cannot_lock_out_the_owner(live):
    """Before, 64 connections that sent nothing (each held up to the 10 s idle timeout, then reopened) answered
    every owner's request 503 for as long as they were held. Now a new connection closes the oldest one still
    waiting for its head (503 to it), and the threads serving connections stay at most MAX_CONNECTIONS."""
    idle = open_connections(live, 2 * limits.MAX_CONNECTIONS)
    try:
        time.sleep(0.3)
        assert handler_threads() <= limits.MAX_CONNECTIONS
        started = time.monotonic()
        status, body, _ = call(live, "GET", "/status", timeout=5)
        assert status == 200 and time.monotonic() - started < 2, (status, body)
        reply = read_all(idle[0])  # the oldest made room
        assert reply.startswith(b"HTTP/1.0 503") and b"busy: closed to make room" in reply, reply[:200]
    finally:
        for sock in idle:
            sock.close()
    assert handler_threads() <= limits.MAX_CONNECTIONS
    assert control._Server.request_queue_size >= 128


def test_connections_whose_requests_arrived_are_never_closed_and_more_get_503(home, monkeypatch):
    monkeypatch.setattr(limits, "MAX_CONNECTIONS", 3)
    job = LiveJob(RunDir.create("20260101-000000-c0c0c2", {"name": "full"}, root=home / "runs"), paused=True)
    try:  # three owner's requests wait (for a first step that does not come) and hold every connection
        waiting = [threading.Thread(target=call, args=(job, "POST", "/set", set_body({"test.knob": "b"}, timeout=2)),
                                    daemon=True) for _ in range(3)]
        for thread in waiting:
            thread.start()
        wait_until(lambda: job.job.server._server.requests == 3)
        started = time.monotonic()
        status, body, _ = call(job, "GET", "/status", timeout=5)
        assert status == 503 and body["error"] == "busy: too many connections" and time.monotonic() - started < 2
        for thread in waiting:
            thread.join(10)
        assert call(job, "GET", "/status")[0] == 200  # and it recovers
    finally:
        job.close()


# --- replies and exit codes -----------------------------------------------------------------------------------


def test_set_exit_codes_say_applied_rolled_back_timed_out_and_refused(fresh, capsys):
    run = fresh.run_dir.id
    assert cli_main(["set", run, "test.knob=b"]) == 0
    assert fresh.job.policies["test.knob"] == "b" and "applied at step" in capsys.readouterr().out
    assert cli_main(["set", run, "test.knob=fail", "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["state"] == "rolled_back" and "breaks on purpose" in out["reason"] and out["exit_code"] == 3
    fresh.pause()  # a rank that does not step: nothing can apply
    assert cli_main(["set", run, "test.knob=a", "--timeout", "0.5"]) == 4
    assert "timed out" in capsys.readouterr().out
    fresh.running.set()
    assert cli_main(["set", run, "test.knob=nonsense"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "1e9"])
def test_cli_timeout_must_be_finite(home, value, capsys):
    for verb in (["set", "somerun", "a.b=1"], ["stop", "somerun"]):
        assert cli_main([*verb, "--timeout", value]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --timeout") and err.count("\n") == 1 and "Traceback" not in err


def test_a_change_after_a_stop_is_refused_with_the_reason_and_stop_agrees_with_its_events(fresh):
    fresh.pause()  # hold the job between two boundaries, as when both arrive within one step
    results = {}
    stopper = threading.Thread(target=lambda: results.update(stop=call(fresh, "POST", "/stop", b"{}")))
    stopper.start()
    wait_until(lambda: fresh.job.coordinator._stop is not None)
    status, body, _ = call(fresh, "POST", "/set", set_body({"test.knob": "b"}))
    assert status == 400 and "stopping" in body["error"]
    fresh.running.set()
    stopper.join(20)
    status, reply, _ = results["stop"]
    assert status == 200 and reply["state"] == "stopped"
    fresh.thread.join(10)
    stops = [e for e in fresh.run_dir.events() if e["kind"] == "stop"]
    assert [e["step"] for e in stops] == [reply["step"]] == [fresh.job.step]
    refusals = [e for e in fresh.run_dir.events() if e["kind"] == "refuse"]
    assert len(refusals) == 1 and "stopping" in refusals[0]["reason"]


def test_a_change_still_queued_when_the_run_ends_is_refused_not_lost(fresh):
    fresh.pause()
    results = {}
    setter = threading.Thread(target=lambda: results.update(set=call(fresh, "POST", "/set",
                                                                      set_body({"test.knob": "b"}))))
    setter.start()
    wait_until(lambda: fresh.job.coordinator.inbox.qsize() == 1)
    fresh.stopped.set()  # the script returns
    fresh.running.set()
    fresh.thread.join(10)
    fresh.job.close()
    setter.join(10)
    status, reply, _ = results["set"]
    assert status == 200 and reply["state"] == "refused" and "ended" in reply["reason"]
    kinds = [(e["kind"], e["change_id"]) for e in fresh.run_dir.events() if e["kind"] in ("pending", "refuse")]
    assert kinds == [("refuse", reply["change_id"])]
    assert liveness.read_endpoint(fresh.run_dir.path) is None
    assert liveness.read_heartbeat(fresh.run_dir.path)["state"] == "ended"


# --- liveness -------------------------------------------------------------------------------------------------


def test_run_state_follows_rank_0_when_the_supervisor_is_gone(home):
    import psutil

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run_dir = RunDir.create("20260101-000000-beef00", {"name": "orphan", "state": "running",
                                                       "launcher_pid": gone.pid, "launcher_start": time.time()},
                            root=home / "runs")
    assert run_state(run_dir)["state"] == "failed"  # no heartbeat
    beat = liveness.Heartbeat(run_dir.path, step=lambda: 7)
    try:
        info = run_state(run_dir)
        assert info["state"] == "running" and info["supervisor"] == "gone"
        assert oct(os.stat(beat.path).st_mode & 0o777) == "0o600"
        assert json.loads(run_dir.run_json.read_text())["state"] == "running"  # a read never writes
    finally:
        beat.stop("stopped")
    assert run_state(run_dir)["state"] == "stopped"
    me = psutil.Process()
    stale = {"time": time.time() - liveness.FRESH_S - 1, "pid": me.pid, "start": me.create_time(), "state": "running"}
    liveness.write_private_json(beat.path, stale)
    assert run_state(run_dir)["state"] == "failed"  # a stale beat says nothing
    liveness.write_private_json(beat.path, {**stale, "time": time.time(), "pid": gone.pid})
    assert run_state(run_dir)["state"] == "failed"  # nor does a fresh one from a dead process


def test_a_live_run_whose_run_json_someone_damaged_is_still_listed_found_by_name_and_controlled(fresh, capsys):
    fresh.run_dir.run_json.write_text('{"id": "20260101-000000-c0c0c1", "name": "fre')  # truncated by someone else
    row = next(r for r in commands.jobs().data["jobs"] if r["id"] == fresh.run_dir.id)
    assert (row["name"], row["state"]) == ("fresh", "running")
    assert row["error"].startswith("run.json unreadable: not JSON")
    assert cli_main(["jobs"]) == 0
    assert "running (run.json unreadable: not JSON" in capsys.readouterr().out
    assert cli_main(["set", "fresh", "test.knob=b"]) == 0
    assert fresh.job.policies["test.knob"] == "b"
    fresh.run_dir.run_json.unlink()  # or deleted
    assert find_run("fresh").id == fresh.run_dir.id
    closer = threading.Thread(target=lambda: (fresh.thread.join(30), fresh.job.close()))  # what the script's end does
    closer.start()
    assert cli_main(["stop", "fresh", "--timeout", "30"]) == 0
    closer.join(30)
    assert run_state(fresh.run_dir)["state"] == "stopped"
    assert not fresh.run_dir.run_json.exists()  # a read never writes run.json


def test_a_dead_run_whose_run_json_is_unreadable_still_reads_failed(home):
    run_dir = RunDir.create("20260101-000000-dead00", {"name": "dead"}, root=home / "runs")
    run_dir.run_json.write_text("[]")
    assert run_state(run_dir)["state"] == "failed"
    assert run_state(run_dir)["error"] == "run.json unreadable: a JSON list, not an object"
    beat = liveness.Heartbeat(run_dir.path)
    beat.stop("stopped")
    assert run_state(run_dir)["state"] == "stopped"  # rank 0's last word


def test_rank_0_never_writes_run_json(live):
    before = live.run_dir.run_json.read_bytes()
    assert call(live, "POST", "/set", set_body({"test.knob": "b"}))[0] == 200
    assert live.run_dir.run_json.read_bytes() == before
    endpoint_file = live.run_dir.path / liveness.CONTROL_FILE
    assert oct(os.stat(endpoint_file).st_mode & 0o777) == "0o600"
    assert "control" not in json.loads(before)


def test_a_change_sent_before_the_first_step_waits_for_the_model_instead_of_a_false_refusal(home):
    run_dir = RunDir.create("20260101-000000-0f1257", {"name": "early"}, root=home / "runs")
    early = LiveJob(run_dir, paused=True)  # launched, model not built: no optimizer step has run
    try:
        results = {}
        setter = threading.Thread(target=lambda: results.update(set=call(
            early, "POST", "/set", set_body({"memory.activation_checkpointing": "full"}, timeout=20))))
        setter.start()
        time.sleep(0.5)
        assert early.job.step == 0 and setter.is_alive()
        early.running.set()
        setter.join(30)
        status, reply, _ = results["set"]
        assert status == 200 and reply["state"] == "applied", reply
        assert not [e for e in run_dir.events() if e["kind"] == "refuse"]
    finally:
        early.close()
    never = LiveJob(RunDir.create("20260101-000000-0f1258", {"name": "never"}, root=home / "runs"), paused=True)
    try:
        status, body, _ = call(never, "POST", "/set", set_body({"test.knob": "b"}, timeout=0.3))
        assert status == 409 and "first step" in body["error"]
    finally:
        never.close()


def test_a_stop_that_outlasts_its_wait_says_so_and_still_happens(fresh, capsys):
    fresh.pause()
    assert cli_main(["stop", fresh.run_dir.id, "--timeout", "0.5"]) == 4
    assert "not done within 0.5 s" in capsys.readouterr().out
    fresh.running.set()
    fresh.thread.join(10)
    assert not fresh.thread.is_alive()
    stops = [e for e in fresh.run_dir.events() if e["kind"] == "stop"]
    assert [e["step"] for e in stops] == [fresh.job.step]


def test_a_request_that_races_the_end_of_the_run_says_the_run_ended(tmp_path, monkeypatch):
    from dspark_lab.errors import ControlError
    from dspark_lab.localhost import free_port
    from dspark_lab.runtime import control as control_mod

    run = RunDir.create("20260101-000000-e0e0e0", {"name": "ending"}, root=tmp_path)
    run.update_info(state="running")
    liveness.write_private_json(run.path / "control.json", {"host": "127.0.0.1", "port": free_port()})
    client = control_mod.ControlClient(run, timeout=2, start_wait=0)
    run.update_info(state="finished")  # the job ended while the request was on its way: nothing listens now
    with pytest.raises(ControlError, match=r"^refused: run 20260101-000000-e0e0e0 ended \(finished\) before this "
                                           r"request was answered$"):
        client.request("POST", "/set", {"changes": {"memory.activation_checkpointing": "full"}})
