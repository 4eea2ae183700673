"""A small expert-parallel MoE transformer for the examples and tests (top-k routing, all-to-all over gloo).

Vocabulary (docs/architecture.md): a logical **expert** has **replicas**; each rank holds ``slots_per_rank``
**slots**; a **placement** is ``phy2log [R]`` per layer, GPU-major (rank ``r`` holds slots ``r*S .. r*S+S-1``).

Math does not depend on the placement (so re-placing experts mid-run leaves the loss trajectory unchanged):

* a token's assignment to logical expert ``e`` goes to replica ``(global assignment index) % count[e]``;
* replicas of one expert hold identical weights and optimizer state: :func:`sync_gradients` sums every replica's
  gradient into one gradient per logical expert (all-reduce) and hands it to every replica, so Adam keeps them equal;
* dense parameters are data-parallel (gradients averaged over ranks).

The router is its own module (:class:`Router`) whose forward returns ``(expert indices [T, k], gates [T, k])``, so
a script can count per-layer expert loads with a forward hook (:func:`expert_load_hook`). The layer also counts
them itself, into its ``expert_load`` buffer, which the runtime reads and zeroes at each step boundary.

Under ``torch.compile`` (the whole model, or each block): the router, the count and the gate-weighted combine are
traced; the dispatch (slot choice, all-to-all, the per-slot expert loop) runs eagerly
(:meth:`ExpertParallelMoE.dispatch`, ``torch.compiler.disable``). Its sizes depend on the routing, so traced they
made Dynamo recompile whenever they changed, and the placement tensors it reads never enter a graph, so
re-placing experts cannot invalidate one. The dispatch also counts the loads (into ``expert_load``): eager, it
counts under any compile from the first step, whereas Dynamo ignores a hook added to a module it has already
traced; and it skips a forward that activation checkpointing re-runs in backward, which a hook counts twice.

Shaped after the MoE layers of GShard / Switch Transformer (top-k softmax gating) and DeepSeek-V3's redundant
experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True, slots=True)
class MoEConfig:
    """Model and expert-parallel sizes; ``router_skew`` biases the router towards low-index experts (hot experts)."""

    vocab: int = 64
    dim: int = 32
    hidden: int = 64
    layers: int = 2
    experts: int = 8
    top_k: int = 2
    slots_per_rank: int = 5
    seq: int = 16
    router_skew: float = 1.5
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab", "dim", "hidden", "layers", "experts", "top_k", "slots_per_rank", "seq"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.experts:
            raise ValueError(f"MoEConfig.top_k ({self.top_k}) must be <= experts ({self.experts})")


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, out_splits, in_splits, group)


class Router(nn.Module):
    """Top-k softmax gating. Forward returns ``(indices [T, k], gates [T, k])``; hook it to count expert loads."""

    def __init__(self, dim: int, experts: int, top_k: int, skew: float):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.top_k = top_k
        self.register_buffer("skew", torch.linspace(skew, 0.0, experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, indices = (self.gate(x) + self.skew).topk(self.top_k, dim=-1)
        return indices, logits.softmax(-1)


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class ExpertParallelMoE(nn.Module):
    """One MoE layer: a replicated router, and this rank's ``slots_per_rank`` expert slots (``experts``)."""

    def __init__(self, config: MoEConfig, phy2log: torch.Tensor, rank: int, world: int, group=None):
        super().__init__()
        self.config, self.rank, self.world, self.group = config, rank, world, group
        self.router = Router(config.dim, config.experts, config.top_k, config.router_skew)
        self.experts = nn.ModuleList(Expert(config.dim, config.hidden) for _ in range(config.slots_per_rank))
        self.last_rank_load = 0  # assignments this rank's slots processed in the last forward
        # assignments per logical expert since the runtime last read it (not saved: per-step bookkeeping)
        self.register_buffer("expert_load", torch.zeros(config.experts, dtype=torch.int64), persistent=False)
        self.set_placement(phy2log)

    def set_placement(self, phy2log) -> None:
        """Adopt ``phy2log [R]`` (R = slots_per_rank * world); the slot weights must already match it."""
        phy2log = torch.as_tensor(phy2log, dtype=torch.int64)
        if phy2log.shape != (self.config.slots_per_rank * self.world,):
            raise ValueError(f"phy2log must have {self.config.slots_per_rank * self.world} slots, "
                             f"got shape {list(phy2log.shape)}")
        count = torch.bincount(phy2log, minlength=self.config.experts)
        if (count == 0).any():
            raise ValueError(f"phy2log leaves experts {torch.nonzero(count == 0).flatten().tolist()} without a slot")
        order = torch.argsort(phy2log, stable=True)
        start = torch.cumsum(count, 0) - count
        rank_of_slot = torch.empty_like(phy2log)
        rank_of_slot[order] = torch.arange(len(phy2log)) - start[phy2log[order]]
        log2phy = torch.full((self.config.experts, int(count.max())), -1, dtype=torch.int64)
        log2phy[phy2log, rank_of_slot] = torch.arange(len(phy2log))
        self.phy2log, self.log2phy, self.count = phy2log, log2phy, count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, gates = self.router(x)
        expert = indices.reshape(-1)
        back = self.dispatch(x, expert)
        return (back.view(x.shape[0], self.config.top_k, -1) * gates.unsqueeze(-1)).sum(1)

    @torch.compiler.disable
    def dispatch(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Each of ``x``'s token-expert assignments (``expert [T*k]``) through its replica's slot and back: ``[T*k,
        dim]``, in assignment order. Eager under torch.compile (module docstring)."""
        tokens, k, slots = x.shape[0], self.config.top_k, self.config.slots_per_rank
        if torch._C._current_graph_task_id() == -1:  # not a checkpoint's recompute in backward: counted once
            self.expert_load.scatter_add_(0, expert, torch.ones_like(expert))
        assignment = torch.arange(tokens * k) + self.rank * tokens * k  # global, so replica choice is placement-free
        slot = self.log2phy[expert, assignment % self.count[expert]]
        order = torch.argsort(slot, stable=True)                      # by destination rank, then local slot
        send = x.repeat_interleave(k, 0)[order]
        send_counts = torch.bincount(slot // slots, minlength=self.world)
        recv_counts = send_counts.clone()
        local_slot = (slot % slots)[order]
        recv_slot = local_slot
        if self.world > 1:
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            recv_slot = local_slot.new_empty(int(recv_counts.sum()))
            dist.all_to_all_single(recv_slot, local_slot, recv_counts.tolist(), send_counts.tolist(),
                                   group=self.group)
        received = all_to_all(send, recv_counts.tolist(), send_counts.tolist(), self.group)
        self.last_rank_load = received.shape[0]
        by_slot = torch.argsort(recv_slot, stable=True)
        sizes = torch.bincount(recv_slot, minlength=slots).tolist()
        chunks = received[by_slot].split(sizes)
        out = torch.cat([self.experts[s](chunk) for s, chunk in enumerate(chunks)])[torch.argsort(by_slot)]
        return all_to_all(out, send_counts.tolist(), recv_counts.tolist(), self.group)[torch.argsort(order)]


class Block(nn.Module):
    def __init__(self, config: MoEConfig, phy2log, rank: int, world: int, group=None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)
        self.qkv, self.proj = nn.Linear(config.dim, 3 * config.dim), nn.Linear(config.dim, config.dim)
        self.moe = ExpertParallelMoE(config, phy2log, rank, world, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        batch, seq, dim = x.shape
        return x + self.moe(self.norm2(x).reshape(-1, dim)).view(batch, seq, dim)


class TinyMoETransformer(nn.Module):
    """Embedding, ``layers`` x (causal attention + expert-parallel MoE), LM head."""

    def __init__(self, config: MoEConfig, phy2log, rank: int = 0, world: int = 1, group=None):
        super().__init__()
        phy2log = torch.as_tensor(phy2log, dtype=torch.int64)
        torch.manual_seed(config.seed)  # same dense weights on every rank
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.pos = nn.Parameter(torch.randn(config.seq, config.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(config, phy2log[i], rank, world, group) for i in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab)
        self._init_slots(rank)

    def _init_slots(self, rank: int) -> None:
        """Every slot takes its logical expert's weights, drawn from a per-layer seed (identical on all ranks)."""
        generator_state = torch.random.get_rng_state()
        for i, block in enumerate(self.blocks):
            torch.manual_seed(self.config.seed + 1000 + i)
            logical = [Expert(self.config.dim, self.config.hidden) for _ in range(self.config.experts)]
            slots = self.config.slots_per_rank
            for s, module in enumerate(block.moe.experts):
                module.load_state_dict(logical[int(block.moe.phy2log[rank * slots + s])].state_dict())
        torch.random.set_rng_state(generator_state)

    def moe_layers(self) -> list[ExpertParallelMoE]:
        return [block.moe for block in self.blocks]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def expert_params(model: TinyMoETransformer) -> set[int]:
    return {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}


def sync_gradients(model: TinyMoETransformer, group=None) -> None:
    """Average dense gradients over ranks; give every replica of an expert the sum of all its replicas' gradients
    (divided by the world size, as data parallelism averages). One all-reduce for everything."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    skip = expert_params(model)
    dense = [p for p in model.parameters() if id(p) not in skip and p.requires_grad]
    parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in dense]
    layers = model.moe_layers()
    for layer in layers:
        per_expert = torch.zeros(layer.config.experts, _flat_size(layer.experts[0]))
        for s, module in enumerate(layer.experts):
            per_expert[layer.phy2log[layer.rank * layer.config.slots_per_rank + s]] += _flat_grad(module)
        parts.append(per_expert.reshape(-1))
    flat = torch.cat(parts)
    if world > 1:
        dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for p in dense:
        p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    for layer in layers:
        size = _flat_size(layer.experts[0])
        per_expert = flat[offset: offset + layer.config.experts * size].view(layer.config.experts, size)
        offset += layer.config.experts * size
        for s, module in enumerate(layer.experts):
            grad = per_expert[layer.phy2log[layer.rank * layer.config.slots_per_rank + s]]
            start = 0
            for p in module.parameters():
                p.grad = grad[start: start + p.numel()].view_as(p).clone()
                start += p.numel()


def _flat_size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flat_grad(module: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in module.parameters()])


def expert_load_hook(loads: list[torch.Tensor], layer: int, experts: int):
    """A forward hook for :class:`Router`: adds this forward's per-expert assignment counts to ``loads[layer]`` (an
    int64 ``[experts]`` tensor, zeroed in place between steps).

    Compile-safe: it closes over that tensor, not over ``layer`` (Dynamo guards a closure's int by value, so each
    layer would get its own graph), and counts with an in-place ``scatter_add_`` (``bincount``'s output size depends
    on the data: a graph break)."""
    counts = loads[layer]
    if counts.shape != (experts,):
        raise ValueError(f"loads[{layer}] must have shape [{experts}], got {list(counts.shape)}")

    def hook(module, inputs, output):
        indices = output[0].reshape(-1)
        counts.scatter_add_(0, indices, torch.ones_like(indices))

    return hook
