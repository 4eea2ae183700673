"""MoE expert placement: replicate hot experts, place replicas on GPUs, and move them live.

``rebalance_experts`` has EPLB's interface (see :mod:`dspark_lab.moe.balance`); ``eplb_reference`` is the
baseline it is measured against; ``placement`` moves expert weights and optimizer state between ranks.
"""

from __future__ import annotations

_LAZY = ("balancedness", "rebalance_experts", "same_gpu_duplicates")


def __getattr__(name: str):
    # balance imports torch; `dspark-lab moe ...` and the CLI's parser import this package without needing it.
    if name in _LAZY:
        from dspark_lab.moe import balance

        return getattr(balance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["balancedness", "rebalance_experts", "same_gpu_duplicates"]
