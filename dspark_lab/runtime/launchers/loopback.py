"""A single-node torchrun rendezvous whose TCPStore listens on 127.0.0.1 only.

torch's TCPStore server binds every interface whatever host it is given, and torchrun has no option to change
that, so ``--standalone`` leaves the run's store (which accepts any ``set`` from anyone who can reach the port)
open to the network. The store does accept an already-listening socket (``master_listen_fd``): this rendezvous
binds one on loopback, hands it to the store and tells the ranks ``MASTER_ADDR=127.0.0.1``. It is registered with
torchrun's own handler registry, then torchrun's ``main`` runs unchanged with the agent's hooks (:mod:`.agent`):

``python -m dspark_lab.runtime.launchers.loopback --rdzv-backend=dspark-loopback --rdzv-endpoint=127.0.0.1:0 ...``

Every rendezvous round (the first group of workers, then one per restart under ``--max-restarts``) gets a new store:
torch's workers expect a fresh agent store per round (``torch.distributed.rendezvous._create_c10d_store``), and a
restarted group on the old one reads the dead group's gloo addresses and cannot connect. The first round's store
lives as long as the agent and is the runtime's (``DSPARK_STORE``, :func:`~dspark_lab.runtime.nodes.store_address`):
the saved policies and the group names outlive every restart there. A later round's store is freed when the next
round starts, so at most two are open. Each restart is a ``restart`` event naming the rank that ended the group
before (:mod:`.failures`), and each rank of a group that ended without a word (a signal) gets an ``error`` event
(:mod:`.agent_events`), at a restart and when the run fails.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

from torch.distributed import PrefixStore, TCPStore
from torch.distributed.elastic.rendezvous import (RendezvousHandler, RendezvousInfo, RendezvousParameters,
                                                  RendezvousStoreInfo, rendezvous_handler_registry)

from dspark_lab.runtime.launchers import agent, agent_events, failures
from dspark_lab.runtime.nodes import STORE_VARIABLE

BACKEND = "dspark-loopback"
HOST = "127.0.0.1"
TIMEOUT_S = 900


def listening_store() -> tuple[TCPStore, int]:
    """A TCPStore server on a free loopback port, and the port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((HOST, 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        store = TCPStore(HOST, port, 1, True, datetime.timedelta(seconds=TIMEOUT_S), multi_tenant=True,
                         master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now and closes it when it is freed
    return store, port


class LoopbackRendezvous(RendezvousHandler):
    """One node, rank 0; a new store per round, the first kept as the runtime's for as long as torchrun's agent."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._first = None  # (store, port): round 0's, kept
        self._latest = None  # the latest later round's, freed when the next one starts
        self.rounds = 0

    def get_backend(self) -> str:
        return BACKEND

    @property
    def use_agent_store(self) -> bool:
        return True  # the ranks connect to this store (MASTER_ADDR / MASTER_PORT) instead of making their own

    def next_rendezvous(self) -> RendezvousInfo:
        # the agent has stopped the previous round's workers: nothing reads that round's store any more
        self._latest = None
        store, port = listening_store()
        if self._first is None:
            self._first = (store, port)
            os.environ[STORE_VARIABLE] = f"{HOST}:{port}"  # the workers inherit the agent's environment
        else:
            self._latest = (store, port)
            agent_events.record_restart(self.rounds, failures.take())  # names the rank that ended the group
        self.rounds += 1
        return RendezvousInfo(PrefixStore(self.run_id, store), 0, 1, RendezvousStoreInfo(HOST, port))

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        pass

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        return True


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    if params.max_nodes != 1:
        raise ValueError(f"{BACKEND} rendezvous is for one node; got --nnodes={params.min_nodes}:{params.max_nodes}")
    return LoopbackRendezvous(params.run_id)


def main(argv: list[str]) -> None:
    rendezvous_handler_registry.register(BACKEND, create_handler)
    agent.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
