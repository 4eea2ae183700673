"""``%dspark``: the CLI's verbs in IPython, thin over :mod:`dspark_lab.commands` (as ipyparallel's magics are).

``%load_ext dspark_lab`` registers ``%dspark`` (line) and ``%%dspark run`` (cell). Each verb parses its arguments
with IPython's ``magic_arguments``, calls the command model and returns its :class:`~dspark_lab.output.Report`, which
a notebook shows as an HTML table and a terminal IPython as text. A user mistake (``DSparkError``, a bad argument)
is one ``UsageError`` line, never a traceback. ``run``, ``watch``, ``policies`` and ``devices`` show widgets in a
notebook; in a terminal they print text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from dspark_lab.errors import DSparkError
from dspark_lab.jupyter.display import ensure_bokehjs, in_notebook, show
from dspark_lab.output import Report
from dspark_lab.runtime.records import dspark_home

# Open widgets by kind, newest last, so `%dspark watch --close-all` (and a test) can end their threads.
OPEN: list[Any] = []


def _commands():
    from dspark_lab import commands

    return commands


def _runtime():
    from dspark_lab.runtime import commands

    return commands


def _display_widget(widget: Any) -> Any:
    OPEN.append(widget)
    from IPython.display import display

    display(widget)
    return widget


# --- verbs: each parses its own arguments and returns what the cell shows ---------------------------------------


@magic_arguments(name="%dspark backends")
def _backends(args, cell):
    """Registered backends, their specs and availability."""
    return _commands().backends()


@magic_arguments(name="%dspark kernels")
def _kernels(args, cell):
    """Kernels per backend and their state."""
    return _commands().kernels()


@magic_arguments(name="%dspark doctor")
def _doctor(args, cell):
    """What is installed, what works and how to fix what does not."""
    return _commands().doctor()


@magic_arguments(name="%dspark jobs")
def _jobs(args, cell):
    """Every run with its state, ranks and step."""
    return _runtime().jobs()


@magic_arguments(name="%dspark status")
@argument("run", help="run id, name or id prefix")
def _status(args, cell):
    """One run's record and current step."""
    return _runtime().status(args.run)


@magic_arguments(name="%dspark get")
@argument("run", help="run id, name or id prefix")
@argument("key", nargs="?", help="one policy key (all when left out)")
def _get(args, cell):
    """Policies of a run: value in force, since which step, pending changes."""
    return _runtime().get(args.run, args.key)


@magic_arguments(name="%dspark set")
@argument("--no-wait", action="store_true", help="return once the change is accepted, before it applies")
@argument("--timeout", type=float, default=60.0, help="seconds to wait for the change to apply")
@argument("run", help="run id, name or id prefix")
@argument("assignments", nargs="+", metavar="KEY=VALUE", help="policy changes, applied together at one step")
def _set(args, cell):
    """Change policies of a running job; all ranks switch at one step."""
    return _runtime().set_policies(args.run, list(args.assignments), wait=not args.no_wait, timeout=args.timeout)


@magic_arguments(name="%dspark events")
@argument("run", help="run id, name or id prefix")
def _events(args, cell):
    """A run's events: starts, applied / refused / rolled-back changes, stops."""
    return _runtime().events(args.run)


@magic_arguments(name="%dspark stop")
@argument("run", help="run id, name or id prefix")
def _stop(args, cell):
    """Stop a running job."""
    return _runtime().stop(args.run)


@magic_arguments(name="%dspark run")
@argument("--nproc", type=int, default=1, help="number of ranks (processes)")
@argument("--policy", action="append", default=[], metavar="KEY=VALUE", help="a launch policy (repeatable)")
@argument("--name", default=None, help="a name to find the run by")
@argument("--no-dashboard", action="store_true", help="do not show the dashboard")
@argument("script", nargs="?", help="training script (with %%dspark run, the cell body is the script)")
@argument("args", nargs="...", help="arguments passed to the script")
def _run(args, cell):
    """Launch a training script in the background; returns the job handle and shows the dashboard."""
    if args.nproc < 1:
        raise DSparkError(f"nproc: must be at least 1, got {args.nproc}")
    if cell is not None:
        script_args = [args.script, *args.args] if args.script else list(args.args)
        script = _cell_script(cell)
    elif not args.script:
        raise DSparkError("script: give a script path, or use %%dspark run with the script as the cell body")
    else:
        script, script_args = args.script, list(args.args)
    job = _runtime().launch(script, script_args, nproc=args.nproc, policies=tuple(args.policy), name=args.name)
    if not args.no_dashboard:
        _watch_run(job.id, refresh_hz=2.0)
    return job


def _cell_script(body: str) -> Path:
    """Write a cell body to a script file under ``$DSPARK_HOME/scripts`` (named by its content)."""
    folder = dspark_home() / "scripts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"cell_{hashlib.sha1(body.encode()).hexdigest()[:12]}.py"
    if not path.exists():
        path.write_text(body, encoding="utf-8")
    return path


def _watch_run(run: str, refresh_hz: float):
    if not in_notebook():
        return show(_runtime().metrics(run))
    from dspark_lab.jupyter.dashboard import Dashboard

    return _display_widget(Dashboard(run, refresh_hz=refresh_hz))


@magic_arguments(name="%dspark watch")
@argument("--hz", type=float, default=2.0, help="refresh rate (changeable on the dashboard)")
@argument("--close-all", action="store_true", help="close every dashboard and panel opened by %%dspark")
@argument("run", nargs="?", help="run id, name or id prefix")
def _watch(args, cell):
    """A live dashboard of a run (its whole history once it has ended); text in a terminal."""
    if args.close_all:
        return close_all()
    if not args.run:
        raise DSparkError("run: give a run id, name or prefix; see %dspark jobs")
    if not 0.05 <= args.hz <= 20:
        raise DSparkError(f"hz: must be within [0.05, 20], got {args.hz:g}")
    _watch_run(args.run, args.hz)


@magic_arguments(name="%dspark policies")
@argument("run", help="run id, name or id prefix")
def _policies(args, cell):
    """The policy panel of a running job (its table in a terminal)."""
    from dspark_lab.jupyter.policy_panel import PolicyPanel

    if not in_notebook():
        return _runtime().policies(args.run)

    _display_widget(PolicyPanel(args.run))


@magic_arguments(name="%dspark devices")
@argument("--hz", type=float, default=2.0, help="refresh rate")
def _devices(args, cell):
    """Live per-device utilization for the backends present (a table in a terminal)."""
    from dspark_lab.jupyter import devices

    if not in_notebook():
        return devices.device_report()
    _display_widget(devices.DeviceView(refresh_hz=args.hz))


VERBS: dict[str, Callable] = {
    "backends": _backends, "kernels": _kernels, "doctor": _doctor, "jobs": _jobs, "status": _status,
    "get": _get, "set": _set, "events": _events, "stop": _stop, "run": _run, "watch": _watch, "policies": _policies,
    "devices": _devices,
}


def close_all() -> int:
    """Close every widget the magics opened (their polling threads end); returns how many."""
    count = 0
    while OPEN:
        OPEN.pop().close()
        count += 1
    return count


def usage() -> Report:
    rows = [{"verb": verb, "does": (fn.__doc__ or "").strip().splitlines()[0]} for verb, fn in VERBS.items()]
    return Report("usage", {"verbs": rows}, rows=rows, columns=("verb", "does"),
                  title="%dspark VERB [args]; %dspark VERB -h for a verb's arguments")


@magics_class
class DSparkMagics(Magics):
    @line_cell_magic
    def dspark(self, line: str, cell: str | None = None):
        """%dspark VERB [args]: the dspark-lab verbs in IPython (``%dspark help`` lists them)."""
        verb, _, rest = line.strip().partition(" ")
        if verb in ("", "help", "-h", "--help"):
            return usage()
        handler = VERBS.get(verb)
        if handler is None:
            raise UsageError(f"verb: unknown {verb!r}; allowed: {' | '.join(VERBS)}")
        if cell is not None and verb != "run":
            raise UsageError(f"%%dspark {verb}: only `%%dspark run` takes a cell body")
        if rest.strip() in ("-h", "--help"):
            print(handler.parser.format_help())
            return None
        try:
            return handler(parse_argstring(handler, rest), cell)
        except DSparkError as exc:
            raise UsageError(str(exc)) from None


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(DSparkMagics)
    ensure_bokehjs()
