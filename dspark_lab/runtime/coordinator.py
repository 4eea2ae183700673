"""Every rank applies a change at the same step, without a collective on every step.

Rank 0 receives a change from the control endpoint and, at its next step boundary ``s``, *announces* it in the
run's c10d store (torchrun's own TCPStore) as "takes effect from step s+2". Every other rank makes one non-blocking
``store.check`` per step for the next announcement. Under DDP (or any per-step collective) no rank can finish step
s+1 before rank 0 has started it, so all ranks have seen the announcement by boundary s+1, where they apply it. The
ranks then agree through the store: if any rank failed, all roll back, and the event says which rank and why.
"""

from __future__ import annotations

import datetime
import itertools
import json
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

ANNOUNCE_MARGIN = 2  # an announcement at boundary s takes effect from step s + ANNOUNCE_MARGIN
AGREE_TIMEOUT_S = 120.0


class StopRun(SystemExit):
    """Raised out of ``optimizer.step()`` on every rank when a stop applies: the script ends with exit code 0."""

    def __init__(self):
        super().__init__(0)


@dataclass
class PendingChange:
    """A change accepted by rank 0, waiting for its step; the control thread waits on ``done``."""

    change_id: str
    changes: dict[str, Any]
    kind: str = "change"  # or "stop"
    step: int | None = None
    state: str = "queued"  # queued -> pending -> applied | rolled_back
    reason: str = ""
    old: dict[str, Any] = field(default_factory=dict)
    announced: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class Coordinator:
    """Announces, discovers and applies changes at step boundaries on one rank."""

    def __init__(self, job, store, rank: int, world: int):
        self.job = job
        self.store = store  # a PrefixStore on torchrun's store, or None when alone
        self.rank = rank
        self.world = world
        self.margin = ANNOUNCE_MARGIN if world > 1 else 1
        self.inbox: queue.SimpleQueue[PendingChange] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._next_seq = 1
        self._scheduled: list[dict[str, Any]] = []
        self._local: dict[str, PendingChange] = {}

    # --- rank 0: from the control thread -----------------------------------------------------------------------

    def submit(self, changes: dict[str, Any], kind: str = "change") -> PendingChange:
        pending = PendingChange(change_id=f"c{next(self._ids)}", changes=changes, kind=kind)
        self.inbox.put(pending)
        return pending

    # --- every rank: at each step boundary ---------------------------------------------------------------------

    def at_boundary(self, step: int) -> None:
        """Called after optimizer step ``step`` completed, before step ``step + 1`` begins."""
        if self.rank == 0:
            self._announce_queued(step)
        elif self.store is not None:
            self._discover()
        due = [a for a in self._scheduled if a["step"] <= step + 1]
        if due:
            self._scheduled = [a for a in self._scheduled if a["step"] > step + 1]
            for announcement in due:
                self._execute(announcement, step)

    def _announce_queued(self, step: int) -> None:
        while True:
            try:
                pending = self.inbox.get_nowait()
            except queue.Empty:
                return
            announcement = {"seq": self._next_seq, "change_id": pending.change_id, "kind": pending.kind,
                            "step": step + self.margin, "changes": pending.changes}
            self._next_seq += 1
            if self.store is not None:
                self.store.set(f"announce/{announcement['seq']}", json.dumps(announcement))
            pending.step, pending.state = announcement["step"], "pending"
            self._local[pending.change_id] = pending
            self._scheduled.append(announcement)
            self.job.record_event("pending", step=announcement["step"], rank=None, change_id=pending.change_id,
                                  changes=pending.changes)
            pending.announced.set()

    def _discover(self) -> None:
        while self.store.check([f"announce/{self._next_seq}"]):
            self._scheduled.append(json.loads(self.store.get(f"announce/{self._next_seq}")))
            self._next_seq += 1

    def _execute(self, announcement: dict[str, Any], step: int) -> None:
        late = step + 1 - announcement["step"]
        if announcement["kind"] == "stop":
            self.job.record_event("stop", step=step, rank=self.rank, change_id=announcement["change_id"],
                                  reason="stop requested")
            self._finish(announcement, "applied", "")
            raise StopRun()
        failure, applied = self.job.apply_changes(announcement["changes"])
        reasons = self._agree(announcement["seq"], failure)
        if reasons:
            self.job.rollback_changes(applied, announcement, "; ".join(reasons))
        else:
            late_note = f"applied {late} step(s) late: ranks were not in step" if late > 0 else ""
            self.job.commit_changes(applied, announcement, late_note)
        # The reply goes out once every rank has logged its apply/rollback, so a reader sees all of them.
        self._agree(f"{announcement['seq']}/logged", "", wait=self.rank == 0)
        self._finish(announcement, "rolled_back" if reasons else "applied", "; ".join(reasons))

    def _agree(self, seq, failure: str, wait: bool = True) -> list[str]:
        """Every rank's failure reason for announcement ``seq`` (empty when all succeeded).

        With ``wait=False`` a rank only posts its own answer and goes on.
        """
        if self.store is None or self.world == 1:
            return [f"rank {self.rank}: {failure}"] if failure else []
        self.store.set(f"result/{seq}/{self.rank}", failure)
        if not wait:
            return []
        keys = [f"result/{seq}/{r}" for r in range(self.world)]
        try:
            self.store.wait(keys, datetime.timedelta(seconds=AGREE_TIMEOUT_S))
        except RuntimeError:  # torch's DistStoreError on timeout
            return ["not every rank reached the apply step in time"]
        answers = [self.store.get(k).decode() for k in keys]
        return [f"rank {r}: {text}" for r, text in enumerate(answers) if text]

    def _finish(self, announcement: dict[str, Any], state: str, reason: str) -> None:
        pending = self._local.pop(announcement["change_id"], None)
        if pending is not None:
            pending.state, pending.reason = state, reason
            pending.done.set()
