"""Predict one training layout: step time, throughput, MFU, memory per GPU and where the time goes.

Per stage, forward (F), input-gradient (B) and weight-gradient (W) times come from per-operator FLOPs against the
device's peak through the efficiency model, plus memory-bound element-wise traffic and the exposed tensor-, context-
and expert-parallel communication of that stage's layers. The pipeline step is the project's own simulator
(``dspark_lab.pipeline.simulate``) run on those per-stage costs, so the bubble of any schedule it knows (1F1B,
interleaved, zero-bubble, ZB-V, DualPipe) comes from the op order, not a closed form. Exposed data-parallel
communication and the optimizer step are added after the pipeline drains. Layers that do not divide evenly over
``pp * vpp`` stages are split as Megatron and torchtitan do (Llama 3's first and last stages hold one layer less,
since they also hold the embedding and the output layer), and the slowest rank sets the pace.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from dspark_lab.errors import DSparkError
from dspark_lab.pipeline.simulate import Costs, dependency_graph, simulate
from dspark_lab.planner import rank_memory
from dspark_lab.planner.hardware import device
from dspark_lab.planner.model import comm, flops, liveness, memory, step_trace
from dspark_lab.planner.model.config import Cluster, Layout, ModelConfig, check_layout, refuse
from dspark_lab.planner.model.efficiency import FP8_GEMM_FACTOR, MEMORY_EFFICIENCY, Efficiency, efficiency
from dspark_lab.planner.presets import preset

GRAD_COMM_BYTES = 2  # gradients are reduced in bf16 (Megatron-Core grad_reduce_in_fp32=False)
FP8_CAST_BYTES = 5  # per element cast to FP8 with current scaling: read bf16 for amax (2), read again (2), write (1)


def elementwise_units(model: ModelConfig, kernels: str = "fused") -> tuple[float, float]:
    """Forward element-wise traffic of one layer (reads + writes, in 2-byte elements) in units of tokens*h and
    tokens*ffn. ``fused`` counts kernel by kernel as Megatron fuses them (and as torch.compile's Inductor does): each
    of the two norms reads x and writes y (2); each fused bias-dropout-add reads the branch output and the residual
    and writes the sum (3) and, with dropout, a 1-byte mask (0.5). The activation reads its input(s) and writes its
    output: GeLU 2, SwiGLU 3 (gate, up, out). The backward pass moves about twice this (input, output gradient and
    the stored tensors). ``eager`` counts the kernels PyTorch runs without a compiler for the Llama block as
    torchtitan writes it (:func:`eager_units`)."""
    if kernels == "eager":
        return eager_units(model)
    h_units = 2 * (2 + 3) + (1.0 if model.dropout else 0.0)
    return h_units, (3.0 if model.ffn_kind == "swiglu" else 2.0)


def eager_units(model: ModelConfig) -> tuple[float, float]:
    """Eager PyTorch's element-wise traffic for torchtitan's Llama block (torchtitan/models/llama/model.py and
    norms.py, Dec 2024), one kernel per op, fp32 elements counting 2. RMSNorm as ``(x.float() * rsqrt(mean(x^2) +
    eps)).type_as(x) * w``: cast (1 + 2), square (2 + 2), mean (2), scale (2 + 2), cast back (2 + 1), weight (1 + 1)
    = 18 per norm, two norms. RoPE on q and k through complex fp32: cast (1 + 2), complex multiply (2 + 2), cast
    back (2 + 1) = 10 per element of q and k. Grouped-query ``repeat_kv`` materialises k and v at full width (read
    kv, write h each). The attention output's ``transpose().contiguous()`` copy (2); the two residual adds (3 each);
    dropout (read, write, 1-byte mask: 2.5, twice) where the model has it. SwiGLU: ``silu`` (2) and the product (3)
    per ffn element; GeLU one kernel (2)."""
    kv = model.kv_heads / model.heads
    h_units = 2 * 18 + 10 * (1 + kv) + 2 + 2 * 3
    if model.kv_heads != model.heads:
        h_units += 2 * (kv + 1)
    if model.dropout:
        h_units += 2 * 2.5
    return h_units, (5.0 if model.ffn_kind == "swiglu" else 2.0)


def split_layers(layers: int, stages: int) -> list[int]:
    """Layers per stage: as even as possible, the short stages first at the two ends (which hold the embedding
    and the output layer), then alternating inwards."""
    base, extra = divmod(layers, stages)
    counts = [base] * stages
    order = sorted(range(stages), key=lambda i: (-min(i, stages - 1 - i), i))  # middle stages first
    for i in order[:extra]:
        counts[i] += 1
    return counts


@dataclass(frozen=True, slots=True)
class Inputs:
    model: ModelConfig
    cluster: Cluster
    layout: Layout


def parse(obj: Any, where: str = "config") -> Inputs:
    if not isinstance(obj, dict):
        raise refuse(where, f"must be an object with model, cluster, layout; got {type(obj).__name__}")
    extra = sorted(set(obj) - {"model", "cluster", "layout"})
    if extra:
        raise refuse(f"{where}.{extra[0]}", "unknown field; allowed: model, cluster, layout")
    for key in ("model", "cluster", "layout"):
        if key not in obj:
            raise refuse(f"{where}.{key}", "is required")
    model_obj = preset(obj["model"]) if isinstance(obj["model"], str) else obj["model"]
    return Inputs(ModelConfig.from_dict(model_obj), Cluster.from_dict(obj["cluster"]),
                  Layout.from_dict(obj["layout"]))


# --- pipeline simulation, cached on normalised costs --------------------------------------------------------------

@lru_cache(maxsize=256)
def _schedule_graph(schedule: str, p: int, m: int, v: int, runtime: str):
    try:
        return dependency_graph(liveness.schedule(schedule, p, m, v, runtime))
    except ValueError as exc:
        raise refuse("layout.schedule", str(exc)) from None


@lru_cache(maxsize=4096)
def _simulate(schedule: str, p: int, m: int, v: int, stage_costs: tuple, comm_s: float, runtime: str):
    graph = _schedule_graph(schedule, p, m, v, runtime)
    s = graph.schedule
    table = {}
    for r in range(p):
        for c in range(s.chunks):
            _, stage = s.where(r, c)
            f, b, w = stage_costs[stage % len(stage_costs)]
            table.update({(r, c, "F"): f, (r, c, "B"): b + w, (r, c, "Bi"): b, (r, c, "W"): w,
                          (r, c, "FB"): f + b + w})
    sim = simulate(s, Costs(f=1.0, b=1.0, w=1.0, comm=comm_s, table=table), graph)
    return sim.step_time, tuple(sim.busy), s.chunks


def simulate_pipeline(schedule: str, p: int, m: int, v: int, costs: list[tuple[float, float, float]],
                      comm_s: float, runtime: str = "megatron"):
    """(step time, busy per rank, chunks per rank). Costs are normalised by the largest forward and rounded to 0.1%
    so layouts with proportional costs share one simulation."""
    unit = max(f for f, _, _ in costs) or 1.0
    key = tuple(tuple(round(x / unit, 3) for x in c) for c in costs)
    step, busy, chunks = _simulate(schedule, p, m, v, key, round(comm_s / unit, 3), runtime)
    return step * unit, [b * unit for b in busy], chunks


# --- the model --------------------------------------------------------------------------------------------------

def _gemm_time(g: flops.Gemm, peak: float, eff: Efficiency, fp8: bool) -> float:
    e = eff.gemm(g.min_dim) * (FP8_GEMM_FACTOR if fp8 and g.weights else 1.0)
    return g.flops / (peak * max(e, 1e-3))


def predict_inputs(inp: Inputs, manager=None, allocator: bool = True) -> dict[str, Any]:
    """The prediction for one layout. ``allocator``: add what the caching allocator keeps reserved beyond the
    counted bytes where the framework reports reserved memory (torchtitan); a search leaves it out of its sweep
    and adds it to the layouts it returns."""
    model, cluster, lay = inp.model, inp.cluster, inp.layout
    check_layout(model, cluster, lay)
    dev = device(cluster, manager)
    eff = efficiency(dev.backend)
    t, p, d, c, e, v, b = lay.tp, lay.pp, lay.dp, lay.cp, lay.ep, lay.vpp, lay.micro_batch
    s, h = model.seq_len, model.hidden
    fp8 = lay.precision == "fp8"
    peak = dev.peak_flops(lay.precision)
    bf16_peak = dev.peak_flops("bf16")
    hbm = dev.hbm_gb_s * 1e9 * MEMORY_EFFICIENCY
    links = dev.links
    tokens = b * s // c  # tokens of one micro-batch on one GPU (CP splits the sequence)
    counts, m, sp = _pipeline_shape(model, lay)
    flash = lay.attention == "flash"
    per_node = links.gpus_per_node

    # Communication of one layer's forward (backward moves the same again).
    act_bytes = tokens * h * 2
    tp_fwd = 2 * comm.collective("all_reduce", act_bytes, t, 1, links)
    if sp:  # an all-gather before and a reduce-scatter after each of attention and MLP
        tp_fwd = 2 * (comm.collective("all_gather", act_bytes, t, 1, links)
                      + comm.collective("reduce_scatter", act_bytes, t, 1, links))
    tp_exposed = 0.2 if lay.overlap_tp_comm else 1.0
    # Megatron's SP keeps only the sequence shard of each column-parallel layer's input and gathers it again in
    # backward for the weight gradient (Korthikanti et al. 2022, section 4.2.2): two more all-gathers per layer in
    # backward. torchtitan's DTensor autograd keeps the gathered input instead (``sp_regather`` false).
    tp_bwd_extra = (2 * comm.collective("all_gather", act_bytes, t, 1, links)
                    if sp and lay.sp_regather else 0.0)
    kv_bytes = 2 * b * (s // c) * h * model.kv_heads // model.heads * 2 / t
    cp_fwd = (c - 1) * comm.p2p(kv_bytes, t * c > per_node, links) if c > 1 else 0.0
    ep_overlap = 0.1 if lay.schedule in ("dualpipe", "dualpipev") else 1.0

    elem_h, elem_f = elementwise_units(model, lay.kernels)

    def layer_costs(index: int) -> dict[str, float]:
        gemms = flops.layer_gemms(model, index, tokens, t, c, e, b, causal_half=flash)
        fwd = sum(_gemm_time(g, peak if g.weights else bf16_peak, eff, fp8) for g in gemms)
        bgrad = fwd + sum(_gemm_time(g, bf16_peak, eff, False) for g in gemms if not g.weights)  # core: 2x in B
        wgrad = sum(_gemm_time(g, peak, eff, fp8) for g in gemms if g.weights)
        core = next(_gemm_time(g, bf16_peak, eff, False) for g in gemms if g.name == "attention")
        ffn = model.moe_ffn_hidden * model.top_k if model.is_moe_layer(index) else model.ffn_hidden
        elem = (elem_h * tokens * h / (t if sp else 1) + elem_f * tokens * ffn / t) * 2
        if fp8:  # the inputs of the weight GEMMs and the weights cast in forward; output gradients in backward
            cast = tokens * (2 * h + (h + ffn) / t) + flops.layer_params(model, index, active=True) / t
            elem += FP8_CAST_BYTES * cast
        if not flash:  # scale-mask-softmax and dropout over the score matrix
            elem += 4 * 2 * b * model.heads / t * (s // c) * s
        elem_t = elem / hbm
        tp_t = tp_fwd * tp_exposed
        cp_t = max(0.0, cp_fwd - core)
        ep_t = 0.0
        if model.is_moe_layer(index) and e > 1:
            a2a = comm.collective("all_to_all", tokens * model.top_k * h * 2, e, t, links)
            ep_t = 2 * a2a * ep_overlap
        recompute = 0.0
        if lay.recompute == "full":
            recompute = fwd + elem_t + tp_t + ep_t
        elif lay.recompute == "selective":
            recompute = core + (4 * 2 * b * model.heads / t * (s // c) * s / hbm if not flash else 0.0)
        elif lay.recompute == "selective-op":  # wk, wo, the FFN's second matmul and every element-wise op again
            recompute = elem_t + tp_t / 2  # + the all-gathers (the reduce-scatters are saved)
            for g in gemms:
                gt = _gemm_time(g, peak, eff, fp8) if g.weights else 0.0
                if g.name == "qkv":
                    kvr = model.kv_heads / model.heads
                    recompute += gt * kvr / (1 + 2 * kvr)
                elif g.name == "proj":
                    recompute += gt
                elif g.name == "mlp":
                    recompute += gt / flops.ffn_matrices(model)
        return {"f": fwd + elem_t, "b": bgrad + 2 * elem_t, "w": wgrad, "tp": tp_t, "cp": cp_t, "ep": ep_t,
                "tp_bwd": tp_t + tp_bwd_extra * tp_exposed,
                "recompute": recompute, "compute": fwd + elem_t + bgrad + 2 * elem_t + wgrad}

    stages = p * v
    starts = [sum(counts[:i]) for i in range(stages)]
    logits = flops.logits_gemm(model, tokens, t)
    logits_t = _gemm_time(logits, bf16_peak, eff, False) + 3 * tokens * model.vocab / t * 4 / hbm  # + softmax/CE
    cache: dict[bool, dict[str, float]] = {}

    def cost_of(i: int) -> dict[str, float]:
        key = model.is_moe_layer(i)
        if key not in cache:
            cache[key] = layer_costs(i)
        return cache[key]

    stage_costs, stage_parts = [], []
    for k in range(stages):
        parts = {"compute": 0.0, "recompute": 0.0, "tp": 0.0, "cp": 0.0, "ep": 0.0}
        f = bb = w = 0.0
        for i in range(starts[k], starts[k] + counts[k]):
            lc = cost_of(i)
            f += lc["f"] + lc["tp"] + lc["cp"] + lc["ep"] / 2
            bb += lc["b"] + lc["recompute"] + lc["tp_bwd"] + 2 * lc["cp"] + lc["ep"] / 2
            w += lc["w"]
            for key in parts:
                parts[key] += lc[key] if key != "cp" else 3 * lc["cp"]
            parts["tp"] += lc["tp_bwd"]  # backward's share
        if k == stages - 1:
            f += logits_t
            bb += logits_t
            w += logits_t
            parts["compute"] += 3 * logits_t
        stage_costs.append((f, bb, w))
        stage_parts.append(parts)

    # The output layer stays in BF16 under FP8 recipes (Transformer Engine's and torchtitan's float8 skip it).
    # Each TP rank sends its 1/t of the boundary activation (already sharded by SP, else Megatron's scatter-gather
    # optimisation, Narayanan et al. 2021 section 4.1, whose intra-node all-gather rides NVLink).
    p2p_t = comm.p2p(tokens * h * 2 / t, t * c * d >= per_node, links) if p > 1 else 0.0
    if p > 1:
        step, busy, chunks = simulate_pipeline(lay.schedule, p, m, v, stage_costs, p2p_t, lay.pp_runtime)
    else:
        f, bb, w = stage_costs[0]
        step, busy, chunks = m * (f + bb + w), [m * (f + bb + w)], 1
    slow = max(range(p), key=lambda r: busy[r])
    rank_stages = rank_memory.rank_stages(slow, p, v, chunks, stages)
    parts = {key: m * sum(stage_parts[k][key] for k in rank_stages) for key in stage_parts[0]}

    # Data-parallel gradient reduction and parameter gather, over dp*cp ranks placed tp apart.
    stage_params = rank_memory.stage_params(model, counts, starts, rank_stages, t, e)
    # Gathered bytes: the blocks' weights travel in fp8 under FSDP's fp8 all-gather (memory.unsharded_weight_bytes)
    fp8_gathered = memory.unsharded_weight_bytes(lay.precision, lay.fp8_allgather) == 1
    blocks = rank_memory.block_params(model, counts, starts, rank_stages, t, e)
    gather_bytes = 2 * stage_params - (blocks if fp8_gathered else 0)
    shard = d * c
    dp_t = 0.0
    if shard > 1:
        if lay.zero >= 3:
            per_mb = (2 * comm.collective("all_gather", gather_bytes, shard, t, links)
                      + comm.collective("reduce_scatter", 2 * stage_params, shard, t, links))
            mb_compute = sum(sum(stage_costs[k]) for k in rank_stages)
            dp_t = m * max(0.0, per_mb - 0.8 * mb_compute) + per_mb / max(1, len(rank_stages) * 4)
        else:
            kind = "reduce_scatter" if lay.zero >= 1 else "all_reduce"
            grad = comm.collective(kind, GRAD_COMM_BYTES * stage_params, shard, t, links)
            gather = comm.collective("all_gather", gather_bytes, shard, t, links) if lay.zero >= 1 else 0.0
            window = sum(stage_costs[k][1] + stage_costs[k][2] for k in rank_stages)  # last micro-batch's backward
            grad_exposed = max(0.0, grad - window) + 0.05 * grad if lay.overlap_grad_reduce else grad
            fwd_window = sum(stage_costs[k][0] for k in rank_stages)
            gather_exposed = max(0.0, gather - fwd_window) + 0.05 * gather if lay.overlap_param_gather else gather
            dp_t = grad_exposed + gather_exposed
    opt_params = stage_params / (shard if lay.zero >= 1 else 1)
    optimizer_t = opt_params * 30 / hbm  # Adam: fp32 master, grad, m, v read; master, m, v, bf16 weight written

    step_time = step + dp_t + optimizer_t
    busy_slow = busy[slow]
    tokens_step = lay.global_batch * s
    model_flops = flops.model_flops_per_token(model) * tokens_step
    hw_flops = model_flops + flops.recompute_flops_per_token(model, lay.recompute) * tokens_step
    gpus = cluster.gpus
    mem = rank_memory.fullest_rank(model, lay, counts, starts, m, chunks, dev, sp, allocator)
    return {
        "step_time_s": step_time,
        "tokens_per_s_per_gpu": tokens_step / step_time / gpus,
        "model_tflops_per_gpu": model_flops / step_time / gpus / 1e12,
        "hardware_tflops_per_gpu": hw_flops / step_time / gpus / 1e12,
        "mfu": model_flops / step_time / gpus / bf16_peak,
        "memory_gb": mem,
        "fits": mem["total"] <= dev.memory_gb,
        "device_memory_gb": dev.memory_gb,
        "breakdown_s": {"compute": parts["compute"], "recompute": parts["recompute"], "tp_comm": parts["tp"],
                        "cp_comm": parts["cp"], "ep_comm": parts["ep"], "dp_comm": dp_t,
                        "pipeline_bubble": max(0.0, step - busy_slow), "optimizer": optimizer_t},
        "layers_per_stage": counts,
        "microbatches": m,
        "gpu": dev.backend,
        "efficiency_from": eff.calibrated_on,
    }


def rank_trace_spec(config: Any, rank: int) -> step_trace.RankSpec | None:
    """What the memory prediction traces for pipeline rank ``rank`` of a config (to replay it elsewhere: the
    allocator benchmark replays it through PyTorch's allocator)."""
    inp = parse(config)
    counts, m, sp = _pipeline_shape(inp.model, inp.layout)
    return rank_memory.rank_spec(inp.model, inp.layout, counts, m, rank, sp)


def rank_memory_counts(config: Any) -> list[dict[str, float]]:
    """Each pipeline rank's memory of a config in GB, counted tensor by tensor at its own peak, without the
    allocator's share (:func:`rank_memory.counted_per_rank`): what the real-run check compares rank by rank."""
    inp = parse(config)
    model, lay = inp.model, inp.layout
    counts, m, sp = _pipeline_shape(model, lay)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    chunks = liveness.schedule(lay.schedule, lay.pp, m, lay.vpp, lay.pp_runtime).chunks if lay.pp > 1 else 1
    return rank_memory.counted_per_rank(model, lay, counts, starts, m, chunks, sp)


def _pipeline_shape(model: ModelConfig, lay: Layout) -> tuple[list[int], int, bool]:
    """Layers per pipeline stage, micro-batches per step, and whether sequence parallelism is on."""
    counts = split_layers(model.layers, lay.pp * lay.vpp)
    return counts, lay.global_batch // (lay.dp * lay.micro_batch), lay.sequence_parallel and lay.tp > 1


def predict(config: Any, manager=None, allocator: bool = True) -> dict[str, Any]:
    return predict_inputs(parse(config), manager, allocator)


def predict_many(configs: Any, manager=None, allocator: bool = True) -> list[dict[str, Any]]:
    items = configs if isinstance(configs, list) else [configs]
    if not items:
        raise DSparkError("config: an empty array; give one object or a non-empty array of them")
    if len(items) > 10000:
        raise DSparkError(f"config: at most 10000 layouts per call, got {len(items)}")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(predict(item, manager, allocator))
        except DSparkError as exc:
            raise DSparkError(f"[{i}] {exc}" if isinstance(configs, list) else str(exc)) from None
    return out
