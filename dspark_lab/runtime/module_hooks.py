"""What the runtime hangs on a script's modules, and what a copy of such a module gets instead.

The runtime adds forward hooks (batch counting, offload grouping, MoE load counting) and, for activation
checkpointing, an instance ``forward``. Those hold the job: its locks, streams and run directory, which neither
``copy.deepcopy`` nor pickle can copy. A script that copies its model while it trains (an EMA model, a "best so
far" snapshot) or saves it whole (``torch.save(model)``) must get a plain module back, not a crash and not a
second module that counts, offloads or checkpoints for the job:

- a copied or unpickled hook is :func:`inert` (it does nothing);
- a copied or unpickled checkpointed ``forward`` is the copy's own class ``forward`` (or the script's own instance
  ``forward`` that checkpointing had replaced). Pickled, it is ``getattr(module, "forward")``, so loading the
  module does not import dspark_lab; a pickled hook does (``state_dict()`` saves carry neither).
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable


def inert(*args: Any, **kwargs: Any) -> None:
    """A hook that does nothing: what a copied or unpickled module holds in place of a runtime hook."""
    return None


def _inert() -> Callable[..., None]:
    return inert


class RuntimeHook:
    """A module hook of the runtime's: called as ``function``; copied or pickled as :func:`inert`."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[..., Any]):
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return inert

    def __reduce__(self):
        return _inert, ()


class InstanceForward:
    """An instance ``forward`` the runtime put on ``module`` (checkpointing), calling ``function(*args)``.
    ``replaced`` is the script's own instance ``forward`` it shadows, if any: what a copy keeps instead."""

    __slots__ = ("module", "function", "replaced")

    def __init__(self, module, function: Callable[..., Any], replaced: Callable[..., Any] | None):
        self.module, self.function, self.replaced = module, function, replaced

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __deepcopy__(self, memo: dict):
        if self.replaced is not None:
            return copy.deepcopy(self.replaced, memo)
        # deepcopy makes the module's copy before its attributes, so the copy is in memo already; its __dict__ is
        # still empty, so this is its class's forward
        twin = memo.get(id(self.module))
        return getattr(twin, "forward") if twin is not None else self

    def __reduce__(self):
        if self.replaced is not None:
            return functools.partial, (self.replaced,)
        return getattr, (self.module, "forward")  # unpickled before the module's attributes: its class's forward
