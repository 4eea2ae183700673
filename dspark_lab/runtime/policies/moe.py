"""MoE policies: record per-layer expert loads every step and re-place experts from them (``moe.placement``).

Expert-parallel MoE layers (:class:`dspark_lab.moe.model.ExpertParallelMoE`) are found in the model; a forward hook
on each router counts this rank's assignments per expert. Every ``moe.placement_interval`` steps, at the boundary,
each rank sums its last ``moe.placement_window`` steps of counts, all ranks all-reduce that window (one collective
per re-placement, none in between), and every rank computes the same new placement: DeepSeek's EPLB
(:mod:`dspark_lab.moe.eplb_reference`) or ours (:func:`dspark_lab.moe.rebalance_experts`, weighing experts moved
by ``moe.move_cost``). :func:`dspark_lab.moe.placement.move_experts` then moves expert weights and optimizer state
between ranks: the math is unchanged, only which rank computes which expert.
"""

from __future__ import annotations

import sys
from collections import deque

import numpy as np
import torch
import torch.distributed as dist

PLACEMENT = ("static", "eplb", "dspark")


def moe_layers(model) -> list:
    """The model's expert-parallel MoE layers (empty when the MoE package is not in use)."""
    module = sys.modules.get("dspark_lab.examples.moe_model")
    if module is None or model is None:
        return []
    return [m for m in model.modules() if isinstance(m, module.ExpertParallelMoE)]


class ExpertPlacement:
    """One rank's load recorder and re-placer for a model's MoE layers."""

    def __init__(self, layers, rank: int, world: int, group=None):
        self.layers, self.rank, self.world, self.group = layers, rank, world, group
        self.experts = layers[0].config.experts
        self.counts = [torch.zeros(self.experts, dtype=torch.int64) for _ in layers]
        self.history: deque[np.ndarray] = deque(maxlen=10_000)
        for index, layer in enumerate(layers):
            layer.router.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def record(module, inputs, output):
            self.counts[index] += torch.bincount(output[0].reshape(-1), minlength=self.experts)
        return record

    def end_step(self) -> dict:
        """This step's local counts for the metrics record; they join the history and the counters restart."""
        counts = torch.stack(self.counts).numpy().copy()
        self.history.append(counts)
        for c in self.counts:
            c.zero_()
        return {"expert_loads": counts.tolist(), "moe_rank_tokens": [int(l.last_rank_load) for l in self.layers]}

    def placement(self) -> np.ndarray:
        return np.stack([layer.phy2log.numpy() for layer in self.layers])

    def replace(self, method: str, window: int, move_cost: float, optimizer) -> dict:
        """Re-place every layer from the last ``window`` steps of loads, summed over ranks; returns a summary."""
        from dspark_lab.moe import eplb_reference
        from dspark_lab.moe.balance import rebalance_experts
        from dspark_lab.moe.measures import balancedness
        from dspark_lab.moe.placement import move_experts

        recent = list(self.history)[-window:]
        loads = torch.from_numpy(np.sum(recent, axis=0)).double()
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(loads, group=self.group)
        loads = loads.numpy()
        current = self.placement()
        replicas = current.shape[1]
        if method == "eplb":
            new = eplb_reference.rebalance_experts(torch.from_numpy(loads), replicas, 1, 1, self.world)[0].numpy()
        else:
            new = rebalance_experts(loads, replicas, 1, 1, self.world, current=current, move_cost=move_cost)[0]
            new = np.asarray(new)
        before, after = balancedness(loads, current, self.world), balancedness(loads, new, self.world)
        received = move_experts(self.layers, optimizer, current, new, self.rank, self.world, group=self.group)
        return {"balancedness_before": before, "balancedness_after": after, "received": received,
                "steps_of_load": len(recent)}


def refusal(job) -> str | None:
    if job.moe is None:
        return "the model has no expert-parallel MoE layers (dspark_lab.moe.model.ExpertParallelMoE)"
    return None


def step_end(job, step: int) -> dict | None:
    """Record loads; re-place when the policy says this step is due (the same step on every rank)."""
    if job.moe is None:
        return None
    record = job.moe.end_step()
    method = job.policies.get("moe.placement", "static")
    if method != "static" and step % int(job.policies["moe.placement_interval"]) == 0:
        summary = job.moe.replace(method, int(job.policies["moe.placement_window"]),
                                  float(job.policies["moe.move_cost"]), job.optimizer)
        job.record_event("placement", step=step + 1, rank=job.rank, key="moe.placement", new=method,
                         reason=f"balancedness {summary['balancedness_before']:.3f} -> "
                                f"{summary['balancedness_after']:.3f}, {summary['received']} expert states "
                                f"received", **summary)
    return record
