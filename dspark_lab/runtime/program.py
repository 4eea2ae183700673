"""What each rank runs: a script's path, or a module as ``python -m`` runs it (``dspark-lab run -m MODULE``).

torchrun's ``-m``/``--module`` semantics: the word after the options is the module's name and every word after it is
the module's own argument. The CLI process checks the module exists before any rank starts (:func:`find_module`)
without importing it or any package above it (``torchtitan/__init__.py`` imports torch; the CLI must not), and the
bootstrap then runs it with :func:`runpy.run_module` (``-m MODULE`` as its first words: :func:`bootstrap_words`).
Imports nothing heavy.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path
from typing import Sequence

from dspark_lab.errors import DSparkError

MODULE_FLAG = "-m"  # the bootstrap's first word when it runs a module


def shown(script: str, module: bool) -> str:
    """How run.json (and ``status``) names what ran: the script's path, or ``-m MODULE``."""
    return f"{MODULE_FLAG} {script}" if module else script


def bootstrap_words(script: str, args: Sequence[str], module: bool) -> list[str]:
    """The bootstrap's arguments (after ``-m dspark_lab.runtime.bootstrap``)."""
    return [MODULE_FLAG, script, *args] if module else [script, *args]


def _find(fullname: str, path: list[str] | None):
    """The spec ``fullname`` would be imported from, as the import system's finders answer, with nothing imported:
    the finders on ``sys.meta_path`` (an editable install's finder among them), then the current directory (where
    ``python -m`` and the ranks look first)."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(fullname, path)
        except (ImportError, ValueError, TypeError):
            spec = None
        if spec is not None:
            return spec
    if path is None:
        return importlib.machinery.PathFinder.find_spec(fullname, [os.getcwd()])
    return None


def check_name(name: str) -> None:
    """Refuse what cannot be a module's name, in one line (a script's path given with ``-m`` among them)."""
    if not name:
        raise DSparkError("-m: give the module's name, then its own arguments (dspark-lab run -m pkg.train ARGS)")
    if name.endswith(".py") or "/" in name or os.sep in name or Path(name).is_file():
        raise DSparkError(f"-m: {name[:200]!r} is a script's path, not a module's name: give a script, or -m and a "
                          "module, not both (dspark-lab run train.py, or dspark-lab run -m pkg.train)")
    if not all(part.isidentifier() for part in name.split(".")):
        raise DSparkError(f"-m: {name[:200]!r} is not a module's name (dotted Python identifiers, as python -m takes)")


def find_module(name: str) -> str:
    """The file ``python -m name`` would run (a package's ``__main__``); one line naming ``-m`` when there is none.

    Each package above the module is looked up by its finders, never imported: what a package's ``__init__`` does
    when a rank imports it is the rank's business (it may import torch)."""
    check_name(name)
    spec, path, fullname = None, None, ""
    for part in name.split("."):
        fullname = f"{fullname}.{part}" if fullname else part
        spec = _find(fullname, path)
        if spec is None:
            where = f" (looked in {os.getcwd()} and sys.path)" if "." not in fullname else ""
            raise DSparkError(f"-m: no module named {fullname!r}{where}" +
                              (f"; cannot run {name!r}" if fullname != name else ""))
        path = list(spec.submodule_search_locations or []) or None
        if path is None and fullname != name:
            raise DSparkError(f"-m: {fullname!r} is a module, not a package; cannot run {name!r}")
    if spec.submodule_search_locations is not None:  # a package: python -m runs its __main__
        main = _find(f"{name}.__main__", list(spec.submodule_search_locations))
        if main is None:
            raise DSparkError(f"-m: {name!r} is a package and has no __main__ module; it cannot be run directly")
        spec = main
    return spec.origin or name
