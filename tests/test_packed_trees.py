"""The packed-trees collective on gloo: equal to torch's all-reduce within fp32 reordering, at 2 and 5 ranks (3
ranks were dropped for CI time: 5 covers odd sizes and a sub-group of several ranks), sub-groups, and paced links
whose measured rate follows the plan."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.distributed as dist

from dspark_lab.collectives.packed_trees import PackedTreesCollective
from dspark_lab.collectives.packing import chain_plan, plan
from dspark_lab.collectives.topology import from_dict, load_topology
from gloo_world import assert_passed_everywhere, checks_in, world_results_for

WORLDS = (2, 5)
NUMELS = (0, 1, 2, 7, 1000, 4099, 65_537)


def _data(rank, numel, salt=0):
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 * rank + numel + salt))


def _topologies():
    return [load_topology("dgx1-v100"), load_topology("mi300x"), load_topology("nodes:2,gpus:3")]


def check_all_reduce_equals_torch(rank, world):
    for topo in _topologies():
        for chunk_bytes in (64, 1 << 20):
            collective = PackedTreesCollective(topo, chunk_bytes=chunk_bytes)
            # 64-byte chunks: 4099 floats already make hundreds of chunks per tree; 65_537 there only costs time
            for numel in (n for n in NUMELS if chunk_bytes > 64 or n <= 4099):
                want = _data(rank, numel)
                dist.all_reduce(want)
                got = _data(rank, numel)
                assert collective.all_reduce(got) is got
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{topo.name} numel={numel}")
    x = _data(rank, 35).view(5, 7).t()  # non-contiguous: reduced in place all the same
    want = x.clone()
    dist.all_reduce(want)
    PackedTreesCollective(_topologies()[0]).all_reduce(x)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)


def check_broadcast_reduce_scatter_all_gather(rank, world):
    topo = _topologies()[0]
    collective = PackedTreesCollective(topo, op="broadcast", chunk_bytes=256)
    x = _data(rank, 3001)
    collective.broadcast(x)
    assert torch.equal(x, _data(0, 3001))
    data = _data(rank, 6 * world)
    want = data.clone()
    dist.all_reduce(want)
    torch.testing.assert_close(collective.reduce_scatter(data), want.view(world, -1)[rank], rtol=1e-5, atol=1e-5)
    gathered = collective.all_gather(_data(rank, 5))
    assert torch.equal(gathered, torch.cat([_data(r, 5) for r in range(world)]))


def check_sub_group(rank, world):
    members = list(range(1, world))
    group = dist.new_group(members)
    if rank not in members or len(members) < 2:
        return
    collective = PackedTreesCollective(load_topology("mi300x"), group)
    got = _data(rank, 999)
    want = got.clone()
    dist.all_reduce(want, group=group)
    collective.all_reduce(got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _best_rate(run, nbytes, reps):
    """The best of ``reps`` timed runs (after one warm-up), in bytes per second: on a shared machine a run is only
    ever slowed down by its neighbours, never sped up, so the fastest run is the closest to what the links allow."""
    x = torch.zeros(nbytes // 4)
    run(x)
    best = float("inf")
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        run(x)
        dist.barrier()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def check_paced_links_follow_the_plan(rank, world):
    """Emulated links: broadcast over the packed trees and over the ring's chain, and the overlapped all-reduce, each
    within [0.8, 1.05] of its alpha-beta time, and the trees beat the ring by the planned ratio (same run).

    The scale keeps the emulator's own CPU use (about 0.6 of one core for 5 ranks here) well below the machine's:
    at 1e-3 it needs 1.3-1.5 cores of the 2, and a loaded machine then measured 0.5-0.7 of the plan. The bound: 28
    single runs on the 2-core machine at a load average of 5-6 (other engineers' jobs), 12 of them with two busy
    loops added, measured 0.91-1.00 of alpha-beta; the test takes the best of 3 and asks for 0.8. What it catches:
    the all-reduce's halves run one after the other measure 0.58; messages not paced measure far above 1.05.
    """
    if world < 5:
        return
    topo = load_topology("dgx1-v100")
    devices = topo.devices[:world]
    scale, chunk, nbytes = 2e-4, 64 << 10, 2 << 20  # 25 GB/s NVLink -> 5 MB/s
    trees = PackedTreesCollective(topo, op="broadcast", emulate=scale, chunk_bytes=chunk)
    ring = PackedTreesCollective(topo, op="broadcast", emulate=scale, chunk_bytes=chunk,
                                 fixed_plan=chain_plan(topo, devices, trees.plan.ring_order))
    reduce = PackedTreesCollective(topo, op="allreduce", emulate=scale, chunk_bytes=chunk)
    ratios = {
        "trees": _best_rate(trees.broadcast, nbytes, 3) * trees.expected_seconds(nbytes // 4, "broadcast") / nbytes,
        "ring": _best_rate(ring.broadcast, nbytes, 2) * ring.expected_seconds(nbytes // 4, "broadcast") / nbytes,
        "allreduce": _best_rate(reduce.all_reduce, nbytes, 3) * reduce.expected_seconds(nbytes // 4, "allreduce")
        / nbytes,
    }
    assert all(0.8 <= r <= 1.05 for r in ratios.values()), ratios
    planned = ring.expected_seconds(nbytes // 4, "broadcast") / trees.expected_seconds(nbytes // 4, "broadcast")
    assert planned > 2.5  # 66 GB/s of trees against a 16 GB/s chain (PCIe) on gpu0-4
    measured = planned * ratios["trees"] / ratios["ring"]
    assert measured > 0.8 * planned, (measured, planned)


CHECKS = checks_in(globals())
# spawned: forked from a loaded test process, the paced links' timings wandered out of their bounds (0.63, 1.053)
world_results = world_results_for(__name__, timeout_s=60, fork=False)


@pytest.mark.slow
@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("world", WORLDS)
def test_in_world(world_results, world, check):
    assert_passed_everywhere(world_results(world), check)


def test_more_ranks_than_devices_is_refused():
    links = [{"src": "a", "dst": "b", "gb_s": 1}, {"src": "b", "dst": "a", "gb_s": 1}]
    topo = from_dict({"nodes": ["a", "b"], "links": links})
    collective = PackedTreesCollective(topo)
    collective.__class__ = type("Three", (PackedTreesCollective,), {"world_size": property(lambda self: 3)})
    with pytest.raises(ValueError, match="3 ranks but topology"):
        _ = collective.devices
    with pytest.raises(ValueError, match="emulate"):
        PackedTreesCollective(topo, emulate=0)


def test_chain_plan_is_the_ring_order():
    topo = load_topology("dgx1-v100")
    devices = ["gpu0", "gpu1", "gpu2", "gpu3"]
    order = plan(topo, devices).ring_order
    chain = chain_plan(topo, devices, order)
    assert [e for e, in [(t.edges,) for t, _ in chain.trees]][0] == tuple(zip(order, order[1:]))


@pytest.mark.slow
def test_a_running_ddp_job_switches_to_packed_trees_live(tmp_path):
    """comm.grad_sync=packed-trees set on a live 3-rank job (topology: a DGX-1 allocation, links emulated):
    applied on every rank at one step, and the losses stay within fp32 reordering of plain torchrun's."""
    from pathlib import Path

    from conftest import plain_torchrun, wait_for_step
    from dspark_lab.runtime import commands

    demo = Path(commands.__file__).parent.parent / "examples" / "demo_train.py"
    args = ["--layers", "2", "--dim", "64", "--seq", "32", "--steps", "14", "--step-sleep", "0.1"]
    plain_torchrun([demo, *args, "--loss-file", tmp_path / "plain.json"], nproc=3)
    job = commands.launch(demo, [*args, "--loss-file", str(tmp_path / "ours.json")], nproc=3, name="packed",
                          policies=["comm.topology=dgx1-v100", "comm.emulate_links=0.05"])
    wait_for_step(job, 3)
    report = commands.set_policies(job.id, ["comm.grad_sync=packed-trees"])
    assert report.data["state"] == "applied", report.data
    assert job.wait(180) == 0, (job.run_dir.path / "output.log").read_text()[-3000:]
    applies = [e for e in job.run_dir.events() if e["kind"] == "apply" and e["key"] == "comm.grad_sync"]
    assert sorted(e["rank"] for e in applies) == [0, 1, 2] and len({e["step"] for e in applies}) == 1
    plain = json.loads((tmp_path / "plain.json").read_text())
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert 3 < applies[0]["step"] < 14
    # within fp32 reordering (the demo's logged loss is itself an all-reduce over 3 ranks, whose sum order gloo
    # does not fix, so even before the switch the last bits may differ from run to run)
    assert len(ours) == len(plain) == 14 and ours == pytest.approx(plain, rel=1e-5)
