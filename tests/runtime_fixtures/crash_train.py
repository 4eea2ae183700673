"""A DDP script whose rank 1 raises at step 4 (a crashed rank), or with ``exit`` calls ``sys.exit(3)`` there, or
with ``kill`` kills itself with SIGKILL there (what ``kill -9`` or the OOM killer does: the rank writes nothing).

With ``finalizer`` no rank fails: every step ends in a finalizer (a ``__del__`` that sleeps), for as long as the run
is let go on, so a Ctrl-C's KeyboardInterrupt lands there, where Python only prints "Exception ignored" and goes on.
"""
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn


class SlowToRelease:
    def __del__(self):
        time.sleep(0.05)


mode = sys.argv[1] if len(sys.argv) > 1 else "raise"
dist.init_process_group("gloo")
model = nn.parallel.DistributedDataParallel(nn.Linear(8, 8))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(100000 if mode == "finalizer" else 100):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if mode == "finalizer":
        SlowToRelease()  # dropped at once: its __del__ runs here
    elif step == 3 and dist.get_rank() == 1:
        if mode == "exit":
            sys.exit(3)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("rank 1 crashed on purpose")
