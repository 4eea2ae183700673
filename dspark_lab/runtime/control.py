"""Rank 0's control endpoint (loopback HTTP, token in a 0600 file) and the client the CLI and notebooks use.

Requests (JSON bodies, ``Authorization: Bearer <token>``):
  GET  /status              run state, current step, policies in force
  GET  /policies            every policy's schema with its value, since-step and pending state
  POST /set   {"changes": {key: value}, "wait": true, "timeout": 60}
  GET  /metrics?tail=N      the last N metric records
  POST /stop                stop every rank at a step boundary
A bad request gets HTTP 4xx with ``{"error": "<one line>"}`` and changes nothing; the job goes on.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from dspark_lab.errors import ControlError, DSparkError, PolicyError
from dspark_lab.output import SCHEMA_VERSION
from dspark_lab.runtime.records import RunDir, run_state

LOOPBACK = "127.0.0.1"


def policy_rows(job) -> list[dict[str, Any]]:
    pending = job.pending_changes()
    rows = []
    for key, spec in job.specs.items():
        change = pending.get(key)
        rows.append({**spec.as_dict(), "value": job.policies[key], "since_step": job.since[key],
                     "state": "pending" if change else "applied",
                     "pending_value": change.changes[key] if change else None,
                     "pending_step": change.step if change else None})
    return rows


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args):  # keep the training script's output clean
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps({"schema_version": SCHEMA_VERSION, **body}, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        sent = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(sent.encode(), self.server.token.encode())

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DSparkError("request: body is not JSON") from None
        if not isinstance(body, dict):
            raise DSparkError("request: body must be a JSON object")
        return body

    def _handle(self, method: str) -> None:
        if not self._authorized():
            self._reply(401, {"error": "token: wrong or missing token"})
            return
        url = urlparse(self.path)
        try:
            route = self.server.routes.get((method, url.path))
            if route is None:
                raise DSparkError(f"request: unknown endpoint {method} {url.path}")
            body = self._body() if method == "POST" else {k: v[-1] for k, v in parse_qs(url.query).items()}
            self._reply(200, route(body))
        except DSparkError as exc:
            self._reply(400, {"error": str(exc)})
        except Exception as exc:  # whatever goes wrong here, the training thread is untouched
            self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    token: str
    routes: dict


class ControlServer:
    """Serves a Job's control requests on a daemon thread of rank 0."""

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
        }
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="dspark-control", daemon=True)
        self._thread.start()

    def status(self, body) -> dict[str, Any]:
        return {"step": self.job.step, "rank_count": self.job.world, "backend": self.job.backend.name,
                "policies": dict(self.job.policies), "blocks": len(self.job.blocks), "job": self.job.describe()}

    def set(self, body) -> dict[str, Any]:
        changes = body.get("changes")
        if not isinstance(changes, dict) or not changes:
            raise DSparkError("set: 'changes' must be a non-empty object of policy keys to values")
        timeout = float(body.get("timeout", 60))
        pending = self.job.request(changes)
        old = {key: self.job.policies[key] for key in changes}
        wait_for = pending.done if body.get("wait", True) else pending.announced
        finished = wait_for.wait(timeout)
        reply = {"change_id": pending.change_id, "state": pending.state, "step": pending.step,
                 "changes": [{"key": k, "old": old[k], "new": v} for k, v in pending.changes.items()],
                 "reason": pending.reason}
        if not finished:
            reply["reason"] = f"not {'applied' if body.get('wait', True) else 'announced'} within {timeout:g} s"
        return reply

    def metrics(self, body) -> dict[str, Any]:
        tail = int(body.get("tail", 20))
        return {"metrics": self.job.run_dir.metrics()[-tail:]}

    def stop(self, body) -> dict[str, Any]:
        pending = self.job.request({}, kind="stop")
        pending.announced.wait(float(body.get("timeout", 30)))
        return {"state": "stopping", "step": pending.step}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class ControlClient:
    """Talks to a run's control endpoint; every failure is a one-line :class:`ControlError`."""

    def __init__(self, run_dir: RunDir, timeout: float = 10.0, start_wait: float = 60.0):
        self.run_dir = run_dir
        info = self._wait_for_endpoint(run_dir, start_wait)
        control = info.get("control")
        if info.get("state") not in ("running", "starting") or not control:
            raise ControlError(f"run {run_dir.id} is {info.get('state', 'unknown')}: it has no live control "
                               "endpoint (policies change only on a running job)")
        self.url = f"http://{control['host']}:{control['port']}"
        self.timeout = timeout

    @staticmethod
    def _wait_for_endpoint(run_dir: RunDir, start_wait: float) -> dict[str, Any]:
        """run.json, once rank 0 has published its endpoint (a run is 'running' a few seconds before that)."""
        deadline = time.monotonic() + start_wait
        while True:
            info = run_state(run_dir)
            if info.get("control") or info.get("state") not in ("running", "starting") or \
                    time.monotonic() > deadline:
                return info
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
            reason = getattr(exc, "reason", exc)
            raise ControlError(f"run {self.run_dir.id}: control endpoint {self.url} did not answer ({reason}); "
                               f"see `dspark-lab status {self.run_dir.id}`") from None
