"""Sets of time intervals as sorted, disjoint ``(starts, ends)`` numpy arrays, and their union / boolean algebra.

A boolean combination of sets is evaluated on the elementary segments between all their boundaries, so it is exact
(no sampling) and vectorised: O(n log n) for n boundaries.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Intervals = tuple[np.ndarray, np.ndarray]
EMPTY: Intervals = (np.zeros(0), np.zeros(0))


def union(starts: np.ndarray, ends: np.ndarray) -> Intervals:
    """Merge possibly overlapping intervals; empty ones are dropped, touching ones joined."""
    keep = ends > starts
    s, e = np.asarray(starts, dtype=np.float64)[keep], np.asarray(ends, dtype=np.float64)[keep]
    if not len(s):
        return EMPTY
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    reach = np.maximum.accumulate(e)
    new = np.empty(len(s), dtype=bool)
    new[0] = True
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    return s[first], np.maximum.reduceat(e, first)


def union_of(*sets: Intervals) -> Intervals:
    return union(np.concatenate([s for s, _ in sets] or [np.zeros(0)]),
                 np.concatenate([e for _, e in sets] or [np.zeros(0)]))


def total(intervals: Intervals) -> float:
    s, e = intervals
    return float((e - s).sum())


def combine(rule: Callable[..., np.ndarray], *sets: Intervals) -> Intervals:
    """The set where ``rule(*memberships)`` holds; each membership is a bool array over elementary segments."""
    bounds = np.unique(np.concatenate([np.concatenate([s, e]) for s, e in sets] or [np.zeros(0)]))
    if len(bounds) < 2:
        return EMPTY
    lo, hi = bounds[:-1], bounds[1:]
    mask = rule(*(member(ivs, (lo + hi) / 2) for ivs in sets))
    return union(lo[mask], hi[mask])


def member(intervals: Intervals, points: np.ndarray) -> np.ndarray:
    """For each point, whether it lies in one of the intervals."""
    s, e = intervals
    if not len(s):
        return np.zeros(len(points), dtype=bool)
    idx = np.searchsorted(s, points, side="right") - 1
    return (idx >= 0) & (points < e[np.maximum(idx, 0)])


def subtract(a: Intervals, b: Intervals) -> Intervals:
    return combine(lambda x, y: x & ~y, a, b)


def intersect(a: Intervals, b: Intervals) -> Intervals:
    return combine(lambda x, y: x & y, a, b)
