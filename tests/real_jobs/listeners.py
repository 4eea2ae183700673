"""Rank 0 prints every socket its torchrun agent and the agent's children listen on (``ss -ltnp``)."""

import subprocess

import psutil
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(2):  # the runtime serves its control endpoint and sees a step boundary
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
if dist.get_rank() == 0:
    agent = psutil.Process().parent()
    pids = {p.pid for p in [agent, *agent.children(recursive=True)]}
    table = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=True).stdout
    print("\n".join(line for line in table.splitlines() if any(f"pid={pid}," in line for pid in pids)), flush=True)
dist.barrier()
dist.destroy_process_group()
