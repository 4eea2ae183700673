"""Live re-placement: move expert weights and optimizer state between ranks at a step boundary.

Given the old and new ``phy2log [layers, R]`` (GPU-major: rank ``r`` holds slots ``r*S .. r*S+S-1``), every rank
fills each of its slots with the weights *and* optimizer state (Adam's ``exp_avg``, ``exp_avg_sq``, ...) of the
slot's new logical expert: from a slot it already holds when it can, else received from the lowest rank that holds
that expert (point-to-point over the default group; one message per (layer, expert, receiving rank)). Parameter
objects keep their identity, so the optimizer needs no rebuilding, and since replicas of one expert are identical
(see :mod:`dspark_lab.examples.moe_model`) the training math is unchanged: only where experts live changes.

Every rank must call :func:`move_experts` with the same placements. Equal loads are not enough: the balancer's
exact stage stops on a wall-clock budget (:data:`dspark_lab.moe.exact.TIME_LIMIT_S`), so a slower rank can get
another answer. :func:`placement_from_rank0` therefore has rank 0 compute the placement and broadcasts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True, slots=True)
class Transfer:
    """One expert state sent from ``src`` rank's ``src_slot`` (local index) to rank ``dst``, for ``layer``."""

    layer: int
    expert: int
    src: int
    src_slot: int
    dst: int


def placement_from_rank0(compute: Callable[[], np.ndarray], shape: tuple[int, ...], group=None) -> np.ndarray:
    """Rank 0 of ``group`` calls ``compute()`` for the new ``phy2log`` of ``shape``; every rank returns rank 0's
    answer (one broadcast). If rank 0's computation fails, every rank raises, so none waits for a transfer."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return np.asarray(compute())
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    placement = torch.full(tuple(shape), -1, dtype=torch.int64, device=device)  # all -1: rank 0 failed
    failure = None
    if dist.get_rank(group) == 0:
        try:
            answer = np.asarray(compute())
            if answer.shape != tuple(shape):
                raise ValueError(f"placement shape {list(answer.shape)}, expected {list(shape)}")
            placement.copy_(torch.from_numpy(answer.astype(np.int64)))
        except Exception as exc:  # the other ranks are already waiting in the broadcast: tell them, then raise
            failure = exc
    dist.broadcast(placement, group=group, group_src=0)
    if failure is not None:
        raise failure
    if (placement < 0).any():
        raise RuntimeError("rank 0 failed to compute the new expert placement; the placement is unchanged")
    return placement.cpu().numpy()


def plan_transfers(old: np.ndarray, new: np.ndarray, world: int) -> list[Transfer]:
    """The messages a re-placement needs: each (layer, expert, rank) pair new in ``new`` comes from the lowest
    rank holding the expert in ``old``. Identical on every rank (a deterministic function of the placements)."""
    old, new = np.asarray(old), np.asarray(new)
    if old.shape != new.shape or old.shape[1] % world:
        raise ValueError(f"old and new placements must share a shape [layers, slots] with slots a multiple of "
                         f"world ({world}); got {list(old.shape)} and {list(new.shape)}")
    slots = old.shape[1] // world
    transfers = []
    for layer in range(old.shape[0]):
        held = old[layer].reshape(world, slots)
        for dst in range(world):
            for expert in sorted(set(new[layer].reshape(world, slots)[dst].tolist()) - set(held[dst].tolist())):
                src, src_slot = np.argwhere(held == expert)[0]
                transfers.append(Transfer(layer, expert, int(src), int(src_slot), dst))
    return transfers


def _state_tensors(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """The tensors that travel with an expert: its parameters, then each one's per-parameter optimizer tensors
    (same shape as the parameter; step counters and other scalars are shared by all parameters and stay)."""
    tensors = []
    for p in module.parameters():
        tensors.append(p.data)
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        tensors.extend(state[k] for k in sorted(state) if torch.is_tensor(state[k]) and state[k].shape == p.shape)
    return tensors


def _pack(module, optimizer) -> torch.Tensor:
    return torch.cat([t.reshape(-1).float() for t in _state_tensors(module, optimizer)])


def _unpack(flat: torch.Tensor, module, optimizer) -> None:
    offset = 0
    for t in _state_tensors(module, optimizer):
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def move_experts(layers, optimizer, old, new, rank: int, world: int, group=None) -> int:
    """Re-fill this rank's expert slots for placement ``new`` (``layers``: per layer an object with ``experts``, an
    ``nn.ModuleList`` of this rank's slots, and ``set_placement(phy2log_row)``). Returns how many (layer, expert)
    states this rank received."""
    old = np.asarray(old.cpu() if torch.is_tensor(old) else old)
    new = np.asarray(new.cpu() if torch.is_tensor(new) else new)
    transfers = plan_transfers(old, new, world)
    slots = old.shape[1] // world
    # Snapshot this rank's current slots first: a slot may be overwritten before another slot copies from it.
    snapshot = [[_pack(m, optimizer) for m in layer.experts] for layer in layers]
    received: dict[tuple[int, int], torch.Tensor] = {}
    ops = []
    for tag, t in enumerate(transfers):
        if t.src == rank:
            ops.append(dist.isend(snapshot[t.layer][t.src_slot], t.dst, group=group, tag=tag))
        elif t.dst == rank:
            buffer = torch.empty_like(snapshot[t.layer][0])
            received[(t.layer, t.expert)] = buffer
            ops.append(dist.irecv(buffer, t.src, group=group, tag=tag))
    for op in ops:
        op.wait()
    for i, layer in enumerate(layers):
        mine_old = old[i, rank * slots:(rank + 1) * slots].tolist()
        for s, module in enumerate(layer.experts):
            expert = int(new[i, rank * slots + s])
            source = snapshot[i][mine_old.index(expert)] if expert in mine_old else received[(i, expert)]
            _unpack(source, module, optimizer)
        layer.set_placement(torch.as_tensor(new[i]))
    return len(received)
