"""The plugin manager: loads plugins from the ``dspark_lab`` entry-point group and asks them questions.

Built-in backends are registered exactly like third-party ones (through entry points). Every hook call in the
project goes through :meth:`Manager.dispatch`, which calls each implementation on its own. A plugin that fails to
import, implements a hook matching no spec or a wrapper, raises when a hook is called, or answers something other
than the hook's declared type (:data:`RETURNS`) is recorded as a :class:`PluginProblem` (``dspark-lab doctor``
shows it) and skipped; the rest of the tool keeps working.

Environment:
  ``DSPARK_PLUGINS=cpu,nvidia``  load only these entry points (by name).
  ``DSPARK_PLUGIN_MODULES=a.b,c`` also register these importable modules as plugins (as pytest's ``-p`` does),
                                 e.g. a plugin under development that is not installed yet.
  ``DSPARK_TRACE_PLUGINS=1``     write every hook call, its plugin and its time to stderr.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import pluggy

from dspark_lab import PROJECT_NAME, hookspecs
from dspark_lab.backend import Backend
from dspark_lab.errors import DSparkError, PolicyError
from dspark_lab.kernel import Kernel
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


@dataclass(frozen=True, slots=True)
class Returns:
    """What an implementation of one hook may answer besides ``None`` (hookspecs.py says it in words).

    Either a list whose items are ``item`` instances, or one object that is a ``kind`` instance, has the callables
    ``methods``, or is itself ``callable``; ``json``: a dict of plain JSON values whose keys avoid ``reserved``.
    """

    hint: str
    item: type | None = None
    kind: type | None = None
    methods: tuple[str, ...] = ()
    callable: bool = False
    json: bool = False
    reserved: frozenset[str] = frozenset()

    def check(self, answer: Any) -> tuple[Any, list[str]]:
        """``(the usable part of answer or None, why each wrong part is wrong)``."""
        if self.item is not None:
            if not isinstance(answer, (list, tuple)):
                return None, [f"returned {type(answer).__name__}, not a list"]
            wrong = [f"returned a {type(x).__name__}, not a {self.item.__name__}"
                     for x in answer if not isinstance(x, self.item)]
            return [x for x in answer if isinstance(x, self.item)], wrong
        if self.kind is not None and not isinstance(answer, self.kind):
            return None, [f"returned {type(answer).__name__}, not a {self.kind.__name__}"]
        if self.callable and (inspect.isgenerator(answer) or not callable(answer)):
            return None, [f"returned {type(answer).__name__}, not a callable"]
        missing = [f"{m}()" for m in self.methods if not callable(getattr(answer, m, None))]
        if missing:
            return None, [f"returned {type(answer).__name__}, which has no {', '.join(missing)}"]
        if self.json:
            clash = sorted(k for k in answer if k in self.reserved)
            if clash:
                return None, [f"returned the core field(s) {', '.join(map(str, clash))}"]
            try:
                json.dumps(answer, allow_nan=False)
            except (TypeError, ValueError) as exc:
                return None, [f"returned a dict that is not plain JSON ({_one_line(exc)})"]
        return answer, []


# Every hook's declared return type; dispatch() checks each answer against it.
RETURNS: dict[str, Returns] = {
    "dspark_register_backends": Returns("return a list of dspark_lab.backend.Backend", item=Backend),
    "dspark_register_kernels": Returns("return a list of dspark_lab.kernels.Kernel", item=Kernel),
    "dspark_register_policies": Returns("return a list of dspark_lab.policy.PolicySpec", item=PolicySpec),
    "dspark_collective_names": Returns("return a list of names (str)", item=str),
    "dspark_make_allocator": Returns("return an object with empty(), release() and stats()",
                                     methods=("empty", "release", "stats")),
    "dspark_make_collective": Returns("return an object with all_reduce(), reduce_scatter() and all_gather()",
                                      methods=("all_reduce", "reduce_scatter", "all_gather")),
    "dspark_device_sampler": Returns("return a zero-argument callable that returns a dict", callable=True),
    # trace.classify turns a wrong item into this plugin's problem (Pattern lives in the trace area, above the core)
    "dspark_trace_classifiers": Returns("return a list of dspark_lab.trace.classify.Pattern", item=object),
    # runtime.launchers checks each item is a named Launcher (the class lives in the runtime, above the core)
    "dspark_launchers": Returns("return a list of dspark_lab.runtime.launchers.base.Launcher", item=object),
    "dspark_job_started": Returns("return None: keep per-job state in job.state", kind=object),
    "dspark_topology": Returns("return the topology file format: a dict with nodes and links", kind=dict),
    # doctor.check_vendors turns a wrong item into this plugin's problem (Check lives above the plugin manager)
    "dspark_doctor_checks": Returns("return a list of dspark_lab.doctor.Check", item=object),
    "dspark_apply_policy": Returns("return a short note (str), or raise PolicyError to refuse", kind=str),
    "dspark_step_end": Returns("return a dict of JSON numbers, strings and lists, or None", kind=dict, json=True,
                               reserved=frozenset({"schema_version", "time", "step", "rank"})),
}
# Exceptions that are a hook's answer, not a plugin's fault: they reach the caller (a refusal rolls a change back).
REFUSALS: dict[str, type[Exception]] = {"dspark_apply_policy": PolicyError}

_WRAPPER_HINT = ("DSpark Lab calls each implementation on its own and takes no wrappers: drop wrapper=True / "
                 "hookwrapper=True and return the answer")


class Answers(list):
    """``(plugin_name, answer)`` pairs from :meth:`Manager.dispatch`; ``failed``: the problems met in that call."""

    def __init__(self):
        super().__init__()
        self.failed: list[PluginProblem] = []


class Manager:
    """One pluggy manager plus the problems met while loading and calling plugins."""

    def __init__(self, trace: bool | None = None):
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.problems: list[PluginProblem] = []
        # Called with each new problem, e.g. by a running job to log it as an event (a rank has no doctor to read).
        self.listeners: list[Callable[[PluginProblem], None]] = []
        self._backends: dict[str, Backend] | None = None
        # DSPARK_TRACE_PLUGINS: dispatch() writes one line per implementation it calls (pluggy's own tracer never
        # fires, since hooks are not called through pluggy's hook callers)
        self._trace = os.environ.get("DSPARK_TRACE_PLUGINS", "") not in ("", "0") if trace is None else trace

    # --- loading ---------------------------------------------------------------------------------------------

    def register(self, plugin: Any, name: str | None = None) -> bool:
        """Register one plugin object or module; on a problem, record it, leave the plugin out and return False."""
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        unknown, wrappers = [], []
        for attr in dir(plugin):
            opts = self.pm.parse_hookimpl_opts(plugin, attr)
            if opts and not opts.get("optionalhook") and \
                    getattr(getattr(self.pm.hook, opts.get("specname") or attr, None), "spec", None) is None:
                unknown.append(attr)
            if opts and (opts.get("wrapper") or opts.get("hookwrapper")):
                wrappers.append(attr)
        if unknown:
            self.problem(name, "unknown hook", f"implements {', '.join(unknown)}, which match no hookspec",
                         "rename the function to a hook listed in docs/plugins.md or drop its @hookimpl")
            return False
        if wrappers:
            self.problem(name, "register", f"{', '.join(wrappers)}: a wrapper implementation", _WRAPPER_HINT)
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

    def problem(self, plugin: str, stage: str, reason: str, hint: str = "") -> PluginProblem:
        """Record a problem once per plugin and stage: a hook that fails is called again on every question (every
        step, for ``dspark_step_end``), maybe with another message each time, and the list must not grow."""
        found = PluginProblem(plugin, stage, reason, hint)
        if not any((p.plugin, p.stage) == (plugin, stage) for p in self.problems):
            self.problems.append(found)
            for listener in self.listeners:
                listener(found)
        return found

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
                self.problem(name, "import", _one_line(exc), "check DSPARK_PLUGIN_MODULES and PYTHONPATH")
                continue
            self.register(module, name=name)

    def plugin_names(self) -> list[str]:
        return sorted(self.pm.get_name(p) for p in self.pm.get_plugins())

    # --- calling: every hook call in the project goes through dispatch() ------------------------------------

    def dispatch(self, hook_name: str, **kwargs) -> "Answers":
        """Call each implementation of ``hook_name`` on its own, in pluggy's order (later-registered first).

        An implementation that raises, or whose answer is not the hook's declared return type (:data:`RETURNS`),
        is recorded as a :class:`PluginProblem` and skipped; the others still answer. ``None`` answers ("not
        mine") are dropped; a ``firstresult`` hook stops at its first valid answer. For a list hook, wrong items
        are dropped and the rest of that answer kept. A hook's refusal (:data:`REFUSALS`: a ``PolicyError`` from
        ``dspark_apply_policy``) is not a problem: it propagates to the caller at once.

        Returns ``(plugin_name, answer)`` pairs; ``.failed`` lists the problems met in this call.
        """
        caller = getattr(self.pm.hook, hook_name, None)
        spec = getattr(caller, "spec", None)
        if spec is None:
            raise KeyError(f"{hook_name} is not a dspark_lab hook")
        missing = set(spec.argnames) - set(kwargs)
        if missing or set(kwargs) - set(spec.argnames):
            raise TypeError(f"{hook_name} takes {', '.join(spec.argnames) or 'no arguments'}, got {', '.join(kwargs)}")
        first = bool(spec.opts.get("firstresult"))
        returns, refusal = RETURNS[hook_name], REFUSALS.get(hook_name, ())
        answers = Answers()
        for impl in reversed(caller.get_hookimpls()):
            if impl.hookwrapper or impl.wrapper:  # registered behind the manager's back (pm.register)
                answers.failed.append(self.problem(impl.plugin_name, hook_name, "a wrapper implementation",
                                                   _WRAPPER_HINT))
                continue
            start = time.perf_counter()
            try:
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
            except refusal:
                raise
            except Exception as exc:
                answers.failed.append(self.problem(impl.plugin_name, hook_name, _one_line(exc),
                                                   "the plugin raised; report it to its author"))
                continue
            if self._trace:
                sys.stderr.write(f"dspark-lab plugin trace: {hook_name} -> {impl.plugin_name} "
                                 f"({(time.perf_counter() - start) * 1e3:.2f} ms): {_summary(result)}\n")
            if result is None:
                continue
            result, wrong = returns.check(result)
            for reason in wrong:
                answers.failed.append(self.problem(impl.plugin_name, hook_name, reason, returns.hint))
            if result is not None:
                answers.append((impl.plugin_name, result))
                if first:
                    break
        return answers

    def call_each(self, hook_name: str, **kwargs) -> list[tuple[str, Any]]:
        """``(plugin_name, answer)`` of every implementation that answered well (:meth:`dispatch`)."""
        return list(self.dispatch(hook_name, **kwargs))

    def call_first(self, hook_name: str, **kwargs) -> Any:
        """The first valid non-``None`` answer (:meth:`dispatch`), or ``None``."""
        return next((answer for _, answer in self.dispatch(hook_name, **kwargs)), None)

    # --- questions the core asks -----------------------------------------------------------------------------

    def backends(self) -> list[Backend]:
        """Every registered backend, in name order, each tagged with the plugin that registered it."""
        if self._backends is None:
            found: dict[str, Backend] = {}
            # In registration order, so the first plugin to register a name keeps it.
            answers = self.dispatch("dspark_register_backends")[::-1]
            for plugin, backend in ((p, b) for p, answer in answers for b in answer):
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
        for _, answer in self.dispatch("dspark_collective_names", backend=backend):
            for name in answer:
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

    def policies(self) -> dict:
        """Every registered policy spec by key; a key registered twice is reported and the later one skipped."""
        specs: dict = {}
        answers = self.dispatch("dspark_register_policies")[::-1]  # registration order: the first keeps a key
        for plugin, spec in ((p, s) for p, answer in answers for s in answer):
            if spec.key in specs:
                self.problem(plugin, "dspark_register_policies", f"policy {spec.key!r} is already registered")
            else:
                specs[spec.key] = self._with_collectives(spec) if spec.plus_collectives else spec
        return dict(sorted(specs.items()))

    def _with_collectives(self, spec):
        """``spec`` with every plugin collective (on any backend) among its choices; whether the job's backend
        offers it is the policy's own check when it applies."""
        offered = [n for b in self.backends() for n in self.collective_names(b) if n not in spec.choices]
        return replace(spec, choices=(*spec.choices, *dict.fromkeys(offered)))


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
