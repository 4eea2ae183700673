"""Verbs of this area, added to ``dspark-lab`` by :mod:`dspark_lab.cli`: ``dspark-lab moe balance``."""

from __future__ import annotations

import argparse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def add_parsers(subparsers, common) -> None:
    """``moe balance``: expert replica placement for a load file."""
    moe = subparsers.add_parser("moe", help="MoE expert placement")
    verbs = moe.add_subparsers(dest="moe_command", metavar="VERB")
    balance = verbs.add_parser("balance", parents=[common],
                               help="replicate and place experts for given loads; balancedness before and after")
    balance.add_argument("--loads", required=True, help="loads, [layers, experts] or [experts]: .json, .npy or .pt")
    balance.add_argument("--replicas", type=int, required=True, help="physical expert slots per layer (R)")
    balance.add_argument("--groups", type=int, required=True, help="expert groups (node-limited if nodes divide it)")
    balance.add_argument("--nodes", type=int, required=True, help="server nodes")
    balance.add_argument("--gpus", type=int, required=True, help="GPUs in all (a multiple of --nodes)")
    balance.add_argument("--current", help="current placement phy2log [layers, slots]: .json, .npy or .pt")
    balance.add_argument("--move-cost", type=_non_negative, default=0.0,
                         help="balancedness given up per fraction of slots moved (default 0: balance only)")

    def run(args):
        from dspark_lab.moe.commands import balance as balance_command

        return balance_command(args.loads, args.replicas, args.groups, args.nodes, args.gpus,
                               current=args.current, move_cost=args.move_cost)

    balance.set_defaults(func=run)
    moe.set_defaults(func=lambda args: moe.print_help() or 2)
