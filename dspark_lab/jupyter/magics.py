"""``%dspark``: every ``dspark-lab`` verb in IPython, parsed by the CLI's own parser (as ipyparallel's magics are).

``%load_ext dspark_lab`` registers ``%dspark`` (line) and ``%%dspark run`` (cell). The line is split as a shell
would split it and parsed by :func:`dspark_lab.cli.build_parser`, so a magic takes exactly the arguments of its CLI
verb; the verb's function returns a :class:`~dspark_lab.output.Report`, which a notebook shows as an HTML table and
a terminal IPython as text. A user mistake (``DSparkError``, a bad argument) is one ``UsageError`` line, never a
traceback. Only the widget verbs are bespoke: ``run`` launches in the background and returns a handle (and shows the
dashboard), ``policies`` shows the policy panel, and two verbs exist only here: ``watch`` (the dashboard) and
``devices``. In a terminal IPython those print text.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from dspark_lab.cli import build_parser
from dspark_lab.errors import DSparkError
from dspark_lab.jupyter.display import ensure_bokehjs, in_notebook, show
from dspark_lab.jupyter.poller import interval_for
from dspark_lab.output import Report
from dspark_lab.private_files import write_private_text
from dspark_lab.runtime.cli import module_of, script_of
from dspark_lab.runtime.records import dspark_home, make_private_dir

PROG = "%dspark"

# Open widgets, newest last, so `%dspark watch --close-all` (and a test) can end their threads.
OPEN: list[Any] = []


def _runtime():
    from dspark_lab.runtime import commands

    return commands


def _display_widget(widget: Any) -> Any:
    OPEN.append(widget)
    # closed (its close button, or code): forgotten here too, so its charts and data can go
    widget.observe(lambda change: _forget(widget) if change["new"] is None else None, names="comm")
    from IPython.display import display

    display(widget)
    return widget


def _forget(widget: Any) -> None:
    if widget in OPEN:
        OPEN.remove(widget)


def close_all() -> int:
    """Close every widget the magics opened (their polling threads end); returns how many."""
    widgets = list(OPEN)
    for widget in widgets:
        widget.close()
    OPEN.clear()
    return len(widgets)


# --- the widget verbs: everything else is the CLI's own verb -----------------------------------------------------


def _hz(text: str) -> float:
    interval_for(text)  # refuses a rate outside the views' range in one line
    return float(text)


def _run(args):
    """Launch in the background; returns the job handle at once and shows the dashboard."""
    from dspark_lab.runtime.cli import check_standalone
    from dspark_lab.runtime.launch import TORCHRUN_OPTIONS

    if getattr(args, "standalone", False):
        check_standalone(args)
    options = {name: getattr(args, name) for name in TORCHRUN_OPTIONS}
    job = _runtime().launch(script_of(args), list(args.script_args), nproc=args.nproc, policies=tuple(args.policy),
                            name=args.name, options=options, launcher=args.launcher, module=module_of(args))
    if not args.no_dashboard:
        _watch_run(job.id, refresh_hz=2.0)
    return job


def _watch_run(run: str, refresh_hz: float):
    if not in_notebook():
        return show(_runtime().metrics(run))
    from dspark_lab.jupyter.dashboard import Dashboard

    return _display_widget(Dashboard(run, refresh_hz=refresh_hz))


def _watch(args):
    if args.close_all:
        return close_all()
    if not args.run:
        raise DSparkError("run: give a run id, name or prefix; see %dspark jobs")
    _watch_run(args.run, _hz(args.hz))


def _policies(args):
    if not in_notebook():
        return _runtime().policies(args.run)
    from dspark_lab.jupyter.policy_panel import PolicyPanel

    _display_widget(PolicyPanel(args.run))


def _devices(args):
    from dspark_lab.jupyter import devices

    hz = _hz(args.hz)
    if not in_notebook():
        return devices.device_report()
    _display_widget(devices.DeviceView(refresh_hz=hz))


def _tune(args):
    """In a notebook, start the tune and show its live view (the cell returns at once); else the CLI's verb."""
    from dspark_lab.tune import cli as tune_cli

    if not in_notebook() or args.json or args.stop or args.status:
        return tune_cli.run(args)
    from dspark_lab.jupyter import tune_view

    _display_widget(tune_view.start(args.run, tune_cli.options(args)))


def _widget_verbs(sub, common) -> None:
    """Rebind ``run`` and ``policies`` to their widget forms and add ``watch`` and ``devices``."""
    run = sub.choices["run"]
    run.add_argument("--no-dashboard", action="store_true", help="do not show the dashboard")
    run.set_defaults(func=_run)
    sub.choices["policies"].set_defaults(func=_policies)
    if "tune" in sub.choices:
        sub.choices["tune"].set_defaults(func=_tune)

    watch = sub.add_parser("watch", help="a live dashboard of a run (its whole history once it has ended)")
    watch.add_argument("--hz", default="2", help="refresh rate (changeable on the dashboard)")
    watch.add_argument("--close-all", action="store_true", help="close every dashboard and panel opened by %%dspark")
    watch.add_argument("run", nargs="?", help="run id, name or id prefix")
    watch.set_defaults(func=_watch)

    devices = sub.add_parser("devices", help="live per-device utilization for the backends present")
    devices.add_argument("--hz", default="2", help="refresh rate")
    devices.set_defaults(func=_devices)


def magic_parser():
    """The CLI's parser with the widget verbs bound; built per call, so a plugin's verbs are never stale."""
    return build_parser(extra=_widget_verbs, prog=PROG)


def _cell_script(body: str) -> Path:
    """Write a cell body to a script file under ``$DSPARK_HOME/scripts`` (named by its content), the user's alone:
    the folders 0700 when this creates them, the file 0600 (notebook code may hold credentials)."""
    folder = make_private_dir(dspark_home() / "scripts")
    path = folder / f"cell_{hashlib.sha1(body.encode()).hexdigest()[:12]}.py"
    if not path.exists():
        write_private_text(path, body)
    return path


def _with_cell_script(words: list[str], cell: str) -> list[str]:
    """``%%dspark run [OPTIONS] [-- SCRIPT_ARGS]``: the cell body is the script, put where the CLI wants SCRIPT."""
    if not words or words[0] != "run":
        raise UsageError(f"%%dspark {words[0] if words else ''}: only `%%dspark run` takes a cell body")
    options = words[:words.index("--")] if "--" in words else words
    if "-m" in options or "--module" in options:
        raise UsageError("%%dspark run: the cell is the script; give a script or -m and a module, not both "
                         "(`%dspark run -m MODULE ARGS` on one line runs a module)")
    script = str(_cell_script(cell))
    if "--" in words:
        at = words.index("--")
        return [*words[:at], script, *words[at + 1:]]
    return [*words, script]


def dispatch(line: str, cell: str | None = None) -> Any:
    """Parse ``line`` as ``dspark-lab`` arguments, run the verb, and return what the cell shows."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"line: {exc}") from None
    if cell is not None:
        words = _with_cell_script(words, cell)
    parser = magic_parser()
    if not words or words[0] == "help":
        print(parser.format_help())
        return None
    try:
        args = parser.parse_args(words)
        if not getattr(args, "func", None):
            print(parser.format_help())
            return None
        result = args.func(args)
    except DSparkError as exc:
        raise UsageError(str(exc)) from None
    except SystemExit:  # -h / --help / --version printed and asked to exit: the cell just ends
        return None
    if isinstance(result, Report):
        return result.to_dict() if getattr(args, "json", False) else result
    return None if isinstance(result, int) else result


@magics_class
class DSparkMagics(Magics):
    @line_cell_magic
    def dspark(self, line: str, cell: str | None = None):
        """%dspark VERB [args]: every dspark-lab verb in IPython (``%dspark help`` lists them)."""
        return dispatch(line, cell)


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(DSparkMagics)
    ensure_bokehjs()
