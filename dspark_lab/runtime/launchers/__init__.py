"""Launchers: how ``dspark-lab run`` starts a script's ranks (:mod:`.base` says what one provides).

Built in: ``torchrun`` (the default) and ``python`` (one process, no torchrun environment); plugins add more (a
cluster launcher) through the ``dspark_launchers`` hook.
"""

from __future__ import annotations

from dspark_lab.errors import DSparkError
from dspark_lab.runtime.launchers.base import TORCHRUN_OPTIONS, Launcher

DEFAULT = "torchrun"

__all__ = ["DEFAULT", "TORCHRUN_OPTIONS", "Launcher", "get_launcher", "launchers"]


def launchers(manager=None) -> dict[str, Launcher]:
    """Every registered launcher by name; a name registered twice is reported and the later one skipped."""
    from dspark_lab.plugins import get_manager

    manager = manager or get_manager()
    found: dict[str, Launcher] = {}
    for plugin, answer in manager.call_each("dspark_launchers")[::-1]:  # registration order: the first keeps a name
        for launcher in answer if isinstance(answer, (list, tuple)) else [answer]:
            if not isinstance(launcher, Launcher) or not launcher.name:
                manager.problem(plugin, "dspark_launchers", f"returned {launcher!r}, not a named Launcher")
            elif launcher.name in found:
                manager.problem(plugin, "dspark_launchers", f"launcher {launcher.name!r} is already registered")
            else:
                found[launcher.name] = launcher
    return dict(sorted(found.items()))


def get_launcher(name: str | None = None, manager=None) -> Launcher:
    known = launchers(manager)
    name = name or DEFAULT
    if not known:
        raise DSparkError("--launcher: no launcher is registered; the built-ins load through the dspark_lab entry "
                          "point 'launchers' (reinstall: pip install -e ., and check DSPARK_PLUGINS)")
    if name not in known:
        raise DSparkError(f"--launcher: unknown launcher {name!r}; registered: {' | '.join(known) or 'none'}")
    return known[name]
