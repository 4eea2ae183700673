"""Verbs of the collectives area: ``dspark-lab collectives plan`` and ``collectives show``.

Each returns a :class:`~dspark_lab.output.Report`; ``collectives/cli.py`` parses arguments for them.
"""

from __future__ import annotations

from pathlib import Path

from dspark_lab.collectives.packing import hierarchical_allreduce, node_groups, plan
from dspark_lab.collectives.topology import load_topology
from dspark_lab.errors import DSparkError
from dspark_lab.output import Report

MAX_RANKS_TEXT = 4096


def parse_ranks(text: str | None) -> list[int] | None:
    """``0,1,3`` -> [0, 1, 3]; None for all devices."""
    if text is None:
        return None
    if len(text) > MAX_RANKS_TEXT:
        raise DSparkError(f"--ranks: at most {MAX_RANKS_TEXT} characters")
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DSparkError(f"--ranks: a comma-separated list of device indices such as 0,1,3; got {text!r}") from None


def plan_collective(topology: str, ranks: str | None = None, root: int | None = None,
                    op: str = "broadcast", html: str | None = None) -> Report:
    """Pack spanning trees for ``op`` over the allocated devices; compare with the best ring and the max-flow bound."""
    topo = load_topology(topology)
    devices = topo.select(parse_ranks(ranks))
    if root is not None:
        if not 0 <= root < len(topo.devices) or topo.devices[root] not in devices:
            raise DSparkError(f"--root: {root} is not one of the allocated device indices")
        root_name = topo.devices[root]
    else:
        root_name = devices[0]
    result = plan(topo, devices, root=root_name, op=op)
    data = result.as_dict()
    rows = [{"tree": i, "rate_gb_s": t["rate_gb_s"], "edges": " ".join(">".join(p) for p in t["paths"])}
            for i, t in enumerate(data["trees"])]
    bound = data["max_flow_bound_gb_s"]
    lines = [
        f"{op} over {len(devices)} devices of {topo.name}, root {root_name}: "
        f"packed trees {data['algbw_gb_s']:.4g} GB/s algbw ({data['busbw_gb_s']:.4g} busbw)"
        + (f", {data['fraction_of_bound']:.3f} of the max-flow bound {bound:.4g} GB/s" if bound else ""),
        f"best ring ({' '.join(data['ring_order'])}): {data['ring_algbw_gb_s']:.4g} GB/s algbw; "
        f"trees / ring = {data['speedup_over_ring']:.3g}x; planned in {data['plan_ms']:.0f} ms",
        *data["notes"],
    ]
    groups = node_groups(devices) if op == "allreduce" else None
    if groups and len({len(g) for g in groups}) == 1:
        staged = hierarchical_allreduce(topo, groups)
        data["hierarchical"] = staged.as_dict()
        lines.append(f"hierarchical over {len(groups)} nodes (reduce inside, all-reduce across, broadcast inside): "
                     f"{staged.algbw_gb_s:.4g} GB/s algbw (inside {staged.inside_gb_s:.4g}, across "
                     f"{staged.across_gb_s:.4g}); flat packed trees {data['algbw_gb_s']:.4g}")
    elif groups:
        lines.append("hierarchical: not planned, the nodes hold different numbers of the allocated devices")
    if html:
        from dspark_lab.collectives.view import save_plan_html

        path = save_plan_html(topo, result, Path(html))
        data["html"] = str(path)
        lines.append(f"wrote {path} (BokehJS inlined)")
    return Report("collectives-plan", {**data, "topology_source": topo.source}, rows=rows,
                  columns=("tree", "rate_gb_s", "edges"), lines=lines,
                  title="trees (each edge with the links it crosses)")


def show_topology(topology: str) -> Report:
    """The nodes and links of a topology (a preset, ``nodes:N,gpus:G`` or a JSON file)."""
    topo = load_topology(topology)
    rows = [{"src": l.src, "dst": l.dst, "gb_s": l.gb_s} for l in topo.links]
    return Report("collectives-topology", topo.as_dict(), rows=rows, columns=("src", "dst", "gb_s"),
                  lines=[f"{topo.name}: {len(topo.devices)} devices, {len(topo.switches)} switches, "
                         f"{len(topo.links)} links; {topo.source}"])
