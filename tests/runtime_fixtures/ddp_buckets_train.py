"""A 2-rank DDP script that writes what DDP's reducer built: ``python ddp_buckets_train.py OUT.json``.

Eight 512x512 layers (8.4 MB of gradients): past its fixed 1 MB first bucket, DDP's default 25 MB cap puts
the rest in one bucket, a 2 MB cap in several.
The bucket sizes are what DDP hands a comm hook in the last step (after DDP rebuilt its buckets); under the runtime
the script's hook is routed through the runtime's own, as any script's would be.
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

dist.init_process_group("gloo")
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)]))
seen = []


def record(state, bucket):
    buffer = bucket.buffer()
    seen.append(buffer.numel() * buffer.element_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


model.register_comm_hook(None, record)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(3):  # DDP rebuilds its buckets after the first backward
    seen.clear()
    loss = model(torch.randn(4, 512)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
if dist.get_rank() == 0:
    with open(sys.argv[1], "w") as fh:
        json.dump({"bucket_bytes_cap": model.bucket_bytes_cap, "bucket_sizes": seen,
                   "gradient_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}, fh)
dist.destroy_process_group()
