"""Every rank applies a change at the same step, without a collective on every step.

Rank 0 receives a change from the control endpoint and, at its next step boundary ``s``, *announces* it in the
run's c10d store (torchrun's own TCPStore) at ``announce/N`` as "takes effect from step s+2". Every other rank makes
one non-blocking ``store.check`` per step for the next announcement. Under DDP (or any per-step collective) no rank
can finish step s+1 before rank 0 has started it, so all ranks have seen the announcement by boundary s+1, where
they apply it and answer at ``result/N/R``.

Rank 0 *decides*: it waits for the other ranks' answers for a bounded window (``window_s`` in the announcement:
the larger of DECIDE_MIN_S and DECIDE_STEPS times the slowest recent step), then commits when every rank applied
it, or rolls back, naming the ranks that failed and why, or that did not answer in the window; it writes that
decision at ``decision/N`` and the other ranks, which wait for it (never for each other, and at most twice the window
plus DECISION_GRACE_S), do the same. A rank that never saw an announcement (deleted or overwritten in the store) so
holds the job up for the window at most: under DDP it waits in the next step's collective meanwhile. Rank 0 then
writes the announcement again (at the decision, and again 1, 2, 4 ... 64 steps later until that rank answers a later
change; and the group's name, deleted or an earlier group's written back); a rank that reads an announcement whose
decision is already written takes no part in it (``rollback`` events with rank 0's reason) and goes on to the next
one, so the ranks never fall out of step on the sequence. A stop is decided the same way: it applies on every rank
or on none.

The store does not grow with the number of changes: once every rank answered a change and said how it ended, rank 0
deletes its announcement and decision, and each other rank deletes its own answers (the first once it read the
decision, the second once it read the next one), all at a change's step. A change some rank did not answer, or did
not say it ended, is kept until that rank answers a later one, for at most MAX_KEPT changes: past them rank 0 drops
the oldest (a ``refuse`` event names it and the ranks) and seals ``floor``, below which every announcement is decided;
a rank jumps to it after a step that waited out rank 0's window (the only steps where it may be behind), and takes
no part in an announcement below it that it reads late (an old one written back after its decision was deleted).

The store has no authentication and anyone who reaches its port can write to it, so every value the ranks exchange
is sealed (:mod:`.sealed`): an HMAC-SHA256 keyed by the run's token, which each rank reads from the run directory
(never from the store), over the run id, the restart group's nonce, the store key and the body, checked with the
size bound before any byte is parsed; every rank also checks an announcement against the policy schema. A value that
fails is ignored (logged once per key) and deleted: its owner's real value replaces it, and a rank fetches a key it
rejected again only after 1, 2, 4 ... 32 steps, so a junk value, however big, costs a bounded number of fetches.
An announcement written again after its decision (a replay) is never applied.

A plugin can hold changes back while it must not be disturbed (a profile capture): a state object in ``job.state``
with a true ``busy`` (its reason), or with ``busy_keys`` of which a change is announced but not yet applied, makes
rank 0 keep every other change queued (not announced) until neither holds; then it is announced as usual and its
reply and ``apply`` event say what it waited for. A stop, and changes of the busy state's own keys, never wait.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dspark_lab.errors import PolicyError
from dspark_lab.runtime.limits import short
from dspark_lab.runtime.sealed import Sealer

ANNOUNCE_MARGIN = 2  # an announcement at boundary s takes effect from step s + ANNOUNCE_MARGIN
DECIDE_MIN_S = 3.0  # rank 0 waits at least this long for the other ranks' answers ...
DECIDE_STEPS = 4  # ... or this many times the slowest of the last RECENT_STEPS steps
RECENT_STEPS = 16
DECISION_GRACE_S = 5.0  # another rank waits for rank 0's decision up to twice the window plus this
MAX_WINDOW_S = 600.0
WAIT_SLICE_S = 0.25  # rank 0's wait for the logged answers wakes this often to repair a deleted decision
MAX_FETCHES = 4  # fetches of one key rejected while waiting for an answer; then it counts as missing
MAX_BACKOFF_STEPS = 32  # a rejected announcement key is fetched again after 1, 2, 4 ... this many steps
REASSERT_STEPS = 64  # rank 0 writes a missed announcement again 1, 2, 4 ... this many steps after its decision
MAX_KEPT = 16  # rank 0 keeps the keys of at most this many decided changes for ranks that may still read them
FLOOR_KEY = "floor"  # every announcement below the sequence number sealed here is decided (and may be gone)
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


class Coordinator:
    """Announces, discovers, applies and decides changes at step boundaries on one rank."""

    def __init__(self, job, store, rank: int, world: int):
        self.job = job
        self.store = store  # a GroupStore / PrefixStore on torchrun's store, or None when alone
        self.rank = rank
        self.world = world
        self.margin = ANNOUNCE_MARGIN if world > 1 else 1
        self.sealer = Sealer(job.run_dir.token(), job.run_dir.id) if store is not None else None
        self._scoped: Sealer | None = None
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
        self._rejected: dict[str, tuple[int, int]] = {}  # announcement key -> (rejections, step it may be read at)
        self._missed: dict[int, dict[str, Any]] = {}  # rank 0: seq -> its keys, kept for ranks that may read them
        self._floor = 0  # rank 0: every announcement below it is decided and no longer kept (FLOOR_KEY)
        self._logged_key: str | None = None  # another rank: its last logged answer, deleted once rank 0 is past it
        self._decided = b""  # rank 0: the sealed decision it wrote last
        self._step_times: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)
        self._left_boundary: float | None = None
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
        now = time.monotonic()
        if self._left_boundary is not None:  # the step itself, not the time spent here (a decision window)
            self._step_times.append(now - self._left_boundary)
        try:
            if self.rank == 0:
                self._announce_queued(step)
                if self._missed:
                    self._reassert(step)
            elif self.store is not None:
                self._discover(step)
            due = [a for a in self._scheduled if a["step"] <= step + 1]
            if due:
                self._scheduled = [a for a in self._scheduled if a["step"] > step + 1]
                for announcement in due:
                    self._execute(announcement, step)
        finally:
            self._left_boundary = time.monotonic()

    def _window(self) -> float:
        """How long rank 0 waits for the other ranks' answers: several of the slowest recent steps, or the floor."""
        return min(MAX_WINDOW_S, max([DECIDE_MIN_S, *(DECIDE_STEPS * t for t in self._step_times)]))

    def _sealer(self) -> Sealer:
        """The sealer of this restart group's keys (its nonce is known once the group's store is resolved)."""
        if self._scoped is None:
            self._scoped = self.sealer.scoped(getattr(self.store, "scope", ""))
        return self._scoped

    def _seal(self, key: str, value: Any) -> bytes:
        return self._sealer().seal(key, value)

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
                            "step": step + self.margin, "changes": pending.changes,
                            "window_s": round(self._window(), 3)}
            if pending.waited:
                announcement["waited"] = pending.waited
            self._next_seq += 1
            if self.store is not None:
                self.store.set(f"announce/{seq}", self._seal(f"announce/{seq}", announcement))
            pending.step, pending.state = announcement["step"], "pending"
            with self._lock:
                self._local[pending.change_id] = pending
            self._scheduled.append(announcement)
            self.job.record_event("pending", step=announcement["step"], rank=None, change_id=pending.change_id,
                                  changes=pending.changes, **({"reason": pending.waited} if pending.waited else {}))
            pending.announced.set()

    def _reassert(self, step: int) -> None:
        """Rank 0: write again the announcements (and decisions) a rank missed, on a doubling schedule."""
        for seq, missed in list(self._missed.items()):
            if not missed["rewrite"] or step < missed["at"]:
                continue
            missed["every"] = min(REASSERT_STEPS, 2 * missed["every"])
            missed["at"] = step + missed["every"]
            self._write_missed(seq, missed)

    def _write_missed(self, seq: int, missed: dict[str, Any]) -> None:
        repair = getattr(self.store, "repair", None)
        if repair is not None:
            repair()  # the group's name, in case that is what the rank could not read
        self.store.set(f"decision/{seq}", missed["decision"])
        self.store.set(f"announce/{seq}", missed["announce"])
        if self._floor:  # a rank that missed this one may have missed one no longer kept, too
            self.store.set(FLOOR_KEY, self._seal(FLOOR_KEY, {"seq": self._floor}))

    def _keep(self, announcement: dict[str, Any], ranks: set[int], decision: bytes | None = None) -> None:
        """Rank 0: keep an announcement's keys until ``ranks`` answer a later change; with its sealed ``decision``
        (they missed it), write both again on the doubling schedule. Beyond MAX_KEPT changes the oldest goes."""
        seq = announcement["seq"]
        entry = self._missed.setdefault(seq, {"ranks": set(), "rewrite": False, "every": 1, "at": self.job.step + 1})
        entry["ranks"] |= ranks
        if decision is not None:
            entry.update(rewrite=True, decision=decision, announce=self._seal(f"announce/{seq}", announcement))
        while len(self._missed) > MAX_KEPT:
            self._drop(min(self._missed))

    def _drop(self, seq: int) -> None:
        """Rank 0: stop keeping announcement ``seq`` (decided) and every one before it; a rank still behind them
        skips to the floor after its next step that waited out a decision window (see _catch_up)."""
        entry = self._missed.pop(seq)
        self._forget(seq)
        self._floor = max(self._floor, seq + 1)
        self.store.set(FLOOR_KEY, self._seal(FLOOR_KEY, {"seq": self._floor}))
        ranks = ", ".join(map(str, sorted(entry["ranks"])))
        self.job.record_event("refuse", step=self.job.step, rank=self.rank,
                              reason=f"store: announcement {seq} (decided) is no longer kept for rank(s) {ranks}: "
                                     f"more than {MAX_KEPT} decided changes were waiting for them; they skip to "
                                     f"announcement {self._floor}")

    def _settle(self, answered) -> None:
        """Rank 0: a rank that answered a change has read every earlier one: delete what nobody needs any more."""
        for seq, entry in list(self._missed.items()):
            entry["ranks"] -= set(answered)
            if not entry["ranks"]:
                del self._missed[seq]
                self._forget(seq)

    def _release(self, announcement: dict[str, Any], unsure: set[int]) -> None:
        """Rank 0, a change done: delete its keys, unless ranks that missed it or were not seen to read its decision
        (``unsure``) may still read them."""
        if unsure:
            self._keep(announcement, unsure)
        if announcement["seq"] not in self._missed:
            self._forget(announcement["seq"])

    def _forget(self, seq: int) -> None:
        for key in (f"announce/{seq}", f"decision/{seq}"):
            self._delete(key)

    def _delete(self, key: str) -> None:
        try:
            self.store.delete_key(key)
        except Exception:  # a store without delete_key, or the key went away meanwhile
            pass

    def _waited_out(self) -> bool:
        """The last step took a decision window at least, and twice the fastest recent one: rank 0 waited for
        this rank's answer meanwhile (under DDP this rank waited in the step's collective). A job whose every step
        is that slow does not pass, so its steps cost no extra store round trip."""
        if not self._step_times:
            return False
        *before, last = self._step_times
        return last >= DECIDE_MIN_S and last >= 2 * min(before, default=0.0)

    def _floor_seq(self) -> int:
        """Another rank: rank 0's floor (every announcement below it is decided and no longer kept), or 0."""
        if not self.store.check([FLOOR_KEY]):
            return 0
        floor = self._read(FLOOR_KEY, lambda f: isinstance(f, dict) and type(f.get("seq")) is int)
        return floor["seq"] if floor is not None else 0

    def _catch_up(self, step: int) -> None:
        """Another rank, after a step that waited out a decision window: follow the group's name if rank 0 wrote
        it again (this rank read an earlier group's), and skip the announcements rank 0 decided without this rank
        and no longer keeps, so it reads the ones still to come."""
        refresh = getattr(self.store, "refresh", None)
        if refresh is not None and refresh():
            self.job.record_event("refuse", step=step, rank=self.rank,
                                  reason=f"store: the group's name read before was an earlier group's; now on "
                                         f"group {self.store.scope or '(the first)'}, from its first announcement")
            self._scoped, self._next_seq, self._scheduled, self._logged_key = None, 1, [], None
            self._rejected.clear()
            self._ignored.clear()
        floor = self._floor_seq()
        if floor > self._next_seq:
            self.job.record_event("rollback", step=step, rank=self.rank,
                                  reason=f"announcements {self._next_seq} to {floor - 1} were decided by rank 0 "
                                         "without this rank and are no longer kept in the store: skipped")
            self._next_seq = floor

    def _discover(self, step: int) -> None:
        if self._waited_out():
            self._catch_up(step)
        while True:
            seq = self._next_seq
            key = f"announce/{seq}"
            # a key rejected before is fetched again only after its backoff, or right after a step that waited
            # out a decision window (rank 0 may have written it again: see _write_missed)
            waited = bool(self._step_times) and self._step_times[-1] >= DECIDE_MIN_S
            if (step < self._rejected.get(key, (0, 0))[1] and not waited) or not self.store.check([key]):
                return
            announcement = self._read(key, lambda a: self._check_shape(a, seq))
            if announcement is None:
                count = self._rejected.get(key, (0, 0))[0] + 1
                self._rejected[key] = (count, step + min(MAX_BACKOFF_STEPS, 2 ** (count - 1)))
                return  # rank 0's real announcement replaces it; it is read then
            self._rejected.pop(key, None)
            self._next_seq += 1
            decided = self._decision(seq)
            if decided is not None:  # decided without this rank (it missed it), or written again: a replay
                self._took_no_part(announcement, decided)
                continue
            if announcement["step"] <= step and self._floor_seq() > seq:  # decided, no longer kept: a replay
                self._took_no_part(announcement, {"reasons": ["decided and no longer kept in the store"]})
                continue
            refusal = self._value_refusal(announcement) if announcement["kind"] == "change" else ""
            if refusal:  # sealed by rank 0, so real, but this rank's schema refuses it (another plugin version):
                # take part and say no, so every rank rolls back at once with the reason instead of waiting
                announcement = {**announcement, "refused_here": refusal}
            self._scheduled.append(announcement)

    def _check_shape(self, announcement: Any, seq: int) -> bool:
        """Every rank checks what rank 0 sealed: the right sequence number, kind, step and fields."""
        window = announcement.get("window_s", DECIDE_MIN_S) if isinstance(announcement, dict) else None
        return isinstance(announcement, dict) and announcement.get("seq") == seq and \
            announcement.get("kind") in KINDS and type(announcement.get("step")) is int and \
            isinstance(announcement.get("change_id"), str) and isinstance(announcement.get("changes"), dict) and \
            isinstance(window, (int, float)) and 0 < window <= MAX_WINDOW_S

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

    def _read(self, key: str, valid: Callable[[Any], bool]) -> Any:
        """The sealed value at ``key`` if it is there and ``valid``; else None. A value that fails is logged once and
        deleted (its writer's real value replaces it), so the same bytes are never fetched twice."""
        try:
            value = self._sealer().open(key, self.store.get(key))
            if not valid(value):
                raise ValueError("sealed, but not the value expected at this key")
            return value
        except ValueError as exc:
            self._ignore(key, str(exc))
            self._delete(key)
            return None

    def _poll(self, keys: dict[int, str], deadline: float, valid: Callable[[Any], bool],
              on_poll: Callable[[], None] | None = None) -> dict[int, Any]:
        """The valid sealed values at ``keys`` (by rank) that arrive before ``deadline``; each key is fetched at most
        MAX_FETCHES times (a key an attacker keeps overwriting counts as missing).

        It waits in ``store.wait`` (the store answers once every key is there), never in a loop of checks: a
        thousand ranks waiting for rank 0's decision cost the store one request each, not one every few ms. Keys
        are fetched once all are there, or at the deadline; ``on_poll``, when given, runs about every WAIT_SLICE_S.
        """
        got: dict[int, Any] = {}
        fetches = dict.fromkeys(keys, 0)
        while True:
            waiting = [key for rank, key in keys.items() if rank not in got and fetches[rank] < MAX_FETCHES]
            left = deadline - time.monotonic()
            if waiting and left > 0:
                try:
                    self.store.wait(waiting, datetime.timedelta(seconds=min(left, WAIT_SLICE_S) if on_poll else left))
                except RuntimeError:  # torch's DistStoreError: not all there within the slice
                    if time.monotonic() < deadline:
                        if on_poll is not None:
                            on_poll()
                        continue
            for rank, key in keys.items():
                if rank in got or fetches[rank] >= MAX_FETCHES or not self.store.check([key]):
                    continue
                fetches[rank] += 1
                value = self._read(key, valid)
                if value is not None:
                    got[rank] = value
            if len(got) == len(keys) or time.monotonic() >= deadline or \
                    all(rank in got or fetches[rank] >= MAX_FETCHES for rank in keys):
                return got
            if on_poll is not None:
                on_poll()

    def _post(self, key: str, value: dict[str, Any]) -> bytes:
        raw = self._seal(key, value)
        self.store.set(key, raw)
        return raw

    def _decision(self, seq: int, deadline: float | None = None) -> dict[str, Any] | None:
        """Rank 0's sealed decision on announcement ``seq`` (waiting for it until ``deadline``), or None."""
        def valid(d):
            return isinstance(d, dict) and d.get("seq") == seq and d.get("outcome") in ("applied", "rolled_back") \
                and isinstance(d.get("reasons"), list) and all(isinstance(r, str) for r in d["reasons"])
        return self._poll({0: f"decision/{seq}"}, deadline or 0.0, valid).get(0)

    # --- applying and deciding ---------------------------------------------------------------------------------

    def _execute(self, announcement: dict[str, Any], step: int) -> None:
        late = step + 1 - announcement["step"]
        applied: list = []
        if announcement["kind"] == "stop":
            failure = ""
        elif announcement.get("refused_here"):
            failure = f"this rank's policy schema refuses it: {announcement['refused_here']}"
        else:
            failure, applied = self.job.apply_changes(announcement["changes"])
        reasons, answered = self._agree(announcement, failure)
        if announcement["kind"] == "stop":
            return self._end_stop(announcement, step, reasons, answered)
        if reasons:
            self.job.rollback_changes(applied, announcement, "; ".join(reasons))
        else:
            late_note = f"applied {late} step(s) late: ranks were not in step" if late > 0 else ""
            note = "; ".join(n for n in (str(announcement.get("waited") or ""), late_note) if n)
            self.job.commit_changes(applied, announcement, note)
            if self.after_commit is not None:
                self.after_commit(announcement)
        outcome = "rolled_back" if reasons else "applied"
        # The reply goes out once every rank that took part has logged its apply/rollback, so a reader sees all.
        reasons += self._logged(announcement, outcome, answered)
        self._finish(announcement, outcome, "; ".join(reasons))

    def _agree(self, announcement: dict[str, Any], failure: str) -> tuple[list[str], list[int]]:
        """Why announcement ``seq`` rolls back on every rank ([] when it applies), and the ranks that answered.

        Rank 0 decides after at most the announcement's window and writes the decision; any other rank posts its
        answer and waits for that decision (up to twice the window plus DECISION_GRACE_S).
        """
        mine = [f"rank {self.rank}: {failure}"] if failure else []
        if self.store is None or self.world == 1:
            return mine, []
        seq, window = announcement["seq"], float(announcement.get("window_s", DECIDE_MIN_S))
        started = time.monotonic()
        if self.rank != 0:
            self._post(f"result/{seq}/{self.rank}", {"rank": self.rank, "failure": failure})
            decision = self._decision(seq, started + 2 * window + DECISION_GRACE_S)
            self._delete(f"result/{seq}/{self.rank}")  # rank 0 has decided, or has stopped waiting for it
            if decision is not None and self._logged_key is not None:  # rank 0 is past the change before
                self._delete(self._logged_key)
                self._logged_key = None
            if decision is None:
                return [f"rank {self.rank}: no decision from rank 0 within {2 * window + DECISION_GRACE_S:g} s"], []
            return (decision["reasons"] if decision["outcome"] == "rolled_back" else []), []
        others = {r: f"result/{seq}/{r}" for r in range(1, self.world)}
        answers = self._poll(others, started + window,
                             lambda v: isinstance(v, dict) and isinstance(v.get("failure"), str))
        missing = sorted(set(others) - set(answers))
        reasons = mine + [f"rank {r}: {answers[r]['failure']}" for r in sorted(answers) if answers[r]["failure"]]
        if missing:
            reasons.append(f"rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} did not answer within "
                           f"{window:g} s (the announcement did not reach it: deleted or overwritten in the store?)")
        self._settle(answers)
        decision = self._post(f"decision/{seq}", {"seq": seq, "outcome": "rolled_back" if reasons else "applied",
                                                  "reasons": reasons})
        self._decided = decision  # _logged writes it again if it goes missing
        if missing:
            self._keep(announcement, set(missing), decision)
            self._write_missed(seq, self._missed[seq])
        return reasons, sorted(answers)

    def _logged(self, announcement: dict[str, Any], outcome: str, answered: list[int]) -> list[str]:
        """Every rank says how it ended; rank 0 waits (one window) for those that answered, writing the decision
        again if it went missing meanwhile, and returns what disagrees with its own outcome."""
        if self.store is None or self.world == 1:
            return []
        seq = announcement["seq"]
        if self.rank != 0:
            self._logged_key = f"result/{seq}/logged/{self.rank}"
            self._post(self._logged_key, {"rank": self.rank, "outcome": outcome})
            return []
        decision_key = f"decision/{seq}"

        def restore():  # the decision itself: a copy without its reasons read "rolled back" as "nothing failed"
            if not self.store.check([decision_key]):
                self.store.set(decision_key, self._decided)
        logged = self._poll({r: f"result/{seq}/logged/{r}" for r in answered},
                            time.monotonic() + float(announcement.get("window_s", DECIDE_MIN_S)),
                            lambda v: isinstance(v, dict) and v.get("outcome") in ("applied", "rolled_back"),
                            restore)
        self._release(announcement, set(answered) - set(logged))  # each rank deletes its own answers
        return [f"rank {r} ended {v['outcome']}" for r, v in sorted(logged.items()) if v["outcome"] != outcome]

    def _took_no_part(self, announcement: dict[str, Any], decision: dict[str, Any]) -> None:
        """A rank that read an announcement only after rank 0 decided it: nothing applies here; say why."""
        why = "; ".join(decision["reasons"]) or "decided without this rank"
        reason = f"decided by rank 0 before this rank read it: {why}"
        for key, value in (announcement["changes"].items() if announcement["kind"] == "change" else [(None, None)]):
            self.job.record_event("rollback", step=announcement["step"], rank=self.rank, key=key,
                                  old=self.job.policies.get(key), new=value, reason=reason,
                                  change_id=announcement["change_id"])

    def _end_stop(self, announcement: dict[str, Any], step: int, reasons: list[str], answered: list[int]) -> None:
        if reasons:  # some rank did not take part: nobody stops, and a new stop may be asked
            reason = "; ".join(reasons)
            if self.rank == 0 and self.store is not None and self.world > 1:  # its keys: until they answer again
                self._release(announcement, set(answered))
            self.job.record_event("rollback", step=step, rank=self.rank, change_id=announcement["change_id"],
                                  reason=f"the stop did not apply: {reason}")
            with self._lock:
                if self._stop is not None and self._stop.change_id == announcement["change_id"]:
                    self._stop = None
            self._finish(announcement, "rolled_back", reason)
            return
        self.stopped = True
        self.job.record_event("stop", step=step, rank=self.rank, change_id=announcement["change_id"],
                              reason="stop requested")
        self._finish(announcement, "applied", "")
        if self.rank == 0:
            self.abandon(f"refused: the run stopped after step {step}, before this change applied")
        raise StopRun()

    def _finish(self, announcement: dict[str, Any], state: str, reason: str) -> None:
        with self._lock:
            pending = self._local.pop(announcement["change_id"], None)
        if pending is not None:
            pending.state, pending.reason = state, reason
            pending.done.set()
