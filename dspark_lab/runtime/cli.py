"""The live runtime's verbs: run, demo, jobs, status, policies, get, set, metrics, events, stop."""

from __future__ import annotations

import argparse
import json
import sys

from dspark_lab.runtime import commands
from dspark_lab.output import Report


def _run(args) -> int:
    from dspark_lab.runtime.launch import TORCHRUN_OPTIONS, prepare, supervise

    options = {name: getattr(args, name) for name in TORCHRUN_OPTIONS}
    run_dir = prepare(args.script, args.script_args, nproc=args.nproc, policies=args.policy, name=args.name,
                      options=options, launcher=args.launcher)
    print(f"dspark-lab: run {run_dir.id} ({args.nproc} rank(s)); records in {run_dir.path}", file=sys.stderr)
    print(f"dspark-lab: change it live with `dspark-lab set {run_dir.id} KEY=VALUE`", file=sys.stderr)
    code = supervise(run_dir)
    print(f"dspark-lab: run {run_dir.id} {run_dir.info().get('state')} (exit code {code})", file=sys.stderr)
    return code


def _metrics(args):
    if not args.follow:
        return commands.metrics(args.run, args.tail)
    from dspark_lab.runtime.records import find_run, iter_follow, run_state

    run_dir = find_run(args.run)
    report = commands.metrics(args.run, 0)
    stop = lambda: run_state(run_dir).get("state") not in ("running", "starting")
    for record in iter_follow(run_dir.metrics_path, stop=stop):
        print(json.dumps(record) if args.json else Report("metrics", {}, [record], report.columns).to_text()
              .splitlines()[-1], flush=True)
    return 0


def _demo(args):
    from dspark_lab.runtime.demo import run_demo

    return run_demo(quick=args.quick, steps_per_phase=args.steps_per_phase)


def add_parsers(subparsers, common) -> None:
    run = subparsers.add_parser("run", help="launch a training script through torchrun with the runtime attached",
                                description="Launch SCRIPT on N ranks with torchrun; the script is not modified.")
    run.add_argument("--nproc", "--nproc-per-node", type=int, default=1, help="ranks per node (default 1)")
    run.add_argument("--policy", action="append", default=[], metavar="KEY=VALUE", help="policy at launch")
    run.add_argument("--name", help="a name to find the run by")
    run.add_argument("--launcher", default=None, metavar="NAME",
                     help="how the ranks start: torchrun (default), python (one process, no torchrun environment), "
                          "or a plugin's")
    for option in ("nnodes", "node-rank", "rdzv-backend", "rdzv-endpoint", "rdzv-id", "max-restarts",
                   "master-addr", "master-port", "monitor-interval"):
        run.add_argument(f"--{option}", dest=option.replace("-", "_"), help="passed to torchrun")
    run.add_argument("script")
    run.add_argument("script_args", nargs=argparse.REMAINDER)
    run.set_defaults(func=_run)

    demo = subparsers.add_parser("demo", parents=[common], help="train a small transformer on 2 ranks and change "
                                                                "its policies live")
    demo.add_argument("--quick", action="store_true", help="fewer steps (for CI)")
    demo.add_argument("--steps-per-phase", type=int, default=None)
    demo.set_defaults(func=_demo)

    subparsers.add_parser("jobs", parents=[common], help="runs and their state").set_defaults(
        func=lambda a: commands.jobs())
    for verb, fn, text in (("status", commands.status, "one run's state"),
                           ("policies", commands.policies, "policy schemas and values of a running job"),
                           ("events", commands.events, "a run's events (changes, refusals, stops)"),
                           ("stop", commands.stop, "stop a running job at the next step boundary")):
        p = subparsers.add_parser(verb, parents=[common], help=text)
        p.add_argument("run", help="run id, name or unique id prefix")
        p.set_defaults(func=lambda a, fn=fn: fn(a.run))

    get = subparsers.add_parser("get", parents=[common], help="a policy's value in force and since which step")
    get.add_argument("run")
    get.add_argument("key", nargs="?")
    get.set_defaults(func=lambda a: commands.get(a.run, a.key))

    set_ = subparsers.add_parser("set", parents=[common], help="change policies of a running job")
    set_.add_argument("run")
    set_.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    set_.add_argument("--no-wait", action="store_true", help="return once the change is announced")
    set_.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the apply (default 60)")
    set_.set_defaults(func=lambda a: commands.set_policies(a.run, a.assignments, wait=not a.no_wait,
                                                           timeout=a.timeout))

    show = subparsers.add_parser("show", parents=[common], help="write a run's charts as a standalone HTML file")
    show.add_argument("run")
    show.add_argument("--html", metavar="PATH", help="where to write (default: RUN_DIR/charts.html)")
    show.set_defaults(func=lambda a: commands.show(a.run, a.html))

    metrics = subparsers.add_parser("metrics", parents=[common], help="a run's per-step metrics")
    metrics.add_argument("run")
    metrics.add_argument("--tail", type=int, default=20)
    metrics.add_argument("--follow", action="store_true", help="keep printing new records until the run ends")
    metrics.set_defaults(func=_metrics)
