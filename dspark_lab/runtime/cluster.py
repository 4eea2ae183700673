"""What a rank adds when its run is under torchrun: a restartable group of workers, maybe on several nodes.

Wires :mod:`.nodes` and :mod:`.restarts` into a :class:`~.attach.Job`: rank 0 publishes its endpoint, collects the
other nodes' records and saves the policies in force; ranks on other nodes relay their records and (local rank 0)
watch the endpoint.

A restarted group must not read the announcements of the group before it, and torchrun's
``TORCHELASTIC_RESTART_COUNT`` cannot tell groups apart: it counts the restarts of one agent, so after a worker dies
the agents of two nodes can start the new group with different counts (a node whose workers were still healthy
restarts for the membership change and does not count it). So rank 0 of each group names the group: the first
group keeps the run's own keys (``dspark/<run-id>/announce/N``), a later one picks a random nonce and the
coordinator's keys move under ``dspark/<run-id>/<nonce>/``. Rank 0 writes the nonce (sealed) before its script
starts; the other ranks read it at their first step boundary, which they reach only after rank 0 joined the first
step's collectives.

A sealed value is authenticated, not fresh: anyone who reaches the store can write the previous group's name back
(it is sealed for the run, as every group's is) before the other ranks read it. So rank 0 of a new group first
writes, under the group before's keys and sealed for that group, the name of its successor
(``<old-nonce>/successor``); a rank that reads a group's name follows its successors to the newest group.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import torch.distributed as dist

from dspark_lab.runtime import nodes, restarts
from dspark_lab.runtime.sealed import Sealer

GROUP_KEY = "group"
SUCCESSOR_KEY = "successor"  # under a group's keys: the name of the group that replaced it
MAX_SUCCESSORS = 64  # successors a rank follows from the name it read (one store round trip each, once a group)


def _nonce_of(value: Any) -> str:
    nonce = value.get("nonce") if isinstance(value, dict) else None
    if not isinstance(nonce, str) or not (nonce == "" or len(nonce) == 12 and nonce.isalnum()):
        raise ValueError("not a group name")
    return nonce


class GroupStore:
    """The coordinator's store for this group of workers (check / get / set / delete_key / wait), its prefix named
    by rank 0.

    ``scope`` is the group's nonce: the coordinator seals its values for it, so a value sealed in an earlier group
    does not open in this one even when copied under this group's keys.
    """

    def __init__(self, base, sealer: Sealer, rank: int):
        self.base, self.sealer = base, sealer
        self._store = None
        self._named = b""  # rank 0: the sealed group name it wrote (repair() writes it again)
        self._succession: tuple[str, bytes] | None = None  # rank 0: the successor key it wrote, and its value
        if rank == 0:
            nonce = secrets.token_hex(6) if base.check([GROUP_KEY]) else ""
            if nonce:
                self._succeed(nonce)
            self._named = sealer.seal(GROUP_KEY, {"nonce": nonce})
            base.set(GROUP_KEY, self._named)
            self._use(nonce)

    @staticmethod
    def _successor_key(nonce: str) -> str:
        return f"{nonce}/{SUCCESSOR_KEY}" if nonce else SUCCESSOR_KEY

    def _succeed(self, nonce: str) -> None:
        """Rank 0 of a new group: name it as the successor of the group before (if that one's name is sealed)."""
        try:
            before = _nonce_of(self.sealer.open(GROUP_KEY, self.base.get(GROUP_KEY)))
        except ValueError:
            return  # not a group's name: nobody follows it anyway
        self._succession = (self._successor_key(before), self.sealer.scoped(before).seal(SUCCESSOR_KEY,
                                                                                          {"nonce": nonce}))
        self.base.set(*self._succession)

    def _newest(self, nonce: str) -> str:
        """The group that replaced ``nonce``, and the one that replaced that ... (an old name written back)."""
        for _ in range(MAX_SUCCESSORS):
            key = self._successor_key(nonce)
            if not self.base.check([key]):
                break
            try:
                nonce = _nonce_of(self.sealer.scoped(nonce).open(SUCCESSOR_KEY, self.base.get(key)))
            except ValueError:
                self.base.delete_key(key)  # forged: only the group's successor can seal it for that group
                break
        return nonce

    def _use(self, nonce: str):
        self.nonce = nonce
        self._store = dist.PrefixStore(f"{nonce}/", self.base) if nonce else self.base
        return self._store

    def _resolve(self):
        if self._store is None:
            raw = self.base.get(GROUP_KEY)
            try:
                nonce = _nonce_of(self.sealer.open(GROUP_KEY, raw))
            except ValueError:
                self.base.delete_key(GROUP_KEY)  # never fetched twice; rank 0 writes its own again (repair)
                raise
            return self._use(self._newest(nonce))
        return self._store

    @property
    def scope(self) -> str:
        self._resolve()
        return self.nonce

    def repair(self) -> None:
        """Rank 0, when a rank did not answer: write the group's name again (deleted, or an earlier group's
        written back) and the successor it wrote for the group before (deleted)."""
        if self._named:
            self.base.set(GROUP_KEY, self._named)
        if self._succession is not None and not self.base.check([self._succession[0]]):
            self.base.set(*self._succession)

    def refresh(self) -> bool:
        """Another rank, after it waited out a decision window: read the group's name again, and say whether it
        names (through its successors) another group than the one this rank used; if so, use that one."""
        if self._store is None or self._named or not self.base.check([GROUP_KEY]):
            return False
        try:
            nonce = self._newest(_nonce_of(self.sealer.open(GROUP_KEY, self.base.get(GROUP_KEY))))
        except ValueError:
            self.base.delete_key(GROUP_KEY)
            return False
        if nonce == self.nonce:
            return False
        self._use(nonce)
        return True

    def check(self, keys):
        if self._store is None and not self.base.check([GROUP_KEY]):
            return False  # rank 0 has not named the group yet: nothing can have been announced in it
        try:
            return self._resolve().check(keys)
        except ValueError:  # a forged group name: nothing is announced until rank 0's real one is read
            return False

    def get(self, key):
        return self._resolve().get(key)

    def set(self, key, value):
        return self._resolve().set(key, value)

    def delete_key(self, key):
        return self._resolve().delete_key(key)

    def wait(self, keys, timeout):
        return self._resolve().wait(keys, timeout)


class Cluster:
    """One rank's restart and multi-node machinery; ``close()`` ends its threads."""

    def __init__(self, run_dir, rank: int, world: int, run_store):
        self.run_dir, self.rank, self.world = run_dir, rank, world
        self.store = run_store  # the run's keys, shared by every group
        self.sealer = Sealer(run_dir.token(), run_dir.id)
        self.group_store = GroupStore(run_store, self.sealer, rank)
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        self.multinode = self.local_world < world
        self.version, self.saved = restarts.load(run_store, self.sealer)
        self.collector = self.watcher = None

    def launch_policies(self, launch: dict[str, Any] | None) -> dict[str, Any]:
        return {**(launch or {}), **self.saved}

    def attach(self, job) -> None:
        ignored = lambda key, why: job.coordinator._ignore(key, why)  # noqa: E731 (one refuse event per key)
        if self.rank == 0:
            job.coordinator.after_commit = restarts.Saver(self.store, self.sealer, job, self.version)
            if job.server is not None:
                nodes.publish_endpoint(self.store, self.sealer, nodes.advertised_host(job.server.host),
                                       job.server.port)
            if self.multinode:
                self.collector = nodes.Collector(self.run_dir, list(range(self.local_world, self.world)), ignored)
        elif self.multinode and nodes.node_rank() != 0:
            relay = nodes.Relay(self.store, self.sealer, self.rank)
            job._events = nodes.RelayedWriter(job._events, relay)
            job._metrics = nodes.RelayedWriter(job._metrics, relay)
            if int(os.environ.get("LOCAL_RANK", 0)) == 0:
                self.watcher = nodes.EndpointWatcher(self.run_dir, ignored)
        if self.version:  # a previous group saved what was in force (maybe all defaults): this group restarted
            job.record_event("reapply", step=0, rank=self.rank, changes=self.saved, version=self.version,
                             reason=f"the group restarted: the policies in force before (version {self.version}) "
                                    "apply again")

    def close(self) -> None:
        if self.collector is not None:
            self.collector.close()
        if self.watcher is not None:
            self.watcher.close()
