"""``dspark-lab plan predict|search``, added to ``dspark-lab`` by :mod:`dspark_lab.cli`."""

from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if not 1 <= value <= 1 << 20:
        raise argparse.ArgumentTypeError(f"must be an integer in 1..{1 << 20}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _fixed_field(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` for ``--with``; VALUE is read as JSON (``true``, ``2``) and else taken as a string (``fp8``)."""
    import argparse
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. precision=fp8), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_framework_options(parser, default: str | None) -> None:
    from dspark_lab.planner import FRAMEWORKS

    fallback = default or "torchtitan for a job on FSDP2 or torch pipelining, else megatron"
    parser.add_argument("--framework", choices=FRAMEWORKS, default=default,
                        help=f"what runs the job: its defaults and the layouts it can run (default {fallback})")
    parser.add_argument("--with", dest="fixed", metavar="KEY=VALUE", type=_fixed_field, action="append", default=[],
                        help="a layout field every candidate gets, e.g. precision=fp8, kernels=fused (repeatable)")


def add_parsers(subparsers, common) -> None:
    plan = subparsers.add_parser("plan", help="predict step time, MFU and memory of training layouts; search them")
    verbs = plan.add_subparsers(dest="plan_verb", metavar="VERB")

    predict = verbs.add_parser("predict", parents=[common], help="predict one layout or a JSON array of them")
    predict.add_argument("config", metavar="CONFIG.json", help="{model, cluster, layout} or an array of them")
    predict.add_argument("--no-allocator", dest="allocator", action="store_false",
                         help="skip the caching-allocator replay of torchtitan layouts (memory_gb.allocator 0): "
                              "milliseconds per layout instead of up to about a second, as plan search sweeps")

    def run_predict(args):
        from dspark_lab.planner.commands import predict_report

        return predict_report(args.config, allocator=args.allocator)

    predict.set_defaults(func=run_predict)

    search = verbs.add_parser("search", parents=[common], help="the best layouts that fit, by predicted throughput")
    search.add_argument("--model", required=True, help="a preset (gpt3-175b, llama3-8b, ...) or a model JSON file")
    search.add_argument("--gpu", required=True, help="a backend name, e.g. nvidia-h100")
    search.add_argument("--gpus", type=_positive_int, required=True, help="GPUs in all")
    search.add_argument("--global-batch", type=_positive_int, required=True, help="sequences per step")
    search.add_argument("--seq", type=_positive_int, default=None, help="sequence length (default: the model's)")
    search.add_argument("--top", type=_positive_int, default=5, help="layouts to return (default 5)")
    search.add_argument("--max-memory-gb", type=_positive_float, default=None,
                        help="memory limit per GPU (default: the device's)")
    search.add_argument("--gpus-per-node", type=_positive_int, default=8, help="GPUs per node (default 8)")
    search.add_argument("--html", metavar="PATH", default=None,
                        help="also write a bokeh view (throughput vs memory, Pareto front, breakdown) to PATH")
    _add_framework_options(search, "megatron")

    def run_search(args):
        from dspark_lab.planner.commands import search_report

        return search_report(args.model, args.gpu, args.gpus, args.global_batch, args.seq, args.top,
                             args.max_memory_gb, args.gpus_per_node, args.html, args.framework, dict(args.fixed))

    search.set_defaults(func=run_search)

    whatif = verbs.add_parser("whatif", parents=[common],
                              help="a running job's layout predicted, and the best layouts on other GPUs")
    whatif.add_argument("run", metavar="RUN", help="run id, name or id prefix (see `dspark-lab jobs`)")
    whatif.add_argument("--model", default=None,
                        help="a preset or a model JSON file (default: what the run publishes)")
    whatif.add_argument("--gpu", default=None, help="target backend name (default: the run's)")
    whatif.add_argument("--gpus", type=_positive_int, default=None, help="target GPU count (default: the run's)")
    whatif.add_argument("--global-batch", type=_positive_int, default=None,
                        help="sequences per step (default: from the run's metrics)")
    whatif.add_argument("--seq", type=_positive_int, default=None, help="sequence length")
    whatif.add_argument("--top", type=_positive_int, default=3, help="layouts to propose (default 3)")
    _add_framework_options(whatif, None)

    def run_whatif(args):
        from dspark_lab.planner.commands import whatif_report

        return whatif_report(args.run, args.model, args.gpu, args.gpus, args.global_batch, args.seq, args.top,
                             args.framework, dict(args.fixed))

    whatif.set_defaults(func=run_whatif)
    plan.set_defaults(func=lambda args: plan.print_help() or 2)
