"""The trial logic on a fake job with scripted step times: winner, tie, drift, a raising apply, a memory cap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dspark_lab.tune.fakejob import FakeJob, bursty, crowded, jumps, linear, square
from dspark_lab.tune.search import (
    BOUNDARIES,
    Sample,
    Search,
    TuneOptions,
    block_time,
    look_levels,
)

START = {"a": "x", "b": 1}
SPACE = {"a": ["x", "y"], "b": [1, 2]}


def run(job, **options):
    # the coin of long trials is seeded from the fake job's seed, so every statistical test here is reproducible
    options.setdefault("seed", job.seed)
    job.values = dict(START)
    events = []
    search = Search(job, START, SPACE, TuneOptions(**options), log=lambda kind, r: events.append((kind, r)))
    out = search.run()
    assert job.values == out.best, "the kept configuration is the one in force at the end"
    assert events[-1][0] == "decision" and len(events) == len(out.trials) + 1
    return out


def verdicts(out):
    return {tuple(t.change.items())[0]: t.verdict for t in out.trials}


def test_a_clear_winner_is_kept():
    job = FakeJob(lambda v: 0.10 * (0.7 if v["a"] == "y" else 1.0))
    out = run(job)
    assert out.best == {"a": "y", "b": 1}
    assert verdicts(out)[("a", "y")] == "win" and verdicts(out)[("b", 2)] == "tie"
    win = out.trials[0]
    assert win.ci[1] < 1 and 0.6 < win.ratio < 0.8
    assert out.steps <= 200 and win.steps <= 80


def test_a_tie_keeps_the_start():
    out = run(FakeJob(lambda v: 0.10))
    assert out.best == START
    assert set(verdicts(out).values()) == {"tie"}
    # a 1% difference is real but under the minimum gain: a tie too, and the incumbent stays
    out = run(FakeJob(lambda v: 0.10 * (0.99 if v["b"] == 2 else 1.0)))
    assert out.best == START and verdicts(out)[("b", 2)] == "tie"


def test_a_slower_candidate_loses():
    out = run(FakeJob(lambda v: 0.10 * (1.3 if v["b"] == 2 else 1.0)))
    assert verdicts(out)[("b", 2)] == "loss" and out.best == START


@pytest.mark.parametrize("drift", [jumps, square, linear, bursty, crowded])
def test_a_drifting_machine_makes_no_more_false_decisions_than_the_confidence_level_allows(drift):
    # equal configurations on a machine whose speed changes under the trials: 50 seeded searches, 2 trials each.
    # Each trial's interval is a 95% one over all its looks, so a false win or loss has probability <= 5% per
    # trial; 10 of 100 is the 99th percentile of Binomial(100, 0.05). The previous per-step bootstrap made 39
    # (jumps) and 70 (square) false decisions here.
    false, trials = 0, 0
    for seed in range(50):
        out = run(FakeJob(lambda v: 0.10, drift=drift(seed), seed=seed))
        assert out.steps <= 200
        trials += len(out.trials)
        false += sum(t.verdict in ("win", "loss") for t in out.trials)
    assert trials == 100 and false <= 10, false


@pytest.mark.parametrize("budget", [200, 400, 800])
def test_a_trial_follows_its_budget_and_the_search_never_exceeds_it(budget):
    # equal configurations on the jumps machine: many trials never separate, so they run to their share of the
    # budget. The first trial's share is max(110, steps left / 2 candidates); a later one may use what is left
    firsts, longest = [], 0
    for seed in range(10):
        out = run(FakeJob(lambda v: 0.10, drift=jumps(seed), seed=seed), budget_steps=budget)
        assert out.steps <= budget, (seed, out.steps)
        first = out.trials[0]
        assert first.steps <= max(110, (budget - 6) // 2) and first.pairs <= first.max_pairs
        firsts.append(first.max_pairs)
        longest = max(longest, max(t.pairs for t in out.trials))
    if budget == 200:  # as before: 110 steps, 8 pairs of 12 steps (plus a switch) at most, looks at 4, 6, 8
        assert set(firsts) == {9} and longest <= 10 and {t.design for t in out.trials} == {"abba"}
    else:  # more budget, more pairs, and the coin: (400 - 6) // 2 = 197 steps -> 12 pairs of 16; 800 -> 24
        assert set(firsts) == {(((budget - 6) // 2) - 2) // 16} and longest > 8 * budget // 400
        assert out.trials[0].design == "coin"


@pytest.mark.parametrize("drift", [jumps, square, bursty, crowded])
def test_more_looks_in_a_larger_budget_still_bound_the_false_decisions(drift):
    # the false-decision test above with budget 400 (trials of up to 28 pairs, looks at 4, 6, ..., 28). The linear
    # machine is left out: its step time would reach 2.6x or 0 within 400 steps
    false = 0
    for seed in range(50):
        out = run(FakeJob(lambda v: 0.10, drift=drift(seed), seed=seed), budget_steps=400)
        assert out.steps <= 400
        false += sum(t.verdict in ("win", "loss") for t in out.trials)
    assert false <= 10, false


def test_a_prefix_of_the_looks_is_calibrated_with_the_whole():
    # the search calibrates its longest possible trial once; a shorter trial's levels come from that pass and
    # equal a calibration of its looks alone (the draws are made pair by pair)
    from dspark_lab.tune import stats

    stats._LEVELS.clear()
    whole = look_levels((4, 6, 8, 10, 12), 0.95, "pocock")
    prefix = look_levels((4, 6, 8), 0.95, "pocock")
    stats._LEVELS.clear()
    assert look_levels((4, 6, 8), 0.95, "pocock") == prefix and len(set(whole)) == 1 and whole[0] > prefix[0]


def test_bursty_interference_does_not_hide_a_real_gain():
    # interference that only adds time (a fifth of the steps +50% to +200%): a block's minimum sees through it. The
    # median of a block kept this 20% gain in 50 of 100 such searches, the minimum in 100 of 100
    # (benchmarks/tune_power.py); here 20 seeded searches must keep it at least 18 times
    speed = lambda v: 0.10 * (0.8 if v["b"] == 2 else 1.0)
    kept = sum(run(FakeJob(speed, drift=bursty(seed), seed=seed)).best["b"] == 2 for seed in range(20))
    assert kept >= 18, kept


def test_a_block_is_summarised_by_its_fastest_step():
    block = [Sample(i, t) for i, t in enumerate([0.30, 0.10, 0.25, 0.12])]
    assert block_time(block) == 0.10 and block_time(block, "median") == pytest.approx(0.185)
    assert block_time(block, "q25") == pytest.approx(0.115)  # linear interpolation between 0.10 and 0.12


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_the_look_levels_hold_the_error_rate_over_all_looks(boundary):
    # independent normal pair log ratios, no difference: a t-test at each look at that look's level; the chance of
    # any rejection over the looks 4, 6, 8 must be 5% (Bonferroni: at most 5%), checked on 40000 fresh trials
    from scipy.stats import t as student_t

    looks = (4, 6, 8)
    levels = look_levels(looks, 0.95, boundary)
    x = np.random.default_rng(7).standard_normal((40_000, 8))
    rejected = np.zeros(len(x), dtype=bool)
    for n, level in zip(looks, levels):
        head = x[:, :n]
        t = np.abs(head.mean(axis=1)) / (head.std(axis=1, ddof=1) / n ** 0.5)
        rejected |= 2 * student_t.sf(t, n - 1) < 1 - level
    assert rejected.mean() <= 0.054, rejected.mean()
    if boundary == "bonferroni":
        assert levels == (1 - 0.05 / 3,) * 3
    else:  # spends the whole 5%, not less: that is what buys the power
        assert rejected.mean() >= 0.046, rejected.mean()
    if boundary == "pocock":
        assert len(set(levels)) == 1 and levels[0] < 1 - 0.05 / 3
    if boundary == "obf":
        assert levels[0] > levels[1] > levels[2] > 0.95


@pytest.mark.parametrize("seed", [0, 1])
def test_a_real_winner_is_found_on_a_linearly_drifting_machine(seed):
    # the drift alone moves step times by more than the gain within one trial; ABBA order cancels it pair by pair
    out = run(FakeJob(lambda v: 0.10 * (0.8 if v["b"] == 2 else 1.0), drift=linear(seed), seed=seed))
    assert out.best == {"a": "x", "b": 2} and verdicts(out) == {("a", "y"): "tie", ("b", 2): "win"}


def test_the_pair_interval_is_students_t_on_log_ratios():
    from dspark_lab.tune.search import paired_ratio_ci

    ratio, (lo, hi) = paired_ratio_ci([0.0, 0.1, -0.1], 0.95)  # mean 0, sd 0.1, n 3: t(0.975, 2 dof) = 4.303
    assert ratio == 1.0 and lo == pytest.approx(np.exp(-4.3027 * 0.1 / 3 ** 0.5), rel=1e-4)
    assert hi == pytest.approx(np.exp(4.3027 * 0.1 / 3 ** 0.5), rel=1e-4)
    assert paired_ratio_ci([0.2], 0.95) == (pytest.approx(np.exp(0.2)), None)  # one pair: no interval


def test_a_trial_that_raises_is_rolled_back_and_the_search_goes_on():
    job = FakeJob(lambda v: 0.10 * (0.7 if v["b"] == 2 else 1.0), fails={("a", "y")})
    out = run(job)
    assert verdicts(out)[("a", "y")] == "failed" and "rank 1" in out.trials[0].reason
    assert out.best == {"a": "x", "b": 2}
    assert {"a": "y", "b": 1} not in job.applied


def test_over_the_memory_cap_is_rolled_back_and_a_feasible_one_kept():
    # a is fast but heavy; b=2 is slow but light; the start is over the cap
    speed = lambda v: 0.10 * (0.5 if v["a"] == "y" else 1.0) * (1.2 if v["b"] == 2 else 1.0)
    peak = lambda v: 100.0 * (1.5 if v["a"] == "y" else 1.0) * (0.4 if v["b"] == 2 else 1.0)
    out = run(FakeJob(speed, peak=peak), max_peak_bytes=60.0)
    assert verdicts(out)[("a", "y")] == "over_cap"
    assert out.best == {"a": "x", "b": 2} and out.feasible and out.best_peak_bytes <= 60.0


def test_a_candidate_predicted_over_the_cap_is_not_tried():
    # the first search learns that b=2 doubles the peak (measured over the cap, rolled back); a second search that
    # starts from a=y with that model predicts a=y,b=2 over the cap and never applies it
    space = {"b": [1, 2], "a": ["x", "y"]}
    speed = lambda v: 0.10 * (0.6 if v["a"] == "y" else 1.0)
    peak = lambda v: 40.0 * (2.0 if v["b"] == 2 else 1.0)
    job = FakeJob(speed, peak=peak)
    job.values = dict(START)
    first = Search(job, START, space, TuneOptions(max_peak_bytes=70.0))
    assert [t.verdict for t in first.run().trials] == ["over_cap", "win"]
    job2 = FakeJob(speed, peak=peak)
    job2.values = {"a": "y", "b": 1}
    second = Search(job2, job2.values, space, TuneOptions(max_peak_bytes=70.0))
    second.memory = first.memory
    trial = second.run().trials[0]
    assert trial.verdict == "predicted_over_cap" and trial.predicted_peak_bytes == pytest.approx(80.0)
    assert all(v["b"] == 1 for v in job2.applied)


def test_bad_options_are_one_line_errors():
    from dspark_lab.errors import DSparkError

    with pytest.raises(DSparkError, match="--objective"):
        TuneOptions(objective="speed")
    with pytest.raises(DSparkError, match="--budget-steps"):
        TuneOptions(budget_steps=5)


def test_the_space_comes_from_the_schemas():
    from dspark_lab.runtime.policies.builtin import SPECS_BY_KEY
    from dspark_lab.tune.space import build

    values = {k: s.default for k, s in SPECS_BY_KEY.items()}
    refuse = lambda key, value: "no DDP" if key.startswith(("comm.", "sched.", "moe.", "memory.reshard")) else \
        ("2 CPUs" if key == "compute.threads" and value > 2 else None)
    space = build(SPECS_BY_KEY, values, refuse)
    assert space.keys == {"memory.activation_checkpointing": ["none", "full", "every-2", "every-4"],
                          "memory.activation_offload": ["off", "host"], "compute.threads": [1, 2]}
    assert not space.bit_exact  # compute.threads reorders sums
    # comm.topology is launch-only but a name or a path: no value to offer, so excluded, not "would try []"
    assert {r["key"] for r in space.needs_restart} == {"comm.bucket_mb"}
    assert all(r["would_try"] for r in space.needs_restart)
    assert {"key": "comm.topology", "reason": "launch-only, and no other value a search can list"} in space.excluded
    assert {"comm.emulate_links"} <= {r["key"] for r in space.excluded}  # slows the job on purpose
    assert "host-fp8" in build(SPECS_BY_KEY, values, refuse, allow_lossy=True).keys["memory.activation_offload"]
    no_ddp = build(SPECS_BY_KEY, values, refuse, not_here=lambda key: "no DDP" if key.startswith("comm.") else None)
    assert no_ddp.needs_restart == [] and {"key": "comm.bucket_mb", "reason": "no DDP"} in no_ddp.excluded
    only = build(SPECS_BY_KEY, values, refuse, keys=["memory.activation_checkpointing"])
    assert list(only.keys) == ["memory.activation_checkpointing"] and only.bit_exact
    from dspark_lab.errors import DSparkError

    with pytest.raises(DSparkError, match="--keys: unknown policy 'memory.nope'"):
        build(SPECS_BY_KEY, values, refuse, keys=["memory.nope"])


def test_a_request_is_never_tuned():
    """``profile.steps`` starts a capture: a live, lossless int a search would otherwise try 1..32 of."""
    from dspark_lab.errors import DSparkError
    from dspark_lab.runtime.policies.builtin import SPECS_BY_KEY
    from dspark_lab.trace.capture import SPEC
    from dspark_lab.tune.space import build

    specs = {**SPECS_BY_KEY, SPEC.key: SPEC}
    values = {k: s.default for k, s in specs.items()}
    space = build(specs, values, lambda key, value: None)
    assert "profile.steps" not in space.keys and "memory.activation_checkpointing" in space.keys
    assert {"key": "profile.steps", "reason": "not a setting to tune (a request or a what-if knob)"} in space.excluded
    with pytest.raises(DSparkError, match="--keys: profile.steps is not a setting to tune"):
        build(specs, values, lambda key, value: None, keys=["profile.steps"])


def test_a_tune_request_is_checked_option_by_option():
    from dspark_lab.errors import DSparkError
    from dspark_lab.tune.driver import parse_request

    assert parse_request({})["budget_steps"] is None  # the driver gives it covering_budget(space)
    for body, field in (({"objective": "fast"}, "--objective"), ({"budget_steps": 5}, "--budget-steps"),
                        ({"budget_steps": True}, "--budget-steps"), ({"max_activation_mb": -1}, "--max-activation-mb"),
                        ({"max_memory_gb": float("inf")}, "--max-memory-gb"), ({"keys": "a,b"}, "--keys"),
                        ({"allow_lossy": "yes"}, "--allow-lossy"),
                        ({"max_activation_mb": 1, "max_memory_gb": 1}, "give one of them")):
        with pytest.raises(DSparkError, match=field):
            parse_request(body)


def test_the_memory_objective_keeps_the_smallest_peak_even_when_slower():
    speed = lambda v: 0.10 * (1.5 if v["b"] == 2 else 1.0)
    peak = lambda v: 100.0 * (0.5 if v["b"] == 2 else 1.0) * (1.2 if v["a"] == "y" else 1.0)
    out = run(FakeJob(speed, peak=peak), objective="memory")
    assert out.best == {"a": "x", "b": 2} and verdicts(out) == {("a", "y"): "loss", ("b", 2): "win"}
    assert run(FakeJob(speed, peak=peak)).best == START  # the throughput objective keeps the faster start


def test_a_live_read_finds_the_record_another_rank_wrote_before_the_tune_started(tmp_path):
    """Ranks finish a step a moment apart: rank 1's record of step 6 can be on disk while rank 0 is still at step 5
    when the tune opens the metrics file. The read of step 6 must find it at once, not wait out its deadline
    (which on a 12 ms step burns the budget's steps)."""
    import json
    import threading
    import time
    from types import SimpleNamespace

    from dspark_lab.tune.driver import LiveJob

    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("w") as f:
        for step in range(1, 6):
            for rank in (0, 1):
                f.write(json.dumps({"step": step, "rank": rank, "step_time_s": 0.01}) + "\n")
        f.write(json.dumps({"step": 6, "rank": 1, "step_time_s": 0.01}) + "\n")
    job = SimpleNamespace(run_dir=SimpleNamespace(metrics_path=metrics), step=5, world=2,
                          meter=SimpleNamespace(want_memory=lambda owner, on=True: None),
                          coordinator=SimpleNamespace(stopped=False), stepped=threading.Condition())
    live = LiveJob(job, "peak_activation_bytes")

    def rank0_finishes_step_6():
        time.sleep(0.05)
        with metrics.open("a") as f:
            f.write(json.dumps({"step": 6, "rank": 0, "step_time_s": 0.02}) + "\n")
        with job.stepped:
            job.step = 6
            job.stepped.notify_all()

    threading.Thread(target=rank0_finishes_step_6).start()
    began = time.monotonic()
    samples = live.read(1)
    assert time.monotonic() - began < 1.0  # the deadline is 2 s
    assert [(s.step, s.step_time_s) for s in samples] == [(6, 0.02)]
    live.close()


def test_the_coin_does_not_move_the_blocks_in_time():
    # a coin trial's blocks fall at the same steps whatever the coin says (a switch's gap before every block), so
    # with equal configurations a pair's log ratio changes only its sign with the coin. Without the gap a pair
    # that starts on the configuration in force runs 4 steps earlier, and the load ties that to the sign
    orders = set()
    for seed in range(6):
        job = FakeJob(lambda v: 0.10, seed=seed)
        job.values = dict(START)
        search = Search(job, START, {"b": [1, 2]}, TuneOptions(order="coin", budget_steps=400, seed=seed))
        seen = []

        def judge(trial, pairs, *rest, seen=seen, original=search._judge):
            seen.append(list(pairs))
            return original(trial, pairs, *rest)

        search._judge = judge
        search.run()
        pairs = seen[-1]
        orders |= {i[0].step < c[0].step for i, c in pairs}
        assert all(abs(i[0].step - c[0].step) == 8 for i, c in pairs)
        firsts = [min(i[0].step, c[0].step) for i, c in pairs]
        assert len(pairs) >= 6 and {b - a for a, b in itertools.pairwise(firsts)} == {16}
    assert orders == {True, False}, "both orders occur"


def test_the_sequential_sign_flip_test_holds_its_level_exactly():
    # the boundaries depend only on the magnitudes, so one run fixes them; then every one of the 2**12 sign
    # vectors is judged at every look exactly as the test would judge it: the share rejected anywhere is the
    # error rate, and it must be at most 5% (and spend most of it: a test that never rejects would pass "<=")
    from dspark_lab.tune.stats import SequentialSignFlip

    rng = np.random.default_rng(3)
    for magnitudes in (np.where(rng.random(12) < 0.6, 0.62, 0.02),  # a lattice, as the jumps machine makes
                       np.abs(rng.standard_normal(12)), np.full(12, 0.1)):
        d = magnitudes * (1 + 0.01 * rng.standard_normal(12))
        test = SequentialSignFlip(0.05)
        for n in range(4, 13, 2):
            test.looked(list(d[:n]), n / 12)
        signs = 1.0 - 2.0 * (np.arange(2 ** 12)[:, None] >> np.arange(12)[None, :] & 1)
        rejected = np.zeros(len(signs), dtype=bool)
        for n, bound in test.bounds:
            rejected |= np.abs(signs[:, :n] @ d[:n]) >= bound - 1e-9
        assert 0.02 < rejected.mean() <= 0.05, rejected.mean()


def test_the_sign_flip_interval_is_the_inverted_test():
    from dspark_lab.tune.stats import signflip_ratio_ci

    # five pairs cannot reach 95% (smallest p 2/32); six equal ones can, and nothing but their value is inside
    assert signflip_ratio_ci([0.1] * 5, 0.95)[1] is None
    _, (lo, hi) = signflip_ratio_ci([0.1] * 6, 0.95)
    assert lo == pytest.approx(np.exp(0.1), abs=1e-6) and hi == pytest.approx(np.exp(0.1), abs=1e-6)
    # against a brute-force inversion on a grid: p(delta) by enumerating the 2**7 sign vectors
    logs = [0.05, -0.02, 0.11, 0.07, 0.09, 0.01, 0.12]
    _, (lo, hi) = signflip_ratio_ci(logs, 0.95)
    signs = np.array(list(itertools.product((-1, 1), repeat=len(logs))))

    def p(delta):
        x = np.array(logs) - delta
        return np.mean(np.abs(signs @ x) >= abs(x.sum()) - 1e-12)

    grid = np.linspace(-0.1, 0.2, 3001)
    inside = grid[[p(g) > 0.05 for g in grid]]
    assert np.log(lo) == pytest.approx(inside.min(), abs=2e-4) and np.log(hi) == pytest.approx(inside.max(), abs=2e-4)


def test_a_long_trial_is_ordered_by_the_coin_and_still_finds_a_winner():
    # budget 800, one key: the trial may have 24 coin pairs, so "auto" orders it by the coin; a 20% gain is kept
    job = FakeJob(lambda v: 0.10 * (0.8 if v["b"] == 2 else 1.0), seed=4)
    job.values = dict(START)
    out = Search(job, START, {"b": [1, 2]}, TuneOptions(budget_steps=800, seed=4)).run()
    (trial,) = out.trials
    assert trial.design == "coin" and trial.verdict == "win" and out.best["b"] == 2 and out.seed == 4
    assert trial.ci[1] < 1 and 0.75 < trial.ratio < 0.85


def test_the_default_budget_gives_every_candidate_a_trial():
    # 9 candidates (3 + 5 + 1 other values) on a machine where nothing differs: every trial is a tie and runs to
    # its share, the most a trial can use. The old default of 200 steps tried 2 and skipped 7 for budget.
    from dspark_lab.tune.search import covering_budget

    start = {"a": "x", "b": 1, "c": False}
    space = {"a": ["x", "y", "z", "w"], "b": [1, 2, 4, 8, 16, 32], "c": [False, True]}
    assert covering_budget(space, start) == 2 + 4 + 9 * 110  # warm-up and block, then 110 steps per candidate
    for budget, skipped in ((covering_budget(space, start), 0), (200, 7)):
        job = FakeJob(lambda v: 0.10, drift=jumps(3), seed=3)
        job.values = dict(start)
        out = Search(job, start, space, TuneOptions(budget_steps=budget, seed=3)).run()
        assert len(out.trials) == 9 and out.steps <= budget
        assert sum(t.verdict == "skipped_budget" for t in out.trials) == skipped, budget
