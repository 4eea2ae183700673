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


def add_parsers(subparsers, common) -> None:
    plan = subparsers.add_parser("plan", help="predict step time, MFU and memory of training layouts; search them")
    verbs = plan.add_subparsers(dest="plan_verb", metavar="VERB")

    predict = verbs.add_parser("predict", parents=[common], help="predict one layout or a JSON array of them")
    predict.add_argument("config", metavar="CONFIG.json", help="{model, cluster, layout} or an array of them")

    def run_predict(args):
        from dspark_lab.planner.commands import predict_report

        return predict_report(args.config)

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

    def run_search(args):
        from dspark_lab.planner.commands import search_report

        return search_report(args.model, args.gpu, args.gpus, args.global_batch, args.seq, args.top,
                             args.max_memory_gb, args.gpus_per_node)

    search.set_defaults(func=run_search)
    plan.set_defaults(func=lambda args: plan.print_help() or 2)
