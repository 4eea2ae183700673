"""The CLI starts fast: ``--version`` and ``--help`` import no torch, and the verbs that read records or talk to a
running job (jobs, status, events, metrics, get, set) never import torch, numpy or bokeh.

Each check runs in a fresh interpreter (this test process has long imported torch). Verbs that talk to a live job
reach a stand-in control endpoint (the transport), so the command code under test is the shipped one.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from dspark_lab.runtime.liveness import CONTROL_FILE, write_private_json
from dspark_lab.runtime.records import JsonlWriter, RunDir

HEAVY = ("torch", "numpy", "bokeh")


def imported(stderr: str) -> set[str]:
    """Top-level package names in ``python -X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[-1].strip().split(".")[0])
    return names


def test_version_and_help_import_no_torch_and_start_fast():
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "dspark_lab", "--version"],
                          capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0 and done.stdout.startswith("dspark-lab ")
    assert not imported(done.stderr) & set(HEAVY), sorted(imported(done.stderr) & set(HEAVY))
    # CPU time, not wall time, is the honest figure on a shared machine; importing torch alone costs about 2 s.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 1.0, f"--version took {cpu:.2f} s of CPU ({wall:.2f} s wall)"

    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "dspark_lab", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "schedule" in done.stdout and "metrics" in done.stdout
    assert "torch" not in imported(done.stderr)


class _StandIn(BaseHTTPRequestHandler):
    """Rank 0's control endpoint as the client sees it: checks the token, answers /status, /policies and /set."""

    token = ""
    calls: list = []

    def _reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_error(401)
            return False
        return True

    def do_GET(self):
        if not self._authorised():
            return
        self.calls.append(("GET", self.path))
        if self.path == "/status":
            self._reply({"step": 7, "policies": {"comm.grad_sync": "ddp"}, "blocks": 4})
        else:
            self._reply({"policies": [{"key": "comm.grad_sync", "value": "ddp", "since_step": 0, "state": "in force",
                                       "allowed": "ddp | ring", "live": True, "lossless": True, "doc": "sync"}]})

    def do_POST(self):
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(("POST", self.path, body["changes"]))
        self._reply({"change_id": 1, "state": "applied", "step": 9, "reason": "",
                     "changes": [{"key": k, "old": "ddp", "new": v} for k, v in body["changes"].items()]})

    def log_message(self, *args):
        pass


@pytest.fixture
def records(tmp_path):
    """$DSPARK_HOME with a finished run (metrics, events) and a running one whose endpoint is the stand-in."""
    root = tmp_path / "runs"
    done = RunDir.create("20260101-000000-aaaaaa", {"name": "done", "ranks": 2}, root=root)
    done.update_info(state="finished")
    metrics, events = JsonlWriter(done.metrics_path), JsonlWriter(done.events_path)
    for step in range(1, 6):
        for rank in (0, 1):
            metrics.write({"step": step, "rank": rank, "step_time_s": 0.1, "loss": 1.0 / step})
    events.write({"step": 3, "rank": 0, "kind": "apply", "key": "comm.grad_sync", "old": "ddp", "new": "ring"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    live = RunDir.create("20260101-000001-bbbbbb", {"name": "live", "ranks": 1}, root=root)
    _StandIn.token, _StandIn.calls = live.token(), []
    me = psutil.Process()
    live.update_info(state="running", launcher_pid=me.pid, launcher_start=me.create_time())
    write_private_json(live.path / CONTROL_FILE, {"host": "127.0.0.1", "port": server.server_address[1]})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path
    server.shutdown()
    server.server_close()


READERS = [["jobs"], ["status", "done"], ["events", "done"], ["metrics", "done", "--tail", "3"],
           ["metrics", "done", "--follow"], ["status", "live"], ["get", "live"], ["get", "live", "comm.grad_sync"],
           ["set", "live", "comm.grad_sync=ring"], ["policies", "live", "--json"]]


def test_record_and_control_verbs_never_import_torch(records):
    code = ("import json, sys\n"
            "from dspark_lab.cli import main\n"
            f"codes = [main(argv) for argv in {READERS!r}]\n"
            f"print(json.dumps({{'codes': codes, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DSPARK_HOME": str(records)})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"codes": [0] * len(READERS), "heavy": []}, done.stderr[-2000:]
    # The verbs really ran: the stand-in saw the reads and the change, and the tables reached stdout.
    assert ("POST", "/set", {"comm.grad_sync": "ring"}) in _StandIn.calls
    assert ("GET", "/status") in _StandIn.calls and ("GET", "/policies") in _StandIn.calls
    assert "applied at step 9" in done.stdout and "20260101-000000-aaaaaa" in done.stdout


def test_planning_verbs_load_every_plugin_without_importing_torch(tmp_path):
    """``plan`` and ``schedule simulate`` read backends' specs through the plugin manager, which imports every
    installed plugin (the built-in policies and the example third-party backend included): none may import torch
    at import time, only in the hooks that act on a job."""
    config = tmp_path / "layout.json"
    config.write_text(json.dumps({"model": "llama3-8b", "cluster": {"gpu": "nvidia-h100", "gpus": 8},
                                  "layout": {"tp": 1, "pp": 1, "dp": 8, "micro_batch": 1, "global_batch": 8}}))
    verbs = [["plan", "predict", str(config), "--json"],
             ["plan", "search", "--model", "llama3-8b", "--gpu", "nvidia-h100", "--gpus", "8", "--global-batch",
              "64", "--top", "1", "--json"],
             ["schedule", "simulate", "1f1b", "--ranks", "4", "--microbatches", "8"]]
    code = ("import json, sys\n"
            "from dspark_lab.cli import main\n"
            "from dspark_lab.plugins import make_manager\n"
            f"codes = [main(argv) for argv in {verbs!r}]\n"
            "names = sorted(name for name, _ in make_manager().pm.list_name_plugin())\n"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "print(json.dumps({'codes': codes, 'plugins': names, 'heavy': heavy}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["codes"] == [0, 0, 0] and result["heavy"] == [], result
    assert "policies" in result["plugins"]  # the built-in policies plugin was loaded, so the check covers it
    assert '"step_time_s"' in done.stdout and '"kind": "plan.search"' in done.stdout
