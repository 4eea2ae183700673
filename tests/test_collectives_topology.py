"""Topologies, Blink-style tree packing against the max-flow bound, and the best-ring reference."""

from __future__ import annotations

import itertools
import json
import random

import networkx as nx
import numpy as np
import pytest

from dspark_lab.collectives.commands import plan_collective
from dspark_lab.collectives.packing import (allocations, best_ring, broadcast_bound, min_arborescence, plan, _Links,
                                           _two_rings_rate)
from dspark_lab.collectives.topology import PRESETS, from_dict, load_topology
from dspark_lab.errors import DSparkError


def check_plan(topology, result):
    """Every tree spans the devices from the root, and together they never load a link beyond its capacity."""
    capacity = topology.capacity()
    load = {}
    for tree, rate in result.trees:
        assert rate > 0
        children = {child for _, child in tree.edges}
        assert children == set(result.devices) - {result.root} and len(tree.edges) == len(result.devices) - 1
        g = nx.DiGraph(tree.edges)
        assert nx.is_arborescence(g) and [n for n, d in g.in_degree() if d == 0] == [result.root]
        for path in tree.paths:
            hops = list(zip(path, path[1:]))
            if result.op == "allreduce":
                hops += [(b, a) for a, b in hops]
            for hop in hops:
                load[hop] = load.get(hop, 0.0) + rate
    assert all(load[hop] <= capacity[hop] * (1 + 1e-6) for hop in load)
    assert len(result.trees) <= 2 * len(result.devices)


def test_dgx1_preset_is_the_hybrid_cube_mesh():
    topo = load_topology("dgx1-v100")
    cap = topo.capacity()
    for gpu in topo.devices:  # six NVLink 2 links of 25 GB/s per GPU, each direction
        assert sum(v for (a, b), v in cap.items() if a == gpu and b.startswith("gpu")) == 150
        assert sum(v for (a, b), v in cap.items() if b == gpu and a.startswith("gpu")) == 150
    assert cap[("gpu0", "gpu3")] == 50 and cap[("gpu0", "gpu1")] == 25 and ("gpu0", "gpu5") not in cap
    assert all(cap[(b, a)] == v for (a, b), v in cap.items())


@pytest.mark.parametrize("bad, field", [
    ({"links": []}, "nodes"), ({"nodes": ["a", "b"], "links": {}}, "links"),
    ({"nodes": ["a", "b"], "links": [{"src": "a", "dst": "c", "gb_s": 1}]}, "links"),
    ({"nodes": ["a", "b"], "links": [{"src": "a", "dst": "b", "gb_s": "fast"}]}, "links[0].gb_s"),
    ({"nodes": ["a", "b"], "links": [{"src": "a", "dst": "b", "gb_s": float("nan")}]}, "gb_s"),
    ({"nodes": ["a", "b"], "links": [{"src": "a", "dst": "b", "gb_s": -1}]}, "gb_s"),
    ({"nodes": ["a", {"name": "s", "kind": "router"}], "links": []}, "nodes[1]"),
    ({"nodes": ["a", "a"], "links": []}, "unique"),
    ({"nodes": ["a"], "links": []}, "at least 2 devices"),
    ([1, 2], "JSON object"),
])
def test_malformed_topologies_are_refused_naming_the_field(bad, field):
    with pytest.raises(DSparkError, match=r"^topology") as info:
        from_dict(bad)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_topology_file_and_cli_refusals(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"nodes": ["x", "y", "z"], "links": [
        {"src": a, "dst": b, "gb_s": 10} for a in "xyz" for b in "xyz" if a != b]}))
    report = plan_collective(str(path), op="broadcast")
    assert report.data["algbw_gb_s"] == pytest.approx(20.0) == report.data["max_flow_bound_gb_s"]
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(DSparkError, match="not valid JSON"):
        load_topology(str(tmp_path / "bad.json"))
    with pytest.raises(DSparkError, match="--ranks: 8 is not a device"):
        plan_collective("dgx1-v100", "0,8")
    with pytest.raises(DSparkError, match="--ranks: a comma-separated"):
        plan_collective("dgx1-v100", "0,x")
    with pytest.raises(DSparkError, match="--root"):
        plan_collective("dgx1-v100", "0,1,2", root=5)
    with pytest.raises(DSparkError, match="nodes x gpus"):
        load_topology("nodes:1000,gpus:8")


def test_min_arborescence_matches_networkx_on_random_graphs():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 10))
        cost = rng.random((n, n)) * 10
        cost[rng.random((n, n)) < 0.3] = np.inf
        g = nx.DiGraph()
        g.add_nodes_from(range(n))
        g.add_weighted_edges_from((u, v, cost[u, v]) for u in range(n) for v in range(1, n)
                                  if u != v and np.isfinite(cost[u, v]))
        try:
            want = sum(cost[u, v] for u, v in nx.minimum_spanning_arborescence(g).edges)
        except nx.NetworkXException:
            with pytest.raises(DSparkError):
                min_arborescence(cost, 0)
            continue
        parent = min_arborescence(cost, 0)
        assert parent[0] == -1 and nx.is_arborescence(nx.DiGraph([(parent[v], v) for v in range(1, n)]))
        assert sum(cost[parent[v], v] for v in range(1, n)) == pytest.approx(want)


def test_a_hand_computed_partial_dgx1_allocation():
    # GPUs 0, 1, 5, 6: one NVLink chain 0-1-5-6 (25 GB/s), and PCIe (16 GB/s) under it; no NVLink ring exists
    topo = load_topology("dgx1-v100")
    result = plan(topo, ["gpu0", "gpu1", "gpu5", "gpu6"])
    check_plan(topo, result)
    assert result.bound_gb_s == pytest.approx(41.0) and result.rate_gb_s == pytest.approx(41.0)
    assert result.ring_rate_gb_s == pytest.approx(16.0)


@pytest.mark.parametrize("name, devices", [
    ("dgx1-v100", ["gpu0", "gpu1", "gpu2", "gpu4", "gpu6"]),
    ("dgx1-v100", ["gpu0", "gpu1", "gpu2", "gpu3", "gpu4", "gpu5"]),
    ("dgx1-v100", ["gpu0", "gpu1", "gpu6", "gpu7"]),  # both rings cross PCIe uplinks: the pruning must allow for it
    ("hgx-h100", ["gpu0", "gpu1", "gpu2", "gpu3", "gpu4", "gpu5"]),  # every order shares every switch port
])
def test_best_ring_is_the_exhaustive_optimum(name, devices):
    topo = load_topology(name)
    links = _Links(topo.graph(devices), devices)
    order, rate = best_ring(links)
    brute = max(_two_rings_rate(links, [devices[0], *p]) for p in itertools.permutations(devices[1:]))
    assert rate == pytest.approx(brute) and sorted(order) == sorted(devices)


@pytest.mark.parametrize("name, link", [("mi300x", 64.0), ("dgx1-v100", 25.0)])
def test_two_device_rings_share_their_links(name, link):
    # The ring gpu0>gpu1>gpu0 and its reverse cross the same two directed links, so together they carry one link's
    # rate; all-reduce sends 2 (n - 1) / n = 1 x the data per rank, so algbw is the link's rate (not twice it).
    result = plan(load_topology(name), ["gpu0", "gpu1"], op="allreduce")
    assert result.ring_rate_gb_s == pytest.approx(link)
    assert result.ring_algbw_gb_s == pytest.approx(link)
    if name == "mi300x":  # one link, no switch path: the trees are the same two directions
        assert result.rate_gb_s == pytest.approx(64.0) and result.as_dict()["speedup_over_ring"] == pytest.approx(1.0)


@pytest.mark.parametrize("name, devices, both_rings, trees", [
    # direct links: the ring 0>1>2>0 and its reverse 0>2>1>0 use disjoint directed links at 64 each, 128 together;
    # the trees: 6 directed links x 64 over 4 link uses per all-reduce tree = 96
    ("mi300x", ["gpu0", "gpu1", "gpu2"], 128.0, 96.0),
    # every hop crosses the NVSwitch: each ring loads every GPU's uplink and downlink once, so the two rings share
    # all of them, 450 together; the trees: 3 x 450 x 2 directions over 4 link uses = 337.5
    ("hgx-h100", ["gpu0", "gpu1", "gpu2"], 450.0, 337.5),
    # gpu6 only by PCIe and QPI: gpu1>gpu6 in one ring and gpu0>gpu6 in the other both cross pcie0>cpu0 (16)
    ("dgx1-v100", ["gpu0", "gpu1", "gpu6"], 16.0, None),
])
def test_three_device_rings_add_up_only_over_disjoint_links(name, devices, both_rings, trees):
    result = plan(load_topology(name), devices, op="allreduce")
    assert result.ring_rate_gb_s == pytest.approx(both_rings)
    assert result.ring_algbw_gb_s == pytest.approx(both_rings * 3 / 4)  # algbw = ring rate x n / (2 (n - 1))
    if trees is not None:
        assert result.rate_gb_s == pytest.approx(trees) and result.ring_algbw_gb_s == pytest.approx(trees)


@pytest.mark.parametrize("name", [*PRESETS, "nodes:2,gpus:4"])
@pytest.mark.parametrize("op", ["broadcast", "allreduce"])
def test_presets_plan_within_capacity(name, op):
    topo = load_topology(name)
    result = plan(topo, op=op)
    check_plan(topo, result)
    if op == "broadcast":
        assert result.rate_gb_s >= 0.95 * result.bound_gb_s


def test_full_dgx1_broadcast_beats_the_ring_by_the_bound():
    result = plan(load_topology("dgx1-v100"))
    assert result.bound_gb_s == pytest.approx(166.0)  # 6 NVLinks + the PCIe uplink
    assert result.rate_gb_s >= 0.95 * 166.0 and result.rate_gb_s / result.ring_rate_gb_s > 3


def sampled_dgx1_cases(count, seed=0):
    topo = load_topology("dgx1-v100")
    cases = [(alloc, root) for alloc in allocations(topo.devices, range(3, 9)) for root in alloc]
    return random.Random(seed).sample(cases, count)


def assert_goals(topo, alloc, root):
    result = plan(topo, alloc, root=root)
    check_plan(topo, result)
    assert result.rate_gb_s >= 0.95 * result.bound_gb_s, (alloc, root)
    if result.bound_gb_s >= 1.5 * result.ring_rate_gb_s:
        assert result.rate_gb_s >= 1.5 * result.ring_rate_gb_s, (alloc, root)


@pytest.mark.parametrize("alloc, root", sampled_dgx1_cases(12))
def test_sampled_dgx1_allocations_meet_the_goals(alloc, root):
    assert_goals(load_topology("dgx1-v100"), alloc, root)


@pytest.mark.slow
def test_every_dgx1_allocation_of_3_to_8_gpus_meets_the_goals():
    topo = load_topology("dgx1-v100")
    for alloc in allocations(topo.devices, range(3, 9)):
        assert_goals(topo, alloc, alloc[0])


def random_sparse(n, seed):
    rng = np.random.default_rng(seed)
    names = [f"d{i}" for i in range(n)]
    links = []
    for i, j in itertools.combinations(range(n), 2):
        if j == i + 1 or rng.random() < 0.3:
            rate = float(rng.choice([10, 25, 50, 100]))
            links += [{"src": names[i], "dst": names[j], "gb_s": rate}, {"src": names[j], "dst": names[i], "gb_s": rate}]
    return from_dict({"nodes": names, "links": links})


@pytest.mark.parametrize("n, seed", [(5, 1), (8, 2), (12, 3), (16, 4)])
def test_random_sparse_graphs_reach_the_bound(n, seed):
    topo = random_sparse(n, seed)
    result = plan(topo)
    check_plan(topo, result)
    assert result.rate_gb_s >= 0.95 * broadcast_bound(topo, topo.devices, topo.devices[0])


def test_backends_say_which_topology_they_report(builtin_plugins):
    from dspark_lab import commands
    from dspark_lab.plugins import make_manager

    rows = {r["name"]: r for r in commands.backends(make_manager(builtin_plugins, entry_points=False)).data["backends"]}
    assert rows["cpu"]["topology"].startswith("loopback: 2 devices")
    assert all(r["topology"] is None for name, r in rows.items() if not r["available"])


def test_every_process_plans_the_same_trees():
    """Ranks plan on their own and must agree: nothing may depend on set or hash order (PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys

    code = ("from dspark_lab.collectives.topology import load_topology\n"
            "from dspark_lab.collectives.packing import plan\n"
            "t = load_topology('dgx1-v100')\n"
            "for devices in (t.devices[:4], t.devices):\n"
            "    for op in ('broadcast', 'allreduce'):\n"
            "        p = plan(t, devices, op=op)\n"
            "        print([(tree.paths, round(rate, 9)) for tree, rate in p.trees], p.ring_order)\n")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(outputs) == 1


def test_nvml_topology_reads_nvlinks_switches_and_p2p():
    """The NVIDIA backend's link graph from NVML, against a stand-in NVML: GPUs 0-1 joined by two NVLink 4 links,
    GPU 2 reaching an NVSwitch over one, and GPUs 1-3 with only PCIe P2P (gen 4 x16)."""
    from types import SimpleNamespace

    from dspark_lab.backends.topology import nvml_topology

    class NVMLError(Exception):
        pass

    bus = {0: b"0000:01:00.0", 1: b"0000:02:00.0", 2: b"0000:03:00.0", 3: b"0000:04:00.0"}
    links = {0: {0: bus[1], 1: bus[1]}, 1: {0: bus[0], 1: bus[0]}, 2: {0: b"0000:ff:00.0"}, 3: {}}

    def link_info(handle, link):
        if link not in links[handle]:
            raise NVMLError("no such link")
        return 1

    fake = SimpleNamespace(
        NVMLError=NVMLError, NVML_FEATURE_ENABLED=1, NVML_P2P_CAPS_INDEX_READ=0, NVML_P2P_STATUS_OK=0,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetPciInfo=lambda h: SimpleNamespace(busId=bus[h]),
        nvmlDeviceGetNvLinkState=link_info, nvmlDeviceGetNvLinkVersion=lambda h, link: 4,
        nvmlDeviceGetNvLinkRemotePciInfo=lambda h, link: SimpleNamespace(busId=links[h][link]),
        nvmlDeviceGetP2PStatus=lambda a, b, caps: 0 if {a, b} == {1, 3} else 1,
        nvmlDeviceGetCurrPcieLinkGeneration=lambda h: 4, nvmlDeviceGetCurrPcieLinkWidth=lambda h: 16)
    topo = from_dict(nvml_topology(fake, [0, 1, 2, 3]))
    cap = topo.capacity()
    assert cap[("gpu0", "gpu1")] == 50.0 and cap[("gpu1", "gpu0")] == 50.0  # two NVLink 4 links, 25 GB/s each
    assert topo.switches == ["nvswitch"] and cap[("gpu2", "nvswitch")] == cap[("nvswitch", "gpu2")] == 25.0
    assert cap[("gpu1", "gpu3")] == pytest.approx(1.969 * 16) and ("gpu0", "gpu3") not in cap


def test_hierarchical_allreduce_on_hand_computed_two_level_topologies():
    """nodes:2,gpus:4: inside a node, 4 GPUs on a switch at X GB/s each way all-reduce at 4X / (2 x 3) (every tree
    edge loads a sender's uplink once each way, 2(n-1) edge uses per tree over n uplinks); across, the 4 columns of
    2 GPUs each all-reduce a quarter at the NIC's 10 GB/s, so 40. The slower stage sets the rate."""
    for nvlink, inside in ((450, 300.0), (30, 20.0)):
        report = plan_collective(f"nodes:2,gpus:4,nvlink:{nvlink},nic:10", op="allreduce")
        staged = report.data["hierarchical"]
        assert staged["groups"] == [[f"n{n}-gpu{g}" for g in range(4)] for n in range(2)]
        assert staged["inside_gb_s"] == pytest.approx(inside) and staged["across_gb_s"] == pytest.approx(40.0)
        assert staged["algbw_gb_s"] == pytest.approx(min(inside, 40.0))
        assert any(line.startswith("hierarchical over 2 nodes") for line in report.lines)
    # with 30 GB/s NVLink the flat packing beats the hierarchical form: it also sends inside a node over the NICs
    assert report.data["algbw_gb_s"] > staged["algbw_gb_s"]
    assert "hierarchical" not in plan_collective("nodes:2,gpus:4", op="broadcast").data
    assert "hierarchical" not in plan_collective("dgx1-v100", op="allreduce").data
    uneven = plan_collective("nodes:2,gpus:4", ranks="0,1,4", op="allreduce")
    assert "hierarchical" not in uneven.data and "different numbers" in uneven.lines[-1]


DATA = __import__("pathlib").Path(__file__).parent / "data"


def test_amd_smi_topology_text_gives_the_mi300x_mesh():
    """``amd-smi topology`` tables for 8 MI300X (tests/data, in amd-smi's table layout): every pair XGMI, the NUMA BW
    table's maximum 64000 MB/s -> the mi300x preset's 64 GB/s full mesh, and the same plan."""
    from dspark_lab.backends.topology import smi_topology

    topo = from_dict(smi_topology((DATA / "amd-smi-topology-mi300x.txt").read_text(), list(range(8))))
    assert topo.source.startswith("amd-smi topology") and topo.switches == []
    assert topo.capacity() == load_topology("mi300x").capacity()
    assert plan(topo, op="allreduce").rate_gb_s == pytest.approx(plan(load_topology("mi300x"), op="allreduce").rate_gb_s)
    subset = from_dict(smi_topology((DATA / "amd-smi-topology-mi300x.txt").read_text(), [2, 5, 7]))
    assert subset.devices == ["gpu2", "gpu5", "gpu7"] and len(subset.links) == 6


def test_rocm_smi_showtopo_text_gives_xgmi_pairs_over_pcie():
    """``rocm-smi --showtopo`` of 4 GPUs in two xGMI pairs (0-1, 2-3) that meet over PCIe: direct 64 GB/s links in
    each pair, every GPU on a ``pcie`` switch at Gen5 x16; a broadcast from gpu0 is bounded by what reaches the far
    pair: PCIe from gpu0 and from gpu1 (63 each), not gpu0's 64 + 63 way out."""
    from dspark_lab.backends.topology import smi_topology

    topo = from_dict(smi_topology((DATA / "rocm-smi-showtopo-2x2.txt").read_text(), [0, 1, 2, 3]))
    cap = topo.capacity()
    assert cap[("gpu0", "gpu1")] == cap[("gpu3", "gpu2")] == 64.0 and ("gpu0", "gpu2") not in cap
    assert topo.switches == ["pcie"] and cap[("gpu2", "pcie")] == cap[("pcie", "gpu2")] == 63.0
    assert broadcast_bound(topo, topo.devices, "gpu0") == pytest.approx(126.0)
    # an XGMI pair with a weight above the direct pairs' is reached through other GPUs, not directly
    text = (DATA / "rocm-smi-showtopo-2x2.txt").read_text()
    indirect = text.replace("GPU0   0            15           40", "GPU0   0            30           40")
    assert ("gpu0", "gpu1") not in from_dict(smi_topology(indirect, [0, 1, 2, 3])).capacity()
    assert smi_topology("rocm-smi: no GPUs found", [0, 1]) is None


def test_amd_backend_reports_its_tools_topology(builtin_plugins, monkeypatch):
    """The AMD backend's ``dspark_topology`` answer comes from its tool's output; ``dspark-lab backends`` says so."""
    from dspark_lab import commands
    from dspark_lab.backend import Availability
    from dspark_lab.backends import amd
    from dspark_lab.plugins import make_manager

    monkeypatch.setattr(amd, "probe", lambda: Availability.yes(8, "8 x AMD Instinct MI300X"))
    monkeypatch.setattr(amd, "topology_text", lambda: (DATA / "amd-smi-topology-mi300x.txt").read_text())
    manager = make_manager(builtin_plugins, entry_points=False)
    rows = {r["name"]: r for r in commands.backends(manager).data["backends"]}
    assert rows[amd.NAME]["topology"] == "amd-smi: 8 devices, 0 switches, 56 links"
    monkeypatch.setattr(amd, "topology_text", lambda: None)  # neither amd-smi nor rocm-smi installed
    rows = {r["name"]: r for r in commands.backends(make_manager(builtin_plugins, entry_points=False))
            .data["backends"]}
    assert rows[amd.NAME]["topology"] is None


def test_dspark_devices_says_which_topology_each_backend_reported(builtin_plugins):
    """``%dspark devices`` (its text report) carries the line ``dspark-lab backends`` shows in its topology column."""
    pytest.importorskip("ipywidgets")
    from dspark_lab import commands
    from dspark_lab.jupyter.devices import device_report
    from dspark_lab.plugins import make_manager

    manager = make_manager(builtin_plugins, entry_points=False)
    report = device_report(manager)
    cpu = next(line for line in report.lines if line.startswith("cpu topology: "))
    column = {r["name"]: r["topology"] for r in commands.backends(manager).data["backends"]}["cpu"]
    assert cpu.startswith(f"cpu topology: {column.split(':')[0]}, ") and "shared memory" in cpu
    assert report.data["topology"] == [line for line in report.lines if " topology: " in line]
    assert cpu in report.to_text()
