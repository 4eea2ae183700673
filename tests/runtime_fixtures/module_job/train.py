"""Run as ``dspark-lab run -m module_job.train OUT [--steps N] [--step-sleep S]``: a 2-rank DDP loop over gloo.

Rank 0 writes OUT (JSON) before the first step: ``__name__``, ``sys.argv`` and this file's path, so a test sees the
module ran as ``python -m`` runs it (``__main__``, ``sys.argv[0]`` its file, its own arguments after it).
"""
import argparse
import json
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=100000)
parser.add_argument("--step-sleep", type=float, default=0.02)
args = parser.parse_args()

dist.init_process_group("gloo")
if dist.get_rank() == 0:
    with open(args.out, "w") as f:
        json.dump({"name": __name__, "argv": sys.argv, "file": __file__}, f)
model = nn.parallel.DistributedDataParallel(nn.Linear(8, 8))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(args.steps):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    time.sleep(args.step_sleep)
dist.destroy_process_group()
