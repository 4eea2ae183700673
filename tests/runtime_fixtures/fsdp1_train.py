"""An unmodified FSDP1 training script: sharded_train.py's small transformer sharded with
``FullyShardedDataParallel`` over gloo on CPU (``device_id=torch.device("cpu")``: torch 2.13 refuses None without
an accelerator), each block its own FSDP unit (``--wrap blocks``, ``auto_wrap_policy``) or one unit around the
whole model (``--wrap root``: the blocks are plain modules inside one flat parameter). Prints
``step N loss X rank R`` (every rank, the loss to the last bit) after each optimizer step.
``torchrun --nproc-per-node 2 fsdp1_train.py --steps 12 [--wrap root] [--sharding SHARD_GRAD_OP] [--orig-params]``
"""

import argparse
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from sharded_train import Transformer, TransformerBlock  # the FSDP2 tests' model: 4 blocks in model.layers

VOCAB = 64


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--wrap", choices=("blocks", "root"), default="blocks")
    parser.add_argument("--sharding", choices=("FULL_SHARD", "SHARD_GRAD_OP"), default="FULL_SHARD")
    parser.add_argument("--orig-params", action="store_true")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    per_block = ModuleWrapPolicy({TransformerBlock}) if args.wrap == "blocks" else None
    model = FSDP(Transformer(), auto_wrap_policy=per_block,
                 sharding_strategy=ShardingStrategy[args.sharding], use_orig_params=args.orig_params,
                 device_id=torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, args.steps + 1):
        tokens = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(1000 * step + rank))
        loss = model(tokens).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sys.stdout.write(f"step {step} loss {loss.item()!r} rank {rank}\n")  # one write: ranks share the pipe
        sys.stdout.flush()
        time.sleep(args.step_sleep)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
