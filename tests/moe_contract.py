"""A script's own MoE layer for tests: the contract of docs/runtime.md ("The MoE layer contract") with every expert
in its one slot; subclasses give the router's choice and the forward."""

from __future__ import annotations

import torch
from torch import nn


class ContractMoE(nn.Module):
    """``config.experts``, ``router``, ``experts``, ``phy2log``, ``last_rank_load`` and ``set_placement``."""

    def __init__(self, router: nn.Module, experts: int, width: int = 16):
        super().__init__()
        self.config = type("Config", (), {"experts": experts})()
        self.router = router
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))
        self.phy2log = torch.arange(experts)
        self.last_rank_load = 0

    def set_placement(self, phy2log):
        self.phy2log = torch.as_tensor(phy2log)
