"""DDP on gloo, 4 blocks, for one-node restarts; after every step each rank logs the policies in force to
$RESTART_LOG/rank<R>.jsonl with its group (torchrun's restart count on this one node).

argv: steps of a restarted group, sleep per step. In the first group, rank 1 kills itself with SIGKILL three steps
after it sees memory.activation_checkpointing changed (torchrun then restarts the group); the first group never
ends by itself before that (at most 100,000 steps). Rank 1 of a restarted group starts its process group 2 s
after rank 0.
"""
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from residual import mixed_model, step_and_log


steps, pause = int(sys.argv[1]), float(sys.argv[2])
group = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if group and os.environ["RANK"] == "1":
    time.sleep(2)  # ranks rarely start together: rank 0 of a restarted group reaches the process group first
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(mixed_model(64, 256))
opt = torch.optim.SGD(model.parameters(), lr=0.001)
log = open(os.path.join(os.environ["RESTART_LOG"], f"rank{rank}.jsonl"), "a")
log.write(json.dumps({"group": group, "start": True, "pid": os.getpid()}) + "\n")
log.flush()
changed_at = None
for step in range(1, (steps if group else 100_000) + 1):
    policies = step_and_log(model, opt, 64, log, group=group, step=step)
    if changed_at is None and policies["memory.activation_checkpointing"] != "none":
        changed_at = step
    if group == 0 and rank == 1 and changed_at is not None and step == changed_at + 3:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(pause)
dist.destroy_process_group()
