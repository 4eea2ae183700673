"""A pipeline-parallel training script: a small transformer split into stages, one rank per pipeline position.

It runs DSpark Lab's pipeline executor (the exact op order of a schedule from ``dspark_lab.pipeline``) and knows
nothing of the live runtime; under ``dspark-lab run`` the ``sched.pipeline`` policy can switch its schedule between
steps::

    dspark-lab run --nproc 2 --name pipe pipeline_train.py --schedule 1f1b --steps 200
    dspark-lab set pipe sched.pipeline=zb-h1
"""

import argparse
import json
import time

import torch
import torch.distributed as dist

from dspark_lab.pipeline.execute import PipelineTrainer
from dspark_lab.pipeline.model import ModelConfig, build_stages, make_batch, mb_loss
from dspark_lab.pipeline.schedules import build


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--chunks", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--mb-size", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--loss-file", help="rank 0 writes the per-step losses here as JSON")
    args = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    schedule = build(args.schedule, world, args.microbatches, args.chunks)
    if args.schedule == "dualpipe":
        raise SystemExit("pipeline_train.py: dualpipe holds every stage twice; use dualpipev here")
    cfg = ModelConfig(d_model=args.d_model, seq=args.seq, stages=schedule.stages)
    stages = build_stages(cfg)
    held = {c: stages[schedule.where(rank, c)[1]] for c in range(schedule.chunks)}
    batch = {}
    trainer = PipelineTrainer(schedule, rank, held, lambda out, i: mb_loss(out, batch["targets"][i],
                                                                            args.microbatches),
                              act_shape=(args.mb_size, cfg.seq, cfg.d_model))
    params = [q for module in held.values() for q in module.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr)

    losses = []
    for step in range(args.steps):
        tokens, batch["targets"] = make_batch(cfg, args.microbatches, args.mb_size, step)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.tensor([trainer.step(tokens)], dtype=torch.float64)
        optimizer.step()
        dist.all_reduce(loss)  # only the rank holding the last stage has a non-zero loss
        losses.append(float(loss.item()))
        if args.step_sleep:
            time.sleep(args.step_sleep)
    if rank == 0:
        if args.loss_file:
            with open(args.loss_file, "w") as f:
                json.dump(losses, f)
        print(f"done: {args.steps} steps of {trainer.schedule.name}, final loss {losses[-1]:.5f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
