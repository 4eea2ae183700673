"""Restarts of a group spread over several nodes: how long rank 0's node waits for the other nodes' reports, and
which group a report counts for. Two `dspark-lab run` agents on loopback (tests/test_multinode.py's `Nodes`), and
the agents' pieces on an in-process store."""

from __future__ import annotations

import json
import time

import pytest

from test_multinode import Nodes, nodes_factory, token_file  # noqa: F401 (fixtures)

GAP_LIMIT_S = 4.5  # a rank's exit to the new group's processes; the old wait for reports alone was 5 s


def restart_gap(nodes: Nodes, exit_rank: int) -> tuple[float, float]:
    """(seconds from ``exit_rank``'s last step of the first group to the first process of the second group,
    ... to the second group's first step on every rank)."""
    records = {rank: [json.loads(line) for line in (nodes.log / f"rank{rank}.jsonl").read_text().splitlines()]
               for rank in range(4)}
    died = max(r["time"] for r in records[exit_rank] if r["restart"] == 0 and "step" in r)
    created = min(r["created"] for rows in records.values() for r in rows if r["restart"] == 1 and "start" in r)
    stepped = max(min(r["time"] for r in rows if r["restart"] == 1 and r.get("step") == 1)
                  for rows in records.values())
    return created - died, stepped - died


@pytest.mark.slow
def test_a_restart_for_a_failure_on_rank_0s_node_does_not_wait_for_reports_that_will_not_come(nodes_factory):
    # rank 1 (always on rank 0's node) exits with code 1 after step 5, while the other node's ranks are in a long
    # step (10 s): they have nothing to report until their next collective. Before, rank 0's node waited the full
    # 5 s for the other node's report before it joined the next rendezvous (its new ranks started 7.6 s after the
    # exit); now it joins at once, the other node's agent restarts its workers for it and posts "nothing failed
    # here" on the way, and the new ranks start about 2.5 s after the exit (torchrun's stop, the other node seeing
    # a node waiting, the rendezvous), on 2 shared cores. The limit leaves 2 s of margin on that and is under the
    # old wait alone. The new ranks' imports are not in the gap (they took 6 to 17 s here, under load).
    nodes = nodes_factory([8, 0.05, "--exit-at", "5:1:10"], extra=("--max-restarts", "1"), rdzv_id="quick")
    zero = nodes.rank0_node()
    assert nodes.wait(150) == [0, 0], nodes.output()
    created, stepped = restart_gap(nodes, exit_rank=1)
    print(f"rank 1's exit to the new group's processes: {created:.2f} s; to its first step: {stepped:.2f} s")
    assert created < GAP_LIMIT_S, created
    restart = [e for e in nodes.events(zero) if e["kind"] == "restart"]
    assert [(e["restart"], e["failed_rank"], e["exit_code"]) for e in restart] == [(1, 1, 1)], restart


# --- the agents' hooks, driven as torch drives them, on an in-process store (fast) -------------------------------

class EmulatedAgent:
    """One node's torchrun agent: a stand-in for ``LocalElasticAgent`` hooked by ``node_agent.install``, driven as
    torch's ``_invoke_run`` drives it (a look at the workers; a restart is stop, rendezvous, start). Each node's
    agent is its own process in a real run, so the module state of ``failures`` and the run directory in the
    environment are this node's while it acts."""

    def __init__(self, monkeypatch, run_dir, port: int, node: int):
        from types import SimpleNamespace as NS

        from dspark_lab.runtime.launchers import node_agent

        self.monkeypatch, self.run_dir, self.listeners, self.seen = monkeypatch, run_dir, [], {}

        class Agent:  # torch's methods, doing nothing but report what _monitor_workers is given
            result = None

            def _monitor_workers(self, worker_group):
                return self.result

            def _stop_workers(self, worker_group):
                pass

            def _start_workers(self, worker_group):
                return {}

            def _restart_workers(self, worker_group):
                self._stop_workers(worker_group)
                self._start_workers(worker_group)  # (the rendezvous is in between)

        monkeypatch.setenv("DSPARK_STORE", f"127.0.0.1:{port}")
        self._enter()
        self.hooks = node_agent.install(Agent)
        assert self.hooks is not None
        self.agent = Agent()
        self.workers = NS(group_rank=node, group_world_size=2,
                          workers=[NS(global_rank=2 * node + i, world_size=4) for i in (0, 1)])

    def _enter(self) -> None:
        from dspark_lab.runtime.launchers import failures

        self.monkeypatch.setenv("DSPARK_RUN_DIR", str(self.run_dir.path))
        self.monkeypatch.setattr(failures, "_listeners", self.listeners)
        self.monkeypatch.setattr(failures, "_seen", self.seen)

    def fail(self, **exits: int) -> None:
        """The agent's look at its workers finds ranks ``r<N>=exitcode`` failed (a negative code: a signal)."""
        from types import SimpleNamespace as NS

        self._enter()
        self.agent.result = NS(failures={int(r[1:]): NS(exitcode=code, timestamp=time.time(), pid=100 + int(r[1:]))
                                         for r, code in exits.items()})
        self.agent._monitor_workers(self.workers)

    def restart(self) -> float:
        """torch's restart of this node's workers; returns how long it took."""
        self._enter()
        started = time.monotonic()
        self.agent._restart_workers(self.workers)
        return time.monotonic() - started

    def stop(self) -> float:
        """The run failed: the workers are stopped for good; returns how long it took."""
        self._enter()
        started = time.monotonic()
        self.agent._stop_workers(self.workers)
        return time.monotonic() - started


@pytest.fixture
def two_agents(tmp_path, monkeypatch):
    import datetime
    import secrets

    import torch.distributed as dist

    from dspark_lab.localhost import free_port
    from dspark_lab.runtime.launchers import node_agent
    from dspark_lab.runtime.records import RunDir

    monkeypatch.setattr(node_agent, "REPORT_WAIT_S", 2.0)  # the bound, shortened for the test
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=10))
    token = secrets.token_urlsafe(24)
    dirs = [RunDir.create("rdzv-groups", {"name": "unit"}, root=tmp_path / f"n{n}", token=token) for n in (0, 1)]
    yield [EmulatedAgent(monkeypatch, dirs[n], port, n) for n in (0, 1)], dirs
    del server


def test_a_restart_with_nothing_failed_on_the_other_node_does_not_wait(two_agents):
    (zero, one), dirs = two_agents
    zero.fail(r1=1)  # rank 1, on rank 0's node, exits with code 1 without a word
    assert one.restart() < 1  # the other node's workers are healthy: they restart for the membership change
    took = zero.restart()  # ...so rank 0's node learns at once that nothing failed there (before: 2 s, the bound)
    assert took < 1, took
    restart = [e for e in dirs[0].events() if e["kind"] == "restart"]
    assert [(e["restart"], e["failed_rank"], e["exit_code"]) for e in restart] == [(1, 1, 1)], restart


def test_a_late_report_counts_for_its_own_group_never_the_next(two_agents, capfd):
    from dspark_lab.runtime.launch import ending

    (zero, one), dirs = two_agents
    zero.fail(r1=1)  # group 0 ends over rank 1 (rank 0's node) ...
    took = zero.restart()  # ...and the other node's agent says nothing in time: rank 0's node waits the bound
    assert 2.0 <= took < 4, took
    one.fail(r3=-9)  # now the other node's report on group 0 comes: rank 3 was killed with SIGKILL
    one.restart()
    # group 1 fails on rank 0's own error; the other node has nothing to report on it
    with dirs[0].events_path.open("a") as f:
        f.write(json.dumps({"time": time.time(), "step": 2, "rank": 0, "kind": "error", "exit_code": 1,
                            "reason": "RuntimeError: boom"}) + "\n")
    one.stop()
    zero.fail(r0=1)
    took = zero.stop()
    assert took < 1, took  # the other node posted on group 1
    events = dirs[0].events()
    # before: the late report counted for group 1, and the run was said to end over "rank 3: killed by signal 9"
    assert ending(events, "torchrun", 1) == ("failed", 1, "rank 0: RuntimeError: boom"), events
    late = [e for e in events if e["kind"] == "error" and e["rank"] == 3]
    assert [(e["signal"], e["group"]) for e in late] == [(9, 0)], late  # kept, with the group it belongs to
    assert "node(s) 1 posted nothing on group 0 within 2 s" in capfd.readouterr().err  # said when it gave up
    started = time.monotonic()
    one.hooks.finish()  # rank 0's node took group 1's records: the other node's agent exits at once
    assert time.monotonic() - started < 1
