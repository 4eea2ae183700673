"""Memory per GPU of the fullest pipeline rank: each rank's states, activations and buffers at the peak its
schedule's op order gives (:mod:`~dspark_lab.planner.model.memory`, :mod:`~dspark_lab.planner.model.liveness`),
and for torchtitan what the caching allocator keeps reserved beyond that (:mod:`~dspark_lab.planner.model.step_trace`
replayed through :mod:`~dspark_lab.planner.model.allocator`). Also the parameter counts per rank that the step-time
model's data-parallel collectives use.
"""

from __future__ import annotations

from dspark_lab.planner.hardware import Device
from dspark_lab.planner.model import block_trace, flops, liveness, memory, step_trace
from dspark_lab.planner.model.config import Layout, ModelConfig

OTHER_GB = 3.0  # CUDA context, NCCL and cuBLAS workspaces
# Block passes (micro-batches x blocks) one prediction's replays write in all, about a second on one core: the first,
# last and fullest pipeline ranks, each through step_trace.STEPS steps, share it evenly.
TRACE_PASSES = 2048
RANK_PASSES = TRACE_PASSES // (3 * step_trace.STEPS)  # one rank, one step


def traced_microbatches(m: int, p: int, blocks: int) -> int | None:
    """How many micro-batches the allocator's replay runs: all ``m`` where ``m x blocks`` is within
    :data:`RANK_PASSES`, else the most that are, as a multiple of ``2p`` (every schedule takes that many); None
    where even ``2p`` micro-batches of one rank's ``blocks`` exceed it (the replay is skipped)."""
    if m * blocks <= RANK_PASSES:
        return m
    fit = RANK_PASSES // blocks // (2 * p) * (2 * p)
    return fit if fit >= 2 * p else None


def block_params(model: ModelConfig, counts, starts, rank_stages, t: int, e: int) -> float:
    """Parameters of the transformer blocks one GPU of the given pipeline rank holds."""
    return sum(_block_sizes(model, counts, starts, rank_stages, t, e))


def stage_params(model: ModelConfig, counts, starts, rank_stages, t: int, e: int) -> float:
    """Parameters one GPU of the given pipeline rank holds (expert weights split over ep, the rest over tp)."""
    total = block_params(model, counts, starts, rank_stages, t, e)
    last = len(counts) - 1
    if 0 in rank_stages:
        total += flops.embedding_params(model) / t
    if last in rank_stages:
        total += flops.output_params(model) / t
    return total


def layer_params(model: ModelConfig, i: int, t: int, e: int) -> float:
    """Parameters of layer ``i`` on one GPU: expert weights split over ep and tp, the rest over tp."""
    experts = model.experts * flops.expert_params(model) if model.is_moe_layer(i) else 0
    return (flops.layer_params(model, i) - experts) / t + experts / t / e


def _fsdp_buffers(model: ModelConfig, lay: Layout, counts, starts, mine, stages: int) -> tuple[float, float]:
    """FSDP's working buffers at this rank's peak (:func:`memory.fsdp_buffers`)."""
    block = max(_block_sizes(model, counts, starts, mine, lay.tp, lay.ep), default=0.0)
    out = flops.output_params(model) / lay.tp if stages - 1 in mine else 0.0
    return memory.fsdp_buffers(lay.zero, block, _root_params(model, lay, mine, stages), out,
                               memory.unsharded_weight_bytes(lay.precision, lay.fp8_allgather))


def _fsdp2_reserved(model: ModelConfig, lay: Layout, counts, starts, mine, stages: int,
                    sharded_grads: float) -> float:
    """What FSDP2's side streams keep reserved on this rank (:func:`memory.fsdp2_side_stream_bytes`): its FSDP
    groups as gathered (each block, and the root unit in bf16) and the sharded gradients given."""
    block_bytes = memory.unsharded_weight_bytes(lay.precision, lay.fp8_allgather)
    groups = [block_bytes * n for n in _block_sizes(model, counts, starts, mine, lay.tp, lay.ep)]
    groups.append(memory.WEIGHT_BYTES * _root_params(model, lay, mine, stages))
    return memory.fsdp2_side_stream_bytes(groups, sharded_grads)


def _block_sizes(model: ModelConfig, counts, starts, rank_stages, t: int, e: int) -> list[float]:
    """Parameters of each transformer block one GPU of the pipeline rank holds (one FSDP group each, as torchtitan
    wraps them)."""
    return [layer_params(model, i, t, e) for k in rank_stages for i in range(starts[k], starts[k] + counts[k])]


def _root_params(model: ModelConfig, lay: Layout, mine, stages: int) -> float:
    """Parameters of the root FSDP unit on this rank: the embedding on the first stage, the output layer on the
    last (torchtitan shards them together, outside the blocks)."""
    return ((flops.embedding_params(model) if 0 in mine else 0.0)
            + (flops.output_params(model) if stages - 1 in mine else 0.0)) / lay.tp


def rank_stages(rank: int, p: int, v: int, chunks: int, stages: int) -> list[int]:
    """The stages pipeline rank ``rank`` holds: ``r, r+p, ...``, or ``r`` and ``2p-1-r`` in a V."""
    if chunks != v:  # V-shaped schedules: rank r holds stages r and 2p-1-r
        return [k for k in (rank, 2 * p - 1 - rank) if k < stages]
    return [k for k in range(stages) if k % p == rank]


def fullest_rank(model, lay: Layout, counts, starts, m: int, chunks: int, dev: Device, sp: bool,
                 allocator: bool = True) -> dict[str, float]:
    """Memory of the fullest pipeline rank: its states, plus activations (and lazily made gradients) at the peak
    the schedule's op order gives (:mod:`~dspark_lab.planner.model.liveness`), plus, for torchtitan, what the
    caching allocator keeps reserved beyond that (:mod:`~dspark_lab.planner.model.step_trace`)."""
    per_rank = counted_per_rank(model, lay, counts, starts, m, chunks, sp)
    p = lay.pp
    if allocator and lay.framework == "torchtitan" and not model.moe:
        # What the caching allocator keeps mapped beyond the bytes counted (torchtitan reports reserved memory),
        # traced for the first and last pipeline ranks and the fullest one, where the peak can be. Never past
        # the device's memory: there the allocator unmaps its cached free pages and retries instead of failing.
        for r in {0, p - 1, max(range(p), key=lambda x: per_rank[x]["total"])}:
            gb = per_rank[r]
            room = dev.memory_gb - gb["total"]
            spec = rank_spec(model, lay, counts, m, r, sp) if room > 0 else None
            if spec is not None:
                held = step_trace.reserved_overhead(spec, lay.recompute) / 1e9
                gb["allocator"] = min(held, room)
                gb["total"] += gb["allocator"]
    return max(per_rank, key=lambda gb: gb["total"])


def counted_per_rank(model, lay: Layout, counts, starts, m: int, chunks: int, sp: bool) -> list[dict[str, float]]:
    """Each pipeline rank's memory per GPU in GB (``params``, ``grads``, ``optimizer``, ``activations``,
    ``other``, ``total``) at the peak its schedule's op order gives, counted tensor by tensor, without what the
    caching allocator keeps beyond the bytes (``allocator`` is 0 here)."""
    t, c, b, p, v, e = lay.tp, lay.cp, lay.micro_batch, lay.pp, lay.vpp, lay.ep
    s = model.seq_len // c
    stages = len(counts)
    ffn = model.moe_ffn_hidden * model.top_k if model.moe else model.ffn_hidden
    terms = memory.layer_activation_terms(s, b, model.hidden, model.heads, t, model.kv_heads / model.heads, ffn,
                                          model.ffn_kind == "swiglu", model.dropout)
    keep_scores = lay.recompute == "none" and lay.attention == "unfused"
    per_layer = memory.layer_activation_bytes(terms, t, sp, keep_scores)
    extra = 0.0
    if lay.recompute == "selective-op":
        extra = per_layer  # the layer being recomputed holds its full activations again
        per_layer = memory.op_sac_bytes(s, b, model.hidden, t, sp, model.kv_heads / model.heads, ffn,
                                        model.ffn_kind == "swiglu")
    if lay.recompute == "full":
        extra = per_layer  # the one layer being recomputed
        per_layer = memory.full_recompute_bytes(s, b, model.hidden, t, sp)
    if lay.cp_rotate == "allgather":
        extra += memory.cp_allgather_bytes(s, b, model.hidden, t, c)  # while one layer's attention runs
    # ZeRO 2 (FSDP without resharding, as Llama 3 and torchtitan with PP run): unsharded fp32 gradients accumulate
    # over micro-batches and appear with each chunk's first backward. ZeRO 3 reduce-scatters every micro-batch, so
    # only the shard (state_bytes) stays.
    lazy_grads = lay.zero == 2
    shard = lay.dp * c
    torch_pp = lay.pp_runtime == "torch" and p > 1
    boundary = memory.boundary_bytes(s, b, model.hidden, t, sp)
    if p > 1:
        # FSDP2 under torch's pipelining reduce-scatters a stage's gradients at its last backward
        reduce_after = m if torch_pp and lazy_grads and shard > 1 else 0
        env = liveness.envelopes((lay.schedule, p, m, v, lay.pp_runtime), tuple(counts), torch_pp,
                                 lay.pp_return_outputs, reduce_after)
    else:
        env = (((counts[0], frozenset({0}), 0),),)  # one stage: a micro-batch's layers, then its gradients
    per_rank = []
    for r in range(p):
        mine = rank_stages(r, p, v, chunks, stages)
        params = stage_params(model, counts, starts, mine, t, e)
        fp8_params = (block_params(model, counts, starts, mine, t, e)
                      if memory.unsharded_weight_bytes(lay.precision, lay.fp8_allgather) == 1 else 0.0)
        weights, shard_grads, optimizer = memory.state_bytes(params, lay.zero, shard, fp8_params)
        grads = shard_grads
        gathered, grad_buffers = (_fsdp_buffers(model, lay, counts, starts, mine, stages)
                                  if lay.zero >= 3 and shard > 1 else (0.0, 0.0))
        weights += gathered
        if lazy_grads:
            chunk_grads = {}
            sched = liveness.schedule(lay.schedule, p, m, v, lay.pp_runtime) if p > 1 else None
            for ch in range(chunks):
                stage = sched.where(r, ch)[1] % stages if sched else 0
                chunk_grads[ch] = memory.GRAD_BYTES * stage_params(model, counts, starts, [stage], t, e)
            act, grads, at_boundaries = max(((a * per_layer + extra, sum(chunk_grads[x] for x in g), k * boundary)
                                             for a, g, k in env[r]), key=sum)
        else:
            act, at_boundaries = max(((a * per_layer + extra, k * boundary) for a, _, k in env[r]), key=sum)
            grads += grad_buffers
        other = OTHER_GB * 1e9
        if lay.fsdp_runtime == "torch" and lay.zero >= 2 and shard > 1:
            # ZeRO 2's gradients at the peak are the unsharded fp32 ones; the shards come after, on the
            # reduce-scatter stream, and keep their blocks reserved from then on. ZeRO 3 counts the shards already.
            other += _fsdp2_reserved(model, lay, counts, starts, mine, stages, shard_grads if lazy_grads else 0.0)
        resident = other  # what every moment of the step holds beyond the states
        kept = 0.0
        if stages - 1 in mine:
            # The loss is differentiated before any layer of that micro-batch is recomputed, so its logits (with the
            # output layer's saved input) and the recomputed layer (``extra``) are never live together: only what
            # the loss moment needs beyond it is added. A pipeline that keeps every micro-batch's logits
            # (``pp_runtime`` torch, ``pp_return_outputs``) holds the earlier ones and the current bf16 ones at the
            # loss, and all of them while the last micro-batch's layers are recomputed.
            logits = memory.loss_bytes_per_logit(lay.loss, t > 1) * b * s * model.vocab / t
            at_loss = (logits + memory.head_input_bytes(s, b, model.hidden, t, sp, lay.sp_regather)
                       + memory.final_norm_bytes(s, b, model.hidden, t, sp, lay.loss == "eager"))
            if torch_pp and lay.pp_return_outputs:
                kept = memory.kept_output_bytes(b, s, model.vocab, t, m)
            other += max(at_loss + kept, kept + extra) - extra
        if torch_pp:
            buffers = memory.pipeline_buffer_bytes(s, b, model.hidden, t, sp, m, sum(k > 0 for k in mine),
                                                   sum(k < stages - 1 for k in mine))
            other += at_boundaries + buffers
            if kept:
                # step() returns the kept logits concatenated (``merge_chunks``), after the last backward: both
                # copies live at once, with the states, the receive buffers and every input gradient left on them;
                # FSDP2 has resharded its gathered weights by then (the fp32 shards are the optimizer's).
                grads_left = m * boundary * sum(k > 0 for k in mine)
                gathered_left = 0.0 if lay.fsdp_runtime == "torch" and shard > 1 else weights
                at_end = gathered_left + shard_grads + optimizer + resident + buffers + grads_left + 2 * kept
                other += max(0.0, at_end - (weights + grads + optimizer + act + other))
        gb = {"params": weights / 1e9, "grads": grads / 1e9, "optimizer": optimizer / 1e9,
              "activations": act / 1e9, "other": other / 1e9, "allocator": 0.0}
        gb["total"] = sum(gb.values())
        per_rank.append(gb)
    return per_rank


def rank_spec(model: ModelConfig, lay: Layout, counts, m: int, rank: int, sp: bool) -> step_trace.RankSpec | None:
    """What :mod:`~dspark_lab.planner.model.step_trace` needs to write one rank's allocations, over
    :func:`traced_microbatches` of the step's ``m``; None where one rank is too deep to replay."""
    t, p, v = lay.tp, lay.pp, lay.vpp
    m = traced_microbatches(m, p, -(-model.layers // p))
    if m is None:
        return None
    shape = block_trace.Shape(s=model.seq_len // lay.cp, b=lay.micro_batch, h=model.hidden, t=t, sp=sp,
                             kv_ratio=model.kv_heads / model.heads, ffn=model.ffn_hidden,
                             swiglu=model.ffn_kind == "swiglu", fused=lay.kernels == "fused",
                             fp8=lay.precision == "fp8", cp=lay.cp)
    if p > 1:
        sched = liveness.schedule(lay.schedule, p, m, v, lay.pp_runtime)
        ops = tuple((kind, mb, sched.where(rank, chunk)[1] % len(counts))
                    for op in sched.ops[rank] for kind, mb, chunk in op.parts() if kind != "W")
    else:
        ops = tuple(x for mb in range(m) for x in (("F", mb, 0), ("B", mb, 0)))
    return step_trace.RankSpec(
        shape=shape, stage_layers=tuple(counts), ops=ops, microbatches=m,
        block_params=layer_params(model, 0, t, lay.ep), embedding_params=flops.embedding_params(model) / t,
        output_params=flops.output_params(model) / t, vocab=model.vocab / t, zero=lay.zero, shard=lay.dp * lay.cp,
        gathered_bytes=memory.unsharded_weight_bytes(lay.precision, lay.fp8_allgather),
        pipelined=p > 1 and lay.pp_runtime == "torch", keep_outputs=lay.pp_return_outputs, loss=lay.loss)
