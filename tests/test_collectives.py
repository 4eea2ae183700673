"""Collectives against torch.distributed's own: ring, tree, error-feedback compression, bandwidth rows, the plugin.

Multi-rank checks run inside one gloo world per size (2, 3 and 4 ranks on loopback; tests/gloo_world.py): each
(world, check) pair is its own test below.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.distributed as dist

from dspark_lab.backends import cpu
from gloo_world import assert_passed_everywhere, checks_in, world_results_for
from dspark_lab.collectives import STANDARD_NAMES, make_standard
from dspark_lab.collectives.bandwidth import bus_factor, measure_all_reduce
from dspark_lab.collectives.compress import ErrorFeedbackAllReduce, make_codec, ring_wire_bytes
from dspark_lab.collectives.ring import RingCollective
from dspark_lab.collectives.tree import TreeCollective, tree_position
from dspark_lab.errors import DSparkError
from dspark_lab.plugins import make_manager

WORLDS = (2, 3, 4)


def _candidates(group=None):
    """The collectives under test: ring, a tree with tiny chunks (many pipelined chunks), the default tree."""
    return [RingCollective(group), TreeCollective(group, chunk_bytes=64), TreeCollective(group)]


def _data(rank: int, numel: int, salt: int = 0) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 * rank + numel + salt))


def _numels(world: int) -> list[int]:
    return [0, 1, world - 1, world, world + 1, 7, 1000, 4099]


# --- checks run inside every world -----------------------------------------------------------------------------


def check_all_reduce(rank, world):
    builtin = make_standard("builtin")
    for numel in _numels(world):
        expected = builtin.all_reduce(_data(rank, numel))
        for collective in _candidates():
            x = _data(rank, numel)
            assert collective.all_reduce(x) is x, f"{collective} all_reduce is not in place"
            torch.testing.assert_close(x, expected, msg=f"{collective} numel={numel}")
    for collective in _candidates():  # a non-contiguous tensor is reduced in place too
        x = _data(rank, 35).view(5, 7).t()
        collective.all_reduce(x)
        torch.testing.assert_close(x, builtin.all_reduce(_data(rank, 35)).view(5, 7).t())


def check_reduce_scatter(rank, world):
    builtin = make_standard("builtin")
    for per_rank in (1, 5, 333):
        x = _data(rank, per_rank * world)
        expected = builtin.reduce_scatter(x)
        assert expected.numel() == per_rank
        for collective in _candidates():
            before = x.clone()
            torch.testing.assert_close(collective.reduce_scatter(x), expected, msg=f"{collective} {per_rank}")
            assert torch.equal(x, before), f"{collective} reduce_scatter changed its input"
    for collective in [builtin, *_candidates()]:
        with pytest.raises(ValueError, match="divisible"):
            collective.reduce_scatter(torch.ones(world + 1))


def check_all_gather(rank, world):
    builtin = make_standard("builtin")
    for numel in (1, 7, 1000):
        x = _data(rank, numel)
        expected = torch.cat([_data(r, numel) for r in range(world)])
        assert torch.equal(builtin.all_gather(x), expected)
        for collective in _candidates():
            assert torch.equal(collective.all_gather(x), expected), f"{collective} numel={numel}"


def check_sub_groups(rank, world):
    # Every rank creates every group, in the same order (torch.distributed requires it).
    groups = [list(range(1, world)), [0, world - 1]]
    handles = [dist.new_group(ranks) for ranks in groups]
    for ranks, group in zip(groups, handles):
        if rank not in ranks:
            continue
        expected = sum(_data(r, 1001, salt=7) for r in ranks)
        shard = ranks.index(rank)
        for collective in _candidates(group):
            assert collective.world_size == len(ranks)
            torch.testing.assert_close(collective.all_reduce(_data(rank, 1001, salt=7)), expected)
            x = _data(rank, 6 * len(ranks), salt=8)
            total = sum(_data(r, 6 * len(ranks), salt=8) for r in ranks)
            torch.testing.assert_close(collective.reduce_scatter(x), total[6 * shard: 6 * (shard + 1)])
            assert torch.equal(collective.all_gather(_data(rank, 9)), torch.cat([_data(r, 9) for r in ranks]))


def _gathered_inputs(rank, world, numel, salt):
    """This rank's input and every rank's, with magnitudes spread over six decades across 128-wide tiles."""
    def make(r):
        x = _data(r, numel, salt)
        tiles = math.ceil(numel / 128)
        spread = 10.0 ** torch.linspace(-3, 3, tiles).repeat_interleave(128)[:numel]
        return x * spread
    return make(rank), [make(r) for r in range(world)]


def check_codec_accuracy(rank, world):
    builtin = make_standard("builtin")
    numel = 1000  # not a multiple of 128: the last fp8 tile is padded
    for codec in ("bf16", "fp8"):
        x, everyone = _gathered_inputs(rank, world, numel, salt=11)
        out = ErrorFeedbackAllReduce(codec).all_reduce(x.clone(), key="b0")
        error = (out - sum(everyone)).abs()
        if codec == "bf16":  # round to nearest: half an ulp, 2^-8 of the value
            bound = sum(2.0 ** -8 * v.abs() for v in everyone)
        else:  # e4m3 keeps 3 mantissa bits (2^-4 relative); subnormals step by scale * 2^-9 = amax / 448 / 512
            bound = sum(2.0 ** -4 * v.abs() + _tile_amax(v) * 2.0 ** -16 for v in everyone)
        assert bool((error <= bound * (1 + 1e-5) + 1e-30).all()), f"{codec}: max excess {(error - bound).max()}"
        assert error.max() > 0, f"{codec}: no rounding at all, the codec is not applied"
        rows = builtin.all_gather(out).view(world, -1)
        assert all(torch.equal(rows[0], row) for row in rows), f"{codec}: ranks disagree on the sum"


def _tile_amax(v):
    padded = torch.nn.functional.pad(v.abs(), (0, -v.numel() % 128)).view(-1, 128)
    return padded.amax(dim=1).repeat_interleave(128)[: v.numel()]


def check_error_feedback(rank, world):
    steps = 16
    for codec in ("bf16", "fp8"):
        g, everyone = _gathered_inputs(rank, world, 640, salt=13)
        truth = sum(everyone)
        errors = {}
        for feedback in (True, False):
            compressed = ErrorFeedbackAllReduce(codec, feedback=feedback)
            total = torch.zeros_like(g)
            for step in range(steps):
                total += compressed.all_reduce(g.clone(), key=0)
                if step == 0:
                    first = (total - truth).abs().max().item()
            errors[feedback] = (total - steps * truth).abs().max().item()
        assert first > 0
        # A constant gradient is rounded the same way every step: without feedback the error adds up linearly.
        assert errors[False] == pytest.approx(steps * first, rel=1e-3), (codec, errors, first)
        # With feedback the sum is off by the last residual only, about one step's rounding.
        assert errors[True] <= 2 * first, (codec, errors, first)


def check_error_feedback_keys(rank, world):
    compressed = ErrorFeedbackAllReduce("fp8")
    compressed.all_reduce(_data(rank, 300), key=0)
    compressed.all_reduce(_data(rank, 50), key=1)
    assert sorted(compressed.residuals) == [0, 1]
    assert compressed.residuals[0].numel() == 300 and compressed.residuals[1].numel() == 50
    with pytest.raises(ValueError, match="key"):
        compressed.all_reduce(_data(rank, 51), key=1)  # raises before communicating, on every rank alike
    compressed.reset(1)
    assert list(compressed.residuals) == [0]


def check_wire_bytes(rank, world):
    bf16, fp8 = ErrorFeedbackAllReduce("bf16"), ErrorFeedbackAllReduce("fp8")
    # 1000 elements: bf16 is 2000 bytes; fp8 is 8 tiles of 128 one-byte codes plus 8 four-byte scales.
    assert bf16.wire_bytes(1000) == (world - 1) * 2000
    assert fp8.wire_bytes(1000) == (world - 1) * (1024 + 32)
    assert ring_wire_bytes(1000, world) == round(2 * (world - 1) / world * 4000)
    assert fp8.wire_bytes(1 << 20) < ring_wire_bytes(1 << 20, world)


def check_bandwidth_rows(rank, world):
    rows = measure_all_reduce("ring", RingCollective().all_reduce, [4096, 1 << 16], warmup=0, reps=2)
    assert [r.bytes for r in rows] == [4096, 1 << 16]
    for row in rows:
        assert row.time_s > 0
        assert row.algbw_gb_s == pytest.approx(row.bytes / row.time_s / 1e9)
        assert row.busbw_gb_s == pytest.approx(row.algbw_gb_s * 2 * (world - 1) / world)
        assert row.wire_bytes == ring_wire_bytes(row.bytes // 4, world)


def check_plugin_collectives(rank, world):
    manager = make_manager([cpu], entry_points=False)
    backend = manager.backend("cpu")
    expected = make_standard("builtin").all_reduce(_data(rank, 77))
    for name in STANDARD_NAMES:
        collective = manager.make_collective(backend, name, None)
        assert collective.name == name
        torch.testing.assert_close(collective.all_reduce(_data(rank, 77)), expected)


CHECKS = checks_in(globals())
world_results = world_results_for(__name__, timeout_s=20)


@pytest.mark.slow
@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("world", WORLDS)
def test_in_world(world_results, world, check):
    assert_passed_everywhere(world_results(world), check)


# --- single-process tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3, 4, 5, 8])
def test_tree_positions_are_consistent_and_complementary(world):
    def positions(tree):
        return [tree_position(r, world, mirrored=tree == 1, to_global=lambda g: g) for r in range(world)]

    for tree in (0, 1):
        pos = positions(tree)
        assert sum(p.parent is None for p in pos) == 1
        for r, p in enumerate(pos):
            for child, below in zip(p.children, p.subtrees):
                assert pos[child].parent == r
                assert child in below
        root = next(r for r, p in enumerate(pos) if p.parent is None)
        assert sorted([root, *[u for below in pos[root].subtrees for u in below]]) == list(range(world))
    inner = [{r for r, p in enumerate(positions(t)) if p.children} for t in (0, 1)]
    assert not inner[0] & inner[1], "a rank is an inner node of both trees"


def test_cpu_plugin_offers_the_standard_collectives():
    manager = make_manager([cpu], entry_points=False)
    backend = manager.backend("cpu")
    assert manager.collective_names(backend) == list(STANDARD_NAMES)
    made = {name: type(manager.make_collective(backend, name, None)).__name__ for name in STANDARD_NAMES}
    assert made == {"builtin": "BuiltinCollective", "ring": "RingCollective", "tree": "TreeCollective"}
    with pytest.raises(DSparkError, match=re.escape("allowed: builtin | ring | tree")):
        manager.make_collective(backend, "butterfly", None)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match=re.escape("codec: 'int4' is not a compression codec; allowed: bf16 | fp8")):
        make_codec("int4")
    with pytest.raises(ValueError, match="trees"):
        TreeCollective(trees=3)
    assert bus_factor(4) == 1.5


def test_fp8_codec_round_trip_pads_to_whole_tiles():
    codec = make_codec("fp8")
    x = torch.linspace(-3, 5, 300)
    encoded = codec.encode(x)
    assert encoded.dtype == torch.uint8 and encoded.numel() == 3 * 128 + 3 * 4 == codec.encoded_bytes(300)
    back = codec.decode(encoded, 300)
    assert back.shape == x.shape
    assert bool(((back - x).abs() <= 2.0 ** -4 * x.abs() + 5 * 2.0 ** -16).all())
