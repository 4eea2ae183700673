"""The statistics of a tune trial: intervals for the candidate / incumbent step-time ratio from the pairs' log
ratios, and how a trial's error rate is shared over its looks.

Two designs (:mod:`.search` runs them). ABBA: the blocks of a pair alternate in order, so a linear drift cancels;
the interval is Student's t over pairs and the looks share the error rate by a group sequential boundary whose
levels are calibrated for independent normal log ratios (:func:`look_levels`). That calibration is only as good
as the normality: on a machine whose load jumps between blocks the log ratios sit on a lattice, and with many looks
the false verdicts rose to 7-12% (docs/tune.md).

The coin: a fair, seeded coin orders each pair's blocks, and every block waits the same gap whether or not the
configuration changes, so where a block falls in time does not depend on the coins. With no difference between the
configurations the sign of each pair's log ratio is then that coin, whatever the machine does to the step times,
and the sign vectors of the pairs seen so far are all equally likely given their magnitudes. The test re-draws the
signs (Fisher, "The Design of Experiments", 1935, section 21; Good, "Permutation, Parametric and Bootstrap Tests of
Hypotheses", 2005) and is sequential by exact error spending (:class:`SequentialSignFlip`): at each look the
boundary is set on the re-drawn sign vectors, counting which of them an earlier look's boundary would already have
rejected, so the chance of any false verdict over all the looks is at most the level spent (Lan and DeMets,
Biometrika 1983, with Pocock's spending function alpha * ln(1 + (e - 1) t)), with no assumption on the noise:
exactly up to 14 pairs, where every sign vector is enumerated, and up to Monte Carlo error beyond.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import fmean, stdev

SIGN_DRAWS = 1 << 14  # sign vectors of a look: all 2**n of them up to 14 pairs, else this many (seeded)


def paired_ratio_ci(logs: list[float], level: float) -> tuple[float, tuple[float, float] | None]:
    """Geometric mean of the per-pair ratios exp(mean(logs)) and its Student-t interval at ``level`` (n - 1 degrees
    of freedom); no interval from a single pair. scipy is imported here, not at module import: the control endpoint
    imports this module and the CLI verbs that talk to it stay light."""
    from scipy.stats import t as student_t

    n = len(logs)
    mean = fmean(logs)
    if n < 2:
        return math.exp(mean), None
    half = float(student_t.ppf(1 - (1 - level) / 2, n - 1)) * stdev(logs) / math.sqrt(n)
    return math.exp(mean), (math.exp(mean - half), math.exp(mean + half))


def look_points(min_pairs: int, max_pairs: int) -> list[int]:
    """The pair counts at which a throughput verdict is tried: complete ABBA cycles (an even count, where a linear
    drift cancels exactly) from ``min_pairs`` on."""
    return [n for n in range(min_pairs, max_pairs + 1) if n % 2 == 0]


CALIBRATION_DRAWS = 100_000
_LEVELS: dict[tuple, tuple[float, ...]] = {}  # (looks, confidence, boundary) -> levels; bounded below


def look_levels(looks: tuple[int, ...], confidence: float, boundary: str) -> tuple[float, ...]:
    """The confidence level of the interval used at each look (pair counts ``looks``) so that the chance of a false
    win or loss over all the looks of a trial is at most 1 - ``confidence`` when the pair log ratios are independent
    normal with mean 0 (a two-sided group sequential test on Student's t; Jennison and Turnbull 2000).

    bonferroni: 1 - alpha/K at every look (conservative: ignores that the looks share their first pairs).
    pocock: one nominal level at every look (Pocock, Biometrika 1977). obf: O'Brien and Fleming (Biometrics 1979),
    boundary z_k = c * sqrt(n_K / n_k): strict early, close to the one-look level at the last look, where a noisy
    trial makes its decision. The constant c is calibrated on the t statistics themselves (each look's t p-value
    turned into a normal deviate), by a seeded Monte Carlo of CALIBRATION_DRAWS trials, which takes the
    dependence between looks into account exactly, whatever their spacing; no closed form exists for t looks.

    One pass calibrates every prefix looks[:k] too (and caches them): a trial whose share of the budget allows
    fewer looks finds its levels without a second calibration, which on a live job would cost steps. The draws are
    made pair by pair, so a prefix gets the same levels as a calibration of it alone."""
    key = (tuple(looks), confidence, boundary)
    if key not in _LEVELS:
        if len(_LEVELS) > 512:
            _LEVELS.clear()
        _LEVELS.update(_calibrate(tuple(looks), confidence, boundary))
    return _LEVELS[key]


def _calibrate(looks: tuple[int, ...], confidence: float, boundary: str) -> dict[tuple, tuple[float, ...]]:
    alpha = 1 - confidence
    if boundary == "bonferroni":
        return {(looks[:k], confidence, boundary): (1 - alpha / k,) * k for k in range(1, len(looks) + 1)}
    import numpy as np
    from scipy.stats import norm
    from scipy.stats import t as student_t

    # boundary at look j is c / w_j, w_j = 1 (pocock) or sqrt(n_j) (obf: c = c_obf * sqrt(n_K)); for the looks
    # [:k] c is the confidence quantile of max_{j<=k} z_j w_j, so one running maximum serves every prefix
    rng = np.random.default_rng(0)
    total, squares = np.zeros(CALIBRATION_DRAWS), np.zeros(CALIBRATION_DRAWS)
    running = np.full(CALIBRATION_DRAWS, -np.inf)
    out, drawn = {}, 0
    for k, n in enumerate(looks, start=1):
        while drawn < n:
            x = rng.standard_normal(CALIBRATION_DRAWS)
            total += x
            squares += x * x
            drawn += 1
        mean = total / n
        sd = np.sqrt(np.maximum(squares - n * mean * mean, 0.0) / (n - 1))
        t = np.abs(mean) / (sd / math.sqrt(n))
        w = 1.0 if boundary == "pocock" else math.sqrt(n)
        running = np.maximum(running, norm.isf(student_t.sf(t, n - 1)) * w)  # the look's p as a normal deviate
        c = float(np.quantile(running, confidence))
        weights = [1.0 if boundary == "pocock" else math.sqrt(m) for m in looks[:k]]
        out[(looks[:k], confidence, boundary)] = tuple(1 - 2 * float(norm.sf(c / wj)) for wj in weights)
    return out


@lru_cache(maxsize=4)
def _signs(n: int):
    """The sign vectors of ``n`` pairs as a float matrix: all 2**n when that is at most SIGN_DRAWS, else the two
    constant ones and SIGN_DRAWS - 2 drawn with a fixed seed (the observed labelling must be among them for a Monte
    Carlo p-value to stay valid: Phipson and Smyth, Stat. Appl. Genet. Mol. Biol. 2010)."""
    import numpy as np

    if 2 ** n <= SIGN_DRAWS:
        codes = np.arange(2 ** n)[:, None] >> np.arange(n)[None, :] & 1
        return 1.0 - 2.0 * codes
    drawn = np.random.default_rng(n).choice([-1.0, 1.0], size=(SIGN_DRAWS - 2, n))
    return np.vstack([np.ones(n), -np.ones(n), drawn])


def signflip_ratio_ci(logs: list[float], level: float) -> tuple[float, tuple[float, float] | None]:
    """exp(mean(logs)) and the sign-flip interval at ``level``: the shifts delta for which the share of sign vectors
    e with |mean(e * (logs - delta))| >= |mean(logs) - delta| is above 1 - level (inverting the test: Lehmann and
    Romano, "Testing Statistical Hypotheses", 2005, 3.5). None while the pairs are too few to reach the level
    (the smallest share is 2 / 2**n). Each end is found by bisection between the mean and a rejected shift."""
    import numpy as np

    n = len(logs)
    mean = fmean(logs)
    alpha = 1 - level
    if n < 2 or 2 / min(2 ** n, SIGN_DRAWS) > alpha:
        return math.exp(mean), None
    signs = _signs(n)
    d = np.asarray(logs, dtype=float)
    a, b = signs @ d / n, signs.sum(axis=1) / n  # at shift delta each re-signed mean is a - delta * b
    tol = 1e-12 * (1 + float(np.abs(d).max()))

    def rejected(delta: float) -> bool:
        return float(np.mean(np.abs(a - delta * b) >= abs(mean - delta) - tol)) <= alpha

    ends = []
    for direction in (-1.0, 1.0):
        inside, step = mean, float(np.abs(d - mean).max()) + 1e-9
        while not rejected(mean + direction * step):
            inside, step = mean + direction * step, 2 * step
        outside = mean + direction * step
        for _ in range(40):
            middle = (inside + outside) / 2
            if rejected(middle):
                outside = middle
            else:
                inside = middle
        ends.append(inside)
    return math.exp(mean), (math.exp(ends[0]), math.exp(ends[1]))


def pocock_spending(alpha: float, t: float) -> float:
    """Error rate spent by information fraction ``t``: Lan and DeMets' Pocock-type function."""
    return alpha * math.log(1 + (math.e - 1) * min(1.0, max(0.0, t)))


class SequentialSignFlip:
    """An exact sequential sign-flip test of "no difference" over one trial's looks (module docstring).

    ``looked(logs, fraction)`` at each look, with every pair's log ratio so far and the trial's information
    fraction (pairs now / the most pairs it may have). The boundary of a look is the smallest |sum| such that the
    re-drawn sign vectors that reach it, among those no earlier boundary rejected, are at most the rate left to
    spend; earlier boundaries are kept in sum units, so a re-drawn vector is judged at every earlier look exactly as
    the observed one was. Rejected when the observed |sum| reaches the boundary."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        # (pairs at the look, its threshold on |sum of log ratios|: the boundary less the float tolerance, so a
        # re-drawn vector and the observed one are held to the same comparison at every later look)
        self.bounds: list[tuple[int, float]] = []

    def looked(self, logs: list[float], fraction: float) -> bool:
        import numpy as np

        n = len(logs)
        d = np.asarray(logs, dtype=float)
        signs = _signs(n)
        earlier = np.zeros(len(signs), dtype=bool)
        for m, bound in self.bounds:
            earlier |= np.abs(signs[:, :m] @ d[:m]) >= bound
        left = pocock_spending(self.alpha, fraction) - float(earlier.mean())
        sums = np.abs(signs @ d)
        tol = 1e-9 * (1 + float(np.abs(d).sum()))
        allowed = math.floor(left * len(signs) + 1e-9)
        candidates = np.sort(sums[~earlier])[::-1]
        bound = math.inf
        if allowed >= 1 and len(candidates):
            # the lowest value v with #(candidates >= v - tol) <= allowed: above any tie that would overspend
            k = min(allowed, len(candidates))
            bound = float(candidates[k - 1])
            if k < len(candidates) and candidates[k] >= bound - tol:
                above = candidates[candidates > bound + tol]
                bound = float(above[-1]) if len(above) else math.inf
        threshold = bound - tol
        self.bounds.append((n, threshold))
        return abs(float(d.sum())) >= threshold
