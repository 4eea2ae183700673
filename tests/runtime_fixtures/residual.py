"""The model the runtime's fixture scripts train: ``nn.Sequential(Linear, Block x N, Linear)`` whose residual MLP
blocks sit in a mixed container, as ordinary scripts put them; and a training step that logs the policies in force."""

import json

import torch
import torch.nn as nn

from dspark_lab.runtime.attach import Job


class Block(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def mixed_model(width: int, hidden: int, blocks: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, width), *[Block(width, hidden) for _ in range(blocks)], nn.Linear(width, 1))


def step_and_log(model, optimizer, batch: int, log, **tags) -> dict:
    """One training step on random inputs, then the policies in force from the next step on, logged as one JSON line
    with ``tags``; returns them."""
    loss = model(torch.randn(batch, 8)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    policies = dict(Job.current.policies)
    log.write(json.dumps({**tags, "policies": policies}) + "\n")
    log.flush()
    return policies
