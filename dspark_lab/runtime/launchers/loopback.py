"""A single-node torchrun rendezvous whose TCPStore listens on 127.0.0.1 only.

torch's TCPStore server binds every interface whatever host it is given, and torchrun has no option to change
that, so ``--standalone`` leaves the run's store (which accepts any ``set`` from anyone who can reach the port)
open to the network. The store does accept an already-listening socket (``master_listen_fd``): this rendezvous
binds one on loopback, hands it to the store and tells the ranks ``MASTER_ADDR=127.0.0.1``. It is registered with
torchrun's own handler registry, then torchrun's ``main`` runs unchanged:

``python -m dspark_lab.runtime.launchers.loopback --rdzv-backend=dspark-loopback --rdzv-endpoint=127.0.0.1:0 ...``
"""

from __future__ import annotations

import datetime
import socket
import sys

from torch.distributed import PrefixStore, TCPStore
from torch.distributed.elastic.rendezvous import (RendezvousHandler, RendezvousInfo, RendezvousParameters,
                                                  RendezvousStoreInfo, rendezvous_handler_registry)

BACKEND = "dspark-loopback"
HOST = "127.0.0.1"
TIMEOUT_S = 900


class LoopbackRendezvous(RendezvousHandler):
    """One node, rank 0; the store is created on first use and lives as long as torchrun's agent."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._store = None
        self._socket = None
        self._port = 0

    def get_backend(self) -> str:
        return BACKEND

    @property
    def use_agent_store(self) -> bool:
        return True  # the ranks connect to this store (MASTER_ADDR / MASTER_PORT) instead of making their own

    def next_rendezvous(self) -> RendezvousInfo:
        if self._store is None:
            self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._socket.bind((HOST, 0))
            self._socket.listen(128)
            self._port = self._socket.getsockname()[1]
            self._store = TCPStore(HOST, self._port, 1, True, datetime.timedelta(seconds=TIMEOUT_S),
                                   multi_tenant=True, master_listen_fd=self._socket.fileno())
        return RendezvousInfo(PrefixStore(self.run_id, self._store), 0, 1, RendezvousStoreInfo(HOST, self._port))

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
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException

    rendezvous_handler_registry.register(BACKEND, create_handler)
    try:
        run.main(argv)
    except SignalException as exc:  # Ctrl-C or a forwarded SIGTERM: torchrun has already passed it to the ranks
        raise SystemExit(128 + int(exc.sigval)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
