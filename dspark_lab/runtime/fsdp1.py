"""FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``) as the runtime sees it: its units, the module each
unit wraps, the sizes of the parameters it flattened, and its settings for ``status``.

An FSDP1 unit owns ``forward``: it all-gathers its flat parameter, calls the module it wraps
(``_fsdp_wrapped_module``), frees the gathered parameter again (FULL_SHARD) and, before that module's backward,
gathers it once more (its pre-backward hook). What the runtime puts on the wrapped module (checkpointing's instance
``forward``) therefore runs with the weights gathered, in forward and in the recompute alike: torch's own recipe,
``apply_activation_checkpointing`` after wrapping. Put on the unit itself it would replace FSDP's forward.

With ``use_orig_params=False`` (the default) the original parameters are gone from their modules (plain tensor
views of the flat parameter stand in for them during forward), so a walk counting ``parameters()`` finds none in a
block; their sizes come from the flat parameters' own records (``_param_infos``, ``_numels``).

Recognised by class name, never imported: a job without FSDP1 pays nothing for it.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def is_unit(module: nn.Module) -> bool:
    """True for an FSDP1 unit (a ``FullyShardedDataParallel`` wrapper)."""
    return "_fsdp_wrapped_module" in module._modules and \
        any(cls.__name__ == "FullyShardedDataParallel" for cls in type(module).__mro__)


def inner(module: nn.Module) -> nn.Module:
    """The module an FSDP1 unit wraps (through nested units), or ``module`` itself when it is no unit."""
    while is_unit(module):
        module = module._modules["_fsdp_wrapped_module"]
    return module


def units(model: nn.Module) -> list[nn.Module]:
    """Every FSDP1 unit in ``model``, outermost first."""
    return [m for m in model.modules() if is_unit(m)]


def flattened_numels(model: nn.Module) -> dict[int, int]:
    """``id(module) -> elements`` of that module's own parameters that FSDP1 flattened (unsharded, no padding)."""
    found: dict[int, int] = {}
    for unit in units(model):
        flat = getattr(getattr(unit, "_handle", None), "flat_param", None)
        for info, numel in zip(getattr(flat, "_param_infos", ()), getattr(flat, "_numels", ())):
            found[id(info.module)] = found.get(id(info.module), 0) + numel
    return found


def describe(model: nn.Module) -> dict[str, Any] | None:
    """``status``'s data-parallel entry for an FSDP1 model (read from its outermost unit), or None without FSDP1."""
    found = units(model)
    if not found:
        return None
    root = found[0]
    strategy = getattr(root, "sharding_strategy", None)
    mp = getattr(root, "mixed_precision", None)
    param_dtype, reduce_dtype = getattr(mp, "param_dtype", None), getattr(mp, "reduce_dtype", None)
    return {"kind": "fsdp1", "units": len(found), "world": getattr(root, "world_size", None),
            "sharding_strategy": getattr(strategy, "name", None),
            "use_orig_params": getattr(root, "_use_orig_params", None),
            "mixed_precision": {"param_dtype": str(param_dtype) if param_dtype else None,
                                "reduce_dtype": str(reduce_dtype) if reduce_dtype else None}}
