"""``dspark-lab schedule simulate|show|run``, added to ``dspark-lab`` by :mod:`dspark_lab.cli`."""

from __future__ import annotations

import argparse

from dspark_lab.pipeline.schedules import SCHEDULES


def _commands():
    from dspark_lab.pipeline import commands  # imported when a verb runs, not when the parser is built

    return commands


def _shape_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(SCHEDULES), metavar="NAME", help=", ".join(SCHEDULES))
    parser.add_argument("--ranks", "-p", type=int, required=True, help="pipeline ranks")
    parser.add_argument("--microbatches", "-m", type=int, required=True, help="micro-batches per step (total)")
    parser.add_argument("--chunks", "-v", type=int, default=None, help="stage copies per rank (default per schedule)")


def _order_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--order", choices=("megatron", "torch"), default="megatron",
                        help="whose op order: megatron (the paper's, default) or torch (torch.distributed.pipelining's;"
                             " differs for interleaved-1f1b with micro-batches = ranks)")


def _cost_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cost-f", type=float, default=1.0, help="forward cost per chunk")
    parser.add_argument("--cost-b", type=float, default=1.0, help="backward cost for input grads (excludes W)")
    parser.add_argument("--cost-w", type=float, default=1.0, help="backward cost for weight grads")
    parser.add_argument("--cost-fb", type=float, default=None, help="overlapped F+B cost (default F+B+W)")
    parser.add_argument("--cost-comm", type=float, default=0.0, help="point-to-point latency")
    parser.add_argument("--costs-from", default=None, metavar="FILE",
                        help="measured costs: the JSON of `dspark-lab trace costs --json` (overrides --cost-f/b/w)")


def _prepare(args, for_show: bool = False):
    commands = _commands()
    limits, max_slots = (commands.SHOW_LIMITS, commands.SHOW_MAX_SLOTS) if for_show else (
        commands.LIMITS, commands.MAX_SLOTS)
    schedule = commands.build_schedule(args.name, args.ranks, args.microbatches, args.chunks, limits=limits,
                                       max_slots=max_slots, order=args.order)
    f, b, w, table = args.cost_f, args.cost_b, args.cost_w, {}
    if getattr(args, "costs_from", None):
        from dspark_lab.trace.costs import read_costs

        scalar, table = read_costs(args.costs_from)
        f, b, w = scalar.get("f", f), scalar.get("b", b), scalar.get("w", w)
    costs = commands.make_costs(f, b, w, args.cost_fb, args.cost_comm)
    costs.table.update(table)
    return schedule, costs


def add_parsers(subparsers, common) -> None:
    top = subparsers.add_parser("schedule", help="pipeline schedules: simulate, draw, run for real")
    verbs = top.add_subparsers(dest="schedule_verb", metavar="VERB", required=True)

    sim = verbs.add_parser("simulate", parents=[common], help="simulate a schedule with per-op costs")
    _shape_options(sim)
    _order_option(sim)
    _cost_options(sim)
    sim.add_argument("--timeline", action="store_true", help="include per-op start/end times in --json")
    sim.set_defaults(func=lambda a: _commands().simulate_report(*_prepare(a), timeline=a.timeline))

    show = verbs.add_parser("show", parents=[common], help="draw the timeline (HTML with bokeh, and PNG)")
    _shape_options(show)
    _order_option(show)
    _cost_options(show)
    show.add_argument("--out", default=None, help="file stem for .html and .png (default schedule-NAME-pP-mM)")
    show.set_defaults(func=lambda a: _commands().show_report(*_prepare(a, for_show=True), out=a.out))

    run = verbs.add_parser("run", parents=[common], help="real multi-process gloo run vs the simulator")
    _shape_options(run)
    run.add_argument("--steps", type=int, default=3, help="measured steps (after profiling)")
    run.add_argument("--no-check", action="store_true", help="skip the single-process gradient check")
    run.set_defaults(func=lambda a: _commands().run_report(a.name, a.ranks, a.microbatches, a.chunks, a.steps,
                                                        not a.no_check))
