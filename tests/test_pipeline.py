"""Pipeline schedules: the IR validator, the generators' closed forms through the simulator, and the CLI verbs."""

from __future__ import annotations

import json
import itertools

import pytest

from dspark_lab.cli import main
from dspark_lab.pipeline.checks import validate
from dspark_lab.pipeline.ir import B, F, Schedule, ScheduleError, W
from dspark_lab.pipeline.schedules import SCHEDULES, build
from dspark_lab.pipeline.simulate import Costs, dependency_graph, simulate

COSTS = [(1.0, 1.0, 1.0), (1.0, 2.0, 1.0), (2.0, 3.0, 1.0), (1.0, 1.0, 0.5), (3.0, 2.0, 1.0), (0.7, 1.3, 0.4)]


def shapes(name: str):
    """Many (p, m, v) each generator accepts."""
    for p, m in itertools.product(range(1, 9), range(1, 26)):
        for v in ([1, 2, 3] if name == "interleaved-1f1b" else [None]):
            try:
                yield build(name, p, m, v)
            except ValueError:
                continue


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_generated_schedule_validates(name):
    count = 0
    for schedule in shapes(name):
        validate(schedule)
        count += 1
    assert count >= 20


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_validator_catches_broken_schedules(name):
    s = build(name, 4, 8 if name not in ("zbv", "dualpipe", "dualpipev") else 16)
    rank_ops = s.ops[1]
    # dropping an op leaves a count incomplete
    with pytest.raises(ScheduleError):
        validate(Schedule(s.name, s.ranks, s.microbatches, s.chunks, [*s.ops[:1], rank_ops[:-1], *s.ops[2:]],
                          s.streams))
    # moving the rank's last op to the front puts a backward before its inputs
    with pytest.raises(ScheduleError):
        validate(Schedule(s.name, s.ranks, s.microbatches, s.chunks,
                          [*s.ops[:1], [rank_ops[-1], *rank_ops[:-1]], *s.ops[2:]], s.streams))
    # a tighter memory bound than the schedule needs
    with pytest.raises(ScheduleError, match="peak activations"):
        validate(Schedule(s.name, s.ranks, s.microbatches, s.chunks, s.ops, s.streams,
                          memory_bound=[1] * s.ranks))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_the_dependency_graph_puts_every_op_after_its_rank_predecessor_and_its_inputs(name):
    # The simulator times ops in the graph's order in one pass, so an op placed before what it waits for would
    # start too early: every op must follow the op before it on its rank and every op producing its inputs.
    for s in itertools.islice(shapes(name), 0, None, 7):
        g = dependency_graph(s)
        assert not g.stuck and sorted(g.nodes) == [(r, i) for r in range(s.ranks) for i in range(len(s.ops[r]))]
        place = {pos: k for k, pos in enumerate(g.nodes)}
        for k, (r, i) in enumerate(g.nodes):
            assert i == 0 or place[(r, i - 1)] < k
            assert all(d < k and (g.nodes[d][0] != r) == crosses for d, crosses in g.inputs[k])
            assert len(g.inputs[k]) == sum(_inputs_of(s, r, kind, chunk) for kind, _, chunk in s.ops[r][i].parts())


def _inputs_of(s: Schedule, rank: int, kind: str, chunk: int) -> int:
    """How many values a pass waits for: a forward its previous stage's (none on the first stage), a backward its
    own forward and the next stage's backward (not on the last stage), a W its input-only backward."""
    stream, stage = s.where(rank, chunk)
    last = len(s.streams[stream]) - 1
    return {"F": int(stage > 0), "B": 1 + (stage < last), "Bi": 1 + (stage < last), "W": 1}[kind]


def test_a_dependency_graph_times_only_its_own_schedule():
    one, other = build("1f1b", 4, 8), build("1f1b", 4, 8)
    costs = Costs(f=1.0, b=2.0, w=0.0, comm=0.1)
    assert simulate(one, costs, dependency_graph(one)).step_time == simulate(one, costs).step_time
    with pytest.raises(ValueError, match="another schedule"):
        simulate(one, costs, dependency_graph(other))


def test_cross_rank_deadlock_is_reported():
    # each rank's order is fine on its own, but rank 0 waits for B1 before it sends F0, and rank 1 wants F0 first
    ops = [[F(1), B(1), F(0), B(0)], [F(0), B(0), F(1), B(1)]]
    s = Schedule("bad", 2, 2, 1, ops, [[(0, 0), (1, 0)]])
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(s)


def test_split_backward_needs_its_weight_pass():
    s = Schedule("x", 1, 1, 1, [[F(0), B(0, full=False)]], [[(0, 0)]])
    with pytest.raises(ScheduleError, match="W0.0 is missing"):
        validate(s)
    validate(Schedule("x", 1, 1, 1, [[F(0), B(0, full=False), W(0)]], [[(0, 0)]]))


def closed_form(name, p, f, b, w, fb=None):
    if name in ("gpipe", "1f1b", "interleaved-1f1b"):
        return (p - 1) * (f + b + w)
    if name == "zb-h1":
        return (p - 1) * (f + b - w)
    stages = p if name == "dualpipe" else 2 * p
    fb = f + b + w if fb is None else fb
    return (stages / 2 - 1) * (fb + (b + w) - 3 * w)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1"])
def test_bubble_closed_forms(name):
    for p, m in itertools.product([1, 2, 3, 4, 6, 8], [4, 8, 9, 16, 32]):
        if m < p:
            continue
        for f, b, w in COSTS:
            sim = simulate(build(name, p, m), Costs(f=f, b=b, w=w))
            assert max(sim.bubble) == pytest.approx(closed_form(name, p, f, b, w), abs=1e-9), (p, m, f, b, w)
            assert sim.step_time == pytest.approx(m * (f + b + w) + max(sim.bubble))


def test_interleaved_bubble_closed_form_with_per_chunk_costs():
    for p, k, v in itertools.product([2, 3, 4, 8], [1, 2, 4], [2, 3, 4]):
        m = k * p
        for f, b, w in COSTS:
            sim = simulate(build("interleaved-1f1b", p, m, v), Costs(f=f, b=b, w=w))
            assert max(sim.bubble) == pytest.approx(closed_form("interleaved-1f1b", p, f, b, w)), (p, m, v)


@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
def test_dualpipe_bubble_closed_form_when_w_equals_f(name):
    # DeepSeek-V3's (PP/2-1)(F&B + B - 3W) holds exactly when B (input grads) and W equal F, for any FB up to F+B+W.
    for p in [2, 4, 6, 8]:
        for m in [2 * p, 2 * p + 2, 4 * p, 32]:
            for f in [0.5, 1.0, 2.0]:
                for fb in [None, 2.5 * f, 2.0 * f]:
                    sim = simulate(build(name, p, m), Costs(f=f, b=f, w=f, fb=fb))
                    assert max(sim.bubble) == pytest.approx(closed_form(name, p, f, f, f, fb)), (p, m, f, fb)


def test_dualpipev_op_order_follows_deepseeks_eight_steps():
    # dualpipev.py with 2 ranks and 4 micro-batches, step by step ("i" = input-only B, its W deferred FIFO).
    # rank 0: nF0 | nF0F1 | nB1W1F1 | nF0B1F1B0 | nB1F1B0 | nB1B0 (zb from the 2nd B) | nWB0 | nW
    # rank 1: nF0F1 | nF0B1F1B0 (first F0, B1 not overlapped) | nB1B0 (zb in the 2nd pair) | nW
    def labels(rank_ops):
        return " ".join(op.label() + ("i" if op.kind == "B" and not op.full else "") for op in rank_ops)

    s = build("dualpipev", 2, 4)
    assert labels(s.ops[0]) == ("F0.0 F1.0 F2.0 F0.1 B0.1i W0.1 F1.1 F3.0/B1.1 F2.1/B0.0 B2.1 F3.1/B1.0 B3.1 B2.0i "
                                "W2.0 B3.0i W3.0")
    assert labels(s.ops[1]) == ("F0.0 F0.1 F1.0 F1.1 F2.0 B0.1 F2.1/B0.0 F3.0/B1.1 F3.1/B1.0 B2.1 B2.0 B3.1i B3.0i "
                                "W3.1 W3.0")


def test_dualpipe_bubble_with_four_stages_matches_the_hand_derived_timeline():
    # PP = 4 (DualPipe on 4 ranks, DualPipeV on 2); see docs/pipeline.md. Rank 0 idles three times:
    # max(F, B-F) waiting for the middle rank's first, non-overlapped full backward (that rank is one F late and runs
    # five forwards first), |FB - (B+W)| where its FB and the other rank's full backward meet (steps 5-6), and
    # max(0, B-W) while it runs a W and the other rank an input-only B (step 7). DeepSeek's FB + B - 2W counts B
    # for the first term, so it is exact only when B = F (and FB >= B + W).
    for name, p, ms in [("dualpipe", 4, [8, 10, 16]), ("dualpipev", 2, [4, 5, 8])]:
        for m in ms:
            for f, w in [(1.0, 1.0), (0.5, 0.5), (1.0, 0.5), (1.0, 2.0)]:
                for b in [0.5, 1.0, 1.5, 2.0, 3.0]:
                    for fb in [f + b + w, 0.8 * (f + b + w), f + b]:
                        sim = simulate(build(name, p, m), Costs(f=f, b=b, w=w, fb=fb))
                        expected = max(f, b - f) + abs(fb - b - w) + max(0.0, b - w)
                        assert max(sim.bubble) == pytest.approx(expected), (name, m, f, b, w, fb)


@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
def test_dualpipe_closed_form_overcounts_when_b_exceeds_f(name):
    # Observed (derived by hand only for PP = 4): with W = F <= B and B + W <= FB <= F + B + W the simulated bubble
    # is the closed form less min((PP/2-1)(B-F), F), so the two agree exactly only at B = F.
    for p in ([4, 6, 8] if name == "dualpipe" else [2, 3, 4]):
        stages = p if name == "dualpipe" else 2 * p
        for m in [2 * p, 2 * p + 2]:
            for b in [1.25, 1.5, 2.0, 3.0]:
                for fb in [None, 0.9 * (2 + b), 1 + b]:
                    sim = simulate(build(name, p, m), Costs(f=1, b=b, w=1, fb=fb))
                    expected = closed_form(name, p, 1, b, 1, fb) - min((stages / 2 - 1) * (b - 1), 1)
                    assert max(sim.bubble) == pytest.approx(expected), (p, m, b, fb)
                    assert max(sim.bubble) < closed_form(name, p, 1, b, 1, fb)


@pytest.mark.parametrize("name,peak", [("gpipe", lambda p, m: m), ("1f1b", lambda p, m: p),
                                       ("zb-h1", lambda p, m: p), ("zb-h2", lambda p, m: 2 * p - 1),
                                       ("dualpipe", lambda p, m: p + 1), ("dualpipev", lambda p, m: 2 * p + 1),
                                       ("zbv", lambda p, m: 2 * p)])
def test_peak_activations(name, peak):
    for p in [2, 4, 6, 8]:
        for m in [2 * p, 3 * p, 32]:
            sim = simulate(build(name, p, m), Costs(f=1, b=1, w=1))
            assert max(sim.peak) == peak(p, m), (p, m, sim.peak)


def test_zero_bubble_beats_1f1b_and_comm_adds_latency():
    costs = Costs(f=1, b=1, w=1)
    assert simulate(build("zb-h1", 4, 8), costs).step_time < simulate(build("1f1b", 4, 8), costs).step_time
    # GPipe's critical path crosses the 3 links once forward and once backward
    slow = simulate(build("gpipe", 4, 8), Costs(f=1, b=1, w=1, comm=0.5))
    assert slow.step_time == pytest.approx(simulate(build("gpipe", 4, 8), costs).step_time + 6 * 0.5)
    # 1F1B waits on a round trip in the steady state too, so it pays more than that
    slow = simulate(build("1f1b", 4, 8), Costs(f=1, b=1, w=1, comm=0.5))
    assert slow.step_time > simulate(build("1f1b", 4, 8), costs).step_time + 6 * 0.5


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="microbatches: interleaved-1f1b needs a multiple of ranks"):
        build("interleaved-1f1b", 4, 6)
    with pytest.raises(ValueError, match="schedule: unknown 'nope'"):
        build("nope", 2, 2)
    with pytest.raises(ValueError, match="ranks: dualpipe needs an even number"):
        build("dualpipe", 3, 12)
    with pytest.raises(ValueError, match="cost f must be >= 0"):
        Costs(f=-1, b=1, w=1)


def test_cli_simulate_json(capsys):
    assert main(["schedule", "simulate", "zb-h1", "--ranks", "4", "--microbatches", "8", "--cost-f", "1",
                 "--cost-b", "2", "--cost-w", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "schedule.simulate" and doc["schema_version"] == 1
    assert (doc["schedule"], doc["ranks"], doc["microbatches"], doc["chunks"]) == ("zb-h1", 4, 8, 1)
    assert max(doc["bubble_time"]) == pytest.approx(3 * (1 + 2 - 1))
    assert doc["peak_activations"] == [4, 3, 2, 1]
    # rank 0 does W right after its B; the last rank keeps 3 W pending (ZB-H1)
    assert doc["ops"][0][3:6] == [{"op": "F", "mb": 3, "chunk": 0}, {"op": "B", "mb": 0, "chunk": 0, "full": False},
                                  {"op": "W", "mb": 0, "chunk": 0}]
    last = [op["op"] for op in doc["ops"][3]]
    assert last[:8] == ["F", "B", "F", "B", "F", "B", "F", "B"] and last[-3:] == ["W", "W", "W"]


def test_cli_simulate_dualpipe_fb_ops(capsys):
    assert main(["schedule", "simulate", "dualpipe", "-p", "4", "-m", "8", "--cost-fb", "2.5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    fbs = [op for op in doc["ops"][0] if op["op"] == "FB"]
    assert fbs and set(fbs[0]) == {"op", "f_mb", "f_chunk", "b_mb", "b_chunk"}
    # directions: chunk 0 enters at rank 0, so rank 0's first op is a forward of direction 0, the last rank's of 1
    assert doc["ops"][0][0] == {"op": "F", "mb": 0, "chunk": 0}
    assert doc["ops"][3][0] == {"op": "F", "mb": 0, "chunk": 1}


def test_cli_bad_input_is_one_line(capsys):
    assert main(["schedule", "simulate", "zbv", "-p", "4", "-m", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: microbatches: zbv needs") and "\n" not in err


def test_show_writes_html_and_png(tmp_path, capsys):
    assert main(["schedule", "show", "1f1b", "-p", "4", "-m", "8", "--out", str(tmp_path / "t"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    html = (tmp_path / "t.html").read_text()
    assert "cdn.bokeh.org" not in html and "Bokeh" in html
    png = (tmp_path / "t.png").read_bytes()
    assert png.startswith(b"\x89PNG") and doc["png"].endswith("t.png")


def test_timeline_figure_has_one_row_per_rank_and_bubbles():
    from dspark_lab.pipeline.show import timeline_figure

    sim = simulate(build("gpipe", 3, 4), Costs(f=1, b=1, w=1))
    fig = timeline_figure(sim)
    ranks = set()
    covered = 0.0
    for renderer in fig.renderers:
        data = renderer.data_source.data
        ranks.update(data["rank"])
        covered += sum(e - s for s, e in zip(data["start"], data["end"]))
    assert ranks == {0, 1, 2}
    assert covered == pytest.approx(sum(sim.busy)) and covered < 3 * sim.step_time


def test_transfer_costs_moves_stage_costs_between_schedules_with_the_same_stages():
    from dspark_lab.pipeline.run import stage_costs, transfer_costs

    split = {(s, k): v for s in range(2) for k, v in (("F", 1.0), ("Bi", 2.0), ("W", 0.5))}
    table = transfer_costs(split, build("1f1b", 2, 4))
    assert set(table.values()) == {1.0, 2.5}  # a full B is Bi + W
    assert simulate(build("1f1b", 2, 4), Costs(f=0, b=0, w=0, table=table)).step_time == \
        simulate(build("1f1b", 2, 4), Costs(f=1, b=2, w=0.5)).step_time
    dual = transfer_costs(split, build("dualpipe", 2, 4))
    assert 1.0 + 2.5 in dual.values()  # an FB is its F plus its full B
    full_only = {(s, k): v for s in range(2) for k, v in (("F", 1.0), ("B", 2.5))}
    assert transfer_costs(full_only, build("zb-h1", 2, 4)) is None  # a full B cannot be split into Bi and W
    assert transfer_costs(split, build("interleaved-1f1b", 2, 4)) is None  # 4 stages, not 2
    measured = {(0, 0, "F"): 1.0, (1, 0, "F"): 3.0, (0, 0, "B"): 2.0, (1, 0, "B"): 4.0}
    assert stage_costs(build("1f1b", 2, 4), measured) == {(0, "F"): 1.0, (1, "F"): 3.0, (0, "B"): 2.0, (1, "B"): 4.0}


def _labels(schedule: Schedule, rank: int) -> list[str]:
    return [f"{kind}{mb}.{chunk}" for op in schedule.ops[rank] for kind, mb, chunk in op.parts()]


def test_torch_orders_interleaved_1f1b_without_megatrons_all_forward_case():
    """With exactly p micro-batches Megatron-LM runs every forward first; torch.distributed.pipelining's
    ScheduleInterleaved1F1B keeps its warm-up of (v-1)p + 2(p-1-r) forwards, so its last rank alternates after p."""
    megatron, torch_order = build("interleaved-1f1b", 4, 4, 2), build("interleaved-1f1b", 4, 4, 2, runtime="torch")
    validate(torch_order)
    assert _labels(megatron, 3)[:8] == [f"F{i}.{c}" for c in (0, 1) for i in range(4)]
    assert _labels(torch_order, 3)[:6] == ["F0.0", "F1.0", "F2.0", "F3.0", "F0.1", "B0.1"]
    assert _labels(megatron, 0) == _labels(torch_order, 0)  # 2(p-1) + p >= 2p: all forwards first either way
    for m in (8, 12):  # no difference beyond m = p
        assert build("interleaved-1f1b", 4, m, 2).ops == build("interleaved-1f1b", 4, m, 2, runtime="torch").ops
    assert build("1f1b", 4, 4).ops == build("1f1b", 4, 4, runtime="torch").ops


def test_cli_simulates_torchs_order_of_interleaved_1f1b(capsys):
    peaks = {}
    for order in ("megatron", "torch"):
        assert main(["schedule", "simulate", "interleaved-1f1b", "-p", "4", "-m", "4", "--order", order,
                     "--json"]) == 0
        peaks[order] = json.loads(capsys.readouterr().out)["peak_activations"]
    assert peaks == {"megatron": [8, 8, 8, 8], "torch": [8, 8, 7, 5]}  # torch's last ranks alternate earlier
