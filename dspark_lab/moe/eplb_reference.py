"""A faithful re-implementation of DeepSeek's EPLB balancer, used as the baseline in tests and the benchmark.

Source: github.com/deepseek-ai/EPLB, ``eplb.py`` at commit d52c72d (March 2025). At that commit the global mode is
the hierarchical mode run with one group on one node; later commits changed it. The algorithm, restated:

1. Hierarchical (``num_groups % num_nodes == 0``): sum each expert group's load and deal groups to nodes with a
   greedy, cardinality-limited packing (heaviest group first, onto the lightest node that still has room).
2. Inside each node, add redundant replicas one at a time to the expert with the highest load per replica.
3. Deal the node's replicas to its GPUs with the same greedy packing (each replica carries load / replica count).

The greedy packing uses float32 sums and Python's ``min`` (first lightest pack wins ties), as upstream does; that
is what makes this module reproduce upstream's output bit for bit. It is deliberately a slow, literal loop: the
benchmark times it as "EPLB". :func:`greedy_packing` takes a ``packer`` argument only so
:mod:`dspark_lab.moe.balance` can run the same steps with a vectorised packer.
"""

from __future__ import annotations

from typing import Callable

import torch

Packer = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]

# Upstream README's example: 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs, and its printed phy2log.
README_EXAMPLE = {
    "weight": [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
               [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]],
    "args": (16, 4, 2, 8),
    "phy2log": [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]],
}


def greedy_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deal the ``n`` items of each row of ``weight [rows, n]`` into ``num_packs`` packs of ``n / num_packs`` items.

    Items go heaviest first, each onto the currently lightest pack that is not full. Returns ``(pack, position)``,
    both ``[rows, n]``: the pack of each item and its position inside that pack.
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return (torch.arange(n, dtype=torch.int64).expand(rows, n).clone(),
                torch.zeros(rows, n, dtype=torch.int64))
    order = weight.float().sort(-1, descending=True).indices
    pack = torch.full((rows, n), -1, dtype=torch.int64)
    position = torch.full((rows, n), -1, dtype=torch.int64)
    for r in range(rows):
        sums = [0] * num_packs  # becomes float32 0-d tensors after the first add, as upstream
        sizes = [0] * num_packs
        for item in order[r].tolist():
            target = min((p for p in range(num_packs) if sizes[p] < per_pack), key=sums.__getitem__)
            pack[r, item] = target
            position[r, item] = sizes[target]
            sums[target] = sums[target] + weight[r, item]
            sizes[target] += 1
    return pack, position


def replicate(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grow each row's ``n`` experts to ``num_phy`` replicas, one at a time to the highest load per replica.

    Returns ``phy2log [rows, num_phy]`` (replica -> expert; the first ``n`` are the experts themselves), ``rank``
    (which replica of its expert each one is) and ``count [rows, n]``.
    """
    rows, n = weight.shape
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(rows, 1)
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    count = torch.ones(rows, n, dtype=torch.int64)
    row_ids = torch.arange(rows)
    for slot in range(n, num_phy):
        hottest = (weight / count).max(dim=-1).indices
        phy2log[:, slot] = hottest
        rank[:, slot] = count[row_ids, hottest]
        count[row_ids, hottest] += 1
    return phy2log, rank, count


def _invert(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
    return inverse


def hierarchical(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int,
                 packer: Packer = greedy_packing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EPLB's three steps; returns ``phy2log [L, num_phy]`` (GPU-major), replica ``rank`` and ``count [L, E]``."""
    layers, experts = weight.shape
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_phy // num_gpus
    experts_per_node = experts // num_nodes

    # 1. groups -> nodes. "Node-major" expert ids (nlog) list node 0's experts first, then node 1's, ...
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    node, slot_in_node = packer(group_load, num_nodes)
    log2nlog = (((node * groups_per_node + slot_in_node) * group_size).unsqueeze(-1)
                + torch.arange(group_size)).flatten(-2)
    nlog2log = _invert(log2nlog)

    # 2. replicate inside each node: one row per (layer, node).
    node_load = weight.gather(-1, nlog2log).view(-1, experts_per_node)
    phy2nlog, rank, nlog_count = replicate(node_load, num_phy // num_nodes)

    # 3. replicas -> GPUs of the node.
    replica_load = (node_load / nlog_count).gather(-1, phy2nlog)
    gpu, slot_in_gpu = packer(replica_load, gpus_per_node)
    slot_of_phy = gpu * slots_per_gpu + slot_in_gpu
    phy_of_slot = _invert(slot_of_phy)

    slot2nlog = phy2nlog.gather(-1, phy_of_slot)
    slot2nlog = (slot2nlog.view(layers, num_nodes, -1)
                 + torch.arange(0, experts, experts_per_node).view(1, -1, 1)).flatten(-2)
    slot2log = nlog2log.gather(-1, slot2nlog)
    slot_rank = rank.gather(-1, phy_of_slot).view(layers, -1)
    count = nlog_count.view(layers, -1).gather(-1, log2nlog)
    return slot2log, slot_rank, count


def logical_to_physical(phy2log: torch.Tensor, rank: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``log2phy [L, E, max(count)]``: the slots of each expert in replica-rank order, padded with -1."""
    layers, experts = count.shape
    width = int(count.max().item())
    log2phy = torch.full((layers, experts, width), -1, dtype=torch.int64)
    log2phy.view(layers, -1).scatter_(-1, phy2log * width + rank,
                                      torch.arange(phy2log.size(1), dtype=torch.int64).expand(layers, -1))
    return log2phy


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      packer: Packer = greedy_packing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EPLB's entry point: ``(phy2log [L, R], log2phy [L, E, X], logcnt [L, E])``.

    Hierarchical when ``num_groups % num_nodes == 0``, otherwise the same steps with one group on one node.
    Upstream asserts on bad counts; so does this (the checked entry point is :mod:`dspark_lab.moe.balance`).
    """
    weight = torch.as_tensor(weight).float().cpu()
    layers, experts = weight.shape
    assert num_replicas % num_gpus == 0 and num_gpus % num_nodes == 0
    if num_groups % num_nodes == 0:
        assert experts % num_groups == 0
        phy2log, rank, count = hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus, packer)
    else:
        phy2log, rank, count = hierarchical(weight, num_replicas, 1, 1, num_gpus, packer)
    return phy2log, logical_to_physical(phy2log, rank, count), count
