"""The live runtime's verbs: run, demo, jobs, status, policies, get, set, metrics, events, stop.

Building these parsers imports nothing heavy: each verb imports :mod:`dspark_lab.runtime.commands` (or the launcher)
when it runs, so the record readers never load torch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from dspark_lab.errors import DSparkError
from dspark_lab.output import Report, cell

MAX_TAIL = 100_000  # metric records printed by `metrics --tail`
MAX_NPROC = 1024  # ranks per node of `run`


def _commands():
    from dspark_lab.runtime import commands

    return commands


def _bounded(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}")
        return value

    return parse


def _script_arguments(parser, what: str) -> None:
    """SCRIPT (or ``-m MODULE``) and everything after it (the script's own arguments, options included, are passed
    through). ``-m`` is torchrun's: a flag saying that SCRIPT is a module's name, run as ``python -m`` runs it."""
    parser.add_argument("-m", "--module", action="store_true",
                        help="SCRIPT is a module's name, run as python -m runs it (torchrun's -m); every argument "
                             "after it is the module's own")
    parser.add_argument("script", nargs="?", help=f"{what}; every argument after it is the script's own")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def script_of(args) -> str:
    """SCRIPT of ``run`` / ``k8s manifest`` (the module's name with ``-m``: :func:`module_of`); one line naming it
    when it is missing."""
    if args.script is None:  # optional to argparse only so that its usage error does not list script_args
        if getattr(args, "module", False):
            raise DSparkError("-m: give the module's name, then its own arguments (dspark-lab run -m pkg.train "
                              "ARGS)")
        raise DSparkError("script: required: the script to run (or -m MODULE), then its own arguments "
                          "(dspark-lab options go before it)")
    return args.script


def module_of(args) -> bool:
    """True when ``-m`` said that SCRIPT is a module's name."""
    return bool(getattr(args, "module", False))


def _run(args) -> int:
    from dspark_lab.runtime.launch import TORCHRUN_OPTIONS, prepare, supervise
    from dspark_lab.runtime.rotation import max_bytes

    from dspark_lab.runtime.step_env import loss_read, memory_every

    max_bytes()  # a bad DSPARK_METRICS_MAX_MB is said here, in one line, not by every rank as it starts
    loss_read(), memory_every()  # and so are DSPARK_LOSS_READ and DSPARK_MEMORY_EVERY
    if args.standalone:
        check_standalone(args)
    options = {name: getattr(args, name) for name in TORCHRUN_OPTIONS}
    run_dir = prepare(script_of(args), args.script_args, nproc=args.nproc, policies=args.policy, name=args.name,
                      options=options, launcher=args.launcher, token_file=args.token_file,
                      control_host=args.control_host, module=module_of(args))
    ranks = run_dir.info().get("ranks")
    print(f"dspark-lab: run {run_dir.id} ({ranks} rank(s)); records in {run_dir.path}", file=sys.stderr)
    print(f"dspark-lab: change it live with `dspark-lab set {run_dir.id} KEY=VALUE`", file=sys.stderr)
    code = supervise(run_dir)
    info = run_dir.info()
    state, error = info.get("state"), info.get("error")
    why = f": {error}" if code and error else ""  # after torchrun's own dump, which rank failed and why
    print(f"dspark-lab: run {run_dir.id} {state} (exit code {code}){why}", file=sys.stderr)
    if args.json:
        print(Report("run", {"id": run_dir.id, "state": state, "exit_code": code, "error": error or None,
                             "run_dir": str(run_dir.path)}).to_json(), flush=True)
    return code


def check_standalone(args) -> None:
    """torchrun's ``--standalone`` (one node, a local rendezvous) is what a one-node run does anyway, on the loopback
    rendezvous (launchers/loopback.py); refused in one line with what contradicts it."""
    if args.launcher not in (None, "torchrun"):
        raise DSparkError(f"--standalone: a torchrun option; --launcher {args.launcher} takes none (use --launcher "
                          "torchrun)")
    if args.nnodes not in (None, "1", "1:1"):
        raise DSparkError(f"--standalone: one node on this machine; it cannot go with --nnodes {args.nnodes}")
    for option in ("rdzv_backend", "rdzv_endpoint", "rdzv_id"):
        if getattr(args, option):
            raise DSparkError(f"--standalone: one node on this machine; it cannot go with "
                              f"--{option.replace('_', '-')} {getattr(args, option)}")


def _metrics(args):
    commands = _commands()
    if not args.follow:
        return commands.metrics(args.run, args.tail)
    from dspark_lab.runtime.jsonl import Follower
    from dspark_lab.runtime.records import LIVE_STATES, find_run, run_state

    run_dir = find_run(args.run)
    columns = commands.metrics(args.run, 0).columns
    widths = [max(len(c), 12) for c in columns]
    row = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    if not args.json:
        print(row(columns), flush=True)
    # The last --tail records already written come first (read from the file's end), then every new one as it
    # lands, across rotations of the file; a record written while the tail was read is shown once.
    follower = Follower(run_dir.metrics_path)  # from the end as it is now, before the tail is read
    shown = commands.metrics(args.run, args.tail).data["metrics"]
    again = {(r.get("step"), r.get("rank")) for r in shown}
    stop = lambda: run_state(run_dir).get("state") not in LIVE_STATES
    follow = (r for r in follower.follow(stop=stop) if (r.get("step"), r.get("rank")) not in again)
    for record in itertools.chain(shown, follow):
        print(json.dumps(record) if args.json else row([cell(record.get(c)) for c in columns]), flush=True)
    return 0


def _k8s_manifest(args):
    from dspark_lab.runtime.launchers import k8s

    document = k8s.manifest(image=args.image, nodes=args.nodes, nproc=args.nproc_per_node, script=script_of(args),
                            script_args=args.script_args, module=module_of(args), name=args.name,
                            max_restarts=args.max_restarts, control_host=args.control_host, policies=args.policy)
    text = "" if args.json else k8s.to_yaml(document).rstrip("\n")
    return Report("k8s_manifest", {"manifest": document}, lines=[text] if text else [])


def _demo(args):
    from dspark_lab.runtime.demo import run_demo

    return run_demo(quick=args.quick, steps_per_phase=args.steps_per_phase, device=args.device)


def _verb(name: str, *fields: str):
    """A verb calling ``commands.<name>`` with the parsed ``fields``, looked up when it runs."""

    def run(args):
        return getattr(_commands(), name)(*(getattr(args, f) for f in fields))

    return run


def add_parsers(subparsers, common) -> None:
    run = subparsers.add_parser("run", parents=[common],
                                help="launch a training script through torchrun with the runtime attached",
                                description="Launch SCRIPT (or -m MODULE, as python -m runs it) on N ranks with "
                                            "torchrun; the script is not modified. "
                                            "With --json, one JSON object (id, state, exit_code, run_dir) at the end.")
    run.add_argument("--nproc", "--nproc-per-node", type=_bounded(1, MAX_NPROC), default=None,
                     help=f"ranks per node (default: PET_NPROC_PER_NODE, else 1; at most {MAX_NPROC})")
    run.add_argument("--policy", action="append", default=[], metavar="KEY=VALUE", help="policy at launch")
    run.add_argument("--name", help="a name to find the run by")
    run.add_argument("--launcher", default=None, metavar="NAME",
                     help="how the ranks start: torchrun (default), python (one process, no torchrun environment), "
                          "or a plugin's")
    for option in ("nnodes", "node-rank", "rdzv-backend", "rdzv-endpoint", "rdzv-id", "max-restarts",
                   "master-addr", "master-port", "monitor-interval", "local-addr"):
        run.add_argument(f"--{option}", dest=option.replace("-", "_"),
                         help="passed to torchrun (default: its PET_* variable)")
    run.add_argument("--standalone", action="store_true",
                     help="torchrun's one-node option: accepted, and what a one-node run does anyway (its "
                          "rendezvous on 127.0.0.1)")
    run.add_argument("--token-file", metavar="PATH",
                     help="the run's control token, the same file on every node (required with --nnodes above 1)")
    run.add_argument("--control-host", metavar="HOST",
                     help="bind rank 0's control endpoint to HOST instead of 127.0.0.1 (token-authenticated, "
                          "plain HTTP: docs/security.md)")
    _script_arguments(run, "the training script")
    run.set_defaults(func=_run)

    k8s = subparsers.add_parser("k8s", help="Kubernetes: a Kubeflow PyTorchJob that runs a script under dspark-lab")
    k8s_verbs = k8s.add_subparsers(dest="k8s_verb", required=True, metavar="VERB")
    manifest = k8s_verbs.add_parser("manifest", parents=[common],
                                    help="print a PyTorchJob (kubeflow.org/v1) whose pods run `dspark-lab run`",
                                    description="Print a Kubeflow PyTorchJob (YAML; --json for the object) with a "
                                                "c10d elastic policy; every pod runs `dspark-lab run` with the token "
                                                "from the Secret NAME-dspark-token (docs/clusters.md).")
    manifest.add_argument("--image", required=True, help="the container image (with dspark-lab and the script)")
    manifest.add_argument("--nodes", type=_bounded(1, 1024), required=True, help="pods (nodes), at most 1024")
    manifest.add_argument("--nproc-per-node", type=_bounded(1, MAX_NPROC), default=1,
                          help=f"ranks per pod (default 1, at most {MAX_NPROC})")
    manifest.add_argument("--name", help="the job's name (default: from the script's name)")
    manifest.add_argument("--max-restarts", type=_bounded(0, 100), default=3,
                          help="restarts of the group after a worker dies (default 3, at most 100)")
    manifest.add_argument("--control-host", metavar="HOST",
                          help="bind rank 0's control endpoint to HOST in its pod (default: loopback only)")
    manifest.add_argument("--policy", action="append", default=[], metavar="KEY=VALUE", help="policy at launch")
    _script_arguments(manifest, "the script's path inside the image")
    manifest.set_defaults(func=_k8s_manifest)

    demo = subparsers.add_parser("demo", parents=[common], help="train a small transformer on 2 ranks and change "
                                                                "its policies live")
    demo.add_argument("--quick", action="store_true", help="fewer steps (for CI)")
    demo.add_argument("--steps-per-phase", type=_bounded(2, 10_000), default=None)
    demo.add_argument("--device", default="cpu", help="cpu (2 ranks, gloo) or cuda (one GPU); default cpu")
    demo.set_defaults(func=_demo)

    subparsers.add_parser("jobs", parents=[common], help="runs and their state").set_defaults(func=_verb("jobs"))
    for verb, name, text in (("status", "status", "one run's state"),
                             ("policies", "policies", "policy schemas and values of a running job"),
                             ("events", "events", "a run's events (changes, refusals, stops)")):
        p = subparsers.add_parser(verb, parents=[common], help=text)
        p.add_argument("run", help="run id, name or unique id prefix")
        p.set_defaults(func=_verb(name, "run"))

    stop = subparsers.add_parser("stop", parents=[common], help="stop a running job at the next step boundary")
    stop.add_argument("run", help="run id, name or unique id prefix")
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the ranks to stop (default 60)")
    stop.add_argument("--force", action="store_true",
                      help="end the run now (SIGTERM to its launcher and ranks) instead of at a step boundary: for a "
                           "job that never reaches one")
    stop.set_defaults(func=lambda a: _commands().stop(a.run, timeout=a.timeout, force=a.force))

    get = subparsers.add_parser("get", parents=[common], help="a policy's value in force and since which step")
    get.add_argument("run")
    get.add_argument("keys", nargs="*", metavar="KEY", help="the policies to show (default: all)")
    get.set_defaults(func=_verb("get", "run", "keys"))

    set_ = subparsers.add_parser("set", parents=[common], help="change policies of a running job")
    set_.add_argument("run")
    set_.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    set_.add_argument("--no-wait", action="store_true", help="return once the change is announced")
    set_.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the apply (default 60)")
    set_.set_defaults(func=lambda a: _commands().set_policies(a.run, a.assignments, wait=not a.no_wait,
                                                              timeout=a.timeout))

    show = subparsers.add_parser("show", parents=[common], help="write a run's charts as a standalone HTML file")
    show.add_argument("run")
    show.add_argument("--html", metavar="PATH", help="where to write (default: RUN_DIR/charts.html)")
    show.set_defaults(func=_verb("show", "run", "html"))

    metrics = subparsers.add_parser("metrics", parents=[common], help="a run's per-step metrics")
    metrics.add_argument("run")
    metrics.add_argument("--tail", type=_bounded(0, MAX_TAIL), default=20,
                         help=f"last N records (default 20, at most {MAX_TAIL})")
    metrics.add_argument("--follow", action="store_true",
                         help="print the last --tail records, then each new one until the run ends")
    metrics.set_defaults(func=_metrics)
