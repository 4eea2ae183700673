"""A DDP script whose rank 1 raises at step 4 (a crashed rank), or with ``exit`` calls ``sys.exit(3)`` there, or
with ``kill`` kills itself with SIGKILL there (what ``kill -9`` or the OOM killer does: the rank writes nothing)."""
import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

dist.init_process_group("gloo")
model = nn.parallel.DistributedDataParallel(nn.Linear(8, 8))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(100):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step == 3 and dist.get_rank() == 1:
        if sys.argv[1:] == ["exit"]:
            sys.exit(3)
        if sys.argv[1:] == ["kill"]:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("rank 1 crashed on purpose")
