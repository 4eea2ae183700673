"""What torchrun's agent saw fail before it restarts the group under ``--max-restarts``.

torch keeps it to itself: ``SimpleElasticAgent._invoke_run`` holds the ``RunResult`` of its last look at the workers
in a local variable and restarts the group without passing it on. :func:`watch` wraps the agent's
``_monitor_workers`` to keep the failures of the last result that had any (global rank -> ``ProcessFailure``);
:func:`take` hands them, once, to the restart event (:func:`.agent_events.record_restart`). Under a torch without
that method nothing is kept, and a restart is recorded without its cause. :func:`listen` adds a callback that sees
each such result as it comes (the multi-node agent relays the failures at once: :mod:`.node_agent`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

_seen: dict[int, Any] = {}
_listeners: list[Callable[[Any, dict[int, Any]], None]] = []


def watch(agent_class: type) -> bool:
    """Wrap ``agent_class._monitor_workers`` (once); False when this torch's agent has no such method."""
    monitor = getattr(agent_class, "_monitor_workers", None)
    if monitor is None:
        return False
    if getattr(monitor, "dspark_watched", False):
        return True

    @functools.wraps(monitor)
    def _monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        if getattr(result, "failures", None):
            _seen.clear()
            _seen.update(result.failures)
            for listener in _listeners:
                listener(worker_group, dict(result.failures))
        return result

    _monitor_workers.dspark_watched = True
    agent_class._monitor_workers = _monitor_workers
    return True


def listen(listener: Callable[[Any, dict[int, Any]], None]) -> None:
    """Call ``listener(worker_group, failures)`` with each result of the watched agent that has failures."""
    _listeners.append(listener)


def take() -> dict[int, Any]:
    """The failures seen since the last take (global rank -> torchrun's ``ProcessFailure``); empty when none."""
    failures = dict(_seen)
    _seen.clear()
    return failures
