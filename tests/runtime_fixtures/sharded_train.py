"""2-rank gloo job on a small torchtitan-shaped model sharded with FSDP2 (``fully_shard``) or tensor parallelism
(``parallelize_module``): trains a reference copy without the runtime, then an identical copy attached to the
runtime, where rank 0 requests ``--change`` (as the control endpoint would) after ``--request-at`` steps.
Writes losses of both, the runtime's events and rank 0's ``job`` description to ``--out`` (one file per rank)."""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh

DIM = 16


class TransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.w1, self.w2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x):
        return x + self.w2(torch.nn.functional.gelu(self.w1(self.norm(x))))


class Transformer(nn.Module):
    def __init__(self, layers=4):
        super().__init__()
        self.tok_embeddings = nn.Embedding(64, DIM)
        self.layers = nn.ModuleDict({str(i): TransformerBlock() for i in range(layers)})
        self.output = nn.Linear(DIM, 64)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(h)


def build(mode, mesh):
    """fsdp: fully_shard over 2 ranks; tp: ColwiseParallel/RowwiseParallel over 2 ranks; fsdp-tp: torchtitan's 2-D
    (dp=1, tp=2) mesh, TP inside each block, then fully_shard on the dp dimension."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = Transformer()
    if mode in ("tp", "fsdp-tp"):
        tp_mesh = mesh["tp"] if mode == "fsdp-tp" else mesh
        for block in model.layers.values():
            parallelize_module(block, tp_mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    if mode in ("fsdp", "fsdp-tp"):
        dp_mesh = mesh["dp"] if mode == "fsdp-tp" else mesh
        for block in model.layers.values():
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train(model, optimizer, steps, rank, mode, on_step=None):
    losses = []
    for step in range(steps):
        # FSDP: each rank its own data; TP: the same data on both ranks (the block inputs are replicated)
        generator = torch.Generator().manual_seed(1000 + step + (rank if mode == "fsdp" else 0))
        tokens = torch.randint(0, 64, (4, 8), generator=generator)
        loss = model(tokens).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if on_step:
            on_step(step + 1)
    return losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("fsdp", "tp", "fsdp-tp"), required=True)
    parser.add_argument("--change", action="append", default=[])
    parser.add_argument("--try", dest="attempt", action="append", default=[],
                        help="a change rank 0 also requests at step 1, expected to be refused")
    parser.add_argument("--request-at", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.mode == "fsdp-tp":
        mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("dp", "tp"))
    else:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp" if args.mode == "fsdp" else "tp",))
    reference = train(*build(args.mode, mesh), args.steps, rank, args.mode)

    import dspark_lab as dl

    model, optimizer = build(args.mode, mesh)
    job = dl.attach(optimizer=optimizer, name=f"sharded-{args.mode}")
    changes = dict(c.split("=", 1) for c in args.change)
    result = {"refused": None, "pending": None}

    def on_step(step):
        if step == 1:
            result["before"] = job.describe()
            for attempt in args.attempt:
                try:
                    job.request(dict([attempt.split("=", 1)]))
                except Exception as exc:
                    result.setdefault("refusals", []).append(str(exc))
        if step == args.request_at and rank == 0 and changes:
            try:
                pending = job.request(changes)
                result["pending"] = pending
            except Exception as exc:
                result["refused"] = str(exc)

    live = train(model, optimizer, args.steps, rank, args.mode, on_step)
    pending = result.pop("pending")
    result.update(reference=reference, live=live, after=job.describe(), policies=dict(job.policies),
                  state=pending.state if pending else None, reason=pending.reason if pending else None,
                  events=[e for e in job.run_dir.events() if e.get("rank") in (rank, None)])
    with open(f"{args.out}.{rank}.json", "w") as f:
        json.dump(result, f, default=str)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort a loaded interpreter's teardown after the work is done


if __name__ == "__main__":
    main()
