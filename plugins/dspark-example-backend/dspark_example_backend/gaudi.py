"""The Intel Gaudi 3 device: its published figures, an availability probe and a live sampler.

Figures (dense, per accelerator, OAM HL-325L) from Intel, "Intel Gaudi 3 AI Accelerator" white paper (2024) and
R. Kaplan, "Intel Gaudi 3 AI Accelerator: Architected for Gen AI Training and Inference", Hot Chips 2024:
BF16 and FP8 matrix 1835 TFLOP/s; 128 GB HBM2e at 3.67 TB/s; 24 x 200 GbE RoCE ports, 1200 GB/s bidirectional,
so 600 GB/s per direction. Intel publishes no FP32/TF32 matrix figure, so those stay ``None``.

The probe asks, in order, the Gaudi PyTorch bridge (``habana_frameworks.torch.hpu``) and the driver's command-line
tool (``hl-smi``). Neither is touched at import, and the probe never raises: without them it says which is missing.
"""

from __future__ import annotations

import shutil
import subprocess

from dspark_lab.backend import Availability, DeviceSpec, devices_sample

NAME = "intel-gaudi3"
# Gaudi 3 product names as the bridge and hl-smi print them (OAM HL-325L, PCIe card HL-338), compared upper-case
# with spaces removed so "Gaudi 3" matches too.
MARKERS = ("HL-325", "HL-338", "GAUDI3")

GAUDI3 = DeviceSpec(
    bf16_tflops=1835, fp8_tflops=1835, memory_gb=128, memory_bandwidth_gb_s=3670, link_gb_s=600,
    link="24 x 200 GbE RoCE", cores=64,
    source="Intel Gaudi 3 AI Accelerator white paper (2024) and Hot Chips 2024; 64 TPCs, matrix figures, dense",
)

_HL_SMI_FIELDS = ("name", "utilization.aip", "memory.used", "memory.total", "power.draw", "temperature.aip")


def is_gaudi3(name: str) -> bool:
    text = name.upper().replace(" ", "")
    return any(marker in text for marker in MARKERS)


def hl_smi(fields: tuple[str, ...]) -> list[list[str]]:
    """One row per device of ``hl-smi -Q <fields> -f csv,noheader,nounits``; RuntimeError with the reason if it
    fails."""
    path = shutil.which("hl-smi")
    if path is None:
        raise RuntimeError("hl-smi (the Gaudi driver's tool) is not on PATH")
    try:
        out = subprocess.run([path, "-Q", ",".join(fields), "-f", "csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"hl-smi failed: {exc}") from None
    if out.returncode != 0:
        raise RuntimeError(f"hl-smi exited {out.returncode}: {out.stderr.strip()[:120]}")
    return [[cell.strip() for cell in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def device_names() -> list[str]:
    """Names of the Gaudi devices present; RuntimeError naming what is missing when nothing can tell."""
    try:
        import habana_frameworks.torch.hpu as hpu
    except ImportError:
        hpu = None
    if hpu is not None and hpu.is_available():
        return [hpu.get_device_name()] * hpu.device_count()
    try:
        return [row[0] for row in hl_smi(("name",))]
    except RuntimeError as exc:
        bridge = "the Gaudi PyTorch bridge sees no device" if hpu else "habana_frameworks (Gaudi PyTorch bridge) is " \
                                                                      "not installed"
        raise RuntimeError(f"{bridge}; {exc}") from None


def probe() -> Availability:
    try:
        names = device_names()
    except RuntimeError as exc:
        return Availability.no(str(exc))
    matching = [n for n in names if is_gaudi3(n)]
    if not matching:
        return Availability.no(f"no Gaudi 3 among Gaudi devices ({', '.join(names) or 'none'})")
    return Availability.yes(len(matching), f"{len(matching)} x {matching[0]}")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # hl-smi prints "N/A" for a counter it cannot read
        return None


def sample() -> dict:
    """Live metrics of every Gaudi 3 from one hl-smi call (memory in MiB, power in W)."""
    devices = []
    for row in hl_smi(_HL_SMI_FIELDS):
        name, util, used, total, power, temp = row
        if not is_gaudi3(name):
            continue
        devices.append({
            "index": len(devices),
            "name": name,
            "utilization_pct": _number(util) or 0.0,
            "memory_used_gb": (_number(used) or 0.0) * 2**20 / 1e9,
            "memory_total_gb": (_number(total) or 0.0) * 2**20 / 1e9,
            "power_w": _number(power),
            "temperature_c": _number(temp),
        })
    return devices_sample(NAME, devices)
