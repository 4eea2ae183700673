"""Same-GPU duplicates: the replica-count search (dspark_lab.moe.recount) removes them within the limit, the exact
solve (dspark_lab.moe.exact) agrees with brute force on tiny domains, symmetry cuts included, and the balancer
leaves a duplicate only where that solve proves it forced."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dspark_lab.moe import balance as B
from dspark_lab.moe import eplb_reference, exact, rebalance_experts, recount
from dspark_lab.moe.measures import domains_with_duplicates


def brute_force_minimum(weight: np.ndarray, slots: int, gpus: int) -> float:
    """The lowest maximum GPU load over every duplicate-free placement (each GPU an S-subset of the experts)."""
    n, per_gpu, best = len(weight), slots // gpus, np.inf
    for choice in itertools.product(itertools.combinations(range(n), per_gpu), repeat=gpus):
        held = np.array(choice)
        count = np.bincount(held.ravel(), minlength=n)
        if (count == 0).any():
            continue
        best = min(best, (weight / count)[held].sum(1).max())
    return best


def check_placement(weight, slots, gpus, limit, sub):
    held = sub.reshape(gpus, -1)
    assert len(sub) == slots and set(sub.tolist()) == set(range(len(weight)))
    assert all(len(set(row.tolist())) == len(row) for row in held)  # no expert twice on a GPU
    count = np.bincount(sub, minlength=len(weight))
    assert (weight / count)[held].sum(1).max() <= limit * (1 + 1e-12)


def test_agrees_with_brute_force_on_tiny_domains():
    rng = np.random.default_rng(11)
    tried = 0
    for gpus, per_gpu, experts in ((2, 2, 3), (2, 3, 4), (3, 2, 4), (3, 2, 5), (3, 3, 5), (4, 2, 5), (4, 2, 6)):
        for trial in range(6):
            # Small integers make ties, so the optimum often sits exactly on the limit.
            weight = rng.integers(0, 12, experts).astype(float) if trial % 2 else rng.lognormal(0, 1, experts)
            slots = gpus * per_gpu
            optimum = brute_force_minimum(weight, slots, gpus)
            status, sub = exact.duplicate_free(weight, slots, gpus, optimum)
            assert status == "found", (weight, gpus, per_gpu)
            check_placement(weight, slots, gpus, optimum, sub)
            if optimum > 0:
                assert exact.duplicate_free(weight, slots, gpus, optimum * (1 - 1e-6))[0] == "forced"
            tried += 1
    assert tried == 42


def test_forced_when_slots_outnumber_expert_gpu_pairs():
    # 3 experts on 2 GPUs of 4 slots: at most 6 distinct (expert, GPU) pairs for 8 slots.
    assert exact.duplicate_free(np.array([5.0, 1.0, 1.0]), 8, 2, 100.0) == ("forced", None)


@pytest.mark.parametrize("fix", [exact.place_without_duplicates, recount.place_by_recount])
def test_fixers_keep_split_limit_and_untouched_domains(fix):
    rng = np.random.default_rng(8)
    weight = rng.zipf(1.6, (6, 32)) * 1.0
    shape = B.check_shape(weight, 48, 4, 2, 8)
    eplb = B.eplb_plan(weight, shape)
    limit = B.gpu_loads(weight, eplb, 8).max(1)
    fixed = fix(weight, eplb, shape, limit)
    assert B.same_gpu_duplicates(fixed, 8, 32) == 0 < B.same_gpu_duplicates(eplb, 8, 32)
    assert (B.gpu_loads(weight, fixed, 8).max(1) <= limit * (1 + 1e-12)).all()
    assert np.array_equal(B.domain_of_experts(fixed, shape), B.domain_of_experts(eplb, shape))
    clean = B.duplicates_per_gpu(eplb, 8).reshape(6, 2, 4).sum(-1) == 0
    per_node = 24
    for layer, node in zip(*np.nonzero(clean)):  # nodes without a duplicate are left exactly as they were
        held = slice(node * per_node, (node + 1) * per_node)
        assert np.array_equal(fixed[layer, held], eplb[layer, held])


def test_balancer_leaves_duplicates_only_where_proven_forced():
    """Every duplicate the balancer returns sits on a node where no duplicate-free placement within EPLB's maximum
    exists (same expert-to-node split), and there are none on the benchmark's small shapes and seeds."""
    forced_seen = 0
    cases = [((64, 80, 8, 2, 8), "lognormal"), ((64, 80, 8, 2, 8), "sparse"), ((64, 72, 3, 2, 8), "zipf"),
             ((8, 12, 1, 1, 2), "lognormal"), ((6, 16, 2, 1, 2), "zipf")]
    for seed in range(3):
        for (experts, replicas, groups, nodes, gpus), kind in cases:
            rng = np.random.default_rng(seed)
            if kind == "zipf":
                weight = rng.zipf(1.6, (16, experts)).astype(float)
            elif kind == "sparse":
                weight = (rng.random((16, experts)) < 0.25) * rng.lognormal(0, 1, (16, experts))
            else:
                weight = rng.lognormal(0, 1, (16, experts))
            weight = weight * rng.lognormal(0, 0.3, weight.shape)
            ours = rebalance_experts(weight, replicas, groups, nodes, gpus)[0].numpy()
            shape = B.check_shape(weight, replicas, groups, nodes, gpus)
            eplb = eplb_reference.rebalance_experts(torch.from_numpy(weight), replicas, groups, nodes, gpus)[0]
            limit = B.gpu_loads(weight, eplb.numpy(), gpus).max(1)
            per_domain, domain_gpus = replicas // shape.domains, gpus // shape.domains
            dups = B.duplicates_per_gpu(ours, gpus).reshape(16, shape.domains, domain_gpus).sum(-1)
            for layer, domain in zip(*np.nonzero(dups)):
                members = np.unique(ours[layer, domain * per_domain:(domain + 1) * per_domain])
                status, _ = exact.duplicate_free(weight[layer, members], per_domain, domain_gpus, limit[layer])
                assert status == "forced", (experts, replicas, kind, seed, layer, domain)
                forced_seen += 1
            if experts == 64:
                assert dups.sum() == 0
    assert forced_seen > 0  # the tiny shapes (more slots than expert-GPU pairs) do force some


def test_recount_changes_replica_counts_where_eplb_counts_cannot_avoid_duplicates():
    # EPLB gives the hot expert more replicas than the node has GPUs, so every packing of its counts has a
    # duplicate; the count search gives some of them to other experts and stays within EPLB's maximum.
    rng = np.random.default_rng(3)
    weight = rng.zipf(1.6, (8, 32)) * 1.0
    shape = B.check_shape(weight, 48, 4, 2, 8)
    eplb = B.eplb_plan(weight, shape)
    too_many = (B.replica_counts(eplb, 32) > 4).any(1)
    assert too_many.any()
    fixed = recount.place_by_recount(weight, eplb, shape, B.gpu_loads(weight, eplb, 8).max(1))
    assert B.same_gpu_duplicates(fixed[too_many], 8, 32) == 0
    assert (B.replica_counts(fixed[too_many], 32) <= 4).all()
    assert not np.array_equal(B.replica_counts(fixed, 32), B.replica_counts(eplb, 32))


def test_recount_leaves_a_domain_alone_when_the_limit_cannot_be_met():
    weight = np.array([[3.0, 1.0]])
    placed = np.array([[0, 0, 0, 1]])  # GPU loads 2 and 2; any duplicate-free placement has a GPU at 2
    shape = B.check_shape(weight, 4, 1, 1, 2)
    assert np.array_equal(recount.place_by_recount(weight, placed, shape, np.array([1.9])), placed)
    fixed = recount.place_by_recount(weight, placed, shape, np.array([2.0]))
    assert B.same_gpu_duplicates(fixed, 2, 2) == 0 and B.gpu_loads(weight, fixed, 2).max() <= 2.0


def test_exact_step_shares_one_time_budget_across_domains(monkeypatch):
    # Four domains hold a duplicate; a clock that advances 1 s per reading and a 2.5 s budget: the solves get the
    # time that is left, and domains past the budget keep their placement.
    rng = np.random.default_rng(8)
    weight = rng.zipf(1.6, (6, 32)) * 1.0
    shape = B.check_shape(weight, 48, 4, 2, 8)
    eplb = B.eplb_plan(weight, shape)
    assert len(domains_with_duplicates(eplb, 8, 2)[0]) >= 4
    clock, given = iter(range(1000)), []
    monkeypatch.setattr(exact.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(exact, "duplicate_free", lambda w, s, g, l, left: given.append(left) or ("unknown", None))
    limit = B.gpu_loads(weight, eplb, 8).max(1)
    assert np.array_equal(exact.place_without_duplicates(weight, eplb, shape, limit, time_limit=2.5), eplb)
    assert given == [1.5, 0.5]
    assert np.array_equal(exact.place_without_duplicates(weight, eplb, shape, limit, time_limit=0.0), eplb)
