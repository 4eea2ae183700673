"""Link graphs of the built-in backends, through the ``dspark_topology`` hook.

- NVIDIA: read from NVML where a driver is present. Each active NVLink (``nvmlDeviceGetNvLinkState``) goes to the
  GPU whose PCI bus id ``nvmlDeviceGetNvLinkRemotePciInfo`` names, or to an ``nvswitch`` node when the far end is
  no GPU of this machine; its rate per direction follows the NVLink generation (25 GB/s per link for NVLink 2-4,
  50 for NVLink 5: NVIDIA's NVLink pages). Pairs without NVLink that NVML reports as P2P-capable get a PCIe link at
  the slower end's current generation and width.
- CPU: every rank is a process on one host; they meet in shared memory, a ``loopback`` switch.
- AMD: parsed from the text of ``amd-smi topology`` (ROCm 6+) or ``rocm-smi --showtopo`` (older ROCm), whichever
  is installed (:func:`smi_topology`; ``backends/amd.py`` runs the tool). A pair whose link type is ``XGMI`` gets a
  direct link: at the maximum of amd-smi's ``NUMA BW TABLE`` (MB/s) where that table is printed, else at the
  MI300X figure (64 GB/s per direction, the ``mi300x`` preset's). A pair that is ``XGMI`` but not directly linked
  (amd-smi reports bandwidth 0 for it; rocm-smi a weight above the direct pairs' 15) gets no link: the planner routes
  through the GPUs between. ``PCIE`` pairs meet at a ``pcie`` switch at PCIe Gen5 x16 rates.
"""

from __future__ import annotations

import re

from dspark_lab import hookimpl

NVLINK_GB_S_PER_LINK = {1: 20.0, 2: 25.0, 3: 25.0, 4: 25.0, 5: 50.0}
PCIE_GB_S_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
LOOPBACK_GB_S = 10.0  # nominal shared-memory copy rate between two processes; planning only compares shapes
MAX_NVLINKS = 18
XGMI_GB_S = 64.0  # AMD Instinct MI300X data sheet: 128 GB/s bidirectional per xGMI link
PCIE5_X16_GB_S = 63.0


def _bus(pci) -> str:
    bus = pci.busId
    return (bus.decode() if isinstance(bus, bytes) else str(bus)).lower()


def nvml_topology(pynvml, indices: list[int]) -> dict:
    """The topology file format for the GPUs ``indices``, read through an initialised ``pynvml``."""
    handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices}
    name_of_bus = {_bus(pynvml.nvmlDeviceGetPciInfo(h)): f"gpu{i}" for i, h in handles.items()}
    capacity: dict[tuple[str, str], float] = {}
    switches: set[str] = set()
    for i, handle in handles.items():
        for link in range(MAX_NVLINKS):
            try:
                if pynvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                    continue
                version = pynvml.nvmlDeviceGetNvLinkVersion(handle, link)
                remote = _bus(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link))
            except pynvml.NVMLError:
                continue  # a link index past the last one this GPU has
            far = name_of_bus.get(remote)
            if far is None:
                far = "nvswitch"
                switches.add(far)
            rate = NVLINK_GB_S_PER_LINK.get(version, 25.0)
            capacity[(f"gpu{i}", far)] = capacity.get((f"gpu{i}", far), 0.0) + rate
            if far == "nvswitch":
                capacity[(far, f"gpu{i}")] = capacity.get((far, f"gpu{i}"), 0.0) + rate
    for i in indices:
        for j in indices:
            if i == j or (f"gpu{i}", f"gpu{j}") in capacity:
                continue
            try:
                status = pynvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], pynvml.NVML_P2P_CAPS_INDEX_READ)
            except pynvml.NVMLError:
                continue
            if status != pynvml.NVML_P2P_STATUS_OK:
                continue
            rates = []
            for k in (i, j):
                generation = pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handles[k])
                width = pynvml.nvmlDeviceGetCurrPcieLinkWidth(handles[k])
                rates.append(PCIE_GB_S_PER_LANE.get(generation, 0.985) * width)
            capacity[(f"gpu{i}", f"gpu{j}")] = min(rates)
    nodes = [f"gpu{i}" for i in indices] + [{"name": s, "kind": "switch"} for s in sorted(switches)]
    links = [{"src": a, "dst": b, "gb_s": gb_s} for (a, b), gb_s in sorted(capacity.items())]
    return {"name": "nvml", "source": "NVML: NVLink state, remote PCI ids, P2P status", "nodes": nodes,
            "links": links}


def smi_tables(text: str) -> dict[str, list[list[str]]]:
    """The matrices of ``amd-smi topology`` (``LINK TYPE TABLE:``) or ``rocm-smi --showtopo`` (``=== Link Type between
    two GPUs ===``) output: lower-case title -> rows of cells, the column labels first."""
    tables: dict[str, list[list[str]]] = {}
    rows: list[list[str]] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        title = re.fullmatch(r"=+ *(.*?) *=+", stripped) or re.fullmatch(r"([A-Z][A-Z0-9 ]* TABLE):", stripped)
        if title:
            rows = tables.setdefault(title[1].lower(), [])
        elif stripped and rows is not None:
            rows.append(stripped.split())
    return tables


def _matrix(tables: dict, *titles: str) -> list[list[str]] | None:
    """The square matrix (labels dropped) of the first table present, or None if none is or it is not square."""
    for title in titles:
        rows = tables.get(title)
        if rows:
            size = len(rows[0])
            body = [row[1:] for row in rows[1:size + 1]]
            if len(body) == size and all(len(row) == size for row in body):
                return body
            return None
    return None


def smi_topology(text: str, indices: list[int]) -> dict | None:
    """The topology file format for the GPUs ``indices``, from ``amd-smi topology`` or ``rocm-smi --showtopo``
    output (see the module docstring); None when the text holds no link type table."""
    tables = smi_tables(text)
    kinds = _matrix(tables, "link type table", "link type between two gpus")
    if kinds is None:
        return None
    bandwidth = _matrix(tables, "numa bw table")
    weights = _matrix(tables, "weight table", "weight between two gpus")
    chosen = [i for i in indices if 0 <= i < len(kinds)]
    xgmi_weights = [int(weights[i][j]) for i in chosen for j in chosen
                    if i != j and kinds[i][j].upper() == "XGMI" and weights and weights[i][j].isdigit()]
    links, pcie = [], set()
    for i in chosen:
        for j in chosen:
            kind = kinds[i][j].upper()
            if i == j:
                continue
            if kind == "XGMI":
                gb_s = XGMI_GB_S
                if bandwidth is not None:
                    top = bandwidth[i][j].split("-")[-1]
                    gb_s = int(top) / 1e3 if top.isdigit() else 0.0
                elif weights is not None and weights[i][j].isdigit() and int(weights[i][j]) > min(xgmi_weights):
                    gb_s = 0.0
                if gb_s > 0:
                    links.append({"src": f"gpu{i}", "dst": f"gpu{j}", "gb_s": gb_s})
            elif kind == "PCIE":
                pcie |= {i, j}
    for i in sorted(pcie):
        links += [{"src": f"gpu{i}", "dst": "pcie", "gb_s": PCIE5_X16_GB_S},
                  {"src": "pcie", "dst": f"gpu{i}", "gb_s": PCIE5_X16_GB_S}]
    nodes = [f"gpu{i}" for i in chosen] + ([{"name": "pcie", "kind": "switch"}] if pcie else [])
    tool = "amd-smi topology" if "link type table" in tables else "rocm-smi --showtopo"
    return {"name": "amd-smi" if tool.startswith("amd") else "rocm-smi", "nodes": nodes, "links": links,
            "source": f"{tool}: link types" + (", NUMA BW table" if bandwidth is not None else ", weights")}


def loopback_topology(count: int) -> dict:
    nodes = [f"rank{i}" for i in range(count)] + [{"name": "loopback", "kind": "switch"}]
    links = [link for i in range(count) for link in (
        {"src": f"rank{i}", "dst": "loopback", "gb_s": LOOPBACK_GB_S},
        {"src": "loopback", "dst": f"rank{i}", "gb_s": LOOPBACK_GB_S})]
    return {"name": "loopback", "source": f"one host: ranks meet in shared memory (nominal {LOOPBACK_GB_S:g} GB/s)",
            "nodes": nodes, "links": links}


@hookimpl
def dspark_topology(backend, devices):
    if backend.name == "cpu":
        return loopback_topology(len(devices))
    if backend.vendor != "nvidia" or not backend.availability().available:
        return None
    from dspark_lab.backends.nvidia import _nvml

    pynvml = _nvml()
    pynvml.nvmlInit()
    try:
        return nvml_topology(pynvml, list(devices))
    finally:
        pynvml.nvmlShutdown()
