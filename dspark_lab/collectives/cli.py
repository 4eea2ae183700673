"""Verbs of this area, added to ``dspark-lab`` by :mod:`dspark_lab.cli`: ``collectives plan`` and ``topology``."""

from __future__ import annotations

TOPOLOGY_HELP = "a preset (dgx1-v100, hgx-h100, mi300x), nodes:N,gpus:G[,nvlink:X][,nic:Y], or a JSON file"


def add_parsers(subparsers, common) -> None:
    area = subparsers.add_parser("collectives", help="topology-aware collectives: link graphs and tree packing")
    verbs = area.add_subparsers(dest="collectives_command", metavar="VERB")

    plan = verbs.add_parser("plan", parents=[common],
                            help="pack spanning trees over an allocation; compare with the best ring and the bound")
    plan.add_argument("--topology", required=True, help=TOPOLOGY_HELP)
    plan.add_argument("--ranks", help="allocated device indices, e.g. 0,1,3 (default: all devices)")
    plan.add_argument("--root", type=int, help="root device index (default: the first allocated)")
    plan.add_argument("--op", choices=("broadcast", "allreduce"), default="broadcast")
    plan.add_argument("--html", metavar="PATH", help="also draw the trees on the topology (standalone HTML)")

    def run_plan(args):
        from dspark_lab.collectives.commands import plan_collective

        return plan_collective(args.topology, args.ranks, args.root, args.op, args.html)

    plan.set_defaults(func=run_plan)

    topology = verbs.add_parser("topology", parents=[common], help="the nodes and links of a topology")
    topology.add_argument("topology", help=TOPOLOGY_HELP)

    def run_topology(args):
        from dspark_lab.collectives.commands import show_topology

        return show_topology(args.topology)

    topology.set_defaults(func=run_topology)
    area.set_defaults(func=lambda args: area.print_help() or 2)
