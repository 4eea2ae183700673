"""Two ranks under plain torchrun opt in with dspark_lab.attach while someone who reaches torchrun's store (any local
user: it is unauthenticated) has written the run-directory key an earlier DSpark read from it. Rank 1 plays that
user, before either rank attaches; rank 0 attaches a moment later, so a rank that took the path from the store
would take the forged one. Each rank prints its run directory and trains two steps."""
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import dspark_lab

EVIL = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 1:
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=30))
    dist.PrefixStore("dspark/attach/", store).set("run_dir", EVIL)
    del store  # a store client still alive at interpreter exit aborts the process (std::terminate)
dist.barrier()
if rank == 0:
    time.sleep(1.0)
model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
job = dspark_lab.attach(model, opt, name="forged-store")
print(f"rank {rank} run dir {job.run_dir.path}", flush=True)
for _ in range(2):
    opt.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
dist.barrier()
dist.destroy_process_group()
