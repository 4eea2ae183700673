"""A plain DDP script with the habits real training scripts have, none of them written for DSpark Lab:

- blocks holding BatchNorm, whose running statistics a training forward updates;
- gradient accumulation (two micro-batches per step, each loss divided by two);
- an EMA model made with ``copy.deepcopy`` and updated after every step, and a "latest" snapshot deep-copied after
  every step;
- fine-tuning in two phases: the head alone with one optimizer, then everything with a new one;
- ``torch.save(model)`` of the whole module at the end (rank 0).

Prints ``step N loss X`` per optimizer step (the step's loss: the two micro-batches' shares added), then the
BatchNorm and EMA state it ends with, so a run under ``dspark-lab run`` can be compared with plain torchrun.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear, self.norm = nn.Linear(width, width), nn.BatchNorm1d(width)

    def forward(self, x):
        return x + F.gelu(self.norm(self.linear(x)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-steps", type=int, default=6)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--step-sleep", type=float, default=0.05)
    parser.add_argument("--save", default="")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), *[Block(32) for _ in range(4)], nn.Linear(32, 4))
    ddp = nn.parallel.DistributedDataParallel(model)
    ema = copy.deepcopy(model)
    data = torch.Generator().manual_seed(1 + rank)
    step = 0
    latest = None

    def train(optimizer, steps: int) -> None:
        nonlocal step, latest
        for _ in range(steps):
            total = 0.0
            for _ in range(2):
                x = torch.randn(16, 16, generator=data)
                y = torch.randint(4, (16,), generator=data)
                loss = F.cross_entropy(ddp(x), y) / 2
                loss.backward()
                total += loss.item()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            latest = copy.deepcopy(model)
            with torch.no_grad():
                for kept, live in zip(ema.state_dict().values(), model.state_dict().values()):
                    kept.copy_(0.9 * kept + 0.1 * live if kept.is_floating_point() else live)
            if rank == 0:
                print(f"step {step} loss {total:.8f}", flush=True)
            time.sleep(args.step_sleep)

    train(torch.optim.SGD(model[-1].parameters(), lr=0.05), args.head_steps)
    train(torch.optim.AdamW(model.parameters(), lr=1e-3), args.steps)
    if rank == 0:
        norm = model[1].norm
        print(f"bn {norm.running_mean.sum().item():.8f} {norm.running_var.sum().item():.8f} "
              f"{int(norm.num_batches_tracked)}", flush=True)
        print(f"ema {sum(p.sum().item() for p in ema.parameters()):.8f}", flush=True)
        model.eval()
        latest.eval()
        probe = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
        print(f"latest matches {torch.equal(latest(probe), model(probe))}", flush=True)
        if args.save:
            torch.save(model, args.save)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
