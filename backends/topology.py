"""Link graphs of the built-in backends, through the ``dspark_topology`` hook.

- NVIDIA: read from NVML where a driver is present. Each active NVLink (``nvmlDeviceGetNvLinkState``) goes to the
  GPU whose PCI bus id ``nvmlDeviceGetNvLinkRemotePciInfo`` names, or to an ``nvswitch`` node when the far end is
  no GPU of this machine; its rate per direction follows the NVLink generation (25 GB/s per link for NVLink 2-4,
  50 for NVLink 5: NVIDIA's NVLink pages). Pairs without NVLink that NVML reports as P2P-capable get a PCIe link at
  the slower end's current generation and width.
- CPU: every rank is a process on one host; they meet in shared memory, a ``loopback`` switch.
- AMD: no topology yet (``amd-smi topology`` has it; the parser is future work), so ``None``.
"""

from __future__ import annotations

from dspark_lab import hookimpl

NVLINK_GB_S_PER_LINK = {1: 20.0, 2: 25.0, 3: 25.0, 4: 25.0, 5: 50.0}
PCIE_GB_S_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
LOOPBACK_GB_S = 10.0  # nominal shared-memory copy rate between two processes; planning only compares shapes
MAX_NVLINKS = 18


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
