"""A DDP script the tuner was not written against: a residual MLP on seeded regression data, gloo, 2+ ranks.

    python ddp_mlp.py STEPS LOSS_FILE
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, width=48, depth=4):
        super().__init__()
        self.inp = nn.Linear(12, width)
        self.stack = nn.ModuleList(Residual(width) for _ in range(depth))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.stack:
            h = block(h)
        return self.out(h)


dist.init_process_group("gloo")
torch.manual_seed(7)
model = nn.parallel.DistributedDataParallel(Net())
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
gen = torch.Generator().manual_seed(100 + dist.get_rank())
losses = []
for _ in range(int(sys.argv[1])):
    x = torch.randn(32, 12, generator=gen)
    loss = (model(x).squeeze(-1) - x.sum(-1).sin()).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
if dist.get_rank() == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(losses, f)
dist.barrier()
dist.destroy_process_group()
