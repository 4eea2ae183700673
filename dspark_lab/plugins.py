"""The plugin manager: loads plugins from the ``dspark_lab`` entry-point group and asks them questions.

Built-in backends are registered exactly like third-party ones (through entry points). A plugin that fails to
import, that raises when a hook is called, or that implements a hook matching no spec is recorded as a
:class:`PluginProblem` (``dspark-lab doctor`` shows it) and skipped; the rest of the tool keeps working.

Environment:
  ``DSPARK_PLUGINS=cpu,nvidia``  load only these entry points (by name).
  ``DSPARK_PLUGIN_MODULES=a.b,c`` also register these importable modules as plugins (as pytest's ``-p`` does),
                                 e.g. a plugin under development that is not installed yet.
  ``DSPARK_TRACE_PLUGINS=1``     write every hook call, its plugin and its time to stderr.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import pluggy

from dspark_lab import PROJECT_NAME, hookspecs
from dspark_lab.backend import Backend
from dspark_lab.errors import DSparkError
from dspark_lab.policy import PolicySpec

ENTRY_POINT_GROUP = PROJECT_NAME


@dataclass(frozen=True, slots=True)
class PluginProblem:
    """Why a plugin (or one of its hooks) was skipped, and what to do about it."""

    plugin: str
    stage: str  # "import", "register", "unknown hook", or the hook that raised
    reason: str
    hint: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"plugin": self.plugin, "stage": self.stage, "reason": self.reason, "hint": self.hint}


class Manager:
    """One pluggy manager plus the problems met while loading and calling plugins."""

    def __init__(self, trace: bool | None = None):
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.problems: list[PluginProblem] = []
        self._backends: dict[str, Backend] | None = None
        self._trace = os.environ.get("DSPARK_TRACE_PLUGINS", "") not in ("", "0") if trace is None else trace
        if self._trace:
            self.pm.trace.root.setwriter(lambda text: sys.stderr.write(f"dspark-lab plugin trace: {text}"))
            self.pm.enable_tracing()

    # --- loading ---------------------------------------------------------------------------------------------

    def register(self, plugin: Any, name: str | None = None) -> bool:
        """Register one plugin object or module; on a problem, record it, leave the plugin out and return False."""
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        unknown = []
        for attr in dir(plugin):
            opts = self.pm.parse_hookimpl_opts(plugin, attr)
            if opts and not opts.get("optionalhook") and \
                    getattr(getattr(self.pm.hook, opts.get("specname") or attr, None), "spec", None) is None:
                unknown.append(attr)
        if unknown:
            self.problem(name, "unknown hook", f"implements {', '.join(unknown)}, which match no hookspec",
                         "rename the function to a hook listed in docs/plugins.md or drop its @hookimpl")
            return False
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # pluggy's PluginValidationError for a bad signature, or a duplicate name
            # pluggy keeps the hooks it registered before the bad one; take them out so the plugin is skipped whole.
            if self.pm.get_plugin(name) is plugin:
                self.pm.unregister(plugin, name=name)
            self.problem(name, "register", _one_line(exc), "check the hook's parameters against docs/plugins.md")
            return False
        self._backends = None
        return True

    def problem(self, plugin: str, stage: str, reason: str, hint: str = "") -> None:
        """Record a problem once (a hook that raises is called again on every question)."""
        found = PluginProblem(plugin, stage, reason, hint)
        if found not in self.problems:
            self.problems.append(found)

    def load_entry_points(self, only: Iterable[str] | None = None) -> None:
        """Load every plugin of the ``dspark_lab`` entry-point group (or only the names in ``only``)."""
        wanted = set(only) if only is not None else _names_from_env()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if wanted is not None and ep.name not in wanted:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                dist = ep.dist.name if getattr(ep, "dist", None) else "its distribution"
                self.problem(ep.name, "import", _one_line(exc), f"reinstall {dist} or uninstall it")
                continue
            self.register(plugin, name=ep.name)

    def load_modules(self, names: Iterable[str]) -> None:
        """Import and register each module named (blank names skipped); an import failure is a problem, not a crash."""
        for name in (n.strip() for n in names):
            if not name:
                continue
            try:
                module = importlib.import_module(name)
            except Exception as exc:
                self.problems.append(PluginProblem(name, "import", _one_line(exc),
                                                   "check DSPARK_PLUGIN_MODULES and PYTHONPATH"))
                continue
            self.register(module, name=name)

    def plugin_names(self) -> list[str]:
        return sorted(self.pm.get_name(p) for p in self.pm.get_plugins())

    # --- calling ---------------------------------------------------------------------------------------------

    def call_each(self, hook_name: str, **kwargs) -> list[tuple[str, Any]]:
        """Call every implementation of ``hook_name`` in pluggy's order; one that raises is recorded and skipped.

        Returns ``(plugin_name, result)`` for each implementation that answered (``None`` answers dropped).
        """
        return list(self._answers(hook_name, kwargs))

    def call_first(self, hook_name: str, **kwargs) -> Any:
        """The first non-``None`` answer of a firstresult hook, skipping implementations that raise."""
        return next((result for _, result in self._answers(hook_name, kwargs)), None)

    def _answers(self, hook_name: str, kwargs: dict) -> Iterator[tuple[str, Any]]:
        # Implementations are called one by one (not through pluggy's loop) so one that raises is skipped alone.
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            start = time.perf_counter()
            try:
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
            except Exception as exc:
                self.problem(impl.plugin_name, hook_name, _one_line(exc), "the plugin raised; report it to its author")
                continue
            if self._trace:
                sys.stderr.write(f"dspark-lab plugin trace: {hook_name} -> {impl.plugin_name} "
                                 f"({(time.perf_counter() - start) * 1e3:.2f} ms): {_summary(result)}\n")
            if result is not None:
                yield impl.plugin_name, result

    def _items(self, hook_name: str, kind: type, answers: list[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """``(plugin, item)`` for every item of every list answer of ``hook_name``; other answers are reported."""
        for plugin, answer in answers:
            if not isinstance(answer, (list, tuple)):
                self.problem(plugin, hook_name, f"returned {type(answer).__name__}, not a list")
                continue
            for item in answer:
                if isinstance(item, kind):
                    yield plugin, item
                else:
                    self.problem(plugin, hook_name, f"returned a {type(item).__name__}, not a {kind.__name__}")

    # --- questions the core asks -----------------------------------------------------------------------------

    def backends(self) -> list[Backend]:
        """Every registered backend, in name order, each tagged with the plugin that registered it."""
        if self._backends is None:
            found: dict[str, Backend] = {}
            # In registration order, so the first plugin to register a name keeps it.
            answers = self.call_each("dspark_register_backends")[::-1]
            for plugin, backend in self._items("dspark_register_backends", Backend, answers):
                if backend.name in found:
                    self.problem(plugin, "dspark_register_backends",
                                 f"backend {backend.name!r} is already registered by {found[backend.name].plugin}",
                                 "rename the backend")
                else:
                    backend.plugin = plugin
                    found[backend.name] = backend
            self._backends = dict(sorted(found.items()))
        return list(self._backends.values())

    def backend(self, name: str) -> Backend:
        for backend in self.backends():
            if backend.name == name:
                return backend
        names = ", ".join(b.name for b in self.backends()) or "none"
        raise DSparkError(f"backend: unknown backend {name!r}; registered: {names}")

    def default_backend(self) -> Backend:
        """The backend a run uses when none is named: the first available one with a device, else an available cpu-like one."""
        available = [b for b in self.backends() if b.availability().available]
        if not available:
            raise DSparkError("backend: no registered backend is available; run `dspark-lab doctor`")
        accelerators = [b for b in available if b.torch_device != "cpu"]
        return (accelerators or available)[0]

    def collective_names(self, backend: Backend) -> list[str]:
        names: list[str] = []
        for _, name in self._items("dspark_collective_names", str,
                                     self.call_each("dspark_collective_names", backend=backend)):
            if name not in names:
                names.append(name)
        return names

    def make_collective(self, backend: Backend, name: str, group=None):
        collective = self.call_first("dspark_make_collective", backend=backend, name=name, group=group)
        if collective is None:
            allowed = " | ".join(self.collective_names(backend)) or "none"
            raise DSparkError(f"collective: {name!r} is not offered for backend {backend.name}; allowed: {allowed}")
        return collective

    def make_allocator(self, backend: Backend, config: dict | None = None):
        allocator = self.call_first("dspark_make_allocator", backend=backend, config=dict(config or {}))
        if allocator is None:
            raise DSparkError(f"allocator: no plugin makes a host allocator for backend {backend.name}")
        return allocator

    def device_sampler(self, backend: Backend):
        return self.call_first("dspark_device_sampler", backend=backend)

    def topology(self, backend: Backend, devices: list[int]) -> dict | None:
        """The backend's link graph in the topology file format (see docs/collectives.md), or None."""
        return self.call_first("dspark_topology", backend=backend, devices=list(devices))
        try:
            return from_dict(answer, backend.name)
        except DSparkError as exc:
            self.problem(backend.plugin, "dspark_topology", str(exc), "return the topology file format")
            return None

    def policies(self) -> dict:
        """Every registered policy spec by key; a key registered twice is reported and the later one skipped."""
        specs: dict = {}
        answers = self.call_each("dspark_register_policies")[::-1]  # registration order: the first keeps a key
        for plugin, spec in self._items("dspark_register_policies", PolicySpec, answers):
            if spec.key in specs:
                self.problem(plugin, "dspark_register_policies", f"policy {spec.key!r} is already registered")
            else:
                specs[spec.key] = spec
        return dict(sorted(specs.items()))


def make_manager(plugins: Iterable[Any] = (), *, entry_points: bool = True, only: Iterable[str] | None = None,
                 trace: bool | None = None) -> Manager:
    """Build a manager. Tests pass explicit ``plugins`` with ``entry_points=False`` so nothing installed leaks in."""
    manager = Manager(trace=trace)
    if entry_points:
        manager.load_entry_points(only)
        manager.load_modules(os.environ.get("DSPARK_PLUGIN_MODULES", "").split(","))
    for plugin in plugins:
        manager.register(plugin)
    return manager


_default: Manager | None = None


def get_manager() -> Manager:
    """The process-wide manager the CLI, the runtime and the magics share (entry points, ``DSPARK_PLUGINS``)."""
    global _default
    if _default is None:
        _default = make_manager()
    return _default


def reset_manager() -> None:
    """Forget the process-wide manager, e.g. after a plugin was installed or registered in a notebook."""
    global _default
    _default = None


def _names_from_env() -> set[str] | None:
    raw = os.environ.get("DSPARK_PLUGINS", "").strip()
    return {n.strip() for n in raw.split(",") if n.strip()} if raw else None


def _one_line(exc: BaseException) -> str:
    # pluggy puts the useful part of a validation error (which argument) on its later lines: keep them, joined.
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[:300]}".rstrip(": ")


def _summary(result: Any) -> str:
    if isinstance(result, (list, tuple)):
        return f"{len(result)} item(s)"
    return type(result).__name__
