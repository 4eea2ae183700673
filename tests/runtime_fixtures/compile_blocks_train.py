"""A single-process script that compiles each block on its own, torchtitan's way (``torch.compile(block)`` put back
in its container), and writes its losses and Dynamo's graph count after every step to a JSON file.

Usage: compile_blocks_train.py STEPS OUT.json [STEP_SLEEP_S]
"""
import json
import sys
import time

import torch
from torch._dynamo.utils import counters

from residual import mixed_model

torch.manual_seed(0)
model = mixed_model(64, 256, 4)
for index in range(1, 5):
    model[index] = torch.compile(model[index], backend="aot_eager", fullgraph=True)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
steps, out, pause = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
losses, graphs = [], []
for step in range(steps):
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(step))
    loss = model(data).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    graphs.append(counters["stats"]["unique_graphs"])
    time.sleep(pause)
with open(out, "w") as f:
    json.dump({"losses": losses, "graphs": graphs}, f)
