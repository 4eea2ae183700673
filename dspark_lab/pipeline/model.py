"""A small decoder-only transformer split into stages, for real pipeline runs and their gradient checks.

Every matmul weight lives in an ``nn.Linear`` so a backward can be split the Zero Bubble way: B computes the
gradients of the stage input and of every Linear output; W turns those into weight gradients (dY^T X).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelConfig:
    vocab: int = 256
    d_model: int = 128
    heads: int = 4
    seq: int = 64
    stages: int = 2
    layers_per_stage: int = 1
    seed: int = 0


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Stage(nn.Module):
    """Stage ``index`` of ``cfg.stages``: the first embeds tokens, the last ends in logits."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.first, self.last = index == 0, index == cfg.stages - 1
        if self.first:
            self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
            self.pos = nn.Parameter(torch.zeros(cfg.seq, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.heads) for _ in range(cfg.layers_per_stage))
        if self.last:
            self.ln = nn.LayerNorm(cfg.d_model)
            self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.tok(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)) if self.last else x


def build_stages(cfg: ModelConfig) -> list[Stage]:
    """All stages, initialised from ``cfg.seed`` (every rank builds the same model and keeps its own stages)."""
    torch.manual_seed(cfg.seed)
    return [Stage(cfg, i) for i in range(cfg.stages)]


def make_batch(cfg: ModelConfig, microbatches: int, mb_size: int, step: int) -> tuple[list, list]:
    """Token and target micro-batches for one step (deterministic in ``step``)."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, cfg.vocab, (microbatches, mb_size, cfg.seq + 1), generator=g)
    return [t[:, :-1] for t in tokens], [t[:, 1:] for t in tokens]


def mb_loss(logits: torch.Tensor, targets: torch.Tensor, microbatches: int) -> torch.Tensor:
    """One micro-batch's share of the step loss (mean cross-entropy / number of micro-batches)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) / microbatches


def reference_grads(cfg: ModelConfig, microbatches: int, mb_size: int, step: int) -> tuple[float, list]:
    """Single-process loss and per-stage gradients for the same step, micro-batch by micro-batch."""
    stages = build_stages(cfg)
    tokens, targets = make_batch(cfg, microbatches, mb_size, step)
    total = 0.0
    for x, y in zip(tokens, targets):
        h = x
        for stage in stages:
            h = stage(h)
        loss = mb_loss(h, y, microbatches)
        loss.backward()
        total += loss.item()
    return total, [[p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in s.parameters()]
                   for s in stages]
