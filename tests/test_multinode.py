"""Runs of several nodes, emulated on this machine: two `dspark-lab run` agents (each its own DSPARK_HOME) joining
one c10d rendezvous on loopback, 2 ranks each; control from either node. Restarts: tests/test_multinode_restarts.py."""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from dspark_lab.errors import DSparkError
from dspark_lab.localhost import free_port
from dspark_lab.runtime.launch import prepare
from dspark_lab.runtime.launchers import multinode
from dspark_lab.runtime.launchers.torchrun import TorchrunLauncher
from test_control_live import kill_all

SCRIPT = Path(__file__).parent / "runtime_fixtures" / "nodes_train.py"
CLI = [sys.executable, "-m", "dspark_lab.cli"]


def write_token(folder: Path) -> Path:
    path = folder / "token"
    path.write_text(secrets.token_urlsafe(24) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def token_file(tmp_path):
    return write_token(tmp_path)


# --- launch checks (fast) ----------------------------------------------------------------------------------------

def test_several_nodes_need_a_rendezvous_id_an_endpoint_and_a_token(tmp_path, monkeypatch, token_file):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    for var in multinode.PET_VARIABLES.values():
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DSparkError, match=r"^--rdzv-id: required when --nnodes is above 1 \(got --nnodes 2\)"):
        prepare(str(SCRIPT), nproc=2, options={"nnodes": "2", "rdzv_endpoint": "h:1"}, token_file=str(token_file))
    with pytest.raises(DSparkError, match=r"^--token-file: required when --nnodes is above 1"):
        prepare(str(SCRIPT), nproc=2, options={"nnodes": "1:4", "rdzv_endpoint": "h:1", "rdzv_id": "j"})
    with pytest.raises(DSparkError, match=r"^--rdzv-endpoint: required"):
        prepare(str(SCRIPT), nproc=2, options={"nnodes": "2", "rdzv_id": "j"}, token_file=str(token_file))
    with pytest.raises(DSparkError, match=r"^--rdzv-id: '\.\./x' is not allowed"):
        prepare(str(SCRIPT), options={"nnodes": "2", "rdzv_endpoint": "h:1", "rdzv_id": "../x"},
                token_file=str(token_file))
    with pytest.raises(DSparkError, match=r"^--nnodes: expected N or MIN:MAX"):
        prepare(str(SCRIPT), options={"nnodes": "3:2", "rdzv_id": "j"}, token_file=str(token_file))
    bad = tmp_path / "bad"
    bad.write_text("short")
    with pytest.raises(DSparkError, match=r"^--token-file: .* must hold one token of 16 to 512"):
        prepare(str(SCRIPT), options={"nnodes": "2", "rdzv_endpoint": "h:1", "rdzv_id": "j"}, token_file=str(bad))
    with pytest.raises(DSparkError, match=r"^--control-host: "):
        prepare(str(SCRIPT), control_host="a b")
    assert not (tmp_path / "home" / "runs").exists() or not list((tmp_path / "home" / "runs").iterdir())


def test_every_node_gets_the_same_run_id_and_the_given_token(tmp_path, monkeypatch, token_file):
    options = {"nnodes": "1:2", "rdzv_endpoint": "10.0.0.1:29400", "rdzv_id": "job-7"}
    dirs = []
    for node in (0, 1):
        monkeypatch.setenv("DSPARK_HOME", str(tmp_path / f"node{node}"))
        dirs.append(prepare(str(SCRIPT), nproc=2, options=options, token_file=str(token_file)))
    assert [d.id for d in dirs] == ["rdzv-job-7", "rdzv-job-7"]
    assert dirs[0].path != dirs[1].path
    assert dirs[0].token() == dirs[1].token() == token_file.read_text().strip()
    assert dirs[0].info()["ranks"] == 4
    command = dirs[0].info()["command"]
    assert "--rdzv-backend=c10d" in command and "--nnodes=1:2" in command and "--rdzv-id=job-7" in command
    assert not any("loopback" in part for part in command)
    with pytest.raises(DSparkError, match=r"^--rdzv-id: run rdzv-job-7 already exists"):
        prepare(str(SCRIPT), nproc=2, options=options, token_file=str(token_file))


def test_pet_variables_take_the_place_of_missing_options(tmp_path, monkeypatch, token_file):
    env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "3", "PET_RDZV_BACKEND": "c10d",
           "PET_RDZV_ENDPOINT": "job-worker-0:29400", "PET_RDZV_ID": "job", "PET_MAX_RESTARTS": "2"}
    options, nproc = multinode.from_environment({"nnodes": None, "max_restarts": "5"}, None, env)
    assert nproc == 3
    assert options == {"nnodes": "2", "max_restarts": "5", "rdzv_backend": "c10d",
                       "rdzv_endpoint": "job-worker-0:29400", "rdzv_id": "job"}
    command = TorchrunLauncher().command("s.py", [], nproc, options)
    # torchrun's own main behind the agent's hooks, not the single-node loopback rendezvous
    assert command[1:3] == ["-m", "dspark_lab.runtime.launchers.agent"]
    assert multinode.from_environment({}, None, {}) == ({}, 1)
    with pytest.raises(DSparkError, match="^PET_NPROC_PER_NODE: "):
        multinode.from_environment({}, None, {"PET_NPROC_PER_NODE": "auto"})


# --- two emulated nodes (slow) -----------------------------------------------------------------------------------

class Nodes:
    """Two `dspark-lab run` agents on loopback, each with its own DSPARK_HOME, joined by --rdzv-id."""

    def __init__(self, tmp_path: Path, token_file: Path, script_args, extra=(), rdzv_id="emulated"):
        self.homes = [tmp_path / "node0", tmp_path / "node1"]
        self.log = tmp_path / "ranks"
        self.log.mkdir()
        self.run_id = f"rdzv-{rdzv_id}"
        port = free_port()
        self.procs = []
        for home in self.homes:
            env = {**os.environ, "DSPARK_HOME": str(home), "NODES_LOG": str(self.log)}
            self.procs.append(subprocess.Popen(
                [*CLI, "run", "--nnodes", "2", "--nproc", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
                 "--rdzv-id", rdzv_id, "--local-addr", "127.0.0.1", "--token-file", str(token_file), *extra,
                 str(SCRIPT), *map(str, script_args)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))

    def run_dir(self, node: int) -> Path:
        return self.homes[node] / "runs" / self.run_id

    def rank0_node(self, timeout: float = 90) -> int:
        """The node whose agent the rendezvous made node 0 (rank 0's: it writes the heartbeat)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in (0, 1):
                if (self.run_dir(node) / "heartbeat.json").exists():
                    return node
            time.sleep(0.2)
        raise AssertionError("no node started rank 0")

    def endpoint(self, node: int, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return json.loads((self.run_dir(node) / "control.json").read_text())
            except (OSError, ValueError):
                time.sleep(0.2)
        raise AssertionError(f"node {node} has no control.json")

    def cli(self, node: int, *args) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], env={**os.environ, "DSPARK_HOME": str(self.homes[node])},
                              capture_output=True, text=True, timeout=120)

    def events(self, node: int) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir(node) / "events.jsonl").read_text().splitlines()]

    def steps(self) -> dict[int, list[dict]]:
        return {rank: [r for r in map(json.loads, (self.log / f"rank{rank}.jsonl").read_text().splitlines())
                       if "step" in r] for rank in range(4)}

    def wait(self, timeout: float) -> list[int]:
        codes = []
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("an agent hung: " + self.output())
            codes.append(proc.returncode)
        return codes

    def output(self) -> str:
        return "\n".join((p.stdout.read() or b"").decode(errors="replace")[-3000:] for p in self.procs
                         if p.poll() is not None)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                # torchrun starts each rank in a session of its own: killpg alone leaves a failed test's ranks training
                workers = psutil.Process(proc.pid).children(recursive=True)
                os.killpg(proc.pid, 9)
                kill_all(workers)
                proc.wait()


@pytest.fixture
def nodes_factory(tmp_path, token_file):
    made = []

    def make(*args, **kwargs):
        made.append(Nodes(tmp_path, token_file, *args, **kwargs))
        return made[-1]

    yield make
    for nodes in made:
        nodes.kill()


def assert_ranks_agree(steps: dict[int, list[dict]], restart: int = 0) -> int:
    """Every rank had the same policies in force after every step; returns how many steps were compared."""
    by_step = {rank: {r["step"]: r["policies"] for r in records if r["restart"] == restart}
               for rank, records in steps.items()}
    common = set.intersection(*(set(s) for s in by_step.values()))
    assert common, by_step
    for step in sorted(common):
        values = [by_step[rank][step] for rank in range(4)]
        assert all(v == values[0] for v in values), f"step {step}: {values}"
    return len(common)


CHANGES = 200  # requests in all, from both nodes, at random moments


def fire_changes(nodes: Nodes, endpoints: dict[int, dict], seed: int) -> list[tuple[int, dict]]:
    """CHANGES requests to /set from both nodes at once, at random moments: valid changes of three policies and
    refused ones (bad keys, bad values, launch-only keys), some waiting for the change, some not; (status, reply)s."""
    token = (nodes.run_dir(0) / "token").read_text().strip()
    valid = [("memory.activation_checkpointing", v) for v in ("none", "full", "every-2", "every-4")] + \
            [("comm.grad_sync", v) for v in ("builtin", "ring", "tree", "bf16")] + \
            [("memory.activation_offload", v) for v in ("off", "host")]
    invalid = [("memory.activation_checkpointing", "most"), ("comm.bucket_mb", 8), ("no.such", 1),
               ("comm.grad_sync", 3)]
    answers: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def fire(node: int, count: int, seed: float) -> None:
        mine = random.Random(seed)
        url = f"http://{endpoints[node]['host']}:{endpoints[node]['port']}/set"
        for _ in range(count):
            time.sleep(mine.uniform(0, 0.1))
            key, value = mine.choice(valid if mine.random() < 0.7 else invalid)
            body = json.dumps({"changes": {key: value}, "wait": mine.random() < 0.3, "timeout": 60}).encode()
            request = urllib.request.Request(url, data=body, method="POST", headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=70) as resp:
                    status, reply = resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                status, reply = exc.code, json.loads(exc.read())
            with lock:
                answers.append((status, reply))

    rng = random.Random(seed)
    threads = [threading.Thread(target=fire, args=(node, CHANGES // 4, rng.random())) for node in (0, 1, 0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    return answers


@pytest.mark.slow
def test_changes_from_either_node_apply_on_all_four_ranks_at_one_step_and_leave_them_with_the_same_values(
        nodes_factory):
    # one run for both: a `set` from the CLI of the node without rank 0, then many requests from both nodes
    nodes = nodes_factory([100000, 0.02], extra=("--control-host", "0.0.0.0"))
    zero = nodes.rank0_node()
    other = 1 - zero
    endpoints = {node: nodes.endpoint(node) for node in (0, 1)}
    assert endpoints[other]["via"] == "store" and "token" not in json.dumps(endpoints[other])
    # rank 0 binds every interface; the other node is told rank 0's store address (here loopback)
    assert (endpoints[zero]["host"], endpoints[other]["host"]) == ("0.0.0.0", "127.0.0.1")

    done = nodes.cli(other, "set", nodes.run_id, "memory.activation_checkpointing=full", "--json")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["state"] == "applied"
    deadline = time.monotonic() + 15  # the collector moves node 1's records every 0.5 s
    while True:
        applies = [e for e in nodes.events(zero) if e["kind"] == "apply" and e["change_id"] == reply["change_id"]]
        if len(applies) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(e["rank"] for e in applies) == [0, 1, 2, 3]
    assert {e["step"] for e in applies} == {reply["step"]}
    local = [e for e in nodes.events(other) if e["kind"] == "apply"]
    assert sorted(e["rank"] for e in local) == sorted({e["rank"] for e in local}) and len(local) == 2
    jobs = json.loads(nodes.cli(other, "jobs", "--json").stdout)["jobs"]
    assert [(j["id"], j["state"], j["ranks"]) for j in jobs] == [(nodes.run_id, "running", 4)]

    answers = fire_changes(nodes, endpoints, seed=20)
    assert len(answers) == CHANGES
    assert {status for status, _ in answers} <= {200, 400}, answers
    accepted = [reply for status, reply in answers if status == 200]
    assert 0 < len(accepted) < CHANGES
    assert all(reply["state"] in ("applied", "pending", "rolled_back") for reply in accepted), accepted
    stop = nodes.cli(other, "stop", nodes.run_id, "--json", "--timeout", "60")
    assert stop.returncode == 0, stop.stderr
    assert nodes.wait(90) == [0, 0], nodes.output()
    metrics = [json.loads(line) for line in (nodes.run_dir(zero) / "metrics.jsonl").read_text().splitlines()]
    assert {m["rank"] for m in metrics} == {0, 1, 2, 3}
    events = nodes.events(zero)
    for change in accepted:
        mine = [e for e in events if e.get("change_id") == change["change_id"] and e["kind"] in ("apply", "rollback")]
        assert len({e["rank"] for e in mine}) == 4 and len({e["step"] for e in mine}) == 1, (change, mine)
    compared = assert_ranks_agree(nodes.steps())
    assert compared > 20 and compared >= reply["step"], compared
    print(f"{len(answers)} requests: {len(accepted)} accepted, {CHANGES - len(accepted)} refused; "
          f"{compared} steps compared on 4 ranks")


@pytest.mark.slow
def test_a_rank_killed_on_the_other_node_is_named_in_rank_0s_run_record(nodes_factory):
    # rank 3 (the second node's) kills itself with SIGKILL after step 3: it says nothing, the other ranks fail on
    # its closed connection; only the second node's agent saw the signal, and relays it to rank 0's node
    nodes = nodes_factory([100000, 0.05, "--sigkill-at", 3], rdzv_id="killed")
    zero = nodes.rank0_node()
    started = time.monotonic()
    codes = nodes.wait(60)
    took = time.monotonic() - started
    infos = [json.loads((nodes.run_dir(node) / "run.json").read_text()) for node in (0, 1)]
    for node in (zero, 1 - zero):  # rank 0's node names the relayed death; the second node its own rank's
        info = infos[node]
        assert (info["state"], info["exit_code"], info["error"]) == \
            ("failed", 137, "rank 3: killed by signal 9 (SIGKILL)"), (node, info, nodes.output())
    assert codes == [137, 137], nodes.output()
    killed = [e for e in nodes.events(zero) if e["kind"] == "error" and e.get("source") == "agent"]
    # rank 3's death, relayed; rank 2 is the SIGTERM its agent sent it once rank 3 had died (not the cause)
    assert {(e["rank"], e["exit_code"], e["signal"]) for e in killed} <= {(3, 137, 9), (2, 143, 15)}, killed
    assert [e["rank"] for e in killed if e["signal"] == 9] == [3], killed
    print(f"both agents ended {took:.1f} s after rank 0 started")


# --- the store pieces, on an in-process store (fast) -------------------------------------------------------------

def test_relayed_records_reach_rank_0_and_forged_ones_do_not(tmp_path, monkeypatch):
    import datetime

    import torch.distributed as dist

    from dspark_lab.runtime import liveness, nodes
    from dspark_lab.runtime.coordinator import Sealer
    from dspark_lab.runtime.records import JsonlWriter, RunDir

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("DSPARK_STORE", raising=False)
    token = secrets.token_urlsafe(24)
    rank0 = RunDir.create("rdzv-unit", {"name": "unit"}, root=tmp_path / "n0", token=token)
    node1 = RunDir.create("rdzv-unit", {"name": "unit"}, root=tmp_path / "n1", token=token)
    store = nodes.run_store("rdzv-unit")
    sealer = Sealer(token, "rdzv-unit")
    writer = nodes.RelayedWriter(JsonlWriter(node1.metrics_path), nodes.Relay(store, sealer, 2))
    for step in (1, 2):
        writer.write({"step": step, "rank": 2})
    store.set("records/3/0", Sealer("another-token-entirely", "rdzv-unit").seal(
        "records/3/0", {"file": "metrics.jsonl", "record": {"step": 9, "rank": 3}}))
    ignored = []
    collector = nodes.Collector(rank0, [2, 3], lambda key, why: ignored.append((key, why)))
    deadline = time.monotonic() + 10
    while len(rank0.metrics()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    collector.close()
    assert [(m["step"], m["rank"]) for m in rank0.metrics()] == [(1, 2), (2, 2)]
    assert [(m["step"], m["rank"]) for m in node1.metrics()] == [(1, 2), (2, 2)]
    assert ignored and ignored[0][0] == "records/3/0" and "HMAC" in ignored[0][1]
    assert not store.check(["records/2/0", "records/2/1"])  # moved records leave the store

    store.set(nodes.ENDPOINT_KEY, json.dumps({"host": "evil.example", "port": 80}))
    watcher = nodes.EndpointWatcher(node1)
    time.sleep(1.5)
    assert liveness.read_endpoint(node1.path) is None  # an unsealed address is not taken
    nodes.publish_endpoint(store, sealer, "10.1.2.3", 4567)
    deadline = time.monotonic() + 10
    while liveness.read_endpoint(node1.path) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {k: liveness.read_endpoint(node1.path)[k] for k in ("host", "port")} == {"host": "10.1.2.3", "port": 4567}
    watcher.close()
    del server


def test_another_nodes_agent_relays_a_killed_rank_and_rank_0s_agent_takes_it(tmp_path, monkeypatch):
    import datetime
    from types import SimpleNamespace as NS

    import torch.distributed as dist

    from dspark_lab.runtime.launchers import failures, node_agent
    from dspark_lab.runtime.records import RunDir

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=10))
    token = secrets.token_urlsafe(24)
    dirs = [RunDir.create("rdzv-agents", {"name": "unit"}, root=tmp_path / f"n{n}", token=token) for n in (0, 1)]
    agents = [node_agent.NodeAgent(run_dir, f"127.0.0.1:{port}") for run_dir in dirs]
    group = [NS(group_rank=n, group_world_size=2, workers=[NS(global_rank=2 * n + i, world_size=4) for i in (0, 1)])
             for n in (0, 1)]
    monkeypatch.setenv("DSPARK_RUN_DIR", str(dirs[1].path))  # the second node: rank 3 killed, relayed at once
    agents[1].on_failures(group[1], {3: NS(exitcode=-9, timestamp=100.0, pid=42)})
    assert [(e["rank"], e["signal"], e["group"]) for e in dirs[1].events()] == [(3, 9, 0)]
    agents[1].after_stop(group[1], restarting=True)  # its workers are stopped: it posts so, and its restart event
    monkeypatch.setenv("DSPARK_RUN_DIR", str(dirs[0].path))  # rank 0's node: its ranks failed on the closed peer
    dirs[0].events_path.write_text(json.dumps({"time": 100.2, "step": 4, "rank": 0, "kind": "error", "exit_code": 1,
                                               "reason": "RuntimeError: Connection closed by peer"}) + "\n")
    failures.take()
    failures._seen[0] = NS(exitcode=1, timestamp=100.2, pid=41)  # what the agent's watch kept of rank 0
    started = time.monotonic()
    agents[0].after_stop(group[0], restarting=True)
    agents[0].before_start()  # the next rendezvous is done; the other node has posted: no wait
    assert time.monotonic() - started < node_agent.REPORT_WAIT_S / 2  # not the wait (a loaded machine took 1 s)
    restart = dirs[0].events()[-1]
    assert (restart["kind"], restart["failed_rank"], restart["exit_code"], restart["failed_ranks"]) == \
        ("restart", 3, 137, [0, 3]), restart
    assert restart["reason"].startswith("restart 1: rank 3: killed by signal 9 (SIGKILL); ")
    agents[1].after_stop(group[1], restarting=False)  # the restarted group fails too: the run ends
    agents[0].after_stop(group[0], restarting=False)
    started = time.monotonic()
    agents[1].finish()  # rank 0's node took the last group's records: the second node's agent exits at once
    assert time.monotonic() - started < node_agent.DRAIN_WAIT_S / 2
    del server
