"""2-rank ``torch.distributed.pipelining`` job over gloo: trains a reference pipeline without the runtime, then an
identical one attached to it, where rank 0 requests ``sched.pipeline=--switch-to`` (as the control endpoint would)
after ``--request-at`` steps. ``--layout single`` holds one stage per rank, ``looped`` two virtual stages per rank
(stage r and r+2). Writes both loss lists (last stage) and the runtime's events to ``--out.<rank>.json``."""
import argparse
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, schedules


DIM, MICROBATCHES = 16, 4


def build(layout, first, rank, world):
    torch.manual_seed(0)
    virtual = 1 if layout == "single" else 2
    parts = [nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()) for _ in range(world * virtual)]
    indices = [rank + v * world for v in range(virtual)]
    stages = [PipelineStage(parts[i], i, world * virtual, torch.device("cpu")) for i in indices]
    cls = getattr(schedules, first)
    loss = nn.MSELoss()
    schedule = cls(stages[0] if layout == "single" else stages, MICROBATCHES, loss_fn=loss)
    params = [p for i in indices for p in parts[i].parameters()]
    return schedule, torch.optim.SGD(params, lr=0.1), indices


def train(schedule, optimizer, steps, rank, world, on_step=None):
    losses = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, DIM, generator=generator), torch.randn(8, DIM, generator=generator)
        mb_losses = []
        if rank == 0:
            schedule.step(x, target=y, losses=mb_losses)
        else:
            schedule.step(target=y, losses=mb_losses)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(sum(float(l) for l in mb_losses) if mb_losses else None)
        if on_step:
            on_step(step + 1)
    return losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", choices=("single", "looped"), required=True)
    parser.add_argument("--first", required=True, help="torch schedule class the script starts with")
    parser.add_argument("--switch-to", action="append", default=[])
    parser.add_argument("--register", action="store_true", help="attach(pipeline=schedule) instead of discovery")
    parser.add_argument("--request-at", type=int, default=2)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    schedule, optimizer, _ = build(args.layout, args.first, rank, world)
    reference = train(schedule, optimizer, args.steps, rank, world)
    del schedule, optimizer
    gc.collect()

    import dspark_lab as dl

    schedule, optimizer, _ = build(args.layout, args.first, rank, world)
    job = dl.attach(optimizer=optimizer, pipeline=schedule if args.register else None, name="torch-pipe")
    result = {"requests": [], "classes": []}
    waiting = list(args.switch_to)

    def on_step(step):
        result["classes"].append(type(schedule).__name__)
        if rank == 0 and waiting and step % args.request_at == 0:
            value = waiting.pop(0)
            try:
                result["requests"].append([value, job.request({"sched.pipeline": value}).change_id])
            except Exception as exc:
                result["requests"].append([value, str(exc)])

    live = train(schedule, optimizer, args.steps, rank, world, on_step)
    result.update(reference=reference, live=live, job=job.describe(), value=job.policies["sched.pipeline"],
                  events=[e for e in job.run_dir.events() if e.get("rank") in (rank, None)])
    with open(f"{args.out}.{rank}.json", "w") as f:
        json.dump(result, f, default=str)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort a loaded interpreter's teardown after the work is done


if __name__ == "__main__":
    main()
