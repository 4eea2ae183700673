"""Search training layouts: enumerate the valid ones (tp, pp, vpp, dp, cp, ep, zero, recompute, micro-batch,
schedule), predict each, and keep the best ``top`` by predicted throughput among those that fit in memory.

The space is pruned the way practitioners prune it (and AutoDDL / Alpa-style searches do): tensor parallelism stays
inside a node, pipeline stages hold at least one layer, context parallelism is tried only where the sequence is long
(>= 8192), expert parallelism only for MoE models. Selective recompute is not tried: with a fused (flash) attention
kernel there are no attention scores to drop, so it costs time and saves nothing (``none`` dominates it). ZeRO 1
(Megatron's distributed optimizer, preallocated fp32 gradient buffer) and 2 (FSDP-style, gradients made during
backward, as Llama 3 ran) are both tried. With ``framework="torchtitan"`` the space is what torchtitan runs: FSDP2
(ZeRO 3, or 2 under PP; :func:`~dspark_lab.planner.model.config.framework_defaults`) and its op-level selective AC
as a third recompute choice, and without PP one micro-batch per step (it has no gradient accumulation).
``fixed`` sets layout fields the search does not vary (precision, kernels, ...) on
every candidate. Pipeline simulations and memory walks are cached across layouts
(``predict.simulate_pipeline``, ``model.liveness``). The caching allocator's reserved overhead (torchtitan's layouts,
``model.step_trace``; a few tenths of a second each) is left out of the sweep and added to the layouts returned,
going down the ranking while one no longer fits.
"""

from __future__ import annotations

import time
from typing import Any

from dspark_lab.errors import DSparkError
from dspark_lab.planner.model.config import (FRAMEWORKS, MAX_SIZE, Cluster, Layout, ModelConfig, check_layout,
                                             framework_defaults)
from dspark_lab.planner.predict import Inputs, predict_inputs

MAX_GPUS = 1 << 20
MAX_TOP = 1000
SEARCHED = ("tp", "pp", "dp", "cp", "ep", "vpp", "micro_batch", "zero", "recompute", "schedule")
NOT_FIXABLE = (*SEARCHED, "global_batch", "framework", "sequence_parallel")


def _divisors(n: int, limit: int) -> list[int]:
    return [k for k in range(1, min(n, limit) + 1) if n % k == 0]


def check_fixed(fixed: dict[str, Any]) -> None:
    """Refuse a fixed field the search varies or the layout does not have, in one line."""
    allowed = sorted(f for f in Layout.__slots__ if f not in NOT_FIXABLE)
    for key in fixed:
        if key not in allowed:
            what = "is searched" if key in NOT_FIXABLE else "is not a layout field"
            raise DSparkError(f"--with {key}: {what}; fixable fields: {', '.join(allowed)}")


def candidates(model: ModelConfig, cluster: Cluster, global_batch: int, framework: str = "megatron",
               fixed: dict[str, Any] | None = None) -> list[Layout]:
    """Every layout of the pruned space that passes :func:`check_layout`, in a fixed order."""
    if framework not in FRAMEWORKS:
        raise DSparkError(f"--framework: must be one of {' | '.join(FRAMEWORKS)}, got {framework!r}")
    fixed = dict(fixed or {})
    check_fixed(fixed)
    # a bad fixed value is refused here, once, in one line (not dropped silently with every candidate below)
    Layout.from_dict({**fixed, "tp": 1, "pp": 1, "dp": 1, "micro_batch": 1, "global_batch": 1}, "--with")
    recomputes = ("none", "selective-op", "full") if framework == "torchtitan" else ("none", "full")
    out = []
    g = cluster.gpus
    cps = [c for c in (1, 2, 4, 8, 16) if model.seq_len >= 8192 * c // 2 and model.seq_len % c == 0] or [1]
    for tp in [t for t in (1, 2, 4, 8) if t <= cluster.gpus_per_node and g % t == 0]:
        for cp in [c for c in cps if g % (tp * c) == 0]:
            for pp in _divisors(g // (tp * cp), model.layers):
                dp = g // (tp * cp * pp)
                for mb in _micro_batches(framework, pp, global_batch // dp if global_batch % dp == 0 else 0):
                    if global_batch % (dp * mb):
                        continue
                    m = global_batch // (dp * mb)
                    eps = [e for e in (1, 2, 4, 8, 16, 32, 64) if model.moe and model.experts % e == 0
                           and (dp * cp) % e == 0] or [1]
                    schedules = [("1f1b", 1)]
                    if pp > 1:
                        schedules += [("interleaved-1f1b", v) for v in (2, 4, 8)
                                      if pp * v <= model.layers + 2 and m % pp == 0]
                    for schedule, vpp in schedules:
                        for ep in eps:
                            for recompute in recomputes:
                                for zero in _zeros(framework, pp, dp * cp > 1):
                                    fields = dict(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, vpp=vpp, micro_batch=mb,
                                                  global_batch=global_batch, zero=zero, recompute=recompute,
                                                  schedule=schedule, framework=framework)
                                    layout = Layout.from_dict({**fixed, **fields}, "--with")
                                    try:
                                        check_layout(model, cluster, layout)
                                    except DSparkError:
                                        continue
                                    out.append(layout)
    return out


def _micro_batches(framework: str, pp: int, local_batch: int) -> tuple[int, ...]:
    """Micro-batch sizes tried. torchtitan 9dec370 has no gradient accumulation, so without PP its local batch is
    one micro-batch, whatever its size."""
    if framework == "torchtitan" and pp == 1:
        return (local_batch,) if local_batch else ()
    return (1, 2, 4)


def _zeros(framework: str, pp: int, sharded: bool) -> tuple[int, ...]:
    """ZeRO stages tried: Megatron's distributed optimizer (1) and FSDP-style (2) wherever anything is sharded;
    torchtitan's one choice (its FSDP2 setting for that pipeline)."""
    if framework == "megatron":
        return (1, 2) if sharded else (0,)
    return (framework_defaults(framework, pp, sharded)["zero"],)


def layout_dict(layout: Layout) -> dict[str, Any]:
    return {k: getattr(layout, k) for k in SEARCHED}


def _without_zero(layout: Layout) -> tuple:
    return tuple(v for k, v in layout_dict(layout).items() if k != "zero")


def search(model: ModelConfig, cluster: Cluster, global_batch: int, top: int = 5,
           max_memory_gb: float | None = None, manager=None, points: bool = False, framework: str = "megatron",
           fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``top`` fitting layouts by predicted throughput; ``points``: also every evaluated layout's throughput,
    memory and whether it fits (what the bokeh view plots). ``framework`` and ``fixed``: :func:`candidates`."""
    if not 1 <= top <= MAX_TOP:
        raise DSparkError(f"top: must be in 1..{MAX_TOP}, got {top}")
    if not 1 <= global_batch <= MAX_SIZE:
        raise DSparkError(f"global_batch: must be in 1..{MAX_SIZE}, got {global_batch}")
    start = time.perf_counter()
    layouts = candidates(model, cluster, global_batch, framework, fixed)
    results, scatter = [], []
    limit = None
    for layout in layouts:
        pred = predict_inputs(Inputs(model, cluster, layout), manager, allocator=False)
        limit = max_memory_gb if max_memory_gb is not None else pred["device_memory_gb"]
        fits = pred["memory_gb"]["total"] <= limit
        if fits:
            results.append((layout, pred))
        if points:
            scatter.append({"layout": layout_dict(layout), "tokens_per_s_per_gpu": pred["tokens_per_s_per_gpu"],
                            "memory_gb": pred["memory_gb"]["total"], "fits": fits})
    # ZeRO 2 is kept only where it saves memory over its ZeRO 1 twin (same communication in this model).
    zero1 = {_without_zero(lay): pred["memory_gb"]["total"] for lay, pred in results if lay.zero == 1}
    results = [(lay, pred) for lay, pred in results
               if lay.zero != 2 or pred["memory_gb"]["total"] < zero1.get(_without_zero(lay), float("inf")) - 1e-6]
    # Highest throughput first; ties broken by less memory, then by the layout's fields (deterministic).
    results.sort(key=lambda lp: (-round(lp[1]["tokens_per_s_per_gpu"], 9), lp[1]["memory_gb"]["total"],
                                 tuple(str(v) for v in layout_dict(lp[0]).values())))
    best = []
    for lay, _ in results:  # the allocator's reserved overhead (torchtitan) only for the layouts returned
        if len(best) == top:
            break
        pred = predict_inputs(Inputs(model, cluster, lay), manager)
        if pred["memory_gb"]["total"] <= limit:
            best.append({"layout": layout_dict(lay), **pred})
    out = {"model": model.name or "custom", "gpu": cluster.gpu, "gpus": cluster.gpus, "global_batch": global_batch,
           "seq_len": model.seq_len, "framework": framework, "fixed": dict(fixed or {}), "evaluated": len(layouts),
           "fitting": len(results), "memory_limit_gb": limit,
           "search_time_s": time.perf_counter() - start, "results": best}
    if points:
        out["points"] = scatter
    return out
