"""What a rank adds when its run spans a restartable group or several nodes: wires :mod:`.nodes` and
:mod:`.restarts` into a :class:`~.attach.Job` (rank 0 publishes, collects and saves; other nodes relay and watch).
"""

from __future__ import annotations

import os
from typing import Any

from dspark_lab.runtime import nodes, restarts
from dspark_lab.runtime.coordinator import Sealer


class Cluster:
    """One rank's multi-node and restart machinery; ``close()`` ends its threads."""

    def __init__(self, run_dir, rank: int, world: int):
        self.run_dir, self.rank, self.world = run_dir, rank, world
        self.store = nodes.run_store(run_dir.id)  # the run's keys, across restarts
        self.sealer = Sealer(run_dir.token(), run_dir.id)
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        self.multinode = self.local_world < world
        self.version, self.saved = restarts.load(self.store, self.sealer) if nodes.generation() > 0 else (0, {})
        self.collector = self.watcher = None

    def launch_policies(self, launch: dict[str, Any] | None) -> dict[str, Any]:
        return {**(launch or {}), **self.saved}

    def attach(self, job) -> None:
        ignored = lambda key, why: job.coordinator._ignore(key, why)  # noqa: E731 (one refuse event per key)
        if self.saved:
            job.record_event("reapply", step=0, rank=self.rank, changes=self.saved, version=self.version,
                             reason=f"restart {nodes.generation()}: the policies in force before the restart "
                                    f"(version {self.version}) apply again")
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

    def close(self) -> None:
        if self.collector is not None:
            self.collector.close()
        if self.watcher is not None:
            self.watcher.close()
