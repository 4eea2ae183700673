"""MoE expert placement: replicate hot experts, place replicas on GPUs, and move them live.

``rebalance_experts`` has EPLB's interface (see :mod:`dspark_lab.moe.balance`); ``eplb_reference`` is the
baseline it is measured against; ``placement`` moves expert weights and optimizer state between ranks.
"""

from dspark_lab.moe.balance import balancedness, rebalance_experts, same_gpu_duplicates

__all__ = ["balancedness", "rebalance_experts", "same_gpu_duplicates"]
