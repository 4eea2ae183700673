"""The tune driver: a thread in rank 0's process that runs :class:`.search.Search` on the live job.

It submits every trial through ``job.request`` (the path ``dspark-lab set`` takes: validated, announced in the
store, applied on every rank at one step, rolled back everywhere if any rank fails) and waits on the
:class:`PendingChange`; it reads step times and peaks from the run's metrics.jsonl. The control endpoint starts it
(``POST /tune``), stops it (``POST /tune/stop``: the search ends at the next block and the best found so far stays)
and reports it (``GET /tune``). Each trial and the decision become ``tune`` events in events.jsonl.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from typing import Any

from dspark_lab.errors import DSparkError, PolicyError
from dspark_lab.runtime.jsonl import Follower
from dspark_lab.tune import space as space_mod
from dspark_lab.tune.search import OBJECTIVES, Sample, Search, TuneOptions, covering_budget

STEP_WAIT_S = 120.0  # a trial gives up when the job makes no step for this long
APPLY_WAIT_S = 300.0
STOP_CHECK_S = 0.5  # how often a wait for a step looks whether the run is stopping
MAX_MB = 1 << 30
_ids = itertools.count(1)
LOOKBACK_BYTES = 256 * 1024  # hundreds of metrics records


class LiveJob:
    """:class:`.search.TrialJob` over a running :class:`~dspark_lab.runtime.attach.Job` (rank 0)."""

    def __init__(self, job, peak_field: str):
        self.job, self.peak_field = job, peak_field
        # Start a little before the end: another rank may already have written its record of the step after
        # rank 0's current one (ranks finish a step a moment apart), and a read must still find it.
        self._follower = Follower(job.run_dir.metrics_path, lookback=LOOKBACK_BYTES)
        self._records: dict[int, list[dict]] = {}
        if peak_field != "peak_activation_bytes":  # memory counters are read every step only when asked for
            job.meter.want_memory("tune")

    @property
    def step(self) -> int:
        return self.job.step

    def apply(self, values: dict[str, Any]) -> None:
        changes = {k: v for k, v in values.items() if self.job.policies.get(k) != v}
        if not changes:
            return
        pending = self.job.request(changes)
        if not pending.done.wait(APPLY_WAIT_S):
            raise RuntimeError(f"change {pending.change_id} not applied within {APPLY_WAIT_S:g} s")
        if pending.state != "applied":
            raise RuntimeError(f"{pending.state}: {pending.reason}")

    def _wait_step(self, target: int) -> None:
        """Until the job has ended step ``target``: woken at each step's end (``job.stepped``), not by polling,
        which would take the GIL from the training thread hundreds of times a second."""
        last, seen = time.monotonic(), self.job.step
        while self.job.step < target:
            if self.job.coordinator.stopped:
                raise RuntimeError("the run is stopping")
            if self.job.step != seen:
                last, seen = time.monotonic(), self.job.step
            elif time.monotonic() - last > STEP_WAIT_S:
                raise RuntimeError(f"the job made no step for {STEP_WAIT_S:g} s")
            with self.job.stepped:
                self.job.stepped.wait_for(lambda: self.job.step >= target, timeout=STOP_CHECK_S)

    def _load(self) -> None:
        for record in self._follower.poll():
            self._records.setdefault(record["step"], []).append(record)

    def read(self, n: int) -> list[Sample]:
        first = self.job.step + 1
        self._wait_step(first + n - 1)
        deadline = time.monotonic() + 2.0  # the other ranks' records of the same steps land within a moment
        while True:
            self._load()
            complete = all(len(self._records.get(s, ())) >= self.job.world for s in range(first, first + n))
            if complete or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        samples = []
        for s in range(first, first + n):
            records = self._records.pop(s, [])
            mine = next((r for r in records if r.get("rank") == 0), None)
            if mine is None:
                continue
            peaks = [r[self.peak_field] for r in records if r.get(self.peak_field) is not None]
            samples.append(Sample(s, float(mine["step_time_s"]), float(max(peaks)) if peaks else None))
        for old in [s for s in self._records if s < first]:
            del self._records[old]
        return samples

    def close(self) -> None:
        self._follower.close()
        self.job.meter.want_memory("tune", False)


def _number(body: dict, name: str, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= hi:
        raise DSparkError(f"--{name.replace('_', '-')}: {value!r} is not allowed; allowed: a number > 0 and <= {hi}")
    return float(value)


def parse_request(body: dict[str, Any]) -> dict[str, Any]:
    """The options of a ``POST /tune`` body, checked (one-line errors naming the option)."""
    objective = body.get("objective", "throughput")
    if objective not in OBJECTIVES:
        raise DSparkError(f"--objective: {str(objective)[:40]!r} is not allowed; allowed: {' | '.join(OBJECTIVES)}")
    budget = body.get("budget_steps")  # None: enough for every candidate (search.covering_budget)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or not 10 <= budget <= 100_000):
        raise DSparkError(f"--budget-steps: {str(budget)[:40]!r} is not allowed; allowed: an int in 10..100000")
    keys = body.get("keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) and len(k) <= 100
                                                                    for k in keys) or len(keys) > 32):
        raise DSparkError("--keys: must be at most 32 policy keys")
    allow_lossy = body.get("allow_lossy", False)
    if not isinstance(allow_lossy, bool):
        raise DSparkError("--allow-lossy: must be true or false")
    act, mem = _number(body, "max_activation_mb", MAX_MB), _number(body, "max_memory_gb", MAX_MB)
    if act is not None and mem is not None:
        raise DSparkError("--max-activation-mb and --max-memory-gb: give one of them")
    return {"objective": objective, "budget_steps": budget, "keys": keys, "allow_lossy": allow_lossy,
            "max_activation_mb": act, "max_memory_gb": mem}


class Tune:
    """One search on one job: started once, stopped on request, and its state read by GET /tune."""

    def __init__(self, job, request: dict[str, Any]):
        self.job, self.request = job, request
        self.id = f"t{next(_ids)}"
        self.state = "running"
        self.error = ""
        self.trials: list[dict] = []
        self.outcome: dict | None = None
        self.stop_event = threading.Event()
        self.space = space_mod.build(job.specs, dict(job.policies), self._refusal, keys=request["keys"],
                                     allow_lossy=request["allow_lossy"], not_here=job.policy_state.not_here)
        self.budget_for_all = covering_budget(self.space.keys, dict(job.policies))
        if request["budget_steps"] is None:
            self.request = request = {**request, "budget_steps": self.budget_for_all}
        memory_field = "memory_peak_bytes" if job.backend.torch_device == "cuda" else "rss_bytes"
        self.peak_field = memory_field if request["max_memory_gb"] is not None else "peak_activation_bytes"
        cap = (request["max_memory_gb"] * 2**30 if request["max_memory_gb"] is not None
               else request["max_activation_mb"] * 2**20 if request["max_activation_mb"] is not None else None)
        self.options = TuneOptions(objective=request["objective"], budget_steps=request["budget_steps"],
                                   max_peak_bytes=cap)
        self._thread = threading.Thread(target=self._run, name=f"dspark-tune-{self.id}", daemon=True)

    def _refusal(self, key: str, value: Any) -> str | None:
        try:
            self.job.validate({key: value})
        except PolicyError as exc:
            return str(exc)
        return None

    def start(self) -> "Tune":
        self._event("start", options=self.request, space=self.space.as_dict(), peak_field=self.peak_field)
        self._thread.start()
        return self

    def _event(self, phase: str, **extra) -> None:
        self.job.record_event("tune", step=self.job.step, rank=None, reason=phase, tune_id=self.id, **extra)

    def _log(self, kind: str, record: dict) -> None:
        if kind == "trial":
            self.trials.append(record)
        self._event(kind, **({"trial": record} if kind == "trial" else {"decision": record}))

    def _run(self) -> None:
        live = LiveJob(self.job, self.peak_field)
        try:
            search = Search(live, dict(self.job.policies), self.space.keys, self.options, log=self._log,
                            should_stop=self.stop_event.is_set)
            outcome = search.run()
            self.outcome = {k: v for k, v in outcome.as_dict().items() if k != "trials"}
            self.state = "stopped" if outcome.stopped or self.stop_event.is_set() else "done"
        except Exception as exc:  # the job is never stopped by the tuner: record and end the search
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"[:300]
            self._event("error", error=self.error)
        finally:
            live.close()

    @property
    def running(self) -> bool:
        return self.state == "running"

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def report(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "error": self.error, "options": self.request,
                "peak_field": self.peak_field, "space": self.space.as_dict(), "budget_for_all": self.budget_for_all,
                "trials": list(self.trials),
                "outcome": self.outcome, "step": self.job.step}


def start(job, body: dict[str, Any]) -> Tune:
    current = job.state.get("tune")
    if current is not None and current.running:
        raise DSparkError(f"tune: tune {current.id} is already running; stop it with `dspark-lab tune "
                          f"{job.run_dir.id} --stop`")
    tune = Tune(job, parse_request(body))
    job.state["tune"] = tune
    return tune.start()


def refusal_of_set(job) -> str | None:
    """Why a manual ``set`` is refused now (a tune owns the policies), or None."""
    tune = job.state.get("tune")
    if tune is not None and tune.running:
        return (f"set: refused: tune {tune.id} is searching this run's policies; stop it with "
                f"`dspark-lab tune {job.run_dir.id} --stop` (it keeps the best found so far)")
    return None
