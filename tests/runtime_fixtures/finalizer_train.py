"""A DDP script that spends most of each step in a finalizer (a ``__del__`` that sleeps), so a Ctrl-C's
KeyboardInterrupt lands there, where Python only prints "Exception ignored" and goes on."""
import time

import torch
import torch.distributed as dist
import torch.nn as nn


class SlowToRelease:
    def __del__(self):
        time.sleep(0.05)


dist.init_process_group("gloo")
model = nn.parallel.DistributedDataParallel(nn.Linear(8, 8))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(100000):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    SlowToRelease()  # dropped at once: its __del__ runs here
