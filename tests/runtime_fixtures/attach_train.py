"""A plain single-process script that opts in with dspark_lab.attach and trains until told to stop."""
import sys
import time

import torch
import torch.nn as nn

import dspark_lab as dl

model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)])
opt = torch.optim.SGD(model.parameters(), lr=0.01)
job = dl.attach(model, opt, name="attach-test")
print(job.run_dir.id, flush=True)
for step in range(int(sys.argv[1])):
    loss = model(torch.randn(8, 16)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    time.sleep(0.02)
