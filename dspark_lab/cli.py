"""``dspark-lab``: the argparse front end of :mod:`dspark_lab.commands`.

Every verb takes ``--json``; user mistakes print one ``error:`` line and exit 2. Areas that add verbs
(the runtime, pipeline schedules, MoE placement) each own a module with ``add_parsers(subparsers, common)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dspark_lab import __version__, commands
from dspark_lab.errors import DSparkError
from dspark_lab.output import Report

# Modules that contribute verbs, in the order their help is listed.
AREA_MODULES = (
    "dspark_lab.runtime.cli",
    "dspark_lab.pipeline.cli",
    "dspark_lab.moe.cli",
    "dspark_lab.planner.cli",
)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors go through the same one-line ``error:`` path as every DSparkError."""

    def error(self, message: str):
        raise DSparkError(f"{self.prog}: {message}")


def common_options() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object (with schema_version)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dspark-lab", description="Make a PyTorch training job faster and smaller, and steer it live.")
    parser.add_argument("--version", action="version", version=f"dspark-lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_options()
    sub.add_parser("backends", parents=[common], help="registered backends, specs and availability").set_defaults(
        func=lambda args: commands.backends())
    sub.add_parser("kernels", parents=[common], help="kernels per backend and their state").set_defaults(
        func=lambda args: commands.kernels())
    sub.add_parser("doctor", parents=[common], help="what is installed and how to fix what is not").set_defaults(
        func=lambda args: commands.doctor())
    for name in AREA_MODULES:
        importlib.import_module(name).add_parsers(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
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
        return 0
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
