"""A plain DDP training script: a small GPT-style transformer on synthetic tokens.

Nothing here knows about DSpark Lab; it is what the demo, the tests and the benchmarks launch under
``dspark-lab run`` and under plain ``torchrun`` to compare. Run it either way::

    torchrun --nproc-per-node 2 demo_train.py --steps 50
    dspark-lab run --nproc 2 demo_train.py --steps 50
    dspark-lab run --nproc 1 demo_train.py --steps 50 --device cuda   # one rank per GPU (nccl)

On CUDA the losses stay on the device until the end (no per-step ``.item()``, which would make the host wait for
the device every step) and the last step's time includes waiting for the device to finish.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim))
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), float("-inf")), 1), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, self.mask[: tokens.shape[1], : tokens.shape[1]])
        return self.head(self.norm(x))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep per step (slows a live demo)")
    p.add_argument("--loss-file", help="write the per-step losses of rank 0 here as JSON")
    p.add_argument("--times-file", help="write rank 0's per-step wall times (s) here as JSON")
    p.add_argument("--cpu-times-file", help="write rank 0's per-step process CPU times (s, all its threads) here")
    p.add_argument("--save", help="save the model's state_dict here at the end (rank 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per rank, nccl")
    args = p.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device: cuda: torch {torch.__version__} sees no CUDA device; allowed: cpu | cuda")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        # the demo compares losses bit for bit across runs: deterministic kernels (math attention, fixed cuBLAS)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if distributed else 0

    torch.manual_seed(args.seed)
    model = TinyGPT(args.vocab, args.dim, args.heads, args.layers, args.seq).to(device)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)

    losses, times, cpu_times = [], [], []
    last, last_cpu = time.perf_counter(), time.process_time()
    for step in range(args.steps):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=data).to(device)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach() if cuda else loss.item())
        if args.step_sleep:
            time.sleep(args.step_sleep)
        now, now_cpu = time.perf_counter(), time.process_time()
        times.append(now - last)
        cpu_times.append(now_cpu - last_cpu)
        last, last_cpu = now, now_cpu
    if cuda:
        torch.cuda.synchronize()
        if times:
            times[-1] += time.perf_counter() - last
        losses = [float(x) for x in torch.stack(losses).cpu()] if losses else []
    if rank == 0:
        if args.loss_file:
            with open(args.loss_file, "w") as f:
                json.dump(losses, f)
        if args.times_file:
            with open(args.times_file, "w") as f:
                json.dump(times, f)
        if args.cpu_times_file:
            with open(args.cpu_times_file, "w") as f:
                json.dump(cpu_times, f)
        if args.save:
            inner = model.module if distributed else model
            torch.save(inner.state_dict(), args.save)
        print(f"done: {args.steps} steps, final loss {losses[-1]:.4f}")
    if distributed:
        dist.barrier()  # no rank tears gloo down while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
