"""Parameter counts and per-operator FLOPs of a decoder-only transformer (dense or MoE).

Conventions (Narayanan et al. SC'21, eq. 3; Korthikanti et al. 2022, section 6): a matmul of an ``m x k`` by a
``k x n`` matrix costs ``2mkn`` FLOPs; the backward pass costs twice the forward (input and weight gradients);
attention scores and attention-over-values are counted over the full ``s x s`` square (the Megatron convention).
Model FLOPs per token for training are therefore ``3 * (2 * matmul_params + 4 * s * h * layers) + 6 * h * V``
(embedding lookups are free, the output layer is a matmul). For GPT-3 (``ffn = 4h``) this is Narayanan's
``72 B s L h^2 (1 + s/(6h) + V/(12 L h))`` per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from dspark_lab.planner.model.config import ModelConfig


def ffn_matrices(model: ModelConfig) -> int:
    return 3 if model.ffn_kind == "swiglu" else 2


def attention_params(model: ModelConfig) -> int:
    """Q and output projections are ``h x h``; K and V shrink with grouped-query attention."""
    h = model.hidden
    return 2 * h * h + 2 * h * (h * model.kv_heads // model.heads)


def dense_mlp_params(model: ModelConfig) -> int:
    return ffn_matrices(model) * model.hidden * model.ffn_hidden


def expert_params(model: ModelConfig) -> int:
    """One expert's matrices."""
    return ffn_matrices(model) * model.hidden * model.moe_ffn_hidden


def layer_params(model: ModelConfig, index: int, active: bool = False) -> int:
    """Parameters of layer ``index`` (norms included); ``active``: only what one token uses (top-k experts)."""
    h = model.hidden
    out = attention_params(model) + 2 * h
    if model.is_moe_layer(index):
        routed = model.top_k if active else model.experts
        out += (routed + model.shared_experts) * expert_params(model) + h * model.experts
    else:
        out += dense_mlp_params(model)
    return out


def embedding_params(model: ModelConfig) -> int:
    return model.vocab * model.hidden


def output_params(model: ModelConfig) -> int:
    return 0 if model.tied_embeddings else model.vocab * model.hidden


def total_params(model: ModelConfig, active: bool = False) -> int:
    layers = sum(layer_params(model, i, active) for i in range(model.layers))
    return layers + embedding_params(model) + output_params(model) + model.hidden  # + final norm


def model_flops_per_token(model: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward), recompute not counted."""
    s, h = model.seq_len, model.hidden
    matmul = sum(layer_params(model, i, active=True) - 2 * h for i in range(model.layers))
    return 3 * (2 * matmul + 4 * s * h * model.layers) + 6 * h * model.vocab


def recompute_flops_per_token(model: ModelConfig, recompute: str) -> float:
    """Extra forward FLOPs per token that recomputation adds: the whole layer (full) or attention's core
    (selective, Korthikanti et al. 2022 section 5)."""
    s, h = model.seq_len, model.hidden
    if recompute == "full":
        return sum(2 * (layer_params(model, i, active=True) - 2 * h) + 4 * s * h for i in range(model.layers))
    if recompute == "selective":
        return 4 * s * h * model.layers
    if recompute == "selective-op":
        return sum(2 * op_sac_recomputed_params(model, i) for i in range(model.layers))
    return 0.0


def op_sac_recomputed_params(model: ModelConfig, index: int) -> int:
    """Weights of the matmuls torchtitan's op-level selective AC recomputes in layer ``index``: its policy saves
    every ``aten.mm`` output except every second one of the block, counted in forward order (wq, wk, wv, wo, then
    w1, w3, w2 for SwiGLU or fc1, fc2 for GeLU), so wk, wo and the FFN's second matmul run again. A MoE layer's
    experts run grouped matmuls, which the policy does not count: only wk and wo there."""
    h = model.hidden
    out = h * (h * model.kv_heads // model.heads) + h * h
    if not model.is_moe_layer(index):
        out += h * model.ffn_hidden
    return out


@dataclass(frozen=True, slots=True)
class Gemm:
    """One matmul of a forward pass on one GPU: ``flops`` and its smallest dimension (what limits efficiency)."""

    name: str
    flops: float
    min_dim: int
    weights: bool = True  # a weight matmul has a weight-gradient GEMM in backward


def layer_gemms(model: ModelConfig, index: int, tokens: int, tp: int, cp: int, ep: int, micro_batch: int,
                causal_half: bool) -> list[Gemm]:
    """Forward matmuls of layer ``index`` for ``tokens`` tokens on one GPU (TP splits heads and FFN columns)."""
    h, a = model.hidden, model.heads
    dh = h // a
    qkv_out = (h + 2 * h * model.kv_heads // a) // tp
    s_kv = model.seq_len
    s_q = model.seq_len // cp
    core = 4 * micro_batch * s_q * s_kv * h / tp * (0.5 if causal_half else 1.0)
    gemms = [Gemm("qkv", 2 * tokens * h * qkv_out, min(tokens, qkv_out, h)),
             Gemm("attention", core, dh, weights=False),
             Gemm("proj", 2 * tokens * h * h / tp, min(tokens, h // tp, h))]
    n = ffn_matrices(model)
    if model.is_moe_layer(index):
        fm = model.moe_ffn_hidden // tp
        routed_tokens = max(1, tokens * model.top_k * ep // model.experts)  # per local expert, balanced
        gemms.append(Gemm("router", 2 * tokens * h * model.experts, min(tokens, model.experts, h)))
        gemms.append(Gemm("experts", n * 2 * tokens * model.top_k * h * fm, min(routed_tokens, fm, h)))
        if model.shared_experts:
            gemms.append(Gemm("shared", n * 2 * tokens * model.shared_experts * h * fm, min(tokens, fm, h)))
    else:
        f = model.ffn_hidden // tp
        gemms.append(Gemm("mlp", n * 2 * tokens * h * f, min(tokens, f, h)))
    return gemms


def logits_gemm(model: ModelConfig, tokens: int, tp: int) -> Gemm:
    v = model.vocab // tp
    return Gemm("logits", 2 * tokens * model.hidden * v, min(tokens, v, model.hidden))
