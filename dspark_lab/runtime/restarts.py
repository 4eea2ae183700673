"""Policies that survive a restart: torchrun restarts the whole group when a worker dies (``--max-restarts``).

After every change it commits, rank 0 saves the policies in force that differ from their defaults, and those set at
launch whatever their value now (a change back to the default must win over ``--policy``), at ``policies``
in the run's store (the rendezvous store of a multi-node run, :func:`.nodes.store_address`), with a version (one
more per commit), sealed with the run's token. That store lives in a torchrun agent, so it outlives the workers;
the ranks of the next group find the value there before their job starts (a new run never does: its id, and so its
keys, are new), take it as launch values (applied where ``--policy`` values are: comm policies when DDP is built,
the others at the first step boundary) and each log one ``reapply`` event.
"""

from __future__ import annotations

from typing import Any

POLICIES_KEY = "policies"


def load(store, sealer) -> tuple[int, dict[str, Any]]:
    """(version, values) saved by the previous group's rank 0; (0, {}) when none or when the value is not sealed."""
    if store is None or not store.check([POLICIES_KEY]):
        return 0, {}
    try:
        saved = sealer.open(POLICIES_KEY, store.get(POLICIES_KEY))
        version, values = saved["version"], saved["values"]
        if type(version) is not int or not isinstance(values, dict):
            raise ValueError("not a policies record")
    except (ValueError, TypeError, KeyError):
        return 0, {}
    return version, values


class Saver:
    """Rank 0: save the policies in force after each commit."""

    def __init__(self, store, sealer, job, version: int):
        self.store, self.sealer, self.job, self.version = store, sealer, job, version

    def __call__(self, announcement: dict[str, Any] | None = None) -> None:
        launch = self.job.launch_policies
        values = {k: v for k, v in self.job.policies.items() if v != self.job.specs[k].default or k in launch}
        self.version += 1
        self.store.set(POLICIES_KEY, self.sealer.seal(POLICIES_KEY, {"version": self.version, "values": values,
                                                                     "step": self.job.step}))
