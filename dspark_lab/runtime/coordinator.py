"""Every rank applies a change at the same step, without a collective on every step.

Rank 0 receives a change from the control endpoint and, at its next step boundary ``s``, *announces* it in the
run's c10d store (torchrun's own TCPStore) as "takes effect from step s+2". Every other rank makes one non-blocking
``store.check`` per step for the next announcement. Under DDP (or any per-step collective) no rank can finish step
s+1 before rank 0 has started it, so all ranks have seen the announcement by boundary s+1, where they apply it. The
ranks then agree through the store: if any rank failed, all roll back, and the event says which rank and why.

The store has no authentication and anyone who reaches its port can write to it, so every value the ranks exchange
is sealed with an HMAC-SHA256 (RFC 2104) keyed by the run's token, which each rank reads from the run directory
(never from the store), over the store key and the body; every rank also checks an announcement against the policy
schema. A value that fails either check is ignored (logged once per key): it changes nothing, and since the real
value overwrites it, it stalls nothing.

A plugin can hold changes back while it must not be disturbed (a profile capture): a state object in ``job.state``
with a true ``busy`` (its reason), or with ``busy_keys`` of which a change is announced but not yet applied, makes
rank 0 keep every other change queued (not announced) until neither holds; then it is announced as usual and its
reply and ``apply`` event say what it waited for. A stop, and changes of the busy state's own keys, never wait.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import itertools
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dspark_lab.errors import PolicyError
from dspark_lab.runtime.limits import MAX_STORE_VALUE, short

ANNOUNCE_MARGIN = 2  # an announcement at boundary s takes effect from step s + ANNOUNCE_MARGIN
AGREE_TIMEOUT_S = 120.0
KINDS = ("change", "stop")


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
    state: str = "queued"  # queued -> pending -> applied | rolled_back | refused
    reason: str = ""
    waited: str = ""  # what a busy job made it wait for before it was announced
    held_since: int | None = None  # the boundary at which rank 0 first held it back
    old: dict[str, Any] = field(default_factory=dict)
    announced: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class Sealer:
    """Seals and opens store values with the run's token: ``{"body": json, "mac": hex}``."""

    def __init__(self, token: str, run_id: str):
        self._key = token.encode()
        self._run = run_id

    def _mac(self, key: str, body: str) -> str:
        return hmac.new(self._key, f"{self._run}\n{key}\n{body}".encode(), hashlib.sha256).hexdigest()

    def seal(self, key: str, value: Any) -> str:
        body = json.dumps(value, sort_keys=True)
        return json.dumps({"body": body, "mac": self._mac(key, body)})

    def open(self, key: str, raw: bytes) -> Any:
        """The value sealed at ``key``; ValueError when it is too big, malformed or not sealed with this token."""
        if len(raw) > MAX_STORE_VALUE:
            raise ValueError(f"{len(raw)} bytes, over the {MAX_STORE_VALUE}-byte limit")
        try:
            outer = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("not JSON") from None
        if not isinstance(outer, dict) or not isinstance(outer.get("body"), str) or \
                not isinstance(outer.get("mac"), str):
            raise ValueError("not a sealed value")
        if not hmac.compare_digest(outer["mac"].encode(), self._mac(key, outer["body"]).encode()):
            raise ValueError("its HMAC does not match the run's token")
        return json.loads(outer["body"])


class Coordinator:
    """Announces, discovers and applies changes at step boundaries on one rank."""

    def __init__(self, job, store, rank: int, world: int):
        self.job = job
        self.store = store  # a PrefixStore on torchrun's store, or None when alone
        self.rank = rank
        self.world = world
        self.margin = ANNOUNCE_MARGIN if world > 1 else 1
        self.sealer = Sealer(job.run_dir.token(), job.run_dir.id) if store is not None else None
        self.inbox: queue.SimpleQueue[PendingChange] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._next_seq = 1
        self._scheduled: list[dict[str, Any]] = []
        self._local: dict[str, PendingChange] = {}
        self._lock = threading.Lock()
        self._stop: PendingChange | None = None
        self._held: list[PendingChange] = []  # rank 0: queued while the job is busy, oldest first
        self.stopped = False
        self._ignored: set[str] = set()
        self.after_commit = None  # rank 0: called with each committed announcement (runtime.restarts.Saver)

    # --- rank 0: from the control thread -----------------------------------------------------------------------

    def submit(self, changes: dict[str, Any], kind: str = "change") -> PendingChange:
        """Queue a change or a stop. Once a stop is asked, a change is refused (logged) and a stop is the same one."""
        with self._lock:
            if self._stop is not None:
                if kind == "stop":
                    return self._stop
                reason = f"refused: the run is stopping (stop {self._stop.change_id} was requested first)"
                self.job.record_event("refuse", step=self.job.step, rank=None, reason=reason,
                                      changes={k: short(v) for k, v in changes.items()})
                raise PolicyError(reason)
            pending = PendingChange(change_id=f"c{next(self._ids)}", changes=changes, kind=kind)
            if kind == "stop":
                self._stop = pending
            self.inbox.put(pending)
            return pending

    def abandon(self, reason: str) -> None:
        """Resolve every change not yet applied as refused with ``reason`` (the run ends); rank 0 only."""
        with self._lock:
            left = list(self._local.values()) + self._held
            self._local.clear()
            self._held = []
            while True:
                try:
                    left.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
        for pending in left:
            if pending.done.is_set():
                continue
            if pending.kind == "stop":
                pending.state, pending.reason = "ended", "the script ended before the stop applied"
                pending.announced.set()
                pending.done.set()
                continue
            pending.state, pending.reason = "refused", reason
            self.job.record_event("refuse", step=pending.step, rank=None, change_id=pending.change_id,
                                  reason=reason, changes={k: short(v) for k, v in pending.changes.items()})
            pending.announced.set()
            pending.done.set()

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

    def _busy(self) -> tuple[str, frozenset]:
        """Why the job is busy now ("" if not), and the keys that may still change (a plugin's ``job.state``)."""
        for state in list(self.job.state.values()):
            keys = frozenset(getattr(state, "busy_keys", ()))
            reason = getattr(state, "busy", "")
            ahead = next((a for a in self._scheduled if keys & set(a["changes"])), None) if keys else None
            if not reason and ahead is not None:
                reason = f"the {', '.join(sorted(keys & set(ahead['changes'])))} change announced for step " \
                         f"{ahead['step']}"
            if reason:
                return reason, keys
        return "", frozenset()

    def _announce_queued(self, step: int) -> None:
        with self._lock:
            while True:
                try:
                    self._held.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            ready, self._held = self._held, []
        for pending in ready:
            busy, free = self._busy() if pending.kind == "change" else ("", frozenset())
            if busy and not set(pending.changes) <= free:
                pending.held_since = step if pending.held_since is None else pending.held_since
                pending.waited = f"waited for {busy} to end (held from step {pending.held_since} to {step + 1})"
                with self._lock:
                    self._held.append(pending)
                continue
            seq = self._next_seq
            announcement = {"seq": seq, "change_id": pending.change_id, "kind": pending.kind,
                            "step": step + self.margin, "changes": pending.changes}
            if pending.waited:
                announcement["waited"] = pending.waited
            self._next_seq += 1
            if self.store is not None:
                self.store.set(f"announce/{seq}", self.sealer.seal(f"announce/{seq}", announcement))
            pending.step, pending.state = announcement["step"], "pending"
            with self._lock:
                self._local[pending.change_id] = pending
            self._scheduled.append(announcement)
            self.job.record_event("pending", step=announcement["step"], rank=None, change_id=pending.change_id,
                                  changes=pending.changes, **({"reason": pending.waited} if pending.waited else {}))
            pending.announced.set()

    def _discover(self) -> None:
        while True:
            key = f"announce/{self._next_seq}"
            if not self.store.check([key]):
                return
            try:
                announcement = self.sealer.open(key, self.store.get(key))
                self._check_shape(announcement, self._next_seq)
            except (ValueError, TypeError) as exc:
                self._ignore(key, str(exc))
                return  # rank 0's real announcement overwrites it; it is read then
            refusal = self._value_refusal(announcement)
            if refusal:  # sealed by rank 0, so real, but this rank's schema refuses it (another plugin version):
                # take part and say no, so every rank rolls back at once with the reason instead of waiting
                announcement = {**announcement, "refused_here": refusal}
            self._scheduled.append(announcement)
            self._next_seq += 1

    def _check_shape(self, announcement: Any, seq: int) -> None:
        """Every rank checks what rank 0 sealed: the right sequence number, kind, step and fields."""
        if not isinstance(announcement, dict) or announcement.get("seq") != seq or \
                announcement.get("kind") not in KINDS or type(announcement.get("step")) is not int or \
                not isinstance(announcement.get("change_id"), str) or \
                not isinstance(announcement.get("changes"), dict):
            raise ValueError("not an announcement of this sequence number")

    def _value_refusal(self, announcement: dict[str, Any]) -> str:
        """Why this rank's policy schema refuses the announced values ("" when it takes them all)."""
        for key, value in announcement["changes"].items():
            spec = self.job.specs.get(key)
            try:
                if spec is None or spec.validate(value) != value:
                    raise PolicyError(f"{short(key)}: not a policy of this run here, or {short(value)} not its value")
            except PolicyError as exc:
                return short(str(exc), 300)
        return ""

    def _ignore(self, key: str, why: str) -> None:
        if key in self._ignored:
            return
        self._ignored.add(key)
        self.job.record_event("refuse", step=self.job.step, rank=self.rank,
                              reason=f"store: ignored the value at dspark/{self.job.run_dir.id}/{key}: {short(why)}")

    def _execute(self, announcement: dict[str, Any], step: int) -> None:
        late = step + 1 - announcement["step"]
        if announcement["kind"] == "stop":
            self.stopped = True
            self.job.record_event("stop", step=step, rank=self.rank, change_id=announcement["change_id"],
                                  reason="stop requested")
            self._finish(announcement, "applied", "")
            if self.rank == 0:
                self.abandon(f"refused: the run stopped after step {step}, before this change applied")
            raise StopRun()
        if announcement.get("refused_here"):
            failure, applied = f"this rank's policy schema refuses it: {announcement['refused_here']}", []
        else:
            failure, applied = self.job.apply_changes(announcement["changes"])
        reasons = self._agree(announcement["seq"], failure)
        if reasons:
            self.job.rollback_changes(applied, announcement, "; ".join(reasons))
        else:
            late_note = f"applied {late} step(s) late: ranks were not in step" if late > 0 else ""
            note = "; ".join(n for n in (str(announcement.get("waited") or ""), late_note) if n)
            self.job.commit_changes(applied, announcement, note)
            if self.after_commit is not None:
                self.after_commit(announcement)
        # The reply goes out once every rank has logged its apply/rollback, so a reader sees all of them.
        self._agree(f"{announcement['seq']}/logged", "", wait=self.rank == 0)
        self._finish(announcement, "rolled_back" if reasons else "applied", "; ".join(reasons))

    def _agree(self, seq, failure: str, wait: bool = True) -> list[str]:
        """Every rank's failure reason for announcement ``seq`` (empty when all succeeded).

        With ``wait=False`` a rank only posts its own answer and goes on. A value that is not sealed by a rank of
        this run is ignored and waited past: the rank's own write replaces it.
        """
        if self.store is None or self.world == 1:
            return [f"rank {self.rank}: {failure}"] if failure else []
        mine = f"result/{seq}/{self.rank}"
        self.store.set(mine, self.sealer.seal(mine, {"rank": self.rank, "failure": failure}))
        if not wait:
            return []
        answers: dict[int, str] = {}
        deadline = time.monotonic() + AGREE_TIMEOUT_S
        while len(answers) < self.world:
            missing = [f"result/{seq}/{r}" for r in range(self.world) if r not in answers]
            try:
                self.store.wait(missing, datetime.timedelta(seconds=max(0.01, deadline - time.monotonic())))
            except RuntimeError:  # torch's DistStoreError on timeout
                return ["not every rank reached the apply step in time"]
            for key in missing:
                rank = int(key.rsplit("/", 1)[1])
                try:
                    value = self.sealer.open(key, self.store.get(key))
                    if value.get("rank") != rank or not isinstance(value.get("failure"), str):
                        raise ValueError("not this rank's answer")
                    answers[rank] = value["failure"]
                except (ValueError, TypeError, AttributeError) as exc:
                    self._ignore(key, str(exc))
            if len(answers) < self.world:
                if time.monotonic() > deadline:
                    return ["not every rank reached the apply step in time"]
                time.sleep(0.01)
        return [f"rank {r}: {text}" for r, text in sorted(answers.items()) if text]

    def _finish(self, announcement: dict[str, Any], state: str, reason: str) -> None:
        with self._lock:
            pending = self._local.pop(announcement["change_id"], None)
        if pending is not None:
            pending.state, pending.reason = state, reason
            pending.done.set()
