"""Link graphs of the devices a job uses: devices, the switches between them, and directed links in GB/s.

A topology is what a backend reports through the ``dspark_topology`` hook, a preset named after a machine people
know, or a JSON file. Links are directed and carry GB/s **per direction**; a switch is a node that forwards but
holds no rank (an NVSwitch, a NIC fabric). The planner (:mod:`.packing`) packs spanning trees over it.

Presets (each figure from the cited vendor document):

- ``dgx1-v100``: NVIDIA DGX-1 with Tesla V100, the hybrid cube-mesh: two fully connected quads of four GPUs plus
  one link between GPU i and GPU i+4; six NVLink 2 links per GPU at 25 GB/s per direction, some pairs doubled
  ("NV2"); below them PCIe Gen3 x16 switches shared by GPU pairs and two CPU sockets joined by QPI. NVIDIA,
  *DGX-1 With Tesla V100 System Architecture*, WP-08437-002, figures 4-5 (the matrix ``nvidia-smi topo -m`` prints).
- ``hgx-h100``: eight H100 SXM5 on four third-generation NVSwitches; 18 NVLink 4 links per GPU, 450 GB/s per
  direction into the switch fabric, modelled as one non-replicating switch. NVIDIA H100 Tensor Core GPU datasheet
  and *NVIDIA DGX H100 User Guide*.
- ``mi300x``: eight AMD Instinct MI300X on an OAM baseboard, fully connected, one xGMI link per GPU pair at
  64 GB/s per direction (128 GB/s bidirectional). AMD, *AMD Instinct MI300X Platform* data sheet.
- ``nodes:N,gpus:G[,nvlink:X][,nic:Y]``: N nodes of G GPUs, an NVSwitch inside each node (X GB/s per GPU and
  direction, default 450) and one NIC per GPU to a common fabric (Y GB/s per direction, default 50: 400 Gb/s
  InfiniBand NDR, as in a DGX H100).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dspark_lab.errors import DSparkError

MAX_NODES = 512  # devices and switches in one topology: a bound on what a file or preset string can ask for
MAX_LINK_GB_S = 1e6
NVLINK2_GB_S = 25.0
PCIE3_X16_GB_S = 16.0  # PCIe Gen3 x16, per direction (15.75 GB/s raw)
QPI_GB_S = 38.4  # two QPI links at 9.6 GT/s, 19.2 GB/s each per direction

# DGX-1V: NVLink count between GPU pairs (upper triangle), WP-08437-002 figure 4.
DGX1_V100_LINKS = {(0, 1): 1, (0, 2): 1, (0, 3): 2, (0, 4): 2, (1, 2): 2, (1, 3): 1, (1, 5): 2, (2, 3): 2,
                   (2, 6): 1, (3, 7): 1, (4, 5): 1, (4, 6): 1, (4, 7): 2, (5, 6): 2, (5, 7): 1, (6, 7): 2}


@dataclass(frozen=True, slots=True)
class Link:
    src: str
    dst: str
    gb_s: float  # per direction


@dataclass(slots=True)
class Topology:
    """Devices (which hold ranks), switches (which only forward) and directed links."""

    name: str
    devices: list[str]
    switches: list[str] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        names = self.devices + self.switches
        if len(set(names)) != len(names):
            raise DSparkError(f"topology {self.name}: nodes: names must be unique")
        if len(names) > MAX_NODES:
            raise DSparkError(f"topology {self.name}: nodes: at most {MAX_NODES}, got {len(names)}")
        known = set(names)
        for link in self.links:
            if link.src not in known or link.dst not in known:
                raise DSparkError(f"topology {self.name}: links: {link.src}->{link.dst} names a node not in nodes")
            if link.src == link.dst:
                raise DSparkError(f"topology {self.name}: links: {link.src}->{link.dst} is a self-loop")
            if not 0 < link.gb_s <= MAX_LINK_GB_S:
                raise DSparkError(f"topology {self.name}: links: gb_s of {link.src}->{link.dst} must be in "
                                  f"(0, {MAX_LINK_GB_S:g}], got {link.gb_s}")

    def capacity(self) -> dict[tuple[str, str], float]:
        """GB/s per directed node pair; parallel links add up."""
        total: dict[tuple[str, str], float] = {}
        for link in self.links:
            total[(link.src, link.dst)] = total.get((link.src, link.dst), 0.0) + link.gb_s
        return total

    def graph(self, devices: Iterable[str] | None = None):
        """A networkx DiGraph (edge attribute ``capacity`` in GB/s) over ``devices`` (default all) and the switches.

        Devices outside the allocation are left out: they belong to another job and relay nothing for this one.
        """
        import networkx as nx

        keep = set(self.devices if devices is None else devices) | set(self.switches)
        g = nx.DiGraph()
        g.add_nodes_from(n for n in self.devices + self.switches if n in keep)
        for (src, dst), gb_s in self.capacity().items():
            if src in keep and dst in keep:
                g.add_edge(src, dst, capacity=gb_s)
        return g

    def select(self, ranks: Iterable[int] | None) -> list[str]:
        """The device names of an allocation given as device indices (``--ranks 0,1,3``); all devices if None."""
        if ranks is None:
            return list(self.devices)
        chosen = []
        for r in ranks:
            if not 0 <= r < len(self.devices):
                raise DSparkError(f"--ranks: {r} is not a device of {self.name} (0..{len(self.devices) - 1})")
            if self.devices[r] in chosen:
                raise DSparkError(f"--ranks: {r} is given twice")
            chosen.append(self.devices[r])
        if len(chosen) < 2:
            raise DSparkError("--ranks: give at least 2 devices")
        return chosen

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source,
                "nodes": [{"name": d, "kind": "device"} for d in self.devices]
                + [{"name": s, "kind": "switch"} for s in self.switches],
                "links": [{"src": l.src, "dst": l.dst, "gb_s": l.gb_s} for l in self.links]}


def _both_ways(a: str, b: str, gb_s: float) -> list[Link]:
    return [Link(a, b, gb_s), Link(b, a, gb_s)]


def dgx1_v100() -> Topology:
    gpus = [f"gpu{i}" for i in range(8)]
    links = [link for (a, b), count in DGX1_V100_LINKS.items()
             for link in _both_ways(gpus[a], gpus[b], count * NVLINK2_GB_S)]
    # PCIe: GPU pairs share a PCIe switch, two switches per CPU socket, the sockets joined by QPI
    switches = ["pcie0", "pcie1", "pcie2", "pcie3", "cpu0", "cpu1"]
    for i, gpu in enumerate(gpus):
        links += _both_ways(gpu, f"pcie{i // 2}", PCIE3_X16_GB_S)
    for k in range(4):
        links += _both_ways(f"pcie{k}", f"cpu{k // 2}", PCIE3_X16_GB_S)
    links += _both_ways("cpu0", "cpu1", QPI_GB_S)
    return Topology("dgx1-v100", gpus, switches, links,
                    "NVIDIA WP-08437-002 (DGX-1 with Tesla V100), figures 4 and 5: NVLink cube-mesh, PCIe Gen3 x16 "
                    "switches per GPU pair, two QPI links between the Xeon E5-2698 v4 sockets")


def switched(name: str, gpus: int, gb_s: float, source: str) -> Topology:
    devices = [f"gpu{i}" for i in range(gpus)]
    links = [link for d in devices for link in _both_ways(d, "nvswitch", gb_s)]
    return Topology(name, devices, ["nvswitch"], links, source)


def full_mesh(name: str, gpus: int, gb_s: float, source: str) -> Topology:
    devices = [f"gpu{i}" for i in range(gpus)]
    links = [Link(a, b, gb_s) for a in devices for b in devices if a != b]
    return Topology(name, devices, links=links, source=source)


def multi_node(nodes: int, gpus: int, nvlink_gb_s: float = 450.0, nic_gb_s: float = 50.0) -> Topology:
    devices, switches, links = [], ["fabric"], []
    for n in range(nodes):
        switch = f"n{n}-nvswitch"
        switches.append(switch)
        for g in range(gpus):
            device = f"n{n}-gpu{g}"
            devices.append(device)
            links += _both_ways(device, switch, nvlink_gb_s) + _both_ways(device, "fabric", nic_gb_s)
    return Topology(f"nodes:{nodes},gpus:{gpus}", devices, switches, links,
                    f"two-level model: NVSwitch {nvlink_gb_s:g} GB/s per GPU inside a node, one {nic_gb_s:g} GB/s "
                    "NIC per GPU to a common fabric")


PRESETS = {
    "dgx1-v100": dgx1_v100,
    "hgx-h100": lambda: switched("hgx-h100", 8, 450.0, "NVIDIA H100 SXM5 datasheet: 900 GB/s NVLink 4 "
                                                       "(450 GB/s per direction) through NVSwitch"),
    "mi300x": lambda: full_mesh("mi300x", 8, 64.0, "AMD Instinct MI300X platform data sheet: one 128 GB/s "
                                                   "(64 GB/s per direction) xGMI link per GPU pair"),
}
_MULTI = re.compile(r"^nodes:(\d+),gpus:(\d+)((?:,(?:nvlink|nic):[0-9.]+)*)$")


def parse_multi_node(text: str) -> Topology:
    match = _MULTI.match(text)
    if not match:
        raise DSparkError(f"--topology: {text!r} is not nodes:N,gpus:G[,nvlink:GB_S][,nic:GB_S]")
    nodes, gpus = int(match[1]), int(match[2])
    if not (1 <= nodes and 1 <= gpus and nodes * gpus >= 2 and nodes * (gpus + 1) + 1 <= MAX_NODES):
        raise DSparkError(f"--topology: nodes x gpus must be 2..{MAX_NODES // 2} devices, got {nodes}x{gpus}")
    extra = dict(part.split(":") for part in match[3].split(",") if part)
    rates = {k: float(v) for k, v in extra.items()}
    for key, value in rates.items():
        if not 0 < value <= MAX_LINK_GB_S:
            raise DSparkError(f"--topology: {key} must be in (0, {MAX_LINK_GB_S:g}] GB/s, got {value}")
    return multi_node(nodes, gpus, rates.get("nvlink", 450.0), rates.get("nic", 50.0))


def from_dict(data: Any, name: str = "file") -> Topology:
    """``{"nodes": [name | {"name", "kind": "device"|"switch"}], "links": [{"src", "dst", "gb_s"}]}``."""
    if not isinstance(data, dict):
        raise DSparkError(f"topology {name}: the file must hold a JSON object with nodes and links")
    nodes, links = data.get("nodes"), data.get("links")
    if not isinstance(nodes, list) or not nodes:
        raise DSparkError(f"topology {name}: nodes: a non-empty list of names or {{name, kind}} objects")
    if not isinstance(links, list):
        raise DSparkError(f"topology {name}: links: a list of {{src, dst, gb_s}} objects")
    if len(nodes) > MAX_NODES or len(links) > MAX_NODES * MAX_NODES:
        raise DSparkError(f"topology {name}: at most {MAX_NODES} nodes and {MAX_NODES ** 2} links")
    devices, switches = [], []
    for i, node in enumerate(nodes):
        if isinstance(node, str):
            devices.append(node)
        elif isinstance(node, dict) and isinstance(node.get("name"), str) and \
                node.get("kind", "device") in ("device", "switch"):
            (switches if node.get("kind") == "switch" else devices).append(node["name"])
        else:
            raise DSparkError(f"topology {name}: nodes[{i}]: a name or {{\"name\": str, \"kind\": device|switch}}")
    parsed = []
    for i, link in enumerate(links):
        if not isinstance(link, dict) or not isinstance(link.get("src"), str) or \
                not isinstance(link.get("dst"), str):
            raise DSparkError(f"topology {name}: links[{i}]: needs src and dst node names")
        gb_s = link.get("gb_s")
        if isinstance(gb_s, bool) or not isinstance(gb_s, (int, float)):
            raise DSparkError(f"topology {name}: links[{i}].gb_s: a number of GB/s per direction")
        parsed.append(Link(link["src"], link["dst"], float(gb_s)))
    if len(devices) < 2:
        raise DSparkError(f"topology {name}: nodes: at least 2 devices")
    return Topology(str(data.get("name", name)), devices, switches, parsed, str(data.get("source", "")))


def backend_topology(manager, backend, devices: list[int]) -> Topology | None:
    """The topology a backend plugin reports through ``dspark_topology``; a malformed answer is recorded as the
    plugin's problem (``dspark-lab doctor`` shows it) and treated as no answer."""
    answer = manager.topology(backend, devices)
    if answer is None:
        return None
    try:
        return from_dict(answer, backend.name)
    except DSparkError as exc:
        manager.problem(backend.plugin, "dspark_topology", str(exc), "return the topology file format")
        return None


def load_topology(spec: str) -> Topology:
    """A preset name, a ``nodes:N,gpus:G`` string, or a JSON file path."""
    if spec in PRESETS:
        return PRESETS[spec]()
    if spec.startswith("nodes:"):
        return parse_multi_node(spec)
    path = Path(spec)
    if not path.is_file():
        raise DSparkError(f"--topology: {spec!r} is neither a preset ({', '.join(PRESETS)}, nodes:N,gpus:G) "
                          "nor a file")
    if path.stat().st_size > 16 << 20:
        raise DSparkError(f"--topology: {spec} is larger than 16 MiB")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DSparkError(f"--topology: {spec} is not valid JSON ({exc})") from None
    return from_dict(data, path.stem)
