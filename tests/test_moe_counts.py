"""Replica counts (dspark_lab.moe.counts) and the count search's single moves (dspark_lab.moe.recount): the LPT
pair bound is a true lower bound, the bounded counts never have a worse bound than EPLB's greedy counts capped, and
the moves' predicted loads are the loads of the moved placement."""

from __future__ import annotations

import itertools

import numpy as np

from dspark_lab.moe import balance as B
from dspark_lab.moe import counts as C
from dspark_lab.moe import recount


def greedy_capped(weight: np.ndarray, slots: int, cap: int) -> np.ndarray:
    """EPLB's rule (next replica to the highest load per replica), no expert above ``cap``."""
    count = np.ones_like(weight, dtype=np.int64)
    for _ in range(slots - weight.shape[1]):
        row = np.arange(len(weight))
        count[row, np.where(count < cap, weight / count, -1).argmax(1)] += 1
    return count


def best_any_placement(weight: np.ndarray, count: np.ndarray, gpus: int, per_gpu: int) -> float:
    """The lowest maximum GPU load over every assignment of the replicas to GPUs with ``per_gpu`` slots each."""
    replicas = np.repeat(weight / count, count)
    best = np.inf
    for gpu_of in itertools.product(range(gpus), repeat=len(replicas)):
        if (np.bincount(gpu_of, minlength=gpus) == per_gpu).all():
            best = min(best, np.bincount(gpu_of, weights=replicas, minlength=gpus).max())
    return best


def test_pair_bound_is_below_every_placement():
    rng = np.random.default_rng(5)
    for _ in range(30):
        gpus, per_gpu, n = 3, 2, 4
        weight = rng.lognormal(0, 1, n)
        count = 1 + np.bincount(rng.integers(0, n, gpus * per_gpu - n), minlength=n)
        bound = C.sorted_pair_bound(weight[None], count[None], gpus)[0]
        best = best_any_placement(weight, count, gpus, per_gpu)
        assert bound <= best + 1e-12
        top = np.sort(np.repeat(weight / count, count))[::-1]
        assert bound >= max(top[0], top[gpus - 1] + top[gpus]) - 1e-12  # and it is the bound it says


def test_two_hot_experts_get_one_replica_per_gpu():
    # Per node: 8 GPUs, 72 slots, 64 experts, two hot ones. EPLB's counts give them 5 + 5 replicas, so two GPUs
    # carry two hot replicas; the bounded counts stop at 8 hot replicas (one per GPU), a lower bound.
    weight = np.full((1, 64), 0.01)
    weight[0, :2] = [4.3, 3.54]
    eplb = greedy_capped(weight, 72, 8)
    assert eplb[0, :2].tolist() == [5, 5]
    ours = C.bounded_counts(weight, 72, 8)
    assert ours.sum() == 72 and (ours >= 1).all() and (ours <= 8).all()
    assert ours[0, :2].sum() == 8
    assert C.sorted_pair_bound(weight, ours, 8)[0] < 0.8 * C.sorted_pair_bound(weight, eplb, 8)[0]


def test_bounded_counts_never_bound_worse_than_greedy_capped():
    rng = np.random.default_rng(9)
    for trial in range(40):
        n, gpus = int(rng.integers(4, 40)), int(rng.integers(2, 9))
        slots = gpus * int(np.ceil((n + rng.integers(0, 2 * gpus)) / gpus))
        weight = rng.zipf(1.6, (4, n)) * rng.lognormal(0, 0.3, (4, n)) if trial % 2 else rng.lognormal(0, 1, (4, n))
        cap = gpus if n * gpus >= slots else slots
        for finest in (False, True):
            ours = C.bounded_counts(weight, slots, gpus, finest=finest)
            assert (ours.sum(1) == slots).all() and (ours >= 1).all() and (ours <= cap).all()
            # finest trades bound for granularity only down to the mean GPU load
            floor = weight.sum(1) / gpus if finest else 0
            greedy = np.maximum(C.sorted_pair_bound(weight, greedy_capped(weight, slots, cap), gpus), floor)
            assert (np.maximum(C.sorted_pair_bound(weight, ours, gpus), floor) <= greedy * (1 + 1e-12)).all()


def test_fill_coldest_spreads_slots_over_cold_experts():
    weight = np.array([[9.0, 5.0, 0.0, 0.0, 0.1, 0.2]])
    start = np.array([[3, 1, 1, 1, 1, 1]])
    assert C.fill_coldest(weight, start, gpus=4, slots=12).tolist() == [[3, 1, 2, 2, 2, 2]]  # the four coldest
    # one each before any expert gets a second, even the hot expert 1 before a second on a zero-load one
    assert C.fill_coldest(weight, start, gpus=4, slots=14).tolist() == [[3, 2, 3, 2, 2, 2]]
    # where the cap cannot hold every slot, duplicates are forced and the cap is dropped rather than looping
    assert C.fill_coldest(np.ones((1, 2)), np.ones((1, 2), dtype=np.int64), gpus=2, slots=6).sum() == 6


def test_single_moves_predict_the_loads_of_the_moved_placement():
    rng = np.random.default_rng(2)
    weight = rng.zipf(1.6, (3, 16)) * rng.lognormal(0, 0.3, (3, 16))
    local = B.deal(weight, C.fewest_counts(weight, weight.sum(1) / 3, 4, 24), 4)
    owner, slot, expert, top, dups = recount._single_moves(weight, local, 4)
    assert len(owner) > 50
    for i in rng.choice(len(owner), 50, replace=False):
        moved = local[owner[i]].copy()
        assert moved[slot[i]] != expert[i]
        moved[slot[i]] = expert[i]
        loads = B.gpu_loads(weight[owner[i]][None], moved[None], 4)[0]
        assert abs(loads.max() - top[i]) <= 1e-9 * loads.max()
        assert B.duplicates_per_gpu(moved[None], 4).sum() == dups[i]
        assert (B.replica_counts(moved[None], 16) >= 1).all()
