"""``dspark-lab``: the argparse front end of :mod:`dspark_lab.commands`.

Every verb takes ``--json``; user mistakes print one ``error:`` line and exit 2. Areas that add verbs
(the runtime, pipeline schedules, MoE placement) each own a module with ``add_parsers(subparsers, common)``.

Building the parser imports no command module: each verb imports what it needs when it runs, so ``--version``,
``--help`` and the record readers (``jobs``, ``status``, ``get``, ...) start without torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dspark_lab import __version__
from dspark_lab.errors import DSparkError
from dspark_lab.output import Report

SIGPIPE_STATUS = 141

# Modules that contribute verbs, in the order their help is listed.
AREA_MODULES = (
    "dspark_lab.runtime.cli",
    "dspark_lab.pipeline.cli",
    "dspark_lab.moe.cli",
    "dspark_lab.collectives.cli",
    "dspark_lab.trace.cli",
    "dspark_lab.planner.cli",
    "dspark_lab.tune.cli",
)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors go through the same one-line ``error:`` path as every DSparkError."""

    def error(self, message: str):
        raise DSparkError(f"{self.prog}: {message}")


def common_options() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object (with schema_version)")
    return common


def _core(verb: str):
    def run(args):
        from dspark_lab import commands

        return getattr(commands, verb)()

    return run


def build_parser(extra=None, prog: str = "dspark-lab") -> argparse.ArgumentParser:
    """The ``dspark-lab`` parser; ``extra(subparsers, common)`` may add or rebind verbs (the ``%dspark`` magics do)."""
    parser = _Parser(prog=prog, description="Make a PyTorch training job faster and smaller, and steer it live.")
    parser.add_argument("--version", action="version", version=f"dspark-lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_options()
    for verb, text in (("backends", "registered backends, specs and availability"),
                       ("kernels", "kernels per backend and their state"),
                       ("doctor", "what is installed and how to fix what is not")):
        sub.add_parser(verb, parents=[common], help=text).set_defaults(func=_core(verb))
    for name in AREA_MODULES:
        importlib.import_module(name).add_parsers(sub, common)
    if extra is not None:
        extra(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb; its exit status. A reader that closed the pipe early (``| head -1``) ends it quietly with 141."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows up here rather than at interpreter exit
        return code
    except BrokenPipeError:
        # what Python's docs advise (library/signal.html, note on SIGPIPE): the interpreter's final flush must not
        # raise again; 141 = 128 + SIGPIPE, the status of a C tool the signal killed
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return SIGPIPE_STATUS


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        result = args.func(args)
    except DSparkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if isinstance(result, Report):
        print(result.to_json() if getattr(args, "json", False) else result.to_text())
        return int(result.data.get("exit_code", 0))  # set and stop: applied / refused / rolled back / timed out
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
