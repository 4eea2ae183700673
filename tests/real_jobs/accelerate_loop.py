"""A hand-written Hugging Face Accelerate loop: ``Accelerator.prepare`` (DDP), gradient accumulation with
``accelerator.accumulate`` (DDP's ``no_sync`` on the first micro-batch), ``clip_grad_norm_``, an LR scheduler,
``gather`` for the printed loss and ``save_state`` at the end. Prints ``step N loss X`` from rank 0.
``torchrun --nproc-per-node 2 accelerate_loop.py --steps 30 --out DIR``
"""

import argparse
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--step-sleep", type=float, default=0.0)
parser.add_argument("--out", required=True)
args = parser.parse_args()

accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
set_seed(0)
WIDTH = 64
model = nn.Sequential(nn.Linear(16, WIDTH),
                      *[nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))
                        for _ in range(4)],
                      nn.Linear(WIDTH, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10, gamma=0.5)
n = 4 * 16 * 2 * args.steps  # enough micro-batches of 16 for every step on 2 ranks
data = torch.utils.data.TensorDataset(torch.randn(n, 16, generator=torch.Generator().manual_seed(0)),
                                      torch.randn(n, 1, generator=torch.Generator().manual_seed(1)))
loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(2))
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

step = 0
for x, y in loader:
    with accelerator.accumulate(model):
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    if accelerator.sync_gradients:
        step += 1
        accelerator.print(f"step {step} loss {accelerator.gather(loss.detach()).mean().item():.8f}", flush=True)
        time.sleep(args.step_sleep)
    if step >= args.steps:
        break
accelerator.wait_for_everyone()
accelerator.save_state(args.out)
