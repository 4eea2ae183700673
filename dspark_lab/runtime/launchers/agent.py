"""torchrun's own ``main`` with the runtime's agent hooks: the launcher of every node of ``dspark-lab run``.

``python -m dspark_lab.runtime.launchers.agent --nnodes=2 --rdzv-backend=c10d ...`` runs torchrun unchanged, after
hooking its ``LocalElasticAgent``: what the group failed over is kept for the restart events (:mod:`.failures`), a
multi-node run's agents relay their silent ranks' failures to rank 0's node (:mod:`.node_agent`), and when the run
fails each rank that ended without a word gets its ``error`` event (:mod:`.agent_events`). A single-node run comes
here through :mod:`.loopback`, which first registers its rendezvous.
"""

from __future__ import annotations

import sys

from dspark_lab.runtime.launchers import agent_events, failures, node_agent


def main(argv: list[str]) -> None:
    from torch.distributed import run
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    failures.watch(LocalElasticAgent)  # what each restart was over, for its event
    node = node_agent.install(LocalElasticAgent)  # None unless the run has several nodes' store (DSPARK_STORE)
    try:
        run.main(argv)
    except SignalException as exc:  # Ctrl-C or a forwarded SIGTERM: torchrun has already passed it to the ranks
        raise SystemExit(128 + int(exc.sigval)) from None
    except ChildFailedError as exc:  # the ranks that ended without a word (a signal) are named in the events
        agent_events.record_failures(exc.failures)
        if node is not None:
            node.finish()  # the store may live here: rank 0's node takes the relayed records first
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
