"""Rank 0's control endpoint (loopback HTTP, token in a 0600 file) and the client the CLI and notebooks use.

Requests (JSON bodies, ``Authorization: Bearer <token>``):
  GET  /status              run state, current step, policies in force
  GET  /policies            every policy's schema with its value, since-step and pending state
  POST /set   {"changes": {key: value}, "wait": true, "timeout": 60}
  GET  /metrics?tail=N      the last N metric records (1 <= N <= 1000), read from the end of the file
  POST /stop  {"timeout": 60}   stop every rank at a step boundary; answers once stopped
  POST /tune  {"objective", "budget_steps", "keys", ...}   start `dspark-lab tune` in rank 0 (docs/tune.md)
  POST /tune/stop   end the search at the next block, keeping the best so far;   GET /tune   its state
A bad request gets HTTP 4xx with ``{"error": "<one line>"}`` and changes nothing; the job goes on. Sizes, waits and
connections are bounded (:mod:`.limits`); the endpoint is published in ``control.json`` (:mod:`.liveness`).
"""

from __future__ import annotations

import hmac
import io
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from dspark_lab.errors import ControlError, DSparkError, PolicyError
from dspark_lab.output import SCHEMA_VERSION
from dspark_lab.runtime import connections, limits, liveness
from dspark_lab.runtime.limits import check_timeout, one_line, short
from dspark_lab.runtime.jsonl import last_records
from dspark_lab.runtime.records import LIVE_STATES, RunDir, run_state, wait_for_end
from dspark_lab.tune import driver as tune_driver

LOOPBACK = "127.0.0.1"
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


class RequestError(DSparkError):
    """A client mistake, answered with ``status`` (4xx) and one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def policy_rows(job) -> list[dict[str, Any]]:
    """Every policy's schema, value in force and state: ``applied``, ``pending``, or ``not_applicable`` (with the
    ``reason``) where this job lacks what it acts on (no FSDP2 to reshard, the script's own DDP comm hook, ...)."""
    pending = job.pending_changes()
    rows = []
    for key, spec in job.specs.items():
        change = pending.get(key)
        reason = _not_here(job, key)
        rows.append({**spec.as_dict(), "value": job.policies[key], "since_step": job.since[key],
                     "state": "pending" if change else ("not_applicable" if reason else "applied"),
                     "pending_value": change.changes[key] if change else None,
                     "pending_step": change.step if change else None,
                     "applicable": reason is None, "reason": reason})
    return rows


def _not_here(job, key: str) -> str | None:
    try:
        return job.policy_state.not_here(key)
    except Exception:  # read from the server thread while the job trains: never fail the request over it
        return None


def _query_int(query: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not limits.is_whole_number(text) or not lo <= int(text) <= hi:
        raise RequestError(f"{name}: {short(text, 40)!r} is not allowed; allowed: a whole number in [{lo}, {hi}]")
    return int(text)


def _changes(body: dict[str, Any]) -> dict[str, Any]:
    """The ``changes`` object of a /set body, bounded in count and size, with scalar values."""
    changes = body.get("changes")
    if not isinstance(changes, dict) or not changes:
        raise RequestError("set: 'changes' must be a non-empty object of policy keys to values")
    if len(changes) > limits.MAX_KEYS:
        raise RequestError(f"set: {len(changes)} keys in one change; allowed: at most {limits.MAX_KEYS}")
    for key, value in changes.items():
        if len(key) > limits.MAX_TEXT or not KEY_PATTERN.fullmatch(key):
            raise RequestError(f"set: key {short(key, 60)!r} is not a policy key; allowed: at most "
                               f"{limits.MAX_TEXT} letters, digits, '.', '_' or '-'")
        if not isinstance(value, (str, int, float, bool)):
            raise RequestError(f"set: {key}: value must be a string, number or boolean, got {type(value).__name__}")
        if len(str(value)) > limits.MAX_TEXT:
            raise RequestError(f"{key}: a value of {len(str(value))} characters; allowed: at most {limits.MAX_TEXT}")
    return changes


class HeadTooLarge(RequestError):
    """A request line or header block past its bound (:mod:`.limits`): answered 414 / 431 and the connection closed."""


def read_head(rfile) -> tuple[bytes, bytes]:
    """The request line and the header lines (through the blank one) of one request, read from ``rfile`` within
    limits.MAX_REQUEST_LINE, MAX_HEADERS and MAX_HEADER_BYTES; past one, :class:`HeadTooLarge` before reading on."""
    line = rfile.readline(limits.MAX_REQUEST_LINE + 1)
    if len(line) > limits.MAX_REQUEST_LINE:
        raise HeadTooLarge(f"request: the request line is over {limits.MAX_REQUEST_LINE} bytes; allowed: at most "
                           f"{limits.MAX_REQUEST_LINE}", 414)
    if len(line.split()) < 3:  # none (the client left), HTTP/0.9 or garbage: parse_request answers it as it is
        return line, b""
    block, left = [], limits.MAX_HEADER_BYTES
    while True:
        header = rfile.readline(left + 1)
        left -= len(header)
        if left < 0 or (len(block) == limits.MAX_HEADERS and header not in (b"\r\n", b"\n", b"")):
            raise HeadTooLarge(f"request: headers over the bound; allowed: at most {limits.MAX_HEADERS} header "
                               f"lines of {limits.MAX_HEADER_BYTES} bytes in all", 431)
        block.append(header)
        if header in (b"\r\n", b"\n", b""):
            return line, b"".join(block)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    timeout = limits.IDLE_TIMEOUT_S  # the socket's timeout while the reply is written; reads: the request deadline

    def log_message(self, *args):  # keep the training script's output clean
        pass

    def setup(self) -> None:
        """http.server's, with reads through a DeadlineReader: the request arrives in full in time or not at all."""
        super().setup()
        self.rfile.close()  # the socket stays open: the handler's wfile and the reader below use it
        self._reader = connections.DeadlineReader(self.connection, limits.REQUEST_DEADLINE_S, self.timeout)
        self.rfile = io.BufferedReader(self._reader)
        self.server.slots.head_arriving(self._reader)

    def finish(self) -> None:
        self.server.slots.forget(self._reader)
        super().finish()

    def handle_one_request(self) -> None:
        """http.server's, except that the request line and headers are read within their bounds (read_head)
        before anything parses them: an oversized head costs rank 0 a few KiB, not http.server's 100 x 64 KiB;
        and the whole request within its deadline (:mod:`.connections`)."""
        try:
            try:
                self.raw_requestline, block = read_head(self.rfile)
                self.server.slots.head_arrived(self._reader)
            except HeadTooLarge as exc:
                self._refuse(exc.status, str(exc))
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if self._parse(block):
                self._handle(self.command)
                self.wfile.flush()
        except connections.RequestTimeout:
            self._refuse(408, self._late())
        except connections.Evicted:
            self._refuse(503, f"busy: closed to make room for another connection (at most "
                              f"{self.server.slots.size} at once); the request head had not arrived")
        except (TimeoutError, ConnectionError):  # the reply could not be written: the client left or reads nothing
            self.close_connection = True

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` before the request was parsed, and close."""
        if not hasattr(self, "request_version"):
            self.requestline = self.request_version = self.command = ""
        try:
            self.send_error(status, message)
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def _late(self) -> str:
        return (f"request: did not arrive in full within {self._reader.deadline_s:g} s of connecting; allowed: "
                f"the request line, headers and body within {self._reader.deadline_s:g} s")

    def _parse(self, block: bytes) -> bool:
        """http.server's parse_request over the header lines read_head already read."""
        stream, self.rfile = self.rfile, io.BytesIO(block)
        try:
            return self.parse_request()
        finally:
            self.rfile = stream

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps({"schema_version": SCHEMA_VERSION, **body}, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad request line, header too long) as one JSON line too."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        self._reply(code, {"error": text if text.startswith("request: ") else f"request: {short(text)}"})

    def _authorized(self) -> bool:
        scheme, _, sent = self.headers.get("Authorization", "").partition(" ")
        return scheme == "Bearer" and hmac.compare_digest(sent.strip().encode("utf-8", "replace"),
                                                          self.server.token.encode())

    def _body(self) -> dict[str, Any]:
        text = self.headers.get("Content-Length") or "0"
        if not limits.is_whole_number(text):
            raise RequestError(f"Content-Length: {short(text, 40)!r} is not allowed; allowed: a whole number "
                               "of bytes in ASCII digits")
        length = int(text)
        if length > limits.MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read
            raise RequestError(f"request: a body of {length} bytes; allowed: at most {limits.MAX_BODY_BYTES}", 413)
        try:
            data = self.rfile.read(length)
        except (connections.RequestTimeout, connections.Evicted):
            self.close_connection = True
            raise RequestError(self._late(), 408) from None
        if len(data) < length:
            raise RequestError(f"request: the body ended after {len(data)} of {length} bytes")

        def no_constants(name):
            raise RequestError(f"request: {name} is not JSON; allowed: finite numbers")

        try:
            body = json.loads(data or b"{}", parse_constant=no_constants)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise RequestError("request: body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestError("request: body must be a JSON object")
        return body

    def _handle(self, method: str) -> None:
        if not self._authorized():
            self.close_connection = True
            self._reply(401, {"error": "token: wrong or missing token (send 'Authorization: Bearer <token>')"})
            return
        with self.server.in_flight:
            self.server.requests += 1
        try:
            url = urlparse(self.path)
            route = self.server.routes.get((method, url.path))
            if route is None:
                known = any(path == url.path for _, path in self.server.routes)
                raise RequestError(f"request: no endpoint {short(method, 20)} {short(url.path, 60)}",
                                   405 if known else 404)
            if method == "POST":
                body = self._body()
            else:
                try:
                    query = parse_qs(url.query, max_num_fields=8, strict_parsing=bool(url.query))
                except ValueError:
                    raise RequestError("request: the query string is malformed") from None
                body = {k: v[-1] for k, v in query.items()}
            self._reply(200, route(body))
        except DSparkError as exc:
            self._reply(getattr(exc, "status", 400), {"error": one_line(str(exc))[:400]})
        except Exception as exc:  # whatever goes wrong here, the training thread is untouched
            self._reply(500, {"error": short(f"{type(exc).__name__}: {exc}", 300)})
        finally:
            with self.server.in_flight:
                self.server.requests -= 1
                self.server.in_flight.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = limits.LISTEN_BACKLOG
    token: str
    routes: dict

    def __init__(self, *args, **kwargs):
        self.in_flight = threading.Condition()
        self.requests = 0
        self.slots = connections.Slots(limits.MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        if not self.slots.take():
            try:
                body = json.dumps({"schema_version": SCHEMA_VERSION, "error": "busy: too many connections"})
                request.sendall(f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class ControlServer:
    """Serves a Job's control requests on a daemon thread of rank 0, and keeps its heartbeat."""

    def __init__(self, job, host: str = LOOPBACK, port: int = 0):
        self.job = job
        self._server = _Server((host, port), _Handler)
        self._server.token = job.run_dir.token()
        self._server.routes = {
            ("GET", "/status"): self.status,
            ("GET", "/policies"): lambda body: {"policies": policy_rows(self.job)},
            ("POST", "/set"): self.set,
            ("GET", "/metrics"): self.metrics,
            ("POST", "/stop"): self.stop,
            ("POST", "/tune"): self.tune,
            ("POST", "/tune/stop"): self.tune_stop,
            ("GET", "/tune"): lambda body: self._tune_report(),
        }
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="dspark-control", daemon=True)
        self._thread.start()
        self.heartbeat = liveness.Heartbeat(job.run_dir.path, step=lambda: self.job.step)
        # the name too: the run stays found by it if someone else damages run.json (records.run_state)
        liveness.write_private_json(job.run_dir.path / liveness.CONTROL_FILE,
                                    {"host": self.host, "port": self.port, "pid": os.getpid(),
                                     "name": job.run_dir.name()})

    def status(self, body) -> dict[str, Any]:
        return {"step": self.job.step, "rank_count": self.job.world, "backend": self.job.backend.name,
                "policies": dict(self.job.policies), "blocks": len(self.job.blocks), "job": self.job.describe()}

    def set(self, body) -> dict[str, Any]:
        changes = _changes(body)
        timeout = check_timeout(body.get("timeout", 60), "timeout")
        wait = body.get("wait", True)
        if not isinstance(wait, bool):
            raise RequestError("wait: must be true or false")
        started = time.monotonic()
        if tune_driver.refusal_of_set(self.job):
            raise RequestError(tune_driver.refusal_of_set(self.job), 409)
        self._wait_for_first_step(timeout)
        pending = self.job.request(changes)
        old = {key: self.job.policies[key] for key in changes}
        left = max(0.0, timeout - (time.monotonic() - started))  # one budget: the client waits timeout + 5 s
        finished = (pending.done if wait else pending.announced).wait(left)
        reply = {"change_id": pending.change_id, "state": pending.state, "step": pending.step,
                 "changes": [{"key": k, "old": old[k], "new": v} for k, v in pending.changes.items()],
                 "reason": pending.reason, "waited": pending.waited}
        if not finished:
            reply.update(state="timed_out", pending_state=pending.state,
                         reason=f"not {'applied' if wait else 'announced'} within {timeout:g} s; the change is "
                                f"still {pending.state} (see `dspark-lab events`)")
        return reply

    def _wait_for_first_step(self, timeout: float) -> None:
        """A change is judged against the model, which the runtime knows once the first optimizer step ran; a
        request sent right after launch waits for it instead of being refused for a model not yet built."""
        deadline = time.monotonic() + timeout
        while self.job.step == 0:
            if self.job.spawned:
                raise RequestError(f"set: the script trains in {self.job.spawned} worker process(es) it started "
                                   "itself (torch.multiprocessing), outside the runtime; launch the training "
                                   "function once per rank with `dspark-lab run --nproc N` instead", 409)
            if time.monotonic() > deadline:
                raise RequestError(f"set: the job has not finished its first step within {timeout:g} s, so its "
                                   "model is not known yet; try again once it trains", 409)
            time.sleep(0.05)

    def metrics(self, body) -> dict[str, Any]:
        tail = _query_int(body, "tail", 20, 1, limits.MAX_TAIL)
        return {"metrics": last_records(self.job.run_dir.metrics_path, tail, limits.MAX_TAIL_BYTES)}

    def stop(self, body) -> dict[str, Any]:
        timeout = check_timeout(body.get("timeout", 60), "timeout")
        wait = body.get("wait", True)
        if not isinstance(wait, bool):
            raise RequestError("wait: must be true or false")
        pending = self.job.request({}, kind="stop")
        finished = (pending.done if wait else pending.announced).wait(timeout)
        last = pending.step - 1 if pending.step is not None else None  # the last step that runs
        if pending.state in ("ended", "rolled_back"):  # rolled back: not every rank took part, none stopped
            return {"change_id": pending.change_id, "state": pending.state, "step": self.job.step,
                    "reason": pending.reason}
        state = "stopped" if pending.done.is_set() else ("stopping" if pending.step is not None else "queued")
        reply = {"change_id": pending.change_id, "state": state, "step": last, "reason": ""}
        if not finished:
            reply.update(state="timed_out", pending_state=state,
                         reason=f"the stop is {state} but was not done within {timeout:g} s")
        return reply

    def tune(self, body) -> dict[str, Any]:
        self._wait_for_first_step(check_timeout(body.pop("timeout", 60), "timeout"))
        return tune_driver.start(self.job, body).report()

    def tune_stop(self, body) -> dict[str, Any]:
        tune = self.job.state.get("tune")
        if tune is None:
            raise RequestError("tune: no tune has run on this job", 409)
        tune.stop_event.set()
        tune.wait(check_timeout(body.get("timeout", 60), "timeout"))
        return tune.report()

    def _tune_report(self) -> dict[str, Any]:
        tune = self.job.state.get("tune")
        return tune.report() if tune is not None else {"id": None, "state": "none"}

    def close(self) -> None:
        """Refuse what will never apply, let the replies in flight go out, then stop serving."""
        coordinator = self.job.coordinator
        coordinator.abandon("refused: the run ended before this change applied")
        with self._server.in_flight:
            self._server.in_flight.wait_for(lambda: self._server.requests == 0, timeout=5.0)
        self._server.shutdown()
        self._server.server_close()
        try:
            (self.job.run_dir.path / liveness.CONTROL_FILE).unlink()
        except FileNotFoundError:
            pass
        self.heartbeat.stop("stopped" if coordinator.stopped else "ended")


class ControlClient:
    """Talks to a run's control endpoint; every failure is a one-line :class:`ControlError`."""

    def __init__(self, run_dir: RunDir, timeout: float = 10.0, start_wait: float = 60.0):
        self.run_dir = run_dir
        info, control = self._wait_for_endpoint(run_dir, start_wait)
        if info.get("state") not in LIVE_STATES or not control:
            raise ControlError(f"run {run_dir.id} is {info.get('state', 'unknown')}: it has no live control "
                               "endpoint (policies change only on a running job)")
        self.url = f"http://{control['host']}:{control['port']}"
        self.timeout = timeout

    @staticmethod
    def _wait_for_endpoint(run_dir: RunDir, start_wait: float):
        """The run's state and, once rank 0 has published it, its endpoint (a run is 'running' before that)."""
        deadline = time.monotonic() + start_wait
        while True:
            info = run_state(run_dir)
            control = liveness.read_endpoint(run_dir.path)
            if control or info.get("state") not in LIVE_STATES or time.monotonic() > deadline:
                return info, control
            time.sleep(0.2)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                timeout: float | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.run_dir.token()}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", str(exc))
            except (json.JSONDecodeError, ValueError):
                message = str(exc)
            raise (PolicyError if exc.code == 400 else ControlError)(message) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            # the request raced the end of the run (its supervisor records it within a moment): say that, not
            # what the closed socket said
            ended = wait_for_end(self.run_dir, 3.0)
            if ended:
                raise ControlError(f"refused: run {self.run_dir.id} ended ({ended}) before this request was "
                                   "answered") from None
            reason = getattr(exc, "reason", exc)
            raise ControlError(f"run {self.run_dir.id}: control endpoint {self.url} did not answer ({reason}); "
                               f"see `dspark-lab status {self.run_dir.id}`") from None
