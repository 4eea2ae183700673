"""A fake job with scripted step times, and the machines it can run on: what the trial logic's tests and
``benchmarks/tune_power.py`` measure false verdicts and power on.

Step time = ``speed(values) * machine(step) * (1 + noise * N(0, 1))``; the first step after a change is 5x slow
(warm-up). A machine is a function of the step: ``jumps`` (+-30% load for 7-step stretches), ``square`` (a periodic
load), ``linear`` (a steady drift) and ``bursty`` (interference that only adds time: random steps +50 to +200%, the
noise model of Chen and Revels, "Robust benchmarking in noisy environments", 2016) and ``crowded`` (the same, but
on most steps).
"""

from __future__ import annotations

import numpy as np

from dspark_lab.tune.search import Sample


class FakeJob:
    """Steps advance only through apply (2 steps, like the coordinator's margin) and read."""

    def __init__(self, speed, *, drift=lambda step: 1.0, peak=lambda v: 100.0, noise=0.02, fails=(), seed=1):
        self.values = {}
        self.speed, self.drift, self.peak_of, self.noise, self.fails = speed, drift, peak, noise, set(fails)
        self.seed = seed  # also seeds the coin of a search run on this job (tests, benchmarks/tune_power.py)
        self.rng = np.random.default_rng(seed)
        self._step = 0
        self.since_change = 0
        self.applied = []

    @property
    def step(self):
        return self._step

    def _one(self):
        self._step += 1
        self.since_change += 1
        t = self.speed(self.values) * self.drift(self._step) * (1 + self.noise * self.rng.standard_normal())
        if self.since_change == 1:
            t *= 5
        return Sample(self._step, t, self.peak_of(self.values))

    def apply(self, values):
        if values == self.values:
            return
        self._one(), self._one()
        bad = [f"{k}={v}" for k, v in values.items() if (k, v) in self.fails]
        if bad:
            raise RuntimeError(f"apply of {bad[0]} failed on rank 1")
        self.values = dict(values)
        self.applied.append(dict(values))
        self.since_change = 0

    def read(self, n):
        return [self._one() for _ in range(n)]


def steady(seed):
    """No drift: the scripted noise only."""
    return lambda step: 1.0


def jumps(seed):
    """The load jumps: the machine runs 30% slower or faster than nominal, a fresh coin per 7-step stretch."""
    signs = np.random.default_rng(1000 + seed).choice([-1, 1], 200)
    return lambda step: 1 + 0.3 * signs[step // 7]


def square(seed):
    """The load alternates 1.3x / 0.7x every 7 steps (a periodic load: the worst case for a fixed interleaving)."""
    return lambda step: 1 + 0.3 * (1 if (step + seed) // 7 % 2 else -1)


def linear(seed):
    """The machine gets 0.4% slower (or faster) every step: from 1x to 1.8x (or 0.2x) over a 200-step search."""
    slope = 0.004 if seed % 2 else -0.004
    return lambda step: 1 + slope * step


def bursty(seed, p: float = 0.2):
    """Interference only adds time: each step, with probability ``p``, is slowed by +50% to +200% (another job's
    burst on a shared core)."""
    rng = np.random.default_rng(2000 + seed)
    extra = np.where(rng.random(2000) < p, rng.uniform(0.5, 2.0, 2000), 0.0)
    return lambda step: 1 + extra[step]


def crowded(seed):
    """Interference is the rule, a clean step the exception: 85% of the steps +50% to +200%. Modelled on the tune
    benchmark's own trace on the shared 2-core machine (clean every-2 steps at about 20 ms, most steps at 35 to
    80 ms); added after that trace was seen, as the case where a block's minimum is a rare event."""
    return bursty(seed, p=0.85)


MACHINES = {"steady": steady, "linear": linear, "jumps": jumps, "square": square, "bursty": bursty,
            "crowded": crowded}
