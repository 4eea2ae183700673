"""A single-process script whose blocks sit in a mixed container, nn.Sequential(Linear, Block x4, Linear), and that
takes a while to build before its first optimizer step (a `set` can arrive before the runtime found the model)."""
import sys
import time

import torch
from residual import mixed_model


time.sleep(float(sys.argv[2]))  # "loading data"
model = mixed_model(16, 64)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(int(sys.argv[1])):
    loss = model(torch.randn(8, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    time.sleep(0.02)
