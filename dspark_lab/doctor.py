"""``dspark-lab doctor``: what this machine has, what DSpark Lab can use of it, and how to fix what is missing.

The core checks what every install needs (torch, bokeh, the Jupyter pieces, the plugins); each backend plugin
checks its own vendor's driver and libraries through the ``dspark_doctor_checks`` hook, so the core names no vendor.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from dspark_lab.plugins import Manager


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # "ok", "missing" (optional piece absent), "problem" (something is broken)
    detail: str
    hint: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status, "detail": self.detail, "hint": self.hint}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_torch() -> Check:
    import torch

    return Check("torch", "ok", torch.__version__)


def check_vendors(manager: Manager) -> list[Check]:
    """What each backend plugin checks for its own devices (``dspark_doctor_checks``)."""
    checks = []
    for plugin, answer in manager.call_each("dspark_doctor_checks")[::-1]:  # in registration order
        items = answer if isinstance(answer, (list, tuple)) else [answer]
        for item in items:
            if isinstance(item, Check):
                checks.append(item)
            else:
                checks.append(Check(f"plugin {plugin}", "problem",
                                    f"dspark_doctor_checks returned a {type(item).__name__}, not a Check",
                                    "report it to the plugin's author"))
    return checks


def check_jupyter() -> list[Check]:
    checks = []
    for dist in ("jupyterlab", "ipywidgets", "jupyter_bokeh", "ipykernel"):
        version = _version(dist)
        checks.append(Check(dist, "ok" if version else "missing", version or "not installed",
                            "" if version else "pip install 'dspark-lab[jupyter]'"))
    return checks


def check_plugins(manager: Manager) -> list[Check]:
    manager.backends()  # calling the discovery hooks surfaces plugins that raise
    manager.policies()
    checks = [Check(f"plugin {name}", "ok", "loaded") for name in manager.plugin_names()]
    checks += [Check(f"plugin {p.plugin}", "problem", f"skipped at {p.stage}: {p.reason}", p.hint)
               for p in manager.problems]
    return checks


def run_checks(manager: Manager) -> list[Check]:
    return [
        check_torch(),
        Check("bokeh", "ok", _version("bokeh") or "?"),
        *check_vendors(manager),
        *check_jupyter(),
        *check_plugins(manager),
    ]
