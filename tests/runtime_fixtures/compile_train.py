"""A single-process script (no torch.distributed) whose model goes through torch.compile."""
import sys
import time

import torch
import torch.nn as nn

model = torch.compile(nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3)]),
                      backend="eager")
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(int(sys.argv[1])):
    loss = model(torch.randn(8, 16)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    time.sleep(0.02)
