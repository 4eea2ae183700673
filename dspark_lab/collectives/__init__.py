"""Collectives written on torch.distributed: the library's own ``builtin``, and ``ring`` and ``tree`` on
point-to-point send/recv. Backends offer them through ``dspark_make_collective``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # base imports torch; backends import this package when they register, long before any use
    from dspark_lab.collectives.base import Collective

STANDARD_NAMES = ("builtin", "ring", "tree")


def make_standard(name: str, group=None) -> Collective | None:
    """The standard collective called ``name`` over ``group``, or ``None`` for a name not among STANDARD_NAMES."""
    if name == "builtin":
        from dspark_lab.collectives.builtin import BuiltinCollective

        return BuiltinCollective(group)
    if name == "ring":
        from dspark_lab.collectives.ring import RingCollective

        return RingCollective(group)
    if name == "tree":
        from dspark_lab.collectives.tree import TreeCollective

        return TreeCollective(group)
    return None


def __getattr__(name: str):
    if name == "Collective":
        from dspark_lab.collectives.base import Collective

        return Collective
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Collective", "STANDARD_NAMES", "make_standard"]
