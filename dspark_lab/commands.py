"""The core's verbs (backends, kernels, doctor), each returning a :class:`~dspark_lab.output.Report`.

Each area owns its verbs in its own ``commands.py`` (the live runtime in :mod:`dspark_lab.runtime.commands`,
pipeline schedules in :mod:`dspark_lab.pipeline.commands`, MoE in :mod:`dspark_lab.moe.commands`); ``cli.py``
parses arguments and prints, ``jupyter/magics.py`` displays. Neither holds logic of its own, so the CLI and
``%dspark`` always answer alike.
"""

from __future__ import annotations

from dspark_lab.doctor import run_checks
from dspark_lab.output import Report
from dspark_lab.plugins import Manager, get_manager


def backends(manager: Manager | None = None) -> Report:
    """Every registered backend with its specs and an honest availability."""
    manager = manager or get_manager()
    rows = []
    for backend in manager.backends():
        availability = backend.availability()
        rows.append({
            "name": backend.name,
            "vendor": backend.vendor,
            "plugin": backend.plugin,
            "available": availability.available,
            "devices": availability.devices,
            "reason": availability.reason,
            "torch_device": backend.torch_device,
            "collectives": manager.collective_names(backend),
            "topology": _topology_line(manager, backend, availability),
            "specs": backend.spec.as_dict(),
        })
    table = [{**r, "bf16_tflops": r["specs"]["bf16_tflops"], "memory_gb": r["specs"]["memory_gb"],
              "link_gb_s": r["specs"]["link_gb_s"]} for r in rows]
    return Report("backends", {"backends": rows}, rows=table,
                  columns=("name", "vendor", "plugin", "available", "bf16_tflops", "memory_gb", "link_gb_s", "topology",
                           "reason"))


def _topology_line(manager: Manager, backend, availability) -> str | None:
    """Which link graph the backend reports (``dspark_topology``) for its devices, in a few words; None if none."""
    if not availability.available:
        return None
    from dspark_lab.collectives.topology import backend_topology

    topology = backend_topology(manager, backend, list(range(max(availability.devices or 1, 2))))
    if topology is None:
        return None
    return f"{topology.name}: {len(topology.devices)} devices, {len(topology.switches)} switches, " \
           f"{len(topology.links)} links"


def kernels(manager: Manager | None = None) -> Report:
    """Every kernel per backend with its state: compiled / runnable / fallback, and why."""
    from dspark_lab.kernels.registry import describe_kernels

    rows = describe_kernels(manager or get_manager())
    return Report("kernels", {"kernels": rows}, rows=rows,
                  columns=("backend", "kernel", "state", "path", "reason"))


def doctor(manager: Manager | None = None) -> Report:
    """What is installed, what works, what is missing and how to fix it."""
    checks = [c.as_dict() for c in run_checks(manager or get_manager())]
    problems = sum(c["status"] == "problem" for c in checks)
    footer = [f"{problems} problem(s)" if problems else "no problems"]
    return Report("doctor", {"checks": checks, "problems": problems}, rows=checks,
                  columns=("check", "status", "detail", "hint"), lines=footer)
