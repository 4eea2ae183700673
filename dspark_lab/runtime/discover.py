"""Find what the runtime needs in a script it did not write: the model behind an optimizer and its repeated blocks."""

from __future__ import annotations

import gc
from collections import Counter

import torch
from torch import nn


def model_of_optimizer(optimizer: torch.optim.Optimizer) -> nn.Module | None:
    """The outermost live module that owns the most of the optimizer's parameters (one scan of the heap, once)."""
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    best, best_key = None, (0, 0)
    # type(), not isinstance(): the heap holds dead weak proxies (isinstance raises) and deprecated module proxies
    modules = [obj for obj in gc.get_objects() if issubclass(type(obj), nn.Module)]
    for obj in modules:
        owned = sum(id(p) in wanted for p in obj.parameters())
        key = (owned, sum(1 for _ in obj.modules()))
        if owned and key > best_key:
            best, best_key = obj, key
    return best


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) if type(model).__name__ == "DistributedDataParallel" else None
        inner = inner or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The largest ``nn.ModuleList``/``nn.Sequential`` whose members share one type (a transformer's layers)."""
    best: list[nn.Module] = []
    best_key = (1, 0)
    for module in model.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        members = list(module.children())
        if len(members) < 2:
            continue
        kind, count = Counter(type(m) for m in members).most_common(1)[0]
        if count != len(members) or not any(True for _ in members[0].parameters()):
            continue
        key = (count, sum(p.numel() for m in members for p in m.parameters()))
        if key > best_key:
            best, best_key = members, key
    return best


def is_fsdp(model: nn.Module) -> bool:
    """True for a model sharded by FSDP (the wrapper class or fully_shard's FSDPModule)."""
    names = {cls.__name__ for m in model.modules() for cls in type(m).__mro__}
    return bool(names & {"FullyShardedDataParallel", "FSDPModule"})


def is_compiled(model: nn.Module) -> bool:
    return type(model).__name__ == "OptimizedModule" or hasattr(model, "_orig_mod")
