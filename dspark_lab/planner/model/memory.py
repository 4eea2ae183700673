"""Memory per GPU: weights, gradients and optimizer state (mixed-precision Adam), and activations after
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4).

Per layer and micro-batch, with sequence ``s``, micro-batch ``b``, hidden ``h``, heads ``a`` and tensor-parallel
size ``t``, a GPT layer stores ``sbh(34 + 5as/h)`` bytes; tensor parallelism with sequence parallelism divides all of
it by ``t``; without sequence parallelism ``sbh(10 + 24/t + 5as/(ht))``; selective recompute (or a fused attention
kernel) drops the ``5as^2b`` softmax/dropout term; full recompute keeps only the layer input ``2sbh``. The terms
below are the same sums written per tensor, so grouped-query attention and other FFN widths fall out of them.

Bytes per parameter (Megatron's mixed precision with fp32 gradient buffers): 2 (bf16 weights) + 4 (fp32 gradient)
+ 12 (fp32 master weights, Adam m and v). ZeRO-1 (distributed optimizer) shards the 12 over data-parallel ranks,
ZeRO-2 also the gradients, ZeRO-3 / FSDP also the weights (Rajbhandari et al. 2020), which then need gathered
working copies (FSDP2's per-block all-gather and prefetch, ``fsdp_buffers``). torchtitan's op-level selective
checkpointing (``op_sac_bytes``), the loss's fp32 logits (``loss_bytes_per_logit``), the output layer's saved input
(``head_input_bytes``), the logits and receive buffers ``torch.distributed.pipelining`` keeps
(``kept_output_bytes``, ``pipeline_buffer_bytes``), FSDP's fp8 all-gather (``unsharded_weight_bytes``) and what
FSDP2's side streams keep reserved in the caching allocator (``fsdp2_side_stream_bytes``) are counted from what the
PyTorch code keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 4, 12


@dataclass(frozen=True, slots=True)
class ActivationTerms:
    """Bytes stored per layer and micro-batch, split into what sequence parallelism shards (``split_by_sp``), what
    tensor parallelism always shards (``split_by_tp``) and the attention-score term (``scores``, already / t)."""

    replicated: float
    split_by_tp: float
    scores: float


def layer_activation_terms(s: int, b: int, h: int, a: int, t: int, kv_ratio: float = 1.0, ffn: int | None = None,
                           swiglu: bool = False, dropout: bool = True) -> ActivationTerms:
    """Korthikanti's per-tensor terms for one layer (2-byte activations, 1-byte dropout masks). A model trained
    without dropout (Llama 3, DeepSeek-V3) stores no masks: ``2sbh`` less, and ``2as^2b`` instead of ``5as^2b``."""
    ffn = 4 * h if ffn is None else ffn
    sbh = s * b * h
    # Replicated without SP: two LayerNorm inputs (4sbh), QKV and MLP inputs (2sbh each), two dropout masks (sbh each).
    replicated = (10 if dropout else 8) * sbh
    # Sharded by TP: Q and K for QK^T, V for attention over values, the projection input, the MLP's inner tensors.
    attention = 2 * sbh + 2 * sbh * kv_ratio + 2 * sbh * kv_ratio + 2 * sbh
    mlp = (6 if swiglu else 4) * s * b * ffn
    scores = (5 if dropout else 2) * a * s * s * b / t  # softmax output (2), dropout mask (1), dropout output (2)
    return ActivationTerms(replicated, (attention + mlp) / t, scores)


def layer_activation_bytes(terms: ActivationTerms, t: int, sequence_parallel: bool, keep_scores: bool) -> float:
    replicated = terms.replicated / t if sequence_parallel else terms.replicated
    return replicated + terms.split_by_tp + (terms.scores if keep_scores else 0.0)


def full_recompute_bytes(s: int, b: int, h: int, t: int, sequence_parallel: bool) -> float:
    """Full recompute keeps only each layer's input (Korthikanti section 5: 2sbh per layer, / t with SP)."""
    return 2 * s * b * h / (t if sequence_parallel else 1)


def op_sac_bytes(s: int, b: int, h: int, t: int, sequence_parallel: bool, kv_ratio: float = 1.0,
                 ffn: int | None = None, swiglu: bool = False) -> float:
    """What torchtitan's op-level selective AC keeps per layer (see ``flops.op_sac_recomputed_params``): the block's
    input, the outputs of the matmuls it does not recompute (wq, wv, and w1 and w2 for SwiGLU or fc1 for GeLU) and
    the flash-attention output; every element-wise result is recomputed. A row-parallel matmul's output (w2) is the
    full ``sbh`` partial sum before its reduction; under SP the two reduce-scatter outputs are saved too."""
    ffn = 4 * h if ffn is None else ffn
    sbh = s * b * h
    tp_split = 2 * (sbh + sbh * kv_ratio + sbh + s * b * ffn) / t  # wq, wv, attention output, w1 / fc1
    out = 2 * sbh / (t if sequence_parallel else 1) + tp_split  # + the block input
    if swiglu:
        out += 2 * sbh  # w2's output
    if sequence_parallel and t > 1:
        out += 2 * 2 * sbh / t  # the reduce-scatter outputs after wo and the FFN
    return out


def loss_bytes_per_logit(loss: str, vocab_parallel: bool = False) -> int:
    """Peak bytes per logit of one micro-batch while the loss is differentiated. ``fused`` (Megatron's vocab-parallel
    cross entropy, which works in place on an fp32 copy): the fp32 logits and their gradient, 8. ``eager`` (PyTorch's
    ``cross_entropy`` on ``logits.float()``, as torchtitan computes its loss): log_softmax keeps its fp32 output for
    backward; its backward holds that output, the incoming fp32 gradient and the fp32 gradient it makes, 12.
    ``eager`` over vocab-sharded logits (torchtitan's default ``loss_parallel`` under TP) runs DTensor's loss-parallel
    handlers (torch/distributed/tensor/parallel/loss.py, Dec 2024): the nll and log_softmax backwards are fused as
    ``(zeros_like(x) + exp(x)) * grad``, which holds the saved fp32 output ``x``, the zeros, ``exp(x)`` and their
    sum (then the sum and the product) at once, 16."""
    if loss == "eager":
        return 16 if vocab_parallel else 12
    return 8


def head_input_bytes(s: int, b: int, h: int, t: int, sequence_parallel: bool, sp_regather: bool) -> float:
    """The output layer's saved input (its weight gradient needs it), per micro-batch. Megatron's column-parallel
    output layer under SP saves the sequence shard and gathers it again in backward (``2sbh/t``); DTensor's
    ``ColwiseParallel(input_layouts=Shard(1))`` (torchtitan's output layer) redistributes to a replicated input
    before the matmul, so autograd saves the gathered full sequence, ``2sbh``; without SP the input is whole too."""
    return 2 * s * b * h / (t if sequence_parallel and sp_regather else 1)


def final_norm_bytes(s: int, b: int, h: int, t: int, sequence_parallel: bool, eager: bool) -> float:
    """What the norm before the output layer saves for backward, per micro-batch on the last stage (outside any
    layer's recompute). A fused kernel (Megatron's or Transformer Engine's layer norm) saves its input and per-row
    statistics, 2 bytes per element. torchtitan's eager ``RMSNorm`` (``self._norm(x.float()).type_as(x) *
    self.weight``, models/norms.py at 9dec370; its blocks are compiled, the head is not) saves the fp32 copy of its
    input (kept by ``x * rsqrt(...)``) and the bf16 normalised output (kept by ``* self.weight``), 6. The input is
    the sequence shard under SP."""
    return (6 if eager else 2) * s * b * h / (t if sequence_parallel else 1)


def kept_output_bytes(b: int, s: int, vocab: int, t: int, microbatches: int) -> float:
    """What ``torch.distributed.pipelining`` holds on the last stage beyond the loss: ``forward_one_chunk`` appends
    every micro-batch's output (the bf16 logits, vocab-sharded over ``t``) to ``output_chunks``, which is merged
    and returned by ``step()`` and cleared only when the next step starts, so after the last forward all
    ``microbatches`` of them are live (2 bytes per logit each)."""
    return 2 * b * s * vocab / t * microbatches


def cp_allgather_bytes(s: int, b: int, h: int, t: int, cp: int) -> float:
    """K and V of every context-parallel rank, all-gathered at once while one layer's attention runs (and again in
    its backward) under PyTorch's context parallelism with ``rotate_method="allgather"`` (torchtitan's default
    ``context_parallel_rotate_method``): ``cp`` shards of K and V, each ``2sbh/t`` bytes for local sequence ``s``,
    since torchtitan's ``repeat_kv`` widens grouped K/V to all query heads before SDPA. Zero without CP. Megatron's
    ring (p2p) exchange is not counted here."""
    return cp * 2 * (2 * s * b * h / t) if cp > 1 else 0.0


def boundary_bytes(s: int, b: int, h: int, t: int, sequence_parallel: bool) -> float:
    """One stage-boundary tensor per micro-batch: ``2sbh``, ``/t`` under SP (torchtitan passes the sequence shard)."""
    return 2 * s * b * h / (t if sequence_parallel else 1)


def pipeline_buffer_bytes(s: int, b: int, h: int, t: int, sequence_parallel: bool, microbatches: int,
                          receives: int, sends: int) -> float:
    """Receive buffers ``torch.distributed.pipelining`` allocates once per micro-batch and keeps (stage.py,
    ``_prepare_forward_infra`` and ``_prepare_backward_infra`` loop over the micro-batches): one for the input of
    each stage that receives activations and one for the output gradient of each stage that sends them, each a
    stage-boundary tensor (:func:`boundary_bytes`). ``receives`` / ``sends``: how many of the rank's stages have a
    previous / next stage. What else it keeps at a boundary (outputs, input gradients) depends on the moment and
    is counted by the schedule walk (``liveness.rank_envelope(boundaries=True)``)."""
    return boundary_bytes(s, b, h, t, sequence_parallel) * microbatches * (receives + sends)


def fsdp_buffers(zero: int, block_params: float, root_params: float = 0.0,
                 output_params: float = 0.0, block_weight_bytes: int = WEIGHT_BYTES) -> tuple[float, float]:
    """(weight, gradient) bytes of FSDP's working buffers at the peak, beyond the sharded states. ZeRO 2 (FSDP
    without resharding, gradients accumulated unsharded in fp32 across micro-batches) has its weights gathered
    already; a block's bf16 gradient before it joins the fp32 accumulator is not added, since it appears while that
    block's own activations are being freed, finer than the per-layer accounting here. ZeRO 3, the larger of two
    moments: a block's backward, with that block and
    the next one all-gathered in bf16 (FSDP2's implicit prefetch), its bf16 gradient and the fp32 copy it is
    reduce-scattered from (torchtitan reduces in fp32); or, while the last stage differentiates the loss, the root
    unit (embedding and output layer, which torchtitan shards together) and the prefetched last block in bf16, and
    the output weight's bf16 gradient. ``block_weight_bytes``: 1 where the blocks are all-gathered in fp8
    (:func:`unsharded_weight_bytes`); their gradients stay bf16."""
    if zero < 3:
        return 0.0, 0.0
    backward = (2 * block_weight_bytes * block_params, (2 + 4) * block_params)
    loss = (2 * root_params + block_weight_bytes * block_params, 2 * output_params)
    return max(backward, loss, key=sum)


def fsdp2_side_stream_bytes(gathered_group_bytes: list[float], sharded_grad_bytes: float) -> float:
    """Device memory PyTorch's caching allocator keeps reserved for FSDP2's side streams, on top of the default
    stream's peak. The allocator caches a freed block for the stream that allocated it (with expandable segments,
    one segment per stream) and never lends it to another, so a side stream's high-water mark stays reserved all
    step; torchtitan reports reserved memory. FSDP2 (torch 1963fc8, Dec 2024) allocates on side streams:

    - each group's flat all-gather output (on its copy-in stream); the previous one is kept until the next
      all-gather's copy-in has waited on it, so two are live: the two largest ``gathered_group_bytes`` of the rank
      (transformer blocks, and the root unit of embedding / output layer);
    - the reduce-scatter outputs (on the reduce-scatter stream), of which the sharded gradients are views; they live
      from backward to the next ``zero_grad``, so their blocks, ``sharded_grad_bytes``, are reserved through the
      next step's forward and backward. Pass 0 where the sharded gradients are already counted at the peak (ZeRO 3,
      which reduce-scatters every block during backward).

    The reduce-scatter input is allocated on the default stream since PyTorch PR 129721 (Jun 2024), whose
    description states the rule this term follows: memory in a non-default stream's pool "cannot be reused by the
    default stream"."""
    return sum(sorted(gathered_group_bytes, reverse=True)[:2]) + sharded_grad_bytes


def unsharded_weight_bytes(precision: str, fp8_allgather: bool) -> int:
    """Bytes per gathered weight of a transformer block. torchao's float8 with FSDP2's fp8 all-gather
    (torchtitan's ``enable_fsdp_float8_all_gather``; torchtitan/float8.py enables it only when the dp_shard degree
    is above 1) casts each shard to fp8 before the all-gather and keeps the gathered weight as a ``Float8Tensor``,
    1 byte per element, which Float8Linear uses directly; otherwise the gathered weight is bf16, 2. The embedding
    and the output layer (which torchtitan leaves out of Float8Linear) stay bf16; the blocks' norm weights (2h
    per layer) are counted with their matmul weights."""
    return 1 if precision == "fp8" and fp8_allgather else WEIGHT_BYTES


def state_bytes(params: float, zero: int, shard: int, fp8_params: float = 0.0) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes for ``params`` local parameters, ZeRO stage ``zero`` over ``shard``.
    ``fp8_params`` of them (a subset) are kept gathered in fp8 (:func:`unsharded_weight_bytes`): under ZeRO 0-2
    (FSDP without resharding) the gathered weights stay all step, 1 byte each instead of 2."""
    weights = WEIGHT_BYTES * params / (shard if zero >= 3 else 1)
    if zero < 3:
        weights -= (WEIGHT_BYTES - 1) * fp8_params
    grads = GRAD_BYTES * params / (shard if zero >= 2 else 1)
    optimizer = OPTIMIZER_BYTES * params / (shard if zero >= 1 else 1)
    return weights, grads, optimizer
