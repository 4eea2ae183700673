"""DDP on gloo, 4 blocks; after every step each rank logs the policies in force to $NODES_LOG/rank<R>.jsonl.

argv: steps (one number, or one per group of workers separated by commas, the last for every later group: 0 is the
first group, 1 the group after torchrun's first restart), sleep per step; with `--die-after-change G`, global rank 3
of group G exits with code 1 three steps after it sees comm.grad_sync changed (torchrun then restarts the group);
with `--sigkill-at N`, global rank 3 (on the second node) of the first group kills itself with SIGKILL after step N,
saying nothing; with `--exit-at N:R[:S]`, global rank R of the first group exits with code 1 after step N, and the
other ranks spend S seconds more on that step (a long step: they meet the closed connection only at their next
collective). Every line has the wall-clock `time` it was written; a start line also has `created`, when torchrun
started the process.
"""
import json
import os
import signal
import sys
import time

import psutil
import torch
import torch.distributed as dist
import torch.nn as nn

from residual import mixed_model, step_and_log


steps_by_group, pause = [int(n) for n in sys.argv[1].split(",")], float(sys.argv[2])
die_group = int(sys.argv[sys.argv.index("--die-after-change") + 1]) if "--die-after-change" in sys.argv else None
sigkill_at = int(sys.argv[sys.argv.index("--sigkill-at") + 1]) if "--sigkill-at" in sys.argv else None
exit_at = exit_rank = None
hold = 0.0
if "--exit-at" in sys.argv:
    exit_at, exit_rank, *rest = sys.argv[sys.argv.index("--exit-at") + 1].split(":")
    exit_at, exit_rank, hold = int(exit_at), int(exit_rank), float(rest[0]) if rest else 0.0
changed_at = None
dist.init_process_group("gloo")
rank = dist.get_rank()
# which group of workers this is (0, then 1 after a restart): torchrun's TORCHELASTIC_RESTART_COUNT can differ
# between nodes, so count this rank's earlier starts
path = os.path.join(os.environ["NODES_LOG"], f"rank{rank}.jsonl")
restart = sum('"start"' in line for line in open(path)) if os.path.exists(path) else 0
steps = steps_by_group[min(restart, len(steps_by_group) - 1)]
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(mixed_model(16, 32))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
log = open(path, "a")
log.write(json.dumps({"restart": restart, "start": True, "time": time.time(),
                     "created": psutil.Process().create_time()}) + "\n")
for step in range(1, steps + 1):
    policies = step_and_log(model, opt, 8, log, restart=restart, step=step, time=time.time())
    if changed_at is None and policies["comm.grad_sync"] != "builtin":
        changed_at = step
    if die_group == restart and rank == 3 and changed_at is not None and step == changed_at + 3:
        os._exit(1)
    if exit_at == step and restart == 0:
        if rank == exit_rank:
            os._exit(1)
        time.sleep(hold)
    if sigkill_at == step and restart == 0 and rank == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(pause)
dist.destroy_process_group()
