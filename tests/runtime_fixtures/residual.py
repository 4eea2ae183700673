"""The model the runtime's fixture scripts train: ``nn.Sequential(Linear, Block x N, Linear)`` whose residual MLP
blocks sit in a mixed container, as ordinary scripts put them."""

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def mixed_model(width: int, hidden: int, blocks: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, width), *[Block(width, hidden) for _ in range(blocks)], nn.Linear(width, 1))
