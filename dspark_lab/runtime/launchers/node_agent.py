"""What torchrun's agent adds on each node of a multi-node run: a rank that died without a word is named on rank 0's
node, and each restart of the group is an event.

On one node the agent writes an ``error`` event for a rank killed by a signal (:mod:`.agent_events`) into the run's
only directory. On several nodes each node has its own directory, and the supervisor of rank 0's node ends its
run.json from its own events, which never held another node's exit statuses: a rank killed on node 1 read there as
a survivor's ``Connection closed by peer``. So:

- the agent of every other node, the moment it sees its group fail, writes those events locally and relays them
  to rank 0's node through the run's store (:class:`~dspark_lab.runtime.nodes.Relay`, sealed like every relayed
  record), then counts its report at ``agents/<node>/reported``;
- the agent of rank 0's node, once its workers are stopped (rank 0's collector has ended with rank 0), waits up to
  :data:`REPORT_WAIT_S` for a new report of every other node, moves the relayed records into its run directory
  (:class:`~dspark_lab.runtime.nodes.Drain`) and counts ``agents/drained``;
- an agent of another node that ends the run failed waits up to :data:`DRAIN_WAIT_S` for that count before it
  exits: the store may live in its process (whichever agent bound the rendezvous endpoint first hosts it).

Each restart is a ``restart`` event in every node's events (:func:`~.agent_events.record_restart`); rank 0's node
names the rank that ended the group from every node's errors, its own and the relayed ones. The store client is
built from ``DSPARK_STORE`` (the agent has no ``MASTER_ADDR``); a store that is gone costs the relay, never the
agent's exit.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from dspark_lab.runtime import nodes
from dspark_lab.runtime.launchers import agent_events, failures
from dspark_lab.runtime.records import RunDir
from dspark_lab.runtime.sealed import Sealer

DRAINED = "agents/drained"
REPORT_WAIT_S = 5.0  # rank 0's node waits this long for the other nodes' reports of a failed group
DRAIN_WAIT_S = 5.0  # another node's agent waits this long for rank 0's node to take its reports before it exits
STORE_TIMEOUT_S = 10.0
POLL_S = 0.05


def _reported(node: int) -> str:
    return f"agents/{node}/reported"


class NodeAgent:
    """One node's agent: relays its silent failures (another node) or takes every node's (rank 0's node)."""

    def __init__(self, run_dir: RunDir, address: str):
        self.run_dir = run_dir
        host, _, port = address.rpartition(":")
        self.address = (host, int(port))
        self._store = None
        self.node, self.nodes, self.world, self.local = 0, 1, 0, set()
        self.reports = 0  # another node: the reports it posted
        self.taken: dict[int, int] = {}  # rank 0's node: each other node's reports it has waited for
        self.restarts = 0

    def store(self):
        if self._store is None:
            self._store = nodes.connect(self.run_dir.id, *self.address, timeout_s=STORE_TIMEOUT_S)
        return self._store

    def _learn(self, worker_group) -> bool:
        """Take this node's place from torchrun's worker group; False on a run of one node."""
        self.node, self.nodes = worker_group.group_rank or 0, worker_group.group_world_size or 1
        self.local = {w.global_rank for w in worker_group.workers}
        self.world = max((w.world_size or 0 for w in worker_group.workers), default=0)
        return self.nodes > 1

    def on_failures(self, worker_group, failed: dict[int, Any]) -> None:
        """Another node: write and relay an ``error`` event for each failed rank that said nothing, at once."""
        if not self._learn(worker_group) or self.node == 0:
            return
        events = agent_events.record_failures(failed)
        try:
            store = self.store()
            sealer = Sealer(self.run_dir.token(), self.run_dir.id)
            for event in events:
                nodes.Relay(store, sealer, event["rank"]).send("events.jsonl", event)
            store.add(_reported(self.node), 1)
            self.reports += 1
        except Exception:  # rank 0's node is gone: the local events are written
            pass

    def after_stop(self, worker_group, restarting: bool) -> None:
        """The workers are stopped: rank 0's node takes the other nodes' records; a restart is recorded."""
        if not self._learn(worker_group):
            return
        others: set[int] = set()
        if self.node == 0:
            others = set(range(self.world)) - self.local
            self._take(sorted(others))
        if restarting:
            self.restarts += 1
            agent_events.record_restart(self.restarts, failures.take(), others=others)

    def _take(self, ranks: list[int]) -> None:
        try:
            store = self.store()
            deadline = time.monotonic() + REPORT_WAIT_S
            counts = {}
            for node in range(1, self.nodes):
                while (counts.setdefault(node, int(store.add(_reported(node), 0))) <= self.taken.get(node, 0)
                       and time.monotonic() < deadline):
                    time.sleep(POLL_S)
                    counts[node] = int(store.add(_reported(node), 0))
            self.taken.update(counts)
            drain = nodes.Drain(store, self.run_dir, ranks)
            try:
                drain()
            finally:
                drain.close()
            store.add(DRAINED, 1)
        except Exception:  # the store is gone: the records already moved are kept
            pass

    def finish(self) -> None:
        """The run failed: another node waits (bounded) until rank 0's node has taken its reports."""
        if self.node == 0 or not self.reports:
            return
        try:
            store = self.store()
            deadline = time.monotonic() + DRAIN_WAIT_S
            while int(store.add(DRAINED, 0)) < self.reports and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except Exception:
            pass


def install(agent_class: type) -> NodeAgent | None:
    """Hook ``agent_class`` (torchrun's ``LocalElasticAgent``) for a run whose store is ``DSPARK_STORE``; None when
    this is no multi-node run of ``dspark-lab run`` (or the torch has no such methods to hook)."""
    address, run_dir = os.environ.get(nodes.STORE_VARIABLE), os.environ.get(agent_events.RUN_DIR_VARIABLE)
    stop, restart = getattr(agent_class, "_stop_workers", None), getattr(agent_class, "_restart_workers", None)
    if not address or not run_dir or stop is None or restart is None or not failures.watch(agent_class):
        return None
    agent = NodeAgent(RunDir(run_dir), address)
    failures.listen(agent.on_failures)
    restarting = []

    @functools.wraps(stop)
    def _stop_workers(self, worker_group, *args, **kwargs):
        stop(self, worker_group, *args, **kwargs)
        agent.after_stop(worker_group, bool(restarting))

    @functools.wraps(restart)
    def _restart_workers(self, worker_group, *args, **kwargs):
        restarting.append(True)
        try:
            return restart(self, worker_group, *args, **kwargs)
        finally:
            restarting.clear()

    agent_class._stop_workers, agent_class._restart_workers = _stop_workers, _restart_workers
    return agent
