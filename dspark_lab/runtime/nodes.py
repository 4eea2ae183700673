"""A run of several nodes: rank 0's endpoint reaches every node, every rank's records reach rank 0's node.

Each node has its own run directory (same run id, its own ``DSPARK_HOME``), and its ranks write their records
there. Ranks on other nodes cannot write rank 0's files on a real cluster, so they also hand each record to rank 0
through torchrun's store: record ``n`` of rank ``r`` goes to ``records/<r>/<n>``, sealed with the run's
token like every other value (:class:`~.sealed.Sealer`); a collector thread of rank 0 moves them into rank 0's
``events.jsonl`` / ``metrics.jsonl`` (about every half second) and deletes the keys, so the store does not grow.
Rank 0's node thus shows every rank; another node shows its own ranks.

Rank 0 publishes its control endpoint's address (never the token) at ``endpoint``, sealed; local rank 0 of every
other node writes it to its own ``control.json``, so ``dspark-lab set RUN k=v`` works from any node. The address is
reachable from other machines only with ``--control-host`` (docs/security.md).
"""

from __future__ import annotations

import datetime
import os
import threading
from typing import Any

from dspark_lab.runtime import liveness
from dspark_lab.runtime.sealed import Sealer
from dspark_lab.runtime.records import JsonlWriter

ENDPOINT_KEY = "endpoint"
COLLECT_EVERY_S = 0.5
WATCH_EVERY_S = 1.0
STORE_VARIABLE = "DSPARK_STORE"  # host:port of the store that outlives every group of workers
FILES = ("events.jsonl", "metrics.jsonl")


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def node_rank() -> int:
    return _env_int("GROUP_RANK", 0)


def store_address() -> tuple[str, int]:
    """The store the runtime uses: the rendezvous store of a multi-node run (``DSPARK_STORE``, set by
    ``dspark-lab run``: it outlives every group of workers), else torchrun's MASTER_ADDR:MASTER_PORT."""
    if os.environ.get(STORE_VARIABLE):
        host, _, port = os.environ[STORE_VARIABLE].rpartition(":")
        return host, int(port)
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def run_store(run_id: str):
    """A new client of torchrun's store under ``dspark/<run-id>/`` (one per thread that uses it), or None alone."""
    if _env_int("WORLD_SIZE", 1) == 1 or "MASTER_ADDR" not in os.environ:
        return None
    return connect(run_id, *store_address())


def connect(run_id: str, host: str, port: int, timeout_s: float = 60):
    """A new client of the store at ``host:port``, under the run's prefix ``dspark/<run-id>/``."""
    import torch.distributed as dist

    store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"dspark/{run_id}/", store)


def advertised_host(bound: str) -> str:
    """The address other nodes use for an endpoint bound to ``bound`` (a wildcard bind: this node's store address)."""
    if bound in ("0.0.0.0", "::", ""):
        return os.environ.get("MASTER_ADDR") or "127.0.0.1"
    return bound


def publish_endpoint(store, sealer: Sealer, host: str, port: int) -> None:
    store.set(ENDPOINT_KEY, sealer.seal(ENDPOINT_KEY, {"host": host, "port": port}))


class Relay:
    """A rank on a node other than rank 0's: each record it writes locally also goes to rank 0 through the store."""

    def __init__(self, store, sealer: Sealer, rank: int):
        self.store, self.sealer, self.rank = store, sealer, rank
        self._lock = threading.Lock()

    def send(self, file: str, record: dict[str, Any]) -> None:
        with self._lock:
            try:  # numbered by the store, so a restarted rank goes on after its predecessor's last record
                key = f"records/{self.rank}/{self.store.add(f'records/{self.rank}/sent', 1) - 1}"
                self.store.set(key, self.sealer.seal(key, {"file": file, "record": record}))
            except Exception:  # the store is gone (rank 0's node ended): the local record is still written
                pass


class RelayedWriter:
    """A :class:`JsonlWriter` whose records are also relayed to rank 0."""

    def __init__(self, writer: JsonlWriter, relay: Relay):
        self._writer, self._relay = writer, relay
        self.path = writer.path

    def write(self, record: dict[str, Any]) -> None:
        self._writer.write(record)
        self._relay.send(self.path.name, record)

    def close(self) -> None:
        self._writer.close()


class Drain:
    """Moves the records other nodes relayed for ``ranks`` from the store into this node's run directory.

    Each rank's ``records/<r>/read`` counts the records moved so far, so a later drain (the next group's rank 0, or
    the agent of rank 0's node after its workers ended: :mod:`.launchers.node_agent`) goes on where this one stopped.
    Only one drain may read the store at a time.
    """

    def __init__(self, store, run_dir, ranks: list[int], on_ignored=lambda key, why: None):
        self.store, self.ranks, self.on_ignored = store, ranks, on_ignored
        self.sealer = Sealer(run_dir.token(), run_dir.id)
        self.writers = {"events.jsonl": JsonlWriter(run_dir.events_path), "metrics.jsonl": run_dir.metrics_writer()}
        self.next = {rank: int(store.add(f"records/{rank}/read", 0)) for rank in ranks}

    def __call__(self) -> int:
        """Move every record waiting in the store; returns how many."""
        moved = 0
        for rank in self.ranks:
            while True:
                key = f"records/{rank}/{self.next[rank]}"
                try:
                    if not self.store.check([key]):
                        break
                    raw = self.store.get(key)
                    self.store.delete_key(key)
                except Exception:
                    return moved
                self.next[rank] += 1
                self.store.add(f"records/{rank}/read", 1)
                try:
                    value = self.sealer.open(key, raw)
                    file, record = value["file"], value["record"]
                    if file not in FILES or not isinstance(record, dict) or record.get("rank") != rank:
                        raise ValueError("not a record of this rank")
                except (ValueError, TypeError, KeyError) as exc:
                    self.on_ignored(key, str(exc))
                    continue
                record.pop("schema_version", None)
                self.writers[file].write(record)
                moved += 1
        return moved

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class Collector:
    """Rank 0: a daemon thread moving other nodes' records from the store into this node's run directory."""

    def __init__(self, run_dir, ranks: list[int], on_ignored=lambda key, why: None):
        self.run_dir, self.ranks, self.on_ignored = run_dir, ranks, on_ignored
        self._drain: Drain | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dspark-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._drain = Drain(run_store(self.run_dir.id), self.run_dir, self.ranks, self.on_ignored)
        except Exception:
            return
        while not self._done.wait(COLLECT_EVERY_S):
            self.drain()

    def drain(self) -> int:
        """Move every record waiting in the store; returns how many."""
        return self._drain() if self._drain is not None else 0

    def close(self, grace_s: float = 1.0) -> None:
        """Stop, after the records the other nodes wrote in the last ``grace_s`` seconds came in."""
        self._done.set()
        self._thread.join(timeout=5)
        deadline = grace_s
        while deadline > 0:
            if not self.drain():
                threading.Event().wait(0.25)
                deadline -= 0.25
        if self._drain is not None:
            self._drain.close()


class EndpointWatcher:
    """Local rank 0 of a node other than rank 0's: keeps this node's control.json on rank 0's published endpoint."""

    def __init__(self, run_dir, on_ignored=lambda key, why: None):
        self.run_dir, self.on_ignored = run_dir, on_ignored
        self.sealer = Sealer(run_dir.token(), run_dir.id)
        self._done = threading.Event()
        self._last: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, name="dspark-endpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            store = run_store(self.run_dir.id)
        except Exception:
            return
        while not self._done.is_set():
            try:
                if store.check([ENDPOINT_KEY]):
                    self._take(store.get(ENDPOINT_KEY))
            except Exception:
                pass
            self._done.wait(WATCH_EVERY_S)

    def _take(self, raw: bytes) -> None:
        try:
            value = self.sealer.open(ENDPOINT_KEY, raw)
            host, port = value["host"], value["port"]
            if not isinstance(host, str) or type(port) is not int or not 0 < port < 65536:
                raise ValueError("not a host and port")
        except (ValueError, TypeError, KeyError) as exc:
            self.on_ignored(ENDPOINT_KEY, str(exc))
            return
        endpoint = {"host": host, "port": port, "via": "store", "node_rank": node_rank()}
        if endpoint != self._last:
            liveness.write_private_json(self.run_dir.path / liveness.CONTROL_FILE, endpoint)
            self._last = endpoint

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=2 * WATCH_EVERY_S)
        try:
            (self.run_dir.path / liveness.CONTROL_FILE).unlink()
        except FileNotFoundError:
            pass
