"""Example: train a small expert-parallel MoE transformer, optionally re-placing experts every few steps.

Run on 2 CPU ranks (gloo)::

    dspark-lab run --nproc 2 dspark_lab/examples/moe_train.py --steps 40 --placement dspark --interval 10
    torchrun --nproc-per-node 2 -m dspark_lab.examples.moe_train --steps 40 --placement dspark --interval 10

``--placement``: ``static`` keeps the initial placement; ``eplb`` re-places with DeepSeek's EPLB
(:mod:`dspark_lab.moe.eplb_reference`); ``dspark`` with :func:`dspark_lab.moe.rebalance_experts` (given the current
placement and ``--move-cost``). Loads are the router's per-expert assignment counts over the last ``--window``
steps, recorded by a forward hook on each layer's router and summed over ranks. The loss trajectory is the same for
every policy (re-placement moves weights and optimizer state, it changes no math); the max-rank token load drops.

``--compile whole`` runs ``torch.compile(model)``, ``--compile blocks`` compiles each block (``block.compile()``),
with ``--compile-backend`` (docs/moe.md, "Under torch.compile"); ``--json`` then also carries Dynamo's count of the
graphs it built, per step.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import deque

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dspark_lab.moe import eplb_reference
from dspark_lab.moe.balance import rebalance_experts
from dspark_lab.examples.moe_model import MoEConfig, TinyMoETransformer, expert_load_hook, sync_gradients
from dspark_lab.moe.placement import move_experts

POLICIES = ("static", "eplb", "dspark")
COMPILE = ("none", "whole", "blocks")


def batch(config: MoEConfig, size: int, step: int, rank: int, world: int) -> torch.Tensor:
    """A seeded batch per (step, rank): sequences following ``next = 5 * prev + 3 (mod vocab)`` with 10% noise."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * world + rank)
    tokens = torch.empty(size, config.seq + 1, dtype=torch.int64)
    tokens[:, 0] = torch.randint(config.vocab, (size,), generator=generator)
    for t in range(1, config.seq + 1):
        noise = torch.rand(size, generator=generator) < 0.1
        random = torch.randint(config.vocab, (size,), generator=generator)
        tokens[:, t] = torch.where(noise, random, (5 * tokens[:, t - 1] + 3) % config.vocab)
    return tokens


def initial_placement(config: MoEConfig, world: int) -> np.ndarray:
    """Slot ``i`` holds expert ``i mod E``: GPU-major, the first ``R - E`` experts get a second replica."""
    return np.tile(np.arange(config.slots_per_rank * world) % config.experts, (config.layers, 1))


def new_placement(policy: str, loads: np.ndarray, current: np.ndarray, world: int, move_cost: float) -> np.ndarray:
    replicas = current.shape[1]
    if policy == "eplb":
        return eplb_reference.rebalance_experts(torch.from_numpy(loads), replicas, 1, 1, world)[0].numpy()
    return rebalance_experts(loads, replicas, 1, 1, world, current=current, move_cost=move_cost)[0].numpy()


def train(*, steps: int = 20, batch_size: int = 8, policy: str = "static", interval: int = 5, window: int = 5,
          move_cost: float = 0.0, replace_at: tuple[int, ...] = (), config: MoEConfig | None = None,
          lr: float = 3e-3, step_sleep: float = 0.0, compile: str = "none", backend: str = "inductor") -> dict:
    """Train on this process's rank; returns the global loss, max-rank token load and moves per step.

    ``replace_at``: extra steps after which to re-place (in addition to every ``interval`` steps).
    ``compile``: ``none``, ``whole`` (``torch.compile(model)``) or ``blocks`` (each block's ``compile()``).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if compile not in COMPILE:
        raise ValueError(f"compile must be one of {', '.join(COMPILE)}, got {compile!r}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    config = config or MoEConfig(slots_per_rank=-(-10 // world))  # 10 slots for 8 experts on 1 or 2 ranks
    if config.slots_per_rank * world < config.experts:
        raise ValueError(f"slots_per_rank ({config.slots_per_rank}) x ranks ({world}) must be at least "
                         f"experts ({config.experts})")
    placement = initial_placement(config, world)
    model = TinyMoETransformer(config, placement, rank, world)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    layers = model.moe_layers()
    step_loads = [torch.zeros(config.experts, dtype=torch.int64) for _ in layers]
    for i, layer in enumerate(layers):  # the loads this loop places from (before any compile traces the routers)
        layer.router.register_forward_hook(expert_load_hook(step_loads, i, config.experts))
    run = model
    if compile == "whole":
        run = torch.compile(model, backend=backend)
    elif compile == "blocks":
        for block in model.blocks:
            block.compile(backend=backend)
    history: deque[np.ndarray] = deque(maxlen=window)
    record = {"loss": [], "max_rank_load": [], "mean_rank_load": [], "moved": [], "placements": [placement.tolist()],
              "loads": []}
    if compile != "none":
        from torch._dynamo.utils import counters

        record["graphs"] = []
    for step in range(steps):
        for counts in step_loads:
            counts.zero_()
        tokens = batch(config, batch_size, step, rank, world)
        logits = run(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, config.vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(model)
        optimizer.step()

        stats = torch.cat([loss.detach().reshape(1), torch.stack(step_loads).flatten().double(),
                           torch.tensor([float(layer.last_rank_load) for layer in layers])])
        rank_loads = torch.zeros(world, len(layers), dtype=torch.float64)
        rank_loads[rank] = stats[-len(layers):]
        if world > 1:
            dist.all_reduce(rank_loads)
            dist.all_reduce(stats)
        record["loss"].append(float(stats[0]) / world)
        record["max_rank_load"].append(float(rank_loads.max(0).values.mean()))
        record["mean_rank_load"].append(float(rank_loads.mean(0).mean()))
        history.append(stats[1:1 + len(layers) * config.experts].view(len(layers), -1).numpy().copy())
        record["loads"].append(history[-1].astype(np.int64).tolist())  # summed over ranks
        if compile != "none":
            record["graphs"].append(counters["stats"]["unique_graphs"])
        if step_sleep:
            time.sleep(step_sleep)

        due = policy != "static" and ((step + 1) % interval == 0 or step + 1 in replace_at) and step + 1 < steps
        if due:
            new = new_placement(policy, np.sum(history, 0), placement, world, move_cost)
            moved = move_experts(layers, optimizer, placement, new, rank, world)
            placement = new
            record["moved"].append({"step": step + 1, "received_by_rank0": moved})
            record["placements"].append(placement.tolist())
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--placement", choices=POLICIES, default="dspark")
    parser.add_argument("--interval", type=int, default=10, help="re-place every this many steps")
    parser.add_argument("--window", type=int, default=10, help="steps of load history used to place")
    parser.add_argument("--move-cost", type=float, default=0.0)
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep per step (a live demo)")
    parser.add_argument("--compile", choices=COMPILE, default="none",
                        help="torch.compile the whole model or each block")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (e.g. aot_eager)")
    parser.add_argument("--json", action="store_true", help="print the whole record as JSON (rank 0)")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    record = train(steps=args.steps, batch_size=args.batch, policy=args.placement, interval=args.interval,
                   window=args.window, move_cost=args.move_cost, step_sleep=args.step_sleep, compile=args.compile,
                   backend=args.compile_backend)
    if not dist.is_initialized() or dist.get_rank() == 0:
        if args.json:
            print(json.dumps(record))
        else:
            for step in range(0, args.steps, max(1, args.steps // 10)):
                print(f"step {step:4d}  loss {record['loss'][step]:.5f}  max-rank load "
                      f"{record['max_rank_load'][step]:.0f} (mean {record['mean_rank_load'][step]:.0f})")
            print(f"re-placements: {record['moved']}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
