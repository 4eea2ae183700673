"""Fuzz the control endpoint and the CLI (hypothesis) against a live 2-rank job.

Random and malformed methods, paths, headers, bodies, keys, values, lengths and encodings, then a burst of
concurrent requests. The job must keep training, every refusal must be one JSON line with a 4xx status (never a
5xx), and the records must stay valid JSON lines. The counts printed here are the ones in docs/security.md.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import wait_for_step
from dspark_lab.cli import main as cli_main
from dspark_lab.runtime import commands, liveness

pytestmark = pytest.mark.slow

DEMO = Path(commands.__file__).parent.parent / "examples" / "demo_train.py"
SMALL = ["--layers", "3", "--dim", "32", "--seq", "16", "--batch", "4", "--vocab", "64", "--steps", "100000",
         "--step-sleep", "0.02"]
KEYS = ["memory.activation_checkpointing", "memory.activation_offload", "comm.grad_sync", "comm.bucket_mb",
        "sched.nothing", "", ".", "a" * 300]
COUNTS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def live_job(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSPARK_HOME", str(tmp_path_factory.mktemp("fuzz_home")))
        from dspark_lab.plugins import reset_manager

        reset_manager()
        job = commands.launch(DEMO, SMALL, nproc=2, name="fuzzed")
        try:
            wait_for_step(job, 2)
            yield job
        finally:
            if job.poll() is None:
                job.stop()
            reset_manager()
    print(f"\nfuzz counts: {dict(sorted(COUNTS.items()))}", file=sys.stderr)


def send(job, raw: bytes, timeout: float = 30) -> bytes:
    endpoint = liveness.read_endpoint(job.run_dir.path)
    with socket.create_connection((endpoint["host"], endpoint["port"]), timeout=timeout) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def check_reply(reply: bytes, label: str) -> int:
    """Every answer: an HTTP status line, 200 or 4xx, a one-line JSON body (an object with 'error' unless 200)."""
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    COUNTS[f"{label}:{status}"] += 1
    assert status == 200 or 400 <= status < 500, reply[:300]
    assert body.count(b"\n") == 0, body[:300]
    parsed = json.loads(body)
    assert isinstance(parsed, dict) and (status == 200 or isinstance(parsed.get("error"), str)), body[:300]
    if status == 200 and "changes" in parsed:
        COUNTS[f"{label}:set {parsed['state']}"] += 1
    return status


scalars = st.one_of(st.text(max_size=300), st.integers(), st.floats(), st.booleans(), st.none(),
                    st.lists(st.integers(), max_size=3), st.sampled_from(["full", "every-2", "tree", "host", "none"]))
valid = st.dictionaries(st.sampled_from(KEYS[:3]), st.sampled_from(["full", "none", "every-2", "host", "off", "tree",
                                                                    "builtin"]), min_size=1, max_size=2)
changes = st.one_of(valid, st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=40)), scalars,
                                           max_size=40))
json_bodies = st.fixed_dictionaries({}, optional={
    "changes": st.one_of(changes, scalars),
    "wait": st.one_of(st.booleans(), scalars),
    "timeout": st.one_of(st.floats(), st.integers(), st.text(max_size=10), st.sampled_from([0.3, 2.0]))})
bodies = st.one_of(
    json_bodies.map(lambda d: json.dumps(d).encode()),
    json_bodies.map(lambda d: json.dumps(d).encode()),
    json_bodies.map(lambda d: json.dumps(d).encode()),
    st.tuples(json_bodies, st.sampled_from(["utf-16", "utf-32", "latin-1"])).map(
        lambda t: json.dumps(t[0], ensure_ascii=False).encode(t[1], "replace")),
    st.binary(max_size=3000),
    st.text(max_size=2000).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(70_000, 200_000).map(lambda n: b"[" + b"1," * (n // 2) + b"1]"),  # over the body limit
)
paths = st.one_of(
    st.sampled_from(["/set"] * 6 + ["/status", "/policies", "/metrics", "/set?x=1"]),
    st.text(max_size=12).map(lambda t: f"/metrics?tail={quote(t)}"),
    st.text(max_size=40).map(lambda t: "/" + quote(t)).filter(lambda p: not p.startswith("/stop")),
)
known_methods = st.sampled_from(["POST"] * 6 + ["GET"] * 2 + ["PUT", "DELETE", "HEAD"])
methods = st.one_of(known_methods, known_methods, known_methods, st.from_regex(r"[A-Z]{1,8}", fullmatch=True))
auths = st.sampled_from(["good"] * 8 + ["none", "wrong", "no-bearer", "lowercase"])
lengths = st.sampled_from(["exact"] * 8 + ["absent", "junk", "huge", "negative"])


def build(job, method, path, auth, body, length) -> bytes:
    token = job.run_dir.token()
    header = {"good": f"Bearer {token}", "wrong": "Bearer nope", "no-bearer": token, "lowercase": f"bearer {token}",
              "none": None}[auth]
    lines = [f"{method} {path} HTTP/1.0"]
    if header:
        lines.append(f"Authorization: {header}")
    size = {"exact": str(len(body)), "junk": "12x", "huge": "99999999", "negative": "-5", "absent": None}[length]
    if size is not None:
        lines.append(f"Content-Length: {size}")
    if method == "HEAD" or size is None or length != "exact":
        body = b""  # never leave the server waiting for bytes we announced and do not send
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


anything = st.tuples(methods, paths, auths, bodies, lengths)
authenticated_sets = st.tuples(st.just("POST"), st.sampled_from(["/set", "/set?wait=1"]), st.just("good"),
                               st.one_of(json_bodies.map(lambda d: json.dumps(d).encode()), bodies),
                               st.just("exact"))
authenticated_reads = st.tuples(st.just("GET"), st.one_of(paths, st.sampled_from(["/status", "/policies"])),
                                st.just("good"), st.just(b""), st.just("absent"))


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(request=st.one_of(anything, authenticated_sets, authenticated_reads))
def test_random_requests_get_200_or_a_one_line_4xx(live_job, request):
    method, path, auth, body, length = request
    reply = send(live_job, build(live_job, method, path, auth, body, length))
    if method == "HEAD":
        assert reply.split(b" ", 2)[1][:1] in (b"2", b"4")
        return
    status = check_reply(reply, "random")
    if auth != "good":
        assert status == 401


def test_concurrent_bad_and_good_requests(live_job):
    token = live_job.run_dir.token()
    requests = [
        f"GET /status HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode(),
        f"GET /metrics?tail=0 HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode(),
        f"POST /set HTTP/1.0\r\nAuthorization: Bearer {token}\r\nContent-Length: 5\r\n\r\n{{bad}}".encode(),
        b"POST /set HTTP/1.0\r\nAuthorization: Bearer nope\r\nContent-Length: 2\r\n\r\n{}",
        f"POST /set HTTP/1.0\r\nAuthorization: Bearer {token}\r\nContent-Length: 9999999\r\n\r\n".encode(),
        f"GET /metrics?tail=5 HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode(),
    ]
    failures = []

    def worker(i):
        for j in range(8):
            try:
                check_reply(send(live_job, requests[(i + j) % len(requests)]), "concurrent")
            except Exception as exc:  # collected and reported below
                failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]


timeouts = st.one_of(st.sampled_from(["3"] * 4 + ["inf", "nan", "-inf", "-1", "0", "1e9", "", "soon", "0.05"]),
                     st.text(max_size=8))
pairs = st.tuples(st.sampled_from(KEYS[:5]),
                  st.one_of(st.sampled_from(["full", "none", "every-2", "tree", "builtin", "off", "x"]),
                            st.text(max_size=20))).map(lambda kv: f"{kv[0]}={kv[1]}")
assignments = st.lists(st.one_of(pairs, pairs, st.text(max_size=30)), min_size=0, max_size=3)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(args=assignments, timeout=timeouts)
def test_cli_set_with_random_arguments_exits_with_a_known_code_and_one_line(live_job, capsys, args, timeout):
    capsys.readouterr()
    code = cli_main(["set", live_job.id, *args, "--timeout", timeout])
    out, err = capsys.readouterr()
    COUNTS[f"cli:{code}"] += 1
    assert code in (0, 2, 3, 4), (args, timeout, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_the_job_trained_on_and_its_records_are_json_lines(live_job):
    before = max(m["step"] for m in live_job.run_dir.metrics())
    deadline = time.monotonic() + 60
    while max(m["step"] for m in live_job.run_dir.metrics()) < before + 3:
        assert live_job.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    for path in (live_job.run_dir.events_path, live_job.run_dir.metrics_path):
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                assert isinstance(json.loads(line), dict), f"{path.name}:{number}"
    assert live_job.run_dir.events_path.stat().st_size < 2 * 1024 * 1024
    assert os.stat(live_job.run_dir.path / "control.json").st_mode & 0o077 == 0
