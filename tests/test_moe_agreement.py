"""Live re-placement on 2 gloo ranks whose balancers answer differently: rank 0's placement is used by both ranks,
and the expert weights and Adam state land in the slots of that placement.

Two ranks given the same loads can compute different placements: a search that stops on a wall-clock budget (the
exact stage did), or a plugin's balancer that is not deterministic. Here rank 1's balancer is replaced by one that
returns another valid placement of the same replicas (its answer rotated by one slot).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import numpy as np
import pytest
import torch

from dspark_lab.localhost import free_port
from gloo_world import leave_rank, start_ranks

LOADS = [1, 4, 1, 1, 2, 6, 1, 6]  # per layer: 8 experts on 10 slots of 2 ranks


def _gather_slots(layer, optimizer):
    import torch.distributed as dist

    from dspark_lab.moe.placement import _pack

    mine = torch.stack([_pack(m, optimizer) for m in layer.experts])
    every = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(every, mine)
    return torch.cat(every)


def _worker(rank: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    from dspark_lab.examples.moe_train import initial_placement
    from dspark_lab.moe import balance
    from dspark_lab.examples.moe_model import MoEConfig, TinyMoETransformer
    from dspark_lab.runtime.policies.moe import ExpertPlacement, StepLoads

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    config = MoEConfig(slots_per_rank=5)
    model = TinyMoETransformer(config, initial_placement(config, 2), rank, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():  # one step with equal gradients: Adam state exists and replicas stay equal
        p.grad = torch.ones_like(p)
    optimizer.step()
    layers = model.moe_layers()
    placer = ExpertPlacement(layers, rank, 2)
    before = [_gather_slots(layer, optimizer) for layer in layers]
    state_of = [{int(e): slots[int(np.flatnonzero(layer.phy2log.numpy() == e)[0])] for e in range(config.experts)}
                for layer, slots in zip(layers, before)]
    weight = np.array([LOADS] * len(layers))
    # all-reduced: LOADS on both ranks
    placer.history.append(StepLoads(torch.from_numpy(weight if rank == 0 else np.zeros_like(weight))))
    current = placer.placement()
    if rank == 1:  # this rank's balancer gives another valid answer for the same loads
        real = balance.rebalance_experts

        def another_answer(*args, **kwargs):
            phy2log, *rest = real(*args, **kwargs)
            return (np.roll(np.asarray(phy2log), 1, axis=1), *rest)

        balance.rebalance_experts = another_answer
    alone = np.asarray(balance.rebalance_experts(weight.astype(float), 10, 1, 1, 2, current=current,
                                                 move_cost=0.0)[0])
    placer.replace("dspark", window=1, move_cost=0.0, optimizer=optimizer)
    after = [_gather_slots(layer, optimizer) for layer in layers]
    placements = [torch.empty(current.shape, dtype=torch.int64) for _ in range(2)]
    dist.all_gather(placements, torch.from_numpy(placer.placement()))
    alones = [torch.empty(current.shape, dtype=torch.int64) for _ in range(2)]
    dist.all_gather(alones, torch.from_numpy(alone.astype(np.int64)))
    moved_right = all(torch.equal(slots[s], state_of[i][int(e)])
                      for i, slots in enumerate(after) for s, e in enumerate(placements[0][i].tolist()))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"placements": [p.tolist() for p in placements], "alone": [a.tolist() for a in alones],
                       "moved_right": moved_right}, f)
    dist.destroy_process_group()
    leave_rank()


@pytest.mark.slow
def test_ranks_with_different_budgets_end_with_rank0s_placement(tmp_path):
    out = tmp_path / "agreement.json"
    start_ranks(_worker, (free_port(), str(out)), 2)
    result = json.loads(out.read_text())
    alone0, alone1 = result["alone"]
    assert alone0 != alone1  # the premise: left alone, the two ranks' balancers disagree
    assert result["placements"][0] == result["placements"][1] == alone0  # both ranks took rank 0's answer
    assert result["moved_right"]  # every slot holds its expert's weights and Adam state


def test_one_process_computes_the_placement_itself():
    from dspark_lab.moe.placement import placement_from_rank0

    placement = np.array([[0, 1, 2, 0]])
    assert np.array_equal(placement_from_rank0(lambda: placement, placement.shape), placement)
