"""What torchrun's agent adds on each node of a multi-node run: a rank that died without a word is named on rank 0's
node, and each restart of the group is an event.

On one node the agent writes an ``error`` event for a rank killed by a signal (:mod:`.agent_events`) into the run's
only directory. On several nodes each node has its own directory, and the supervisor of rank 0's node ends its
run.json from its own events, which never held another node's exit statuses: a rank killed on node 1 read there as
a survivor's ``Connection closed by peer``. So:

- the agent of every other node, the moment it sees its group fail, writes those events locally and relays them
  to rank 0's node through the run's store (:class:`~dspark_lab.runtime.nodes.Relay`, sealed like every relayed
  record), each tagged with its ``group``; once its workers are stopped (all their own records are in the store by
  then) it posts ``agents/<node>/stopped/<group>`` = 1 + the failed ranks it reported, so "nothing failed here"
  is a post too;
- the agent of rank 0's node takes a group's records once every other node of that group has posted (or after
  :data:`REPORT_WAIT_S`, for a node whose agent died): when the run ends, right after its workers are stopped; on
  a restart, after the next rendezvous and before its new workers start, where every node that joined it has
  posted already, so a healthy restart waits for nothing. It moves the relayed records into its run directory
  (:class:`~dspark_lab.runtime.nodes.Drain`) and posts ``agents/drained/<group>``;
- an agent of another node that ends the run failed waits up to :data:`DRAIN_WAIT_S` for that post before it
  exits: the store may live in its process (whichever agent bound the rendezvous endpoint first hosts it).

A group is numbered by each agent: 0, then one more at each restart. Every agent of a run with a fixed ``--nnodes``
goes through every rendezvous round (torchrun joins the next one only through ``_restart_workers``), so the numbers
agree across nodes. A report that comes after rank 0's node has stopped waiting for its group keeps its group's
number: :func:`~.agent_events.group_events` never counts it for a later group.

Each restart is a ``restart`` event in every node's events (:func:`~.agent_events.record_restart`); rank 0's node
names the rank that ended the group from every node's errors, its own and the relayed ones. The store client is
built from ``DSPARK_STORE`` (the agent has no ``MASTER_ADDR``); a store that is gone costs the relay, never the
agent's exit.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

from dspark_lab.runtime import nodes
from dspark_lab.runtime.launchers import agent_events, failures
from dspark_lab.runtime.records import RUN_DIR_VARIABLE, RunDir
from dspark_lab.runtime.sealed import Sealer

REPORT_WAIT_S = 5.0  # rank 0's node waits at most this long for the other nodes' posts on a stopped group
DRAIN_WAIT_S = 5.0  # another node's agent waits this long for rank 0's node to take its reports before it exits
STORE_TIMEOUT_S = 10.0
POLL_S = 0.05


def _stopped(node: int, group: int) -> str:
    """Another node's post on a group: its workers are stopped; the value is 1 + the failed ranks it reported."""
    return f"agents/{node}/stopped/{group}"


def _drained(group: int) -> str:
    """Rank 0's node's post: it has taken the group's relayed records."""
    return f"agents/drained/{group}"


class NodeAgent:
    """One node's agent: relays its silent failures (another node) or takes every node's (rank 0's node)."""

    def __init__(self, run_dir: RunDir, address: str):
        self.run_dir = run_dir
        host, _, port = address.rpartition(":")
        self.address = (host, int(port))
        self._store = None
        self.node, self.nodes, self.world, self.local = 0, 1, 0, set()
        self.group = 0  # the group of workers this agent runs: 0, then one more at each restart
        self.reported = 0  # another node: the failed ranks it reported in this group
        self.pending: tuple[int, int, list[int]] | None = None  # rank 0's node: a restarted group, not yet taken

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
        events = agent_events.record_failures(failed, group=self.group)
        self.reported += len(events)
        try:
            store = self.store()
            sealer = Sealer(self.run_dir.token(), self.run_dir.id)
            for event in events:
                nodes.Relay(store, sealer, event["rank"]).send("events.jsonl", event)
        except Exception:  # rank 0's node is gone: the local events are written
            pass

    def after_stop(self, worker_group, restarting: bool) -> None:
        """The workers are stopped: another node posts so; rank 0's node takes the other nodes' records (on a
        restart, once the next rendezvous is done: :meth:`before_start`); a restart is recorded."""
        if not self._learn(worker_group):
            return
        group = self.group
        if restarting:
            self.group += 1
        if self.node != 0:
            try:
                self.store().add(_stopped(self.node, group), 1 + self.reported)
            except Exception:  # rank 0's node is gone
                pass
            self.reported = 0
            if restarting:
                agent_events.record_restart(self.group, failures.take())
            return
        self.pending = (group, self.nodes, sorted(set(range(self.world)) - self.local))
        if not restarting:
            self.settle()

    def before_start(self) -> None:
        """Rank 0's node, after the rendezvous of a restart: take the stopped group's records, then its event."""
        if self.pending is not None:
            others = self.pending[2]
            self.settle()
            agent_events.record_restart(self.group, failures.take(), others=others)

    def settle(self) -> None:
        """Take the pending group's records (also when the next rendezvous failed: they are the run's last)."""
        if self.pending is None:
            return
        group, count, ranks = self.pending
        self.pending = None
        try:
            store = self.store()
            missing = self._wait_for_posts(store, group, count)
            if missing:
                print(f"dspark-lab: node(s) {', '.join(map(str, missing))} posted nothing on group {group} within "
                      f"{REPORT_WAIT_S:g} s; what they relay later keeps group {group}, never counted for a later "
                      "one", file=sys.stderr)
            drain = nodes.Drain(store, self.run_dir, ranks)
            try:
                drain()
            finally:
                drain.close()
            store.add(_drained(group), 1)
        except Exception:  # the store is gone: the records already moved are kept
            pass

    @staticmethod
    def _wait_for_posts(store, group: int, count: int) -> list[int]:
        """Wait (at most :data:`REPORT_WAIT_S`) until nodes 1 .. count-1 posted on ``group``; those that did not."""
        waiting = set(range(1, count))
        deadline = time.monotonic() + REPORT_WAIT_S
        while True:
            for node in sorted(waiting):
                key = _stopped(node, group)
                if store.check([key]):
                    try:
                        posted = int(store.add(key, 0)) > 0
                    except Exception:  # not a count (whoever wrote it): something was posted
                        posted = True
                    if posted:
                        store.delete_key(key)
                        waiting.discard(node)
            if not waiting or time.monotonic() >= deadline:
                return sorted(waiting)
            time.sleep(POLL_S)

    def finish(self) -> None:
        """The run failed: another node waits (bounded) until rank 0's node has taken its last group's records."""
        if self.node == 0:
            return
        try:
            store = self.store()
            deadline = time.monotonic() + DRAIN_WAIT_S
            while not store.check([_drained(self.group)]) and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except Exception:
            pass


def install(agent_class: type) -> NodeAgent | None:
    """Hook ``agent_class`` (torchrun's ``LocalElasticAgent``) for a run whose store is ``DSPARK_STORE``; None when
    this is no multi-node run of ``dspark-lab run`` (or the torch has no such methods to hook)."""
    address, run_dir = os.environ.get(nodes.STORE_VARIABLE), os.environ.get(RUN_DIR_VARIABLE)
    stop, restart = getattr(agent_class, "_stop_workers", None), getattr(agent_class, "_restart_workers", None)
    start = getattr(agent_class, "_start_workers", None)
    if not address or not run_dir or None in (stop, restart, start) or not failures.watch(agent_class):
        return None
    agent = NodeAgent(RunDir(run_dir), address)
    failures.listen(agent.on_failures)
    restarting = []

    @functools.wraps(stop)
    def _stop_workers(self, worker_group, *args, **kwargs):
        stop(self, worker_group, *args, **kwargs)
        agent.after_stop(worker_group, bool(restarting))

    @functools.wraps(start)
    def _start_workers(self, worker_group, *args, **kwargs):
        agent.before_start()  # the rendezvous is done: every node of the stopped group that joined it has posted
        return start(self, worker_group, *args, **kwargs)

    @functools.wraps(restart)
    def _restart_workers(self, worker_group, *args, **kwargs):
        restarting.append(True)
        try:  # torch's: stop, rendezvous, start
            return restart(self, worker_group, *args, **kwargs)
        finally:
            restarting.clear()
            agent.settle()  # the rendezvous failed: the stopped group's records are still taken

    agent_class._stop_workers, agent_class._restart_workers = _stop_workers, _restart_workers
    agent_class._start_workers = _start_workers
    return agent
