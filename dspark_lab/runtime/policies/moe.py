"""MoE policies: record per-layer expert loads every step and re-place experts from them (``moe.placement``).

The MoE layers are the ones a script registered (``dspark_lab.attach(..., moe_layers=[...])``), else DSpark's own
:class:`dspark_lab.examples.moe_model.ExpertParallelMoE` found in the model. A layer must meet the contract in
docs/runtime.md (router loads out, placement in): ``config.experts``, a ``router`` submodule whose forward output's
first element holds the chosen expert per token, ``phy2log`` (slot -> expert), ``experts`` (this rank's slots,
modules of one shape), ``set_placement(phy2log)`` and ``last_rank_load``. A layer with an ``expert_load`` tensor
(``[experts]`` int64, as :class:`~dspark_lab.examples.moe_model.ExpertParallelMoE` has) counts its own assignments
into it in its forward; the runtime reads and zeroes it at each boundary. Otherwise a forward hook on its router
counts this rank's assignments per expert, on the router's device. Each step's counts reach the host with the step's
loss, one step late (:mod:`dspark_lab.runtime.step_reads`), and the record carries them. Every
``moe.placement_interval`` steps, at the boundary,
each rank sums its last ``moe.placement_window`` steps of counts, all ranks all-reduce that window (one collective
per re-placement, none in between), and rank 0 computes the new placement and broadcasts it: DeepSeek's EPLB
(:mod:`dspark_lab.moe.eplb_reference`) or ours (:func:`dspark_lab.moe.rebalance_experts`, weighing experts moved
by ``moe.move_cost``). :func:`dspark_lab.moe.placement.move_experts` then moves expert weights and optimizer state
between ranks: the math is unchanged, only which rank computes which expert.

Under ``torch.compile`` (docs/moe.md, tests/test_moe_compile.py): the count is one in-graph ``scatter_add_`` into a
tensor, whose value Dynamo does not guard, so counting adds no graph break and no recompile. The hook reaches its
layer's counter through a one-element list, not an index: Dynamo guards a hook's closure ints by value, so an index
made it compile the layer (or block) code once per MoE layer, past its recompile limit (8) at 8 layers. Dynamo
ignores a hook added to a module it has already traced (``torch._dynamo.config.skip_nnmodule_hook_guards``): such a
layer's loads stay 0, and a re-placement from a window in which a layer counted nothing is refused, naming why.
"""

from __future__ import annotations

import sys
from collections import deque

import numpy as np
import torch
import torch.distributed as dist

from dspark_lab.errors import PolicyError
from dspark_lab.runtime.module_hooks import RuntimeHook


def moe_layers(model) -> list:
    """The model's expert-parallel MoE layers (empty when the MoE package is not in use)."""
    module = sys.modules.get("dspark_lab.examples.moe_model")
    if module is None or model is None:
        return []
    return [m for m in model.modules() if isinstance(m, module.ExpertParallelMoE)]


class StepLoads:
    """One step's local loads ``[layers, experts]``: on the router's device until the step boundary's late read
    (:mod:`dspark_lab.runtime.step_reads`) brings them to the host, then on the host only."""

    __slots__ = ("device", "host")

    def __init__(self, loads: torch.Tensor):
        self.device: torch.Tensor | None = loads
        self.host: np.ndarray | None = None

    def landed(self, value) -> None:
        self.host, self.device = np.asarray(value, dtype=np.int64), None

    def on_host(self) -> np.ndarray:
        """The loads on the host; when the late read has not landed yet this waits for the device (a sync)."""
        if self.host is None:
            self.landed(self.device.cpu().numpy())
        return self.host


def counting_hook(box: list):
    """A forward hook for a router: adds its output's chosen experts to ``box[0]`` (``[experts]`` int64), in place.

    Traced into a compiled graph this is one ``scatter_add_`` on a graph input (a mutation, guarded by shape and
    device, not by value). A router on another device than the counter (the model moved after the hook was put on)
    gets a new counter there once. Eager, a forward that activation checkpointing re-runs in backward is not counted
    again; a compiled graph cannot tell (the check would break the graph), so a hooked layer inside a block compiled
    on its own *and* checkpointed counts twice (give such a layer an ``expert_load`` counter it fills eagerly)."""

    def record(module, inputs, output):
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            return  # a checkpoint's recompute in backward: this forward was counted when it ran
        chosen = output[0].reshape(-1)
        counts = box[0]
        if counts.device != chosen.device:
            counts = box[0] = torch.zeros_like(counts, device=chosen.device)
        counts.scatter_add_(0, chosen.long(), torch.ones_like(chosen, dtype=torch.int64))

    return record


def _own_counter(layer) -> bool:
    return isinstance(getattr(layer, "expert_load", None), torch.Tensor)


def _device_of(module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


class ExpertPlacement:
    """One rank's load recorder and re-placer for a model's MoE layers.

    The counts stay on the router output's device (``scatter_add_``: ``torch.bincount`` on CUDA reads the largest
    index on the host, a sync per call); each step's loads reach the host with the step's loss, one step late.
    """

    def __init__(self, layers, rank: int, world: int, group=None):
        self.layers, self.rank, self.world, self.group = layers, rank, world, group
        self.experts = layers[0].config.experts
        # per layer: None where the layer counts into its own expert_load, else the router hook's [counter]
        self.boxes: list[list[torch.Tensor] | None] = []
        for layer in layers:
            if _own_counter(layer):
                self.boxes.append(None)
                continue
            box = [torch.zeros(self.experts, dtype=torch.int64, device=_device_of(layer.router))]
            layer.router.register_forward_hook(RuntimeHook(counting_hook(box)))
            self.boxes.append(box)
        self.history: deque[StepLoads] = deque(maxlen=10_000)  # oldest first

    def counters(self) -> list[torch.Tensor]:
        """Each layer's counter now (a layer's own buffer is looked up again: ``model.to()`` replaces buffers)."""
        return [layer.expert_load if box is None else box[0] for layer, box in zip(self.layers, self.boxes)]

    def end_step(self, reader=None) -> dict:
        """This step's local counts for the metrics record; they join the history and the counters restart.

        ``reader`` (the job's :class:`~dspark_lab.runtime.metering.Meter`) reads values on a device at a later
        boundary into this step's record; without one, or for CPU values, they are read now.
        """
        counters = self.counters()
        device = counters[0].device
        loads = torch.stack([c.to(device) for c in counters])
        for counts in counters:  # stack copied them: the counters restart in place (stream-ordered on CUDA)
            counts.zero_()
        entry = StepLoads(loads)
        self.history.append(entry)
        record = {}
        if reader is not None and reader.read_later("expert_loads", loads, entry.landed):
            record["expert_loads"] = None  # filled in when the step's late read lands
        else:
            record["expert_loads"] = entry.on_host().tolist()
        tokens = [layer.last_rank_load for layer in self.layers]
        if any(isinstance(t, torch.Tensor) for t in tokens):
            stacked = torch.stack([torch.as_tensor(t, dtype=torch.int64, device=device).reshape(()) for t in tokens])
            if reader is not None and reader.read_later("moe_rank_tokens", stacked):
                record["moe_rank_tokens"] = None
            else:
                record["moe_rank_tokens"] = stacked.tolist()
        else:
            record["moe_rank_tokens"] = [int(t) for t in tokens]
        return record

    def placement(self) -> np.ndarray:
        return np.stack([layer.phy2log.numpy() for layer in self.layers])

    def replace(self, method: str, window: int, move_cost: float, optimizer) -> dict:
        """Re-place every layer from the last ``window`` steps of loads, summed over ranks; returns a summary."""
        from dspark_lab.moe import eplb_reference
        from dspark_lab.moe.balance import rebalance_experts
        from dspark_lab.moe.measures import balancedness
        from dspark_lab.moe.placement import move_experts, placement_from_rank0

        recent = list(self.history)[-window:]
        # the steps whose late read has not landed yet (this one at least on CUDA) are waited for: one sync, on
        # the re-placement steps only
        loads = torch.from_numpy(np.sum([entry.on_host() for entry in recent], axis=0)).double()
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(loads, group=self.group)
        loads = loads.numpy()
        silent = [i for i, row in enumerate(loads) if not row.any()]
        if silent:  # re-placing from no loads would be arbitrary; every rank sees the same sums, so all refuse
            more = f" and {len(silent) - 1} more" if len(silent) > 1 else ""
            raise PolicyError(f"moe_layers[{silent[0]}]{more} counted no expert loads in the last {len(recent)} "
                              "steps: its router hook did not run (torch.compile ignores a hook added after it "
                              "traced the layer: register the layers with dspark_lab.attach(moe_layers=...) before "
                              "the first forward, or give each an expert_load counter); placement unchanged")
        current = self.placement()
        replicas = current.shape[1]

        def compute() -> np.ndarray:  # on rank 0 only: the balancer's time budget could split the ranks' answers
            if method == "eplb":
                return eplb_reference.rebalance_experts(torch.from_numpy(loads), replicas, 1, 1, self.world)[0].numpy()
            return np.asarray(rebalance_experts(loads, replicas, 1, 1, self.world, current=current,
                                                move_cost=move_cost)[0])

        new = placement_from_rank0(compute, current.shape, self.group)
        before, after = balancedness(loads, current, self.world), balancedness(loads, new, self.world)
        received = move_experts(self.layers, optimizer, current, new, self.rank, self.world, group=self.group)
        return {"balancedness_before": before, "balancedness_after": after, "received": received,
                "steps_of_load": len(recent)}


REQUIRED = ("config", "router", "phy2log", "experts", "set_placement", "last_rank_load")


def check_layers(layers) -> list:
    """The registered layers, or a one-line PolicyError naming the first missing part of the contract."""
    for index, layer in enumerate(layers):
        missing = [name for name in REQUIRED if not hasattr(layer, name)]
        if missing:
            raise PolicyError(f"moe_layers[{index}]: {type(layer).__name__} lacks {', '.join(missing)} "
                              "(the MoE layer contract in docs/runtime.md)")
    return layers


class MoEState:
    """The MoE policies' per-job state (created by ``dspark_job_started``): the placement recorder, once the
    model (or a registration) shows MoE layers."""

    def __init__(self):
        self.placement: ExpertPlacement | None = None

    def on_model(self, job) -> None:
        layers = job.registered.get("moe_layers") or moe_layers(job.model)
        if layers and self.placement is None:
            self.placement = ExpertPlacement(check_layers(layers), job.rank, job.world)


def _placement(job):
    state = job.state.get("moe")
    return state.placement if state is not None else None


def refusal(job) -> str | None:
    if _placement(job) is None:
        return ("the model has no MoE layers: none registered with dspark_lab.attach(moe_layers=...) and no "
                "dspark_lab.examples.moe_model.ExpertParallelMoE in the model")
    return None


def step_end(job, step: int) -> dict | None:
    """Record loads; re-place when the policy says this step is due (the same step on every rank)."""
    placement = _placement(job)
    if placement is None:
        return None
    record = placement.end_step(getattr(job, "meter", None))
    method = job.policies.get("moe.placement", "static")
    if method != "static" and step % int(job.policies["moe.placement_interval"]) == 0:
        try:
            summary = placement.replace(method, int(job.policies["moe.placement_window"]),
                                        float(job.policies["moe.move_cost"]), job.optimizer)
        except PolicyError as refused:
            job.record_event("error", step=step, rank=job.rank, key="moe.placement", reason=str(refused))
            return record
        job.record_event("placement", step=step + 1, rank=job.rank, key="moe.placement", new=method,
                         reason=f"balancedness {summary['balancedness_before']:.3f} -> "
                                f"{summary['balancedness_after']:.3f}, {summary['received']} expert states "
                                f"received", **summary)
    return record
