"""The trial logic of ``dspark-lab tune``: greedy one-key-at-a-time search over live policies inside a running job.

Plain Python over :class:`TrialJob` (apply values at a step boundary, read the next steps' times and peak memory),
so it runs the same on the real job (:mod:`.driver`) and on a fake job with scripted step times (the tests).

A trial compares a candidate C with the incumbent I in pairs of adjacent blocks, ordered ABBA: ``I C | C I | I C | C I
...`` (one switch per pair; the warm-up steps after each switch are discarded, then ``block`` steps measured). The
unit of evidence is a pair, not a step: steps of one block share the machine's load at that moment, so they are not
independent, and adjacent blocks share it the most. A block is summarised by its minimum: on a shared machine
interference only ever adds time to a step, so the fastest step of a block estimates the uninterfered step time with
far less variance than the median (Chen and Revels, "Robust benchmarking in noisy environments", 2016). Per pair
d = log(min C block / min I block); the order alternates, so a linear drift adds +e and -e to alternate pairs and
cancels (a design balanced for a trend: Cox, "Planning of Experiments", 1958; the reason Kalibera and Jones,
"Rigorous Benchmarking in Reasonable Time", ISMM 2013, interleave). The ratio is exp(mean d) with a Student-t
interval over pairs (n - 1 degrees of freedom). The trial is judged after every complete ABBA cycle (an even number
of pairs, where a linear drift cancels exactly) from ``min_pairs`` on. A trial's length follows the budget: it may
use its share of the steps left (those steps over the candidates still to try, at least ``min_trial_steps``), so a
larger ``--budget-steps`` buys longer trials and more looks. The K looks a trial is allowed share the error
rate by Pocock's boundary (one nominal level at every look, calibrated for t looks by :func:`look_levels`), so the
chance of any false verdict over the trial's looks stays within 1 - confidence (Jennison and Turnbull, "Group
Sequential Methods with Applications to Clinical Trials", 2000). The median summary and Bonferroni's 1 - alpha/K
are kept as options (``block_stat``, ``boundary``); benchmarks/tune_power.py compares them on the fake job.
A trial whose share allows COIN_FROM_PAIRS pairs or more is ordered by a seeded coin instead of ABBA, with a switch's
gap before every block, and judged by an exact sequential sign-flip test (:mod:`.stats`): with many looks ABBA's
normal-theory levels let false verdicts past 5% on a machine whose load jumps between blocks.
Verdicts: win when the interval lies below 1 and the ratio is at least ``min_gain`` faster, loss the mirror, tie
(stopped early) when the interval lies within ``1 +- min_gain``; otherwise the trial goes on to its budget and
is a tie ("not separated"): the incumbent stays (a switch is never paid for on no evidence).

Memory: the incumbent's measured peak times per-policy ratios learned from earlier trials (one factor per
key=value relative to that key's first-seen value) predicts a candidate's peak; a prediction over the cap with the
``margin`` is not tried, a measured peak over the cap is rolled back at once, an apply that raises is rolled back
and marked failed. The search goes on; at the end the incumbent (the best found) is in force.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from dataclasses import dataclass, field
from statistics import median, quantiles
from typing import Any, Callable, Protocol

from dspark_lab.tune.stats import (
    SequentialSignFlip,
    look_levels,
    look_points,
    paired_ratio_ci,
    signflip_ratio_ci,
)

OBJECTIVES = ("throughput", "memory")
SWITCH_STEPS = 2  # steps a change takes to be in force on every rank (the coordinator's margin): a nominal figure
BLOCK_STATS = ("median", "q25", "min")  # how a block of steps is summarised
BOUNDARIES = ("bonferroni", "pocock", "obf")  # how the error rate is spent over a trial's looks (ABBA)
ORDERS = ("auto", "abba", "coin")  # how a pair's blocks are ordered (and so which test judges the trial)
COIN_FROM_PAIRS = 12  # under "auto", a trial that may have this many coin pairs is ordered by the coin
VERDICTS = ("win", "loss", "tie", "over_cap", "predicted_over_cap", "failed", "stopped", "skipped_budget")


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured step: its wall time and the peak memory (bytes) it reached, None when not metered."""

    step: int
    step_time_s: float
    peak_bytes: float | None = None


class TrialJob(Protocol):
    """What the search needs from a job. ``apply`` blocks until the values are in force on every rank (or raises);
    ``read(n)`` blocks until ``n`` steps completed after the call and returns them; ``step`` is the last step."""

    def apply(self, values: dict[str, Any]) -> None: ...

    def read(self, n: int) -> list[Sample]: ...

    @property
    def step(self) -> int: ...


@dataclass(kw_only=True, slots=True)
class TuneOptions:
    objective: str = "throughput"
    max_peak_bytes: float | None = None  # the cap on Sample.peak_bytes (--max-activation-mb or --max-memory-gb)
    budget_steps: int = 200
    warmup: int = 2
    block: int = 4
    min_pairs: int = 4  # pairs of blocks before a throughput verdict (a t-interval needs a few; even: ABBA cycles)
    max_pairs: int = 64  # the most pairs of one trial, whatever the budget (bounds the boundary's calibration)
    # a trial may use max(min_trial_steps, steps left / candidates left), never more than the steps left; an
    # undecided trial is extended up to it, then a tie (110 steps: 8 pairs of 4-step blocks)
    min_trial_steps: int = 110
    min_gain: float = 0.03  # a win must be at least this much faster; a tie is within it
    margin: float = 0.10  # memory safety margin of a prediction
    confidence: float = 0.95  # over all the looks of one trial
    block_stat: str = "min"  # interference only adds time: a block's minimum varies least (benchmarks/tune_power.py)
    boundary: str = "pocock"
    order: str = "auto"  # abba (t test) for short trials, the coin (exact sign-flip test) for long ones
    seed: int | None = None  # of the coin; None draws one (the outcome records it)

    def __post_init__(self):
        from dspark_lab.errors import DSparkError

        if self.objective not in OBJECTIVES:
            raise DSparkError(f"--objective: {self.objective!r} is not allowed; allowed: {' | '.join(OBJECTIVES)}")
        if not 10 <= self.budget_steps <= 100_000:
            raise DSparkError(f"--budget-steps: {self.budget_steps} is not allowed; allowed: an int in 10..100000")
        if self.max_peak_bytes is not None and not (math.isfinite(self.max_peak_bytes) and self.max_peak_bytes > 0):
            raise DSparkError(f"memory cap: {self.max_peak_bytes!r} is not allowed; allowed: a positive number")
        if self.block_stat not in BLOCK_STATS:
            raise DSparkError(f"block_stat: {self.block_stat!r} is not allowed; allowed: {' | '.join(BLOCK_STATS)}")
        if self.boundary not in BOUNDARIES:
            raise DSparkError(f"boundary: {self.boundary!r} is not allowed; allowed: {' | '.join(BOUNDARIES)}")
        if self.order not in ORDERS:
            raise DSparkError(f"order: {self.order!r} is not allowed; allowed: {' | '.join(ORDERS)}")
        if not 2 <= self.block <= 32:
            raise DSparkError(f"block: {self.block} is not allowed; allowed: 2 to 32 steps")
        if not 2 <= self.min_pairs <= self.max_pairs <= 64:
            raise DSparkError(f"min_pairs, max_pairs: {self.min_pairs}, {self.max_pairs} are not allowed; "
                              "allowed: 2 <= min_pairs <= max_pairs <= 64")
        if not 10 <= self.min_trial_steps <= 100_000:
            raise DSparkError(f"min_trial_steps: {self.min_trial_steps} is not allowed; allowed: an int in 10..100000")


@dataclass(slots=True)
class Trial:
    values: dict[str, Any]  # the full candidate configuration
    change: dict[str, Any]  # what differs from the incumbent
    verdict: str = ""
    steps: int = 0  # steps the trial consumed (warm-up and incumbent blocks included)
    pairs: int = 0  # pairs of blocks measured
    max_pairs: int = 0  # the most pairs its share of the budget allowed (its last look)
    design: str = "abba"  # abba (t interval, calibrated looks) | coin (sign-flip test, exact error spending)
    median_step_time_s: float | None = None
    incumbent_step_time_s: float | None = None
    ratio: float | None = None
    ci: tuple[float, float] | None = None
    peak_bytes: float | None = None
    predicted_peak_bytes: float | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"values": self.values, "change": self.change, "verdict": self.verdict, "steps": self.steps,
                "pairs": self.pairs, "max_pairs": self.max_pairs, "design": self.design,
                "median_step_time_s": self.median_step_time_s, "incumbent_step_time_s": self.incumbent_step_time_s,
                "ratio": self.ratio, "ci": list(self.ci) if self.ci else None, "peak_bytes": self.peak_bytes,
                "predicted_peak_bytes": self.predicted_peak_bytes, "reason": self.reason}


@dataclass(slots=True)
class Outcome:
    start: dict[str, Any]
    best: dict[str, Any]
    best_step_time_s: float | None
    best_peak_bytes: float | None
    feasible: bool
    trials: list[Trial] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    stopped: bool = False
    found_at_step: int = 0  # steps into the search when the kept configuration was first accepted
    found_after_s: float = 0.0
    seed: int = 0  # of the coin that ordered the blocks of coin trials (reproduces a search on a fake job)

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "start": self.start, "best": self.best, "best_step_time_s": self.best_step_time_s,
                "best_peak_bytes": self.best_peak_bytes, "feasible": self.feasible, "steps": self.steps,
                "seconds": self.seconds, "stopped": self.stopped, "found_at_step": self.found_at_step,
                "found_after_s": self.found_after_s, "trials": [t.as_dict() for t in self.trials]}


class MemoryModel:
    """Peak of a configuration = the incumbent's measured peak x the learned factor of each changed key=value."""

    def __init__(self):
        self.factor: dict[tuple[str, str], float] = {}

    @staticmethod
    def _k(key, value) -> tuple[str, str]:
        return key, repr(value)

    def learn(self, incumbent: dict, candidate: dict, incumbent_peak: float, candidate_peak: float) -> None:
        changed = [k for k in candidate if candidate[k] != incumbent.get(k)]
        if len(changed) != 1 or not incumbent_peak or candidate_peak is None:
            return
        key = changed[0]
        base = self.factor.setdefault(self._k(key, incumbent[key]), 1.0)
        self.factor[self._k(key, candidate[key])] = base * candidate_peak / incumbent_peak

    def predict(self, incumbent: dict, incumbent_peak: float | None, candidate: dict) -> float | None:
        if incumbent_peak is None:
            return None
        peak = incumbent_peak
        for key, value in candidate.items():
            if value == incumbent.get(key):
                continue
            new, old = self.factor.get(self._k(key, value)), self.factor.get(self._k(key, incumbent[key]))
            if new is not None and old is not None:
                peak *= new / old
        return peak


def block_time(block: list[Sample], stat: str = "min") -> float:
    """One block's step time: its median, 25th percentile (linear interpolation) or minimum."""
    times = [s.step_time_s for s in block]
    if stat == "min" or len(times) == 1:
        return min(times)
    if stat == "q25":
        return quantiles(times, n=4, method="inclusive")[0]
    return float(median(times))


def pair_steps(o: TuneOptions, design: str = "abba") -> int:
    """Steps one pair of blocks takes: two blocks and the gaps before them (a switch and the warm-up after it).
    ABBA needs one switch a pair; under the coin every block waits a switch's gap, switch or not, so that where a
    block falls in time does not depend on the coins."""
    return (1 if design == "abba" else 2) * (SWITCH_STEPS + o.warmup) + 2 * o.block


def trial_pairs(o: TuneOptions, limit: int, design: str = "abba") -> int:
    """The most pairs a trial of at most ``limit`` steps is allowed (its last look; at least ``min_pairs``)."""
    return max(o.min_pairs, min(o.max_pairs, (limit - SWITCH_STEPS) // pair_steps(o, design)))


def trial_design(o: TuneOptions, limit: int) -> str:
    """"abba" or "coin" for a trial of at most ``limit`` steps: ``order``, or under "auto" the coin once the trial
    may have COIN_FROM_PAIRS coin pairs. Short trials keep ABBA and its t interval, which can decide from 4 pairs
    (the sign-flip test's smallest p with n pairs is 2 / 2**n); long ones, where ABBA's normal-theory looks let
    false verdicts past 5% on a jumpy machine, get the exact test (docs/tune.md)."""
    if o.order != "auto":
        return o.order
    return "coin" if trial_pairs(o, limit, "coin") >= COIN_FROM_PAIRS else "abba"


def covering_budget(space: dict[str, list[Any]], start: dict[str, Any], o: TuneOptions | None = None) -> int:
    """Steps that give every candidate of ``space`` (each value but the start's) a trial of ``min_trial_steps``,
    after the baseline block: what ``--budget-steps`` defaults to, so a tune tries the whole space (at most 100000).

    Enough: a trial uses at most its share, ``max(min_trial_steps, steps left / candidates left)``, so every
    candidate still to try keeps about ``min_trial_steps`` (less the switch to each winner), well above the
    ``min_pairs`` pairs a trial needs to start."""
    o = o or TuneOptions()
    # a key's start value is skipped where it comes first; later in its list, a win before it makes it a candidate
    candidates = sum(len(values) - (values[:1] == [start.get(key)]) for key, values in space.items())
    return min(100_000, max(10, o.warmup + o.block + candidates * o.min_trial_steps))


class Search:
    """Greedy coordinate search: for each key, try each of its values against the incumbent; a win replaces it."""

    def __init__(self, job: TrialJob, start: dict[str, Any], space: dict[str, list[Any]], options: TuneOptions,
                 log: Callable[[str, dict], None] = lambda kind, record: None,
                 should_stop: Callable[[], bool] = lambda: False):
        self.job, self.space, self.options = job, space, options
        self.start = dict(start)
        self.seed = options.seed if options.seed is not None else secrets.randbits(32)
        self._coin = random.Random(self.seed)
        self.incumbent = dict(start)
        self.log, self.should_stop = log, should_stop
        self.memory = MemoryModel()
        self.incumbent_time: float | None = None
        self.incumbent_peak: float | None = None
        self._start_step = 0

    # --- helpers -------------------------------------------------------------------------------------------------

    def _used(self) -> int:
        return self.job.step - self._start_step

    def _left(self) -> int:
        return self.options.budget_steps - self._used()

    def _over(self, peak: float | None, margin: float = 0.0) -> bool:
        cap = self.options.max_peak_bytes
        return cap is not None and peak is not None and peak * (1 + margin) > cap

    def _block(self, warm: bool = False) -> list[Sample]:
        """Discard the warm-up steps after a change (unless ``warm``: the same configuration ran the block before),
        then measure one block."""
        if not warm:
            self.job.read(self.options.warmup)
        return self.job.read(self.options.block)

    @staticmethod
    def _peak(samples: list[Sample]) -> float | None:
        peaks = [s.peak_bytes for s in samples if s.peak_bytes is not None]
        return max(peaks) if peaks else None

    # --- the search ----------------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        paired_ratio_ci([0.0, 0.0], 0.95)  # loads scipy now: a second's import inside a trial would cost it steps
        o = self.options
        # every trial's looks are a prefix of these (a share is at most the whole budget): calibrated once, now
        look_levels(tuple(look_points(o.min_pairs, trial_pairs(o, o.budget_steps))), o.confidence, o.boundary)
        began = time.monotonic()
        self._start_step = self.job.step
        out = Outcome(start=dict(self.start), best=self.incumbent, best_step_time_s=None, best_peak_bytes=None,
                      feasible=False, seed=self.seed)
        baseline = self._block()
        self.incumbent_time = float(median([s.step_time_s for s in baseline]))
        self.incumbent_peak = self._peak(baseline)
        order = [(key, value) for key, values in self.space.items() for value in values]
        for position, (key, value) in enumerate(order):
            if value == self.incumbent.get(key):
                continue
            candidate = {**self.incumbent, key: value}
            if self.should_stop():
                out.stopped = True
                break
            needed = pair_steps(self.options) * self.options.min_pairs + SWITCH_STEPS
            if self._left() < needed:
                trial = Trial(candidate, {key: value}, verdict="skipped_budget",
                              reason=f"{self._left()} steps left, a trial needs {needed}")
            else:
                # this one and those after it that differ from the incumbent share the steps left
                to_try = sum(v != self.incumbent.get(k) for k, v in order[position:])
                share = max(o.min_trial_steps, self._left() // to_try)
                trial = self._trial(candidate, {key: value}, min(share, self._left()))
            out.trials.append(trial)
            self.log("trial", trial.as_dict())
            if trial.verdict == "win":
                self.job.apply(candidate)  # each trial ends on the incumbent: switch to the winner
                self.incumbent = candidate
                self.incumbent_time = trial.median_step_time_s
                self.incumbent_peak = trial.peak_bytes
                out.found_at_step, out.found_after_s = self._used(), time.monotonic() - began
        out.best = dict(self.incumbent)
        out.best_step_time_s, out.best_peak_bytes = self.incumbent_time, self.incumbent_peak
        out.feasible = not self._over(self.incumbent_peak)
        out.steps, out.seconds = self._used(), time.monotonic() - began
        self.log("decision", {k: v for k, v in out.as_dict().items() if k != "trials"})
        return out

    def _trial(self, candidate: dict, change: dict, limit: int) -> Trial:
        """Compare ``candidate`` with the incumbent in at most ``limit`` steps (its share of the budget)."""
        o = self.options
        trial = Trial(candidate, change, incumbent_step_time_s=self.incumbent_time)
        trial.predicted_peak_bytes = self.memory.predict(self.incumbent, self.incumbent_peak, candidate)
        if self._over(trial.predicted_peak_bytes, o.margin) and change_key_known(self.memory, change):
            trial.verdict, trial.reason = "predicted_over_cap", "the memory model predicts a peak over the cap"
            return trial
        began = self.job.step
        design = trial.design = trial_design(o, limit)
        max_pairs = trial.max_pairs = trial_pairs(o, limit, design)
        looks = tuple(look_points(o.min_pairs, max_pairs))  # fixed before any time is measured (the boundary's K)
        if design == "abba":
            look_levels(looks, o.confidence, o.boundary)  # calibrated (cached) before the first block, not between two
        test = SequentialSignFlip(1 - o.confidence)
        pairs: list[tuple[list[Sample], list[Sample]]] = []  # (incumbent block, candidate block), in time order
        in_force = "I"
        configs = {"I": self.incumbent, "C": candidate}
        try:
            while True:
                if design == "abba":
                    order = ("I", "C") if len(pairs) % 2 == 0 else ("C", "I")  # I C | C I | I C | ...
                else:
                    order = ("I", "C") if self._coin.random() < 0.5 else ("C", "I")
                blocks = {}
                for label in order:
                    fresh = label != in_force or not pairs and not blocks
                    if label != in_force:
                        self.job.apply(configs[label])
                        in_force = label
                    elif design == "coin":  # a switch's gap anyway: the coin must not move blocks in time
                        self.job.read(SWITCH_STEPS)
                        fresh = True
                    blocks[label] = self._block(warm=not fresh)
                    if label == "C" and self._over(self._peak(blocks["C"])):
                        break
                if "I" not in blocks or self._over(self._peak(blocks["C"])):
                    trial.verdict, trial.reason = "over_cap", "measured peak over the cap: rolled back"
                    pairs.append((blocks.get("I", []), blocks["C"]))
                    break
                pairs.append((blocks["I"], blocks["C"]))
                verdict = self._judge(trial, pairs, looks, test)
                if verdict:
                    trial.verdict = verdict
                    break
                used = self.job.step - began
                if self.should_stop():
                    trial.verdict, trial.reason = "stopped", "the tune was stopped"
                    break
                per_pair = max(pair_steps(o, design), used / len(pairs))  # a real switch can take more than 2 steps
                to_next_look = next((n for n in looks if n > len(pairs)), 0) - len(pairs)
                if to_next_look <= 0 or used + (to_next_look + 1) * per_pair - o.warmup - 2 * o.block > limit:
                    trial.verdict = "tie"
                    trial.reason = trial.reason or (f"not separated in {len(pairs)} pairs of blocks: "
                                                    "the incumbent stays")
                    break
            if in_force != "I":
                self.job.apply(self.incumbent)  # each trial ends on the incumbent
        except Exception as exc:  # an apply that raises: back to the incumbent, mark failed, go on
            trial.verdict, trial.reason = "failed", f"{type(exc).__name__}: {exc}"[:300]
            try:
                self.job.apply(self.incumbent)
            except Exception as again:
                trial.reason += f"; restoring the incumbent failed too: {again}"[:200]
        trial.steps, trial.pairs = self.job.step - began, len(pairs)
        c_steps = [s for _, c in pairs for s in c]
        if c_steps:
            trial.peak_bytes = self._peak(c_steps)
            trial.median_step_time_s = float(median([s.step_time_s for s in c_steps]))
            incumbent_peak = self._peak([s for i, _ in pairs for s in i])
            self.memory.learn(self.incumbent, candidate, incumbent_peak, trial.peak_bytes)
            if trial.verdict == "win" and trial.ratio is not None:
                trial.median_step_time_s = self.incumbent_time * trial.ratio
        return trial

    def _judge(self, trial: Trial, pairs, looks: tuple[int, ...], test: SequentialSignFlip) -> str:
        o = self.options
        c_peak = self._peak([s for _, c in pairs for s in c])
        i_peak = self._peak([s for i, _ in pairs for s in i])
        logs = self._logs(pairs)
        ratio, ci = self._score(trial, pairs, logs, looks)  # reported even when the budget ends the trial
        if self._over(i_peak) and c_peak is not None and not self._over(c_peak):
            trial.reason = "the incumbent is over the memory cap and this one is under it"
            return "win"
        if o.objective == "memory":
            if c_peak is None or i_peak is None:
                return "tie"
            if c_peak < i_peak * (1 - o.min_gain):
                trial.reason = f"peak {c_peak / i_peak - 1:+.1%}"
                return "win"
            return "loss" if c_peak > i_peak * (1 + o.min_gain) else "tie"
        if len(pairs) not in looks:
            return ""
        if trial.design == "coin" and logs:
            apart = test.looked(logs, len(pairs) / trial.max_pairs)
            if apart and ratio <= 1 - o.min_gain:
                return "win"
            if apart and ratio >= 1 + o.min_gain:
                return "loss"
        if ci is None:
            return ""
        lo, hi = ci
        if trial.design == "abba" and hi < 1 and ratio <= 1 - o.min_gain:
            return "win"
        if trial.design == "abba" and lo > 1 and ratio >= 1 + o.min_gain:
            return "loss"
        if lo > 1 - o.min_gain and hi < 1 + o.min_gain:
            trial.reason = "within the minimum gain"
            return "tie"
        return ""

    def _logs(self, pairs) -> list[float]:
        o = self.options
        return [math.log(block_time(c, o.block_stat) / block_time(i, o.block_stat))
                for i, c in pairs if i and c]  # a read can miss steps

    def _score(self, trial: Trial, pairs, logs: list[float], looks: tuple[int, ...]):
        """The ratio and its interval, for the record and for an early tie. ABBA: the t interval at this look's
        calibrated level (between looks, a trial cut short, the next one's). The coin: the sign-flip interval at the
        trial's confidence (its verdicts come from the sequential test, not from this interval)."""
        o = self.options
        if not logs:
            return None, None
        if trial.design == "coin":
            ratio, ci = signflip_ratio_ci(logs, o.confidence)
        else:
            levels = look_levels(looks, o.confidence, o.boundary)
            level = next((lv for n, lv in zip(looks, levels) if n >= len(pairs)), levels[-1])
            ratio, ci = paired_ratio_ci(logs, level)
        trial.ratio, trial.ci = ratio, ci
        trial.incumbent_step_time_s = float(median([s.step_time_s for i, c in pairs if i and c for s in i]))
        return ratio, ci


def change_key_known(memory: MemoryModel, change: dict) -> bool:
    """A prediction only counts when every changed key=value has a learned factor."""
    return all(memory._k(k, v) in memory.factor for k, v in change.items())
