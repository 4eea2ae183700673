"""Find what the runtime needs in a script it did not write: the model behind an optimizer, its repeated blocks,
and which wrappers (DDP, FSDP2, FSDP1, torch.compile) sit on it.

Blocks are the longest run of consecutive same-type children with parameters inside any container of the model
(``nn.ModuleList``, ``nn.ModuleDict``, ``nn.Sequential`` or a plain module's attributes), runs of modules with
layers of their own before runs of single layers (``Linear``): a transformer's layers
(HF ``model.transformer.h`` / ``model.model.layers``, torchtitan's ``model.layers`` ModuleDict) as well as the four
``Block``s of ``nn.Sequential(Linear, Block, Block, Block, Block, Linear)``. Activation checkpointing (Chen et al.
2016) wraps these. FSDP1 units are looked through (:mod:`.fsdp1`): a block each unit wraps is the module inside the
unit, and blocks inside one unit's flat parameter count the parameters FSDP1 took from them.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch
from torch import nn

from dspark_lab.runtime import fsdp1


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
        inner = inner or model.__dict__.get("_modules", {}).get("_orig_mod")
        if inner is None:
            return model
        model = inner


def _is_fsdp2_class(cls: type) -> bool:
    return any(c.__name__ == "FSDPModule" for c in cls.__mro__)


def is_optimized_module(module: nn.Module) -> bool:
    """A ``torch.compile(module)`` wrapper, also once ``fully_shard`` made it an ``FSDPOptimizedModule`` (torchtitan
    compiles each block, then shards it)."""
    return any(cls.__name__ == "OptimizedModule" for cls in type(module).__mro__) and "_orig_mod" in module._modules


def script_module(module: nn.Module) -> nn.Module:
    """The module the script wrote under FSDP1 units and compile's OptimizedModule (FSDP2 keeps the module itself)."""
    while True:
        if is_optimized_module(module):
            module = module._modules["_orig_mod"]
        elif fsdp1.is_unit(module):
            module = fsdp1.inner(module)
        else:
            return module


def user_class(module: nn.Module) -> type:
    """The class the script wrote: FSDP2's ``FSDP<Name>`` subclass, an FSDP1 unit and compile's OptimizedModule are
    looked through."""
    module = script_module(module)
    return next((cls for cls in type(module).__mro__ if not _is_fsdp2_class(cls)), type(module))


@dataclass
class Blocks:
    """The repeated blocks found: the modules, their class name, where they sit, and why they were chosen."""

    modules: list[nn.Module] = field(default_factory=list)
    kind: str = ""
    path: str = ""
    why: str = "no container holds two or more consecutive same-type modules with parameters"

    def as_dict(self) -> dict:
        return {"type": self.kind or None, "count": len(self.modules), "path": self.path or None, "why": self.why}


def _numel(module: nn.Module, flattened: dict[int, int]) -> int:
    """Elements of ``module``'s parameters (a shared one once), those FSDP1 flattened at their unsharded size."""
    total, seen = 0, set()
    for m in module.modules():
        if id(m) in flattened:
            total += flattened[id(m)]
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen and not getattr(p, "_is_flat_param", False):
                seen.add(id(p))
                total += p.numel()
    return total


def param_count(model: nn.Module) -> int:
    """Elements of the model's parameters: DTensors at their global size, FSDP1's flattened ones unsharded."""
    return _numel(model, fsdp1.flattened_numels(model))


def _path(root: str, name: str) -> str:
    """``root.name`` without FSDP1's ``_fsdp_wrapped_module`` steps (the names FSDP1 itself reports)."""
    parts = [part for part in name.split(".") if part and part != "_fsdp_wrapped_module"]
    return ".".join([root, *parts])


def _holds_layers(module: nn.Module, flattened: dict[int, int]) -> bool:
    """Whether ``module`` (under FSDP1 / compile wrappers) has a child with parameters: a block, not one layer."""
    return any(_numel(child, flattened) for child in script_module(module).children())


def find_blocks(model: nn.Module, root: str = "model") -> Blocks:
    """The longest run of consecutive same-type children (with parameters) inside any module of ``model``.

    A run of modules that hold layers of their own beats any run of single layers (a small Llama's 3 decoder
    layers, not the 4 ``Linear`` projections inside one layer's attention: checkpointing a lone layer keeps its
    input anyway). Ties go to the run holding more parameters. ``path`` names the container (``model.layers``);
    a run that is only part of its container gets a slice (``model[1:5]``). A run of FSDP1 units gives the modules
    they wrap.
    """
    best, best_key = Blocks(), (False, 1, 0)
    flattened = fsdp1.flattened_numels(model)
    for name, container in model.named_modules():
        children = list(container.children())
        start = 0
        while start < len(children):
            kind = user_class(children[start])
            end = start + 1
            while end < len(children) and user_class(children[end]) is kind:
                end += 1
            run = children[start:end]
            if len(run) >= 2 and _numel(run[0], flattened):
                key = (_holds_layers(run[0], flattened), len(run), sum(_numel(m, flattened) for m in run))
                if key > best_key:
                    path = _path(root, name)
                    if len(run) != len(children):
                        path += f"[{start}:{end}]"
                    best_key = key
                    best = Blocks([fsdp1.inner(m) for m in run], kind.__name__, path,
                                  f"longest run of same-type modules with parameters: {len(run)} x {kind.__name__} "
                                  f"at {path}")
            start = end
    return best


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    return find_blocks(model).modules


def fsdp2_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module ``fully_shard`` was applied to, root first."""
    return [(name, m) for name, m in model.named_modules() if _is_fsdp2_class(type(m))
            and hasattr(m, "_get_fsdp_state")]


def fsdp2_groups(module: nn.Module) -> list:
    """The FSDPParamGroups of one FSDP2 module (empty for a module that holds no parameters of its own)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        groups = [state._fsdp_param_group] if getattr(state, "_fsdp_param_group", None) is not None else []
    return list(groups)


def is_fsdp(model: nn.Module) -> bool:
    """True for a model sharded by FSDP (the wrapper class or fully_shard's FSDPModule)."""
    names = {cls.__name__ for m in model.modules() for cls in type(m).__mro__}
    return bool(names & {"FullyShardedDataParallel", "FSDPModule"})


def compiled_paths(model: nn.Module, compiled_ids: set[int] = frozenset(), root: str = "model") -> list[str]:
    """Paths of the modules of ``model`` that run compiled: ``torch.compile(module)`` (an OptimizedModule or a
    module the runtime saw passed to torch.compile) or ``module.compile()`` (a compiled ``_call_impl``).

    A ``torch.compile`` of a plain function (torchtitan compiles ``flex_attention`` at import) compiles no module
    and is not reported: it changes nothing the memory policies touch.
    """
    found: list[str] = []
    for name, module in model.named_modules():
        path = f"{root}.{name}" if name else root
        if any(path.startswith(f + ".") for f in found):  # inside a compiled module already named
            continue
        if (is_optimized_module(module) or id(module) in compiled_ids
                or module.__dict__.get("_compiled_call_impl") is not None):
            found.append(path)
    return found
