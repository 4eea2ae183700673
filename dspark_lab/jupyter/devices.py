"""Live per-device utilization for the backends present, an nvdashboard/nvitop-like view.

Each available backend's sampler (``dspark_device_sampler``) returns a plain dict; a poller thread collects the
dicts and :class:`~dspark_lab.views.DeviceCharts` streams them. On a machine without accelerators it shows the
``cpu`` backend, one bar per core. A terminal IPython gets a text table instead (:func:`device_report`).
"""

from __future__ import annotations

import html
from typing import Any, Callable

import ipywidgets as widgets
from dspark_lab.jupyter.plot import BokehPlot

from dspark_lab.collectives.topology import backend_topology
from dspark_lab.errors import DSparkError
from dspark_lab.jupyter.display import close_tree, ensure_bokehjs
from dspark_lab.jupyter.live_box import rate_slider
from dspark_lab.jupyter.poller import Poller, interval_for
from dspark_lab.output import Report
from dspark_lab.plugins import Manager, get_manager
from dspark_lab.views import DeviceCharts, device_rows

Sampler = Callable[[], dict]


def samplers(manager: Manager | None = None) -> list[tuple[str, Sampler]]:
    """``(backend, sampler)`` for every available backend whose plugin offers a sampler."""
    manager = manager or get_manager()
    found = []
    for backend in manager.backends():
        if not backend.availability().available:
            continue
        sampler = manager.device_sampler(backend)
        if sampler is not None:
            found.append((backend.name, sampler))
    if not found:
        raise DSparkError("devices: no available backend offers a sampler; run `dspark-lab doctor`")
    return found


def sample_all(pairs: list[tuple[str, Sampler]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One sample per backend, and a line per sampler that raised (it is skipped, the others still shown)."""
    samples, errors = [], []
    for name, sampler in pairs:
        try:
            sample = dict(sampler())
        except Exception as exc:
            errors.append(f"{name}: sampler raised {type(exc).__name__}: {exc}")
            continue
        sample.setdefault("backend", name)
        samples.append(sample)
    return samples, errors


def topology_lines(manager: Manager | None = None) -> list[str]:
    """A line per available backend saying which link graph it reported (``dspark_topology``), or that it reported
    none, as the ``topology`` column of ``dspark-lab backends``."""
    manager = manager or get_manager()
    lines = []
    for backend in manager.backends():
        availability = backend.availability()
        if not availability.available:
            continue
        topology = backend_topology(manager, backend, list(range(max(availability.devices or 1, 2))))
        lines.append(f"{backend.name} topology: " + ("none reported" if topology is None else
                     f"{topology.name}, {len(topology.devices)} devices, {len(topology.switches)} switches, "
                     f"{len(topology.links)} links ({topology.source})"))
    return lines


def device_report(manager: Manager | None = None) -> Report:
    samples, errors = sample_all(samplers(manager))
    topology = topology_lines(manager)
    return Report("devices", {"devices": samples, "errors": errors, "topology": topology}, rows=device_rows(samples),
                  columns=("backend", "device", "utilization_pct", "memory_used_gb", "memory_total_gb"),
                  lines=[*topology, *errors])


class DeviceView(widgets.VBox):
    """Per-device utilization, refreshed by its own thread; pause, refresh rate and close controls."""

    def __init__(self, manager: Manager | None = None, refresh_hz: float = 2.0, history: int = 240):
        ensure_bokehjs()
        interval = interval_for(refresh_hz)
        self._samplers = samplers(manager)
        first, errors = sample_all(self._samplers)
        self.charts = DeviceCharts(first, history=history)
        self.samples = first
        self.errors = errors
        self.plot = BokehPlot(self.charts.layout)
        self.pause = widgets.ToggleButton(value=False, description="pause", icon="pause",
                                          layout=widgets.Layout(width="90px"))
        self.rate = rate_slider(refresh_hz)
        self.close_button = widgets.Button(description="close", icon="times", layout=widgets.Layout(width="90px"))
        self.status = widgets.HTML()
        self.topology = widgets.HTML("<br>".join(html.escape(line) for line in topology_lines(manager)))
        self.pause.observe(lambda c: self.poller.pause(c["new"]), "value")
        self.rate.observe(lambda c: self.poller.set_interval(1.0 / max(c["new"], 0.01)), "value")
        self.close_button.on_click(lambda _: self.close())
        super().__init__([widgets.HBox([self.pause, self.rate, self.close_button]), self.plot, self.topology,
                          self.status])
        self.add_class("dspark-devices")
        self.poller = Poller(self._tick, interval, name="dspark-devices").start()

    def _tick(self) -> None:
        self.samples, self.errors = sample_all(self._samplers)
        self.charts.update(self.samples)
        self.status.value = "<br>".join(html.escape(e) for e in self.errors)

    def close(self) -> None:
        if getattr(self, "poller", None) is not None:
            self.poller.stop()
        close_tree(self.children)
        super().close()
