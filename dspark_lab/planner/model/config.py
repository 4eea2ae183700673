"""The planner's inputs as small typed dataclasses, validated when built from JSON.

Vocabulary: ``tp`` tensor-parallel size, ``pp`` pipeline stages (ranks), ``vpp`` chunks (virtual stages) per
pipeline rank, ``dp`` data-parallel size, ``cp`` context-parallel size, ``ep`` expert-parallel size (carved out of
dp x cp, as Megatron-Core does). A *micro-batch* holds ``micro_batch`` sequences; a step consumes ``global_batch``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from dspark_lab.errors import DSparkError
from dspark_lab.planner import FRAMEWORKS

FFN_KINDS = ("gelu", "swiglu")
RECOMPUTE = ("none", "selective", "selective-op", "full")
KERNELS = ("fused", "eager")
LOSS = ("fused", "eager")
PP_RUNTIMES = ("megatron", "torch")  # torch: torch.distributed.pipelining (torchtitan)
FSDP_RUNTIMES = ("megatron", "torch")  # torch: FSDP2's side-stream collectives (torchtitan)
CP_ROTATES = ("ring", "allgather")  # how context parallelism exchanges K/V (torchtitan: allgather)
PRECISIONS = ("bf16", "fp8")
ATTENTION = ("flash", "unfused")
MAX_SIZE = 1 << 20  # bound on any count a user gives (layers, GPUs, batch, ...)


def refuse(field: str, message: str) -> DSparkError:
    return DSparkError(f"{field}: {message}")


def _int(obj: dict, field: str, where: str, default: Any = None, low: int = 1) -> int:
    value = obj.get(field, default)
    if value is None:
        raise refuse(f"{where}.{field}", "is required (an integer)")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_SIZE:
        raise refuse(f"{where}.{field}", f"must be an integer in {low}..{MAX_SIZE}, got {value!r}")
    return value


def _num(obj: dict, field: str, where: str, default: Any = None) -> float | None:
    value = obj.get(field, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
        raise refuse(f"{where}.{field}", f"must be a positive number, got {value!r}")
    return float(value)


def _choice(obj: dict, field: str, where: str, allowed: tuple, default: Any) -> Any:
    value = obj.get(field, default)
    if value not in allowed:
        raise refuse(f"{where}.{field}", f"must be one of {' | '.join(map(str, allowed))}, got {value!r}")
    return value


def framework_defaults(framework: str, pp: int, sharded: bool) -> dict[str, Any]:
    """The layout fields a framework sets, where the config leaves them out, differently from the planner's own
    defaults (the :class:`Layout` fields' defaults, which are Megatron-LM's: distributed optimizer, fused kernels
    and loss, selective recompute; so ``megatron`` sets none). ``torchtitan``: what
    torchtitan 9dec370 runs unless told otherwise (``config_manager.py`` and its Llama 3 train configs): eager
    kernels (``training.compile`` off), op-level selective AC (``selective_ac_option = 'op'`` in the Llama 3
    configs), ``cross_entropy`` on fp32 logits (``loss_parallel`` under TP), DTensor keeping the gathered TP input,
    torch.distributed.pipelining, FSDP2 (resharding after forward, ZeRO 3, except under PP, ZeRO 2; none when
    nothing is sharded), all-gather context parallelism, and float8's FSDP all-gather off. One field follows the
    torchtitan people run now instead: since #1922 (Oct 2025; torchtitan 0.2.2, tested here, has it) it calls the
    pipeline's ``step`` with ``return_outputs=False``, so no stage keeps its outputs (``pp_return_outputs`` false;
    9dec370 kept them, and its validation rows say so). ``sharded``: dp x cp > 1."""
    if framework == "torchtitan":
        return {"zero": (2 if pp > 1 else 3) if sharded else 0, "recompute": "selective-op", "kernels": "eager",
                "loss": "eager", "sp_regather": False, "pp_runtime": "torch", "fsdp_runtime": "torch",
                "cp_rotate": "allgather", "fp8_allgather": False, "pp_return_outputs": False}
    return {}


def _known(obj: Any, where: str, cls) -> dict:
    if not isinstance(obj, dict):
        raise refuse(where, f"must be an object, got {type(obj).__name__}")
    allowed = {f.name for f in fields(cls)}
    extra = sorted(set(obj) - allowed)
    if extra:
        raise refuse(f"{where}.{extra[0]}", f"unknown field; allowed: {', '.join(sorted(allowed))}")
    return obj


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq_len: int
    kv_heads: int
    ffn_hidden: int
    ffn_kind: str = "gelu"
    experts: int = 0
    top_k: int = 0
    moe_ffn_hidden: int = 0
    shared_experts: int = 0
    dense_layers: int = 0
    tied_embeddings: bool = False
    dropout: bool = True
    name: str = ""

    @classmethod
    def from_dict(cls, obj: dict, where: str = "model") -> "ModelConfig":
        _known(obj, where, cls)
        heads = _int(obj, "heads", where)
        hidden = _int(obj, "hidden", where)
        layers = _int(obj, "layers", where)
        kv = _int(obj, "kv_heads", where, heads)
        if hidden % heads:
            raise refuse(f"{where}.hidden", f"must be divisible by heads ({heads}), got {hidden}")
        if heads % kv:
            raise refuse(f"{where}.kv_heads", f"must divide heads ({heads}), got {kv}")
        experts = _int(obj, "experts", where, 0, low=0)
        top_k = _int(obj, "top_k", where, 2 if experts else 0, low=0)
        if experts and not 1 <= top_k <= experts:
            raise refuse(f"{where}.top_k", f"must be in 1..experts ({experts}), got {top_k}")
        dense = _int(obj, "dense_layers", where, 0, low=0)
        if dense > layers:
            raise refuse(f"{where}.dense_layers", f"must be <= layers ({layers}), got {dense}")
        ffn = _int(obj, "ffn_hidden", where, 4 * hidden)
        return cls(layers=layers, hidden=hidden, heads=heads, vocab=_int(obj, "vocab", where),
                   seq_len=_int(obj, "seq_len", where), kv_heads=kv, ffn_hidden=ffn,
                   ffn_kind=_choice(obj, "ffn_kind", where, FFN_KINDS, "gelu"), experts=experts, top_k=top_k,
                   moe_ffn_hidden=_int(obj, "moe_ffn_hidden", where, ffn if experts else 0, low=0),
                   shared_experts=_int(obj, "shared_experts", where, 0, low=0), dense_layers=dense,
                   tied_embeddings=_choice(obj, "tied_embeddings", where, (True, False), False),
                   dropout=_choice(obj, "dropout", where, (True, False), True), name=str(obj.get("name", "")))

    @property
    def moe(self) -> bool:
        return self.experts > 0

    def is_moe_layer(self, index: int) -> bool:
        return self.moe and index >= self.dense_layers


@dataclass(frozen=True, kw_only=True, slots=True)
class Cluster:
    gpu: str
    gpus: int
    gpus_per_node: int = 8
    scale_out_gb_s: float | None = None
    memory_gb: float | None = None
    hbm_gb_s: float | None = None
    power_limit_w: float | None = None

    @classmethod
    def from_dict(cls, obj: dict, where: str = "cluster") -> "Cluster":
        _known(obj, where, cls)
        gpu = obj.get("gpu")
        if not isinstance(gpu, str) or not gpu:
            raise refuse(f"{where}.gpu", "is required: a backend name (see `dspark-lab backends`)")
        return cls(gpu=gpu, gpus=_int(obj, "gpus", where), gpus_per_node=_int(obj, "gpus_per_node", where, 8),
                   scale_out_gb_s=_num(obj, "scale_out_gb_s", where), memory_gb=_num(obj, "memory_gb", where),
                   hbm_gb_s=_num(obj, "hbm_gb_s", where), power_limit_w=_num(obj, "power_limit_w", where))


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    global_batch: int
    cp: int = 1
    ep: int = 1
    vpp: int = 1
    zero: int = 1
    recompute: str = "selective"
    sequence_parallel: bool = True
    schedule: str = "1f1b"
    precision: str = "bf16"
    attention: str = "flash"
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    overlap_tp_comm: bool = False
    kernels: str = "fused"
    loss: str = "fused"
    sp_regather: bool = True
    pp_runtime: str = "megatron"
    fsdp_runtime: str = "megatron"
    cp_rotate: str = "ring"
    fp8_allgather: bool = False
    pp_return_outputs: bool = True
    framework: str = "megatron"

    @classmethod
    def from_dict(cls, obj: dict, where: str = "layout") -> "Layout":
        from dspark_lab.pipeline.schedules import SCHEDULES

        _known(obj, where, cls)
        tp = _int(obj, "tp", where)
        pp, dp, cp = _int(obj, "pp", where), _int(obj, "dp", where), _int(obj, "cp", where, 1)
        vpp = _int(obj, "vpp", where, 1)
        schedule = obj.get("schedule", "interleaved-1f1b" if vpp > 1 else "1f1b")
        if schedule not in SCHEDULES:
            raise refuse(f"{where}.schedule", f"must be one of {' | '.join(SCHEDULES)}, got {schedule!r}")
        framework = _choice(obj, "framework", where, FRAMEWORKS, "megatron")
        default = {f.name: f.default for f in fields(cls)} | framework_defaults(framework, pp, dp * cp > 1)

        def pick(field: str, allowed: tuple) -> Any:
            return _choice(obj, field, where, allowed, default[field])

        return cls(tp=tp, pp=pp, dp=dp, micro_batch=_int(obj, "micro_batch", where),
                   global_batch=_int(obj, "global_batch", where), cp=cp, ep=_int(obj, "ep", where, 1), vpp=vpp,
                   zero=pick("zero", (0, 1, 2, 3)), recompute=pick("recompute", RECOMPUTE),
                   sequence_parallel=_choice(obj, "sequence_parallel", where, (True, False), tp > 1),
                   schedule=schedule, precision=_choice(obj, "precision", where, PRECISIONS, "bf16"),
                   attention=_choice(obj, "attention", where, ATTENTION, "flash"),
                   overlap_grad_reduce=_choice(obj, "overlap_grad_reduce", where, (True, False), True),
                   overlap_param_gather=_choice(obj, "overlap_param_gather", where, (True, False), True),
                   overlap_tp_comm=_choice(obj, "overlap_tp_comm", where, (True, False), False),
                   kernels=pick("kernels", KERNELS), loss=pick("loss", LOSS),
                   sp_regather=pick("sp_regather", (True, False)), pp_runtime=pick("pp_runtime", PP_RUNTIMES),
                   fsdp_runtime=pick("fsdp_runtime", FSDP_RUNTIMES), cp_rotate=pick("cp_rotate", CP_ROTATES),
                   fp8_allgather=pick("fp8_allgather", (True, False)),
                   pp_return_outputs=pick("pp_return_outputs", (True, False)), framework=framework)


def check_layout(model: ModelConfig, cluster: Cluster, layout: Layout) -> None:
    """Refuse a layout that cannot exist, in one line naming the field."""
    t, p, d, c, e = layout.tp, layout.pp, layout.dp, layout.cp, layout.ep
    if t * p * d * c != cluster.gpus:
        raise refuse("layout", f"tp*pp*dp*cp = {t}*{p}*{d}*{c} = {t * p * d * c} must equal cluster.gpus "
                               f"({cluster.gpus})")
    if model.heads % t:
        raise refuse("layout.tp", f"must divide model.heads ({model.heads}), got {t}")
    if model.kv_heads % t and t % model.kv_heads:
        raise refuse("layout.tp", f"must divide or be a multiple of model.kv_heads ({model.kv_heads}), got {t}")
    if p * layout.vpp > model.layers + (2 if p * layout.vpp > 1 else 0):
        # Up to two stages may hold no layer: the first and last, which hold the embedding and the output layer
        # (Llama 3 405B's first chunk holds only the embedding, section 3.3.2).
        raise refuse("layout.pp", f"pp*vpp = {p * layout.vpp} stages is more than model.layers + 2 "
                                  f"({model.layers + 2}; only the end stages may hold no layer)")
    if layout.vpp > 1 and layout.schedule not in ("interleaved-1f1b",):
        raise refuse("layout.vpp", f"vpp > 1 needs schedule interleaved-1f1b, got {layout.schedule!r}")
    if layout.schedule in ("zbv", "dualpipev", "dualpipe") and 2 * p > model.layers:
        raise refuse("layout.schedule", f"{layout.schedule} holds 2 stages per rank: needs 2*pp <= model.layers")
    if model.seq_len % c:
        raise refuse("layout.cp", f"must divide model.seq_len ({model.seq_len}), got {c}")
    if e > 1 and not model.moe:
        raise refuse("layout.ep", f"must be 1 for a dense model, got {e}")
    if model.moe and (model.experts % e or (d * c) % e):
        raise refuse("layout.ep", f"must divide model.experts ({model.experts}) and dp*cp ({d * c}), got {e}")
    per_dp = layout.global_batch / d
    if layout.global_batch % (d * layout.micro_batch):
        raise refuse("layout.global_batch", f"must be a multiple of dp*micro_batch ({d * layout.micro_batch}), "
                                            f"got {layout.global_batch}")
    m = int(per_dp) // layout.micro_batch
    if layout.schedule == "interleaved-1f1b" and p > 1 and m % p:
        raise refuse("layout.global_batch", f"interleaved-1f1b needs micro-batches per pipeline ({m}) to be a "
                                            f"multiple of pp ({p})")
    if layout.schedule in ("dualpipe",) and (m % 2 or p % 2):
        raise refuse("layout.schedule", "dualpipe needs an even pp and an even number of micro-batches")
