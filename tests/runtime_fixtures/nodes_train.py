"""DDP on gloo, 4 blocks; after every step each rank logs the policies in force to $NODES_LOG/rank<R>.jsonl.

argv: steps, sleep per step; `--die-at STEP` makes global rank 3 exit with code 1 at that step in the first group.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from dspark_lab.runtime.attach import Job


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


steps, pause = int(sys.argv[1]), float(sys.argv[2])
die_at = int(sys.argv[sys.argv.index("--die-at") + 1]) if "--die-at" in sys.argv else None
dist.init_process_group("gloo")
rank = dist.get_rank()
restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), *[Block() for _ in range(4)],
                                                          nn.Linear(16, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
log = open(os.path.join(os.environ["NODES_LOG"], f"rank{rank}.jsonl"), "a")
for step in range(1, steps + 1):
    loss = model(torch.randn(8, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    policies = dict(Job.current.policies)  # in force from the next step on
    log.write(json.dumps({"restart": restart, "step": step, "policies": policies}) + "\n")
    log.flush()
    if die_at is not None and restart == 0 and rank == 3 and step == die_at:
        os._exit(1)
    time.sleep(pause)
dist.destroy_process_group()
