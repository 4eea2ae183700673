"""``dspark-lab tune RUN [...]`` and ``dspark-lab tune RUN --stop``, added to ``dspark-lab`` by :mod:`dspark_lab.cli`.

Building the parser imports nothing heavy; the verb imports :mod:`.commands` when it runs.
"""

from __future__ import annotations

import argparse
import math


MAX_CAP = 1 << 30  # MB or GB: the same bound the control endpoint checks (driver.MAX_MB)


def _int_in(low: int, high: int):
    """An argparse type: an int in ``low..high``, refused in one line saying so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an int in {low}..{high}, got {text!r}")
        return value

    return parse


def _positive(high: int):
    """An argparse type: a number above 0 and at most ``high``, refused in one line saying so."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 < value <= high:  # nan fails too
            raise argparse.ArgumentTypeError(f"must be a number > 0 and <= {high}, got {text!r}")
        return value

    return parse


def options(args) -> dict:
    """The search options of parsed ``tune`` arguments, as keyword arguments of ``commands.start``/``tune``."""
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    return {"objective": args.objective, "max_activation_mb": args.max_activation_mb,
            "max_memory_gb": args.max_memory_gb, "budget_steps": args.budget_steps, "keys": keys,
            "allow_lossy": args.allow_lossy}


def run(args):
    """The verb: start a tune and wait for it (trials printed as they end), or ``--stop`` / ``--status``."""
    from dspark_lab.tune import commands

    if args.stop:
        return commands.stop(args.run)
    if args.status:
        return commands.status(args.run)
    return commands.tune(args.run, **options(args), follow=None if args.json else commands.print_trial)


def add_parsers(subparsers, common) -> None:
    p = subparsers.add_parser(
        "tune", parents=[common], help="search a running job's live policies for speed or memory, without a restart",
        description="Try the job's live policies one value at a time, interleaved with the best so far, and keep "
                    "the best; the job trains on throughout. --stop ends a running tune (the best stays).")
    p.add_argument("run", help="run id, name or unique id prefix")
    p.add_argument("--objective", choices=("throughput", "memory"), default="throughput")
    p.add_argument("--max-activation-mb", type=_positive(MAX_CAP), metavar="MB",
                   help="cap on the peak bytes saved for backward (any rank)")
    p.add_argument("--max-memory-gb", type=_positive(MAX_CAP), metavar="GB",
                   help="cap on device peak memory (CUDA) or RSS (cpu)")
    p.add_argument("--budget-steps", type=_int_in(10, 100_000), default=None,
                   help="steps the whole search may use, 10 to 100000 (default: 110 per candidate, enough to try "
                        "them all)")
    p.add_argument("--keys", metavar="KEY,...", help="only these policies (default: every live one that applies)")
    p.add_argument("--allow-lossy", action="store_true", help="also try lossy values (fp8, compression)")
    p.add_argument("--stop", action="store_true", help="end the running tune; the best found so far stays")
    p.add_argument("--status", action="store_true", help="print the tune's state and return")
    p.set_defaults(func=run)
