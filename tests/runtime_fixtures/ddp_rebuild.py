"""One-rank DDP whose parameters are registered in the reverse of the order they are used: after the first step
DDP rebuilds its buckets in gradient-ready order, so bucket 0 changes size (Lightning hit this with bf16 sync).
Runs the runtime's gradient-sync dispatcher in ``sys.argv[1]`` mode and prints each step's bucket sizes."""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from dspark_lab.runtime.policies.comm import GradSync, install_on_ddp


class Reversed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.b, self.a = nn.Linear(64, 8), nn.Linear(256, 64), nn.Linear(8, 256)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=0, world_size=1)
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(Reversed(), bucket_cap_mb=0.05)
sync = GradSync(make_collective=None)
install_on_ddp(model, sync)
sync.set_mode(sys.argv[1])
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(4):
    model(torch.randn(4, 8)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    print("step", step, sorted(r.numel() for r in sync._impl.residuals.values()), flush=True)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # gloo's threads can abort a loaded interpreter's teardown after the work is done
