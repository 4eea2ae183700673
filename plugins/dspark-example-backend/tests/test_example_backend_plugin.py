"""Tests of the example plugin on its own: hooks, Gaudi 3 figures and probe, the kernel, and the collective run
for real over gloo (4 processes: the whole world, a power of two, and a 3-rank subgroup, which is not)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dspark_example_backend as plugin
from dspark_example_backend import gaudi, rms_norm
from dspark_example_backend.halving_doubling import HalvingDoublingCollective
from dspark_lab.backends import cpu, nvidia
from dspark_lab.plugins import make_manager


@pytest.fixture
def manager():
    return make_manager([cpu, plugin], entry_points=False)


def test_registers_cleanly(manager):
    manager.pm.check_pending()
    assert [b.name for b in manager.backends()] == ["cpu", "intel-gaudi3"] and manager.problems == []


def test_gaudi3_published_figures(manager):
    spec = manager.backend("intel-gaudi3").spec
    assert (spec.bf16_tflops, spec.fp8_tflops, spec.memory_gb, spec.memory_bandwidth_gb_s, spec.link_gb_s) == \
        (1835, 1835, 128, 3670, 600)
    assert "Intel Gaudi 3" in spec.source


def test_probe_says_what_is_missing(manager, monkeypatch):
    monkeypatch.setitem(sys.modules, "habana_frameworks", None)
    monkeypatch.setenv("PATH", "/nonexistent")
    availability = manager.backend("intel-gaudi3").availability()
    assert not availability.available
    assert availability.reason == ("habana_frameworks (Gaudi PyTorch bridge) is not installed; "
                                   "hl-smi (the Gaudi driver's tool) is not on PATH")
    assert manager.device_sampler(manager.backend("intel-gaudi3")) is None


@pytest.fixture
def fake_hl_smi(tmp_path, monkeypatch):
    """An hl-smi on PATH that answers queries for two Gaudi 3 and one Gaudi 2, as the real one prints CSV."""
    rows = ["HL-325L, 30, 20480, 131072, 600, 45", "HL-325L, 50, N/A, 131072, N/A, 47",
            "HL-225, 99, 1024, 98304, 400, 40"]
    script = tmp_path / "hl-smi"
    script.write_text("#!/bin/sh\ncase \"$2\" in\n  name) " + "; ".join(f"echo '{r.split(',')[0]}'" for r in rows)
                      + " ;;\n  *) " + "; ".join(f"echo '{r}'" for r in rows) + " ;;\nesac\n")
    script.chmod(0o755)
    monkeypatch.setitem(sys.modules, "habana_frameworks", None)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_probe_and_sampler_through_hl_smi(manager, fake_hl_smi):
    backend = manager.backend("intel-gaudi3")
    availability = backend.availability()
    assert availability.available and availability.devices == 2 and availability.reason == "2 x HL-325L"
    sample = manager.device_sampler(backend)()
    assert sample["utilization_pct"] == 40.0
    assert sample["memory_used_gb"] == pytest.approx(20480 * 2**20 / 1e9)
    assert sample["memory_total_gb"] == pytest.approx(2 * 131072 * 2**20 / 1e9)
    assert [d["power_w"] for d in sample["devices"]] == [600.0, None]


@pytest.mark.parametrize("name, expected", [("HL-325L", True), ("GAUDI3", True), ("Intel Gaudi 3", True),
                                            ("HL-225", False), ("GAUDI2", False)])
def test_gaudi3_names(name, expected):
    assert gaudi.is_gaudi3(name) is expected


def test_kernel_registered_for_its_backend_only(manager):
    registry = pytest.importorskip("dspark_lab.kernels.registry")
    kernels = registry.registered_kernels(manager)
    mine = [k for k in kernels if k.backend == "intel-gaudi3"]
    assert [k.name for k in mine] == ["rms_norm"] and mine[0].launcher is rms_norm.launch
    assert [row["state"] for row in registry.describe_kernels(manager) if row["backend"] == "intel-gaudi3"] == \
        ["runnable"]


def test_rms_norm_reference():
    x, weight = torch.randn(3, 8, dtype=torch.bfloat16), torch.rand(8)
    expected = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * weight.double()
    out = rms_norm.reference(x, weight)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


def test_collective_offered_for_gaudi3_and_cpu(manager):
    for name in ("cpu", "intel-gaudi3"):
        backend = manager.backend(name)
        assert "halving_doubling" in manager.collective_names(backend)
        assert isinstance(manager.make_collective(backend, "halving_doubling"), HalvingDoublingCollective)
    manager.register(nvidia)
    assert "halving_doubling" not in manager.collective_names(manager.backend("nvidia-h100"))


def _check(collective: HalvingDoublingCollective, members: list[int], rank: int) -> None:
    size, me = len(members), members.index(rank)
    for numel in (0, 1, 5, 37):  # empty, fewer elements than ranks, odd split sizes
        mine = torch.arange(numel, dtype=torch.float64) * (rank + 1) + rank
        expected = sum(torch.arange(numel, dtype=torch.float64) * (r + 1) + r for r in members)
        got = collective.all_reduce(mine.clone().view(-1, 1) if numel else mine.clone())
        torch.testing.assert_close(got.view(-1), expected, rtol=0, atol=0)
        gathered = collective.all_gather(mine)
        torch.testing.assert_close(gathered, torch.cat([torch.arange(numel, dtype=torch.float64) * (r + 1) + r
                                                        for r in members]), rtol=0, atol=0)
    full = torch.arange(size * 6, dtype=torch.float64) + 100 * rank
    shard = collective.reduce_scatter(full)
    total = sum(torch.arange(size * 6, dtype=torch.float64) + 100 * r for r in members)
    torch.testing.assert_close(shard, total[me * 6:(me + 1) * 6], rtol=0, atol=0)
    transposed = torch.arange(12, dtype=torch.float32).view(3, 4).t()  # a non-contiguous input, reduced in place
    collective.all_reduce(transposed)
    torch.testing.assert_close(transposed, torch.arange(12, dtype=torch.float32).view(3, 4).t() * size)


def _worker(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _check(HalvingDoublingCollective(None), list(range(world)), rank)
        odd = [1, 2, 3]  # a subgroup of 3: the pre-step path, and group ranks that differ from global ranks
        group = dist.new_group(odd)
        if rank in odd:
            _check(HalvingDoublingCollective(group), odd, rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_halving_doubling_matches_the_sums_over_gloo(tmp_path):
    # fork: the children start with torch already imported (spawn costs seconds per process on a small machine)
    mp.start_processes(_worker, args=(4, str(tmp_path / "store")), nprocs=4, join=True, start_method="fork")
