"""The GPU part table: peak figures per part, keyed on the full name the vendor's library reports.

The figures live in one data file, ``data/gpu_parts.json`` (each part cites its datasheet). A name is matched
exactly, never as a substring; where one name covers two SKUs the device's memory size picks between them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from dspark_lab.backend import DeviceSpec

DATA = Path(__file__).with_name("data") / "gpu_parts.json"
SPEC_KEYS = tuple(DeviceSpec.__dataclass_fields__)


@lru_cache(maxsize=1)
def parts() -> tuple[dict, ...]:
    return tuple(json.loads(DATA.read_text())["parts"])


def lookup(name: str, memory_gb: float | None = None) -> dict | None:
    """The part whose name list holds ``name`` exactly; among several, the one nearest ``memory_gb``."""
    found = [p for p in parts() if name.strip() in p["names"]]
    if len(found) > 1 and memory_gb is not None:
        found.sort(key=lambda p: abs(p["memory_gb"] - memory_gb))
    return found[0] if found else None


def spec(part: dict) -> DeviceSpec:
    return DeviceSpec(**{k: part[k] for k in SPEC_KEYS if k in part and k != "source"},
                      source=f"{part['part']}: {part['source']}")


def backend_parts(vendor_prefix: str) -> dict[str, dict]:
    """Backend name -> its default part, for every backend whose name starts with ``vendor_prefix``."""
    out: dict[str, dict] = {}
    for p in parts():
        if p["backend"].startswith(vendor_prefix) and (p.get("default") or p["backend"] not in out):
            out[p["backend"]] = p
    return dict(sorted(out.items()))
