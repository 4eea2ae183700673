"""``dspark-lab trace analyze|costs|show`` and ``dspark-lab profile``, added by :mod:`dspark_lab.cli`."""

from __future__ import annotations

import argparse


def _steps(text: str) -> int:
    from dspark_lab.trace.capture import MAX_STEPS

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, {MAX_STEPS}], got {text!r}")
    return value


def add_parsers(subparsers, common) -> None:
    from dspark_lab.trace import commands

    top = subparsers.add_parser("trace", help="profiler traces: where the time goes, op costs, timeline")
    verbs = top.add_subparsers(dest="trace_verb", metavar="VERB", required=True)
    traces = dict(nargs="+", metavar="TRACE", help=".json / .json.gz files, directories of them, or RUN:PROFILE_ID")

    analyze = verbs.add_parser("analyze", parents=[common],
                               help="per rank: compute, communication (overlapped / exposed), waits, idle")
    analyze.add_argument("traces", **traces)
    analyze.set_defaults(func=lambda a: commands.analyze(a.traces))

    costs = verbs.add_parser("costs", parents=[common], help="median F, B, W per rank and chunk (schedule simulate)")
    costs.add_argument("traces", **traces)
    costs.set_defaults(func=lambda a: commands.costs(a.traces))

    show = verbs.add_parser("show", parents=[common], help="timeline as standalone HTML (bokeh)")
    show.add_argument("traces", **traces)
    show.add_argument("--out", default=None, help="HTML file (default timeline.html beside the first trace)")
    show.set_defaults(func=lambda a: commands.show(a.traces, a.out))

    profile = subparsers.add_parser("profile", parents=[common],
                                    help="profile N steps of a running job on every rank (torch.profiler)")
    profile.add_argument("run", metavar="RUN", help="run id, name or prefix")
    profile.add_argument("--steps", type=_steps, default=2, help="steps to record (default 2)")
    profile.add_argument("--wait", action="store_true", help="wait for every rank's trace and analyse it")
    profile.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait")
    profile.set_defaults(func=lambda a: commands.profile(a.run, a.steps, a.wait, a.timeout))
