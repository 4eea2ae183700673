"""The planner's per-rank memory count against a real ``torch.distributed.pipelining`` run.

The planner counts each pipeline rank's memory tensor by tensor at the peak its schedule's op order gives
(``planner/rank_memory.py``: the layer inputs full recompute keeps for every micro-batch in flight, the layer being
recomputed, the receive buffers and outputs ``torch.distributed.pipelining`` keeps, the loss, the gradients made
at each stage's first backward and, under FSDP, freed at its last). Here torchtitan's own Llama 3 model runs under
``torch.distributed.pipelining`` (gloo, one process per rank, on CPU, full activation checkpointing as torchtitan
applies it; with ``dp`` above 1, FSDP2 as torchtitan applies it under PP) with ``Schedule1F1B`` and
``ScheduleInterleaved1F1B``, and each rank's live bytes come from PyTorch's profiler, which sees every allocation
and free of the CPU allocator. Nothing is fitted to these runs (docs/planner.md, "A real run that checks").

Per rank, measured: the most bytes live during the second step beyond what existed before the profiler started
(the weights; with FSDP their fp32 shards), i.e. what the first step left (receive buffers, the outputs kept for
``step()``) plus what the second makes. Counted: the planner's count for the same layout less what exists only on
a GPU (3 GB of CUDA context and workspaces; FSDP2's side-stream reserve), with its fp32 gradients at 2 bytes where
the run keeps bf16 ones (no FSDP) and the gathered bf16 weights added where FSDP gathers them during the step. The
stages hold the layers the planner assigns. A pipeline rank with dp above 1 reports its fullest process.

    python benchmarks/pipeline_memory.py                  # 4 ranks, 16 layers (about 3 min on 2 cores)
    python benchmarks/pipeline_memory.py --shape t5-fsdp  # torchtitan's Table 5 shape scaled down, FSDP2 over 2
    python benchmarks/pipeline_memory.py --shape t5       # the same without FSDP: 8 ranks, 126 layers (11 min)
    python benchmarks/pipeline_memory.py --shape t5 --explain 7   # and what rank 7's peak holds, by what made it
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dspark_lab.planner.model.memory import GRAD_BYTES  # noqa: E402
from dspark_lab.planner.predict import rank_memory_counts, split_layers  # noqa: E402
from dspark_lab.planner.rank_memory import OTHER_GB  # noqa: E402

RUN_GRAD_BYTES = 2  # bf16 gradients in the run
MARKER = 12345  # bytes of a throwaway tensor whose free marks the second step's start in the profile

# Shapes: torchtitan Llama arguments and the pipeline. "t5" keeps the ratios of torchtitan's Table 5 run per GPU
# (405B, TP 8 with SP, PP 8, 8 micro-batches, 126 layers): vocab / hidden 7.8 (16032 / 2048 per GPU), one KV head
# in 8, and a stage's gradient bytes about 170 layer inputs of one micro-batch (186 there).
SHAPES = {
    "small": dict(layers=16, hidden=128, heads=4, kv_heads=2, vocab=1024, multiple_of=64, seq=64, micro_batch=4,
                  microbatches=8, pp=4),
    "fsdp": dict(layers=16, hidden=128, heads=4, kv_heads=2, vocab=1024, multiple_of=64, seq=64, micro_batch=4,
                 microbatches=4, pp=2, dp=2),
    "t5-fsdp": dict(layers=63, hidden=128, heads=8, kv_heads=1, vocab=1000, multiple_of=32, seq=64, micro_batch=4,
                    microbatches=4, pp=4, dp=2),
    "t5": dict(layers=126, hidden=128, heads=8, kv_heads=1, vocab=1000, multiple_of=32, seq=32, micro_batch=4,
               microbatches=8, pp=8),
}
RUNS = {  # (vpp, return_outputs) per shape
    "small": [(1, True), (2, True), (1, False)],
    "fsdp": [(1, True), (2, True)],
    "t5": [(1, True), (2, True)],
    "t5-fsdp": [(1, True), (2, True)],
}


def build_model(shape: dict, bf16: bool):
    """torchtitan's Llama 3 with the shape's arguments; bf16 weights unless FSDP2 keeps fp32 ones and gathers
    bf16 copies (its RoPE table stays complex64 either way)."""
    import torch
    from torchtitan.models.llama3.model.args import TransformerModelArgs
    from torchtitan.models.llama3.model.model import Transformer

    args = TransformerModelArgs(dim=shape["hidden"], n_layers=shape["layers"], n_heads=shape["heads"],
                                n_kv_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                                multiple_of=shape["multiple_of"], max_seq_len=shape["seq"])
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    if bf16:
        for param in model.parameters():
            param.data = param.data.to(torch.bfloat16)
    return model


def ffn_hidden(shape: dict) -> int:
    """The SwiGLU width torchtitan's FeedForward computes from ``4 * dim`` and ``multiple_of``."""
    width, multiple = int(2 * 4 * shape["hidden"] / 3), shape["multiple_of"]
    return multiple * -(-width // multiple)


def stage_modules(whole, counts: list[int], stage: int, dp_mesh=None):
    """One pipeline stage as torchtitan builds it: a copy of the model without the other stages' layers (each
    kept layer wrapped for full activation checkpointing), the embedding only on the first stage, the final norm
    and output layer only on the last; with ``dp_mesh``, FSDP2 over it as torchtitan applies it under PP (each
    layer, then the stage; bf16 compute, fp32 reduction; no resharding after forward)."""
    import torch
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    part = copy.deepcopy(whole)
    first = sum(counts[:stage])
    keep = {str(i) for i in range(first, first + counts[stage])}
    for name in list(part.layers.keys()):
        if name in keep:
            part.layers[name] = checkpoint_wrapper(part.layers[name], preserve_rng_state=False)
        else:
            del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
    if stage != len(counts) - 1:
        part.norm = part.output = None
    if dp_mesh is not None:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in part.layers.values():
            fully_shard(layer, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
        fully_shard(part, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    return part


def _allocations(profiler) -> list:
    """The profiler's allocation and free events (nodes of its event tree), in time order."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    nodes = [node for node in walk(profiler.profiler.kineto_results.experimental_event_tree())
             if node.tag == _EventType.Allocation]
    return sorted(nodes, key=lambda node: node.start_time_ns)


def _live_at_peak(profiler) -> tuple[int, list]:
    """Most bytes live after the marker's free, counting from the profiler's start, and the allocations live then.
    Allocations are matched to frees by address, and an address allocated again counts once: the profiler misses a
    free made on a thread it does not trace (gloo's), so a running sum of its events would drift upward."""
    live: dict[int, object] = {}
    total, peak, at_peak, started = 0, 0, [], False
    for node in _allocations(profiler):
        ptr, nbytes = node.extra_fields.ptr, node.extra_fields.alloc_size
        if nbytes > 0:
            old = live.get(ptr)
            total += nbytes - (old.extra_fields.alloc_size if old is not None else 0)
            live[ptr] = node
        else:
            old = live.pop(ptr, None)
            total -= old.extra_fields.alloc_size if old is not None else 0
        if not started:
            started = nbytes == -MARKER
            continue
        if total > peak:
            peak, at_peak = total, list(live.values())
    return peak, at_peak


def _peak_after_marker(profiler) -> int:
    return _live_at_peak(profiler)[0]


def _made_by(node) -> str:
    """The op and the innermost torch / torchtitan Python frame an allocation was made under (``--explain``)."""
    from torch._C._profiler import _EventType

    op = frame = None
    parent = node.parent
    while parent is not None and not (op and frame):
        if parent.tag == _EventType.PyCall and frame is None and ("torch" in parent.name):
            frame = parent.name
        elif parent.tag == _EventType.TorchOp and op is None:
            op = parent.name
        parent = parent.parent
    return f"{op or '-'} under {frame or 'no torch or torchtitan frame (the autograd engine, or the caller)'}"


def explain(nodes: list, top: int = 12) -> list[tuple[int, str]]:
    """Bytes live at a rank's peak grouped by what made them, largest first."""
    groups: dict[str, int] = {}
    for node in nodes:
        label = _made_by(node)
        groups[label] = groups.get(label, 0) + node.extra_fields.alloc_size
    return sorted(((nbytes, label) for label, nbytes in groups.items()), reverse=True)[:top]


def rank_main(rank: int, shape: dict, vpp: int, return_outputs: bool, port: int, out, explained: int) -> None:
    """One process: build its stages, run one step, then profile the second. The process ``explained`` also
    records Python frames and reports its peak's allocations grouped by what made them."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleInterleaved1F1B
    from torch.profiler import ProfilerActivity, profile

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    p, d, m = shape["pp"], shape.get("dp", 1), shape["microbatches"]
    dist.init_process_group("gloo", rank=rank, world_size=p * d)
    pp_group, dp_mesh, pp_rank = None, None, rank
    if d > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (p, d), mesh_dim_names=("pp", "dp"))
        pp_group, dp_mesh, pp_rank = mesh["pp"].get_group(), mesh["dp"], mesh["pp"].get_local_rank()
    counts = split_layers(shape["layers"], p * vpp)
    mine = [k for k in range(p * vpp) if k % p == pp_rank]
    whole = build_model(shape, bf16=d == 1)
    parts = [stage_modules(whole, counts, k, dp_mesh) for k in mine]
    del whole
    stages = [PipelineStage(part, k, p * vpp, torch.device("cpu"), group=pp_group) for part, k in zip(parts, mine)]

    def loss_fn(logits, labels):  # torchtitan's: cross entropy on fp32 logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))

    if vpp == 1:
        schedule = Schedule1F1B(stages[0], n_microbatches=m, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=m, loss_fn=loss_fn, scale_grads=False)
    gen = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, shape["vocab"], (shape["micro_batch"] * m, shape["seq"]), generator=gen)
                      for _ in range(2))

    def step() -> None:
        args = (tokens,) if 0 in mine else ()
        kwargs = {"target": labels, "losses": []} if p * vpp - 1 in mine else {}
        schedule.step(*args, return_outputs=return_outputs, **kwargs)
        for part in parts:
            for param in part.parameters():
                param.grad = None  # torchtitan's zero_grad

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=rank == explained) as profiler:
        step()
        dist.barrier()
        marker = torch.empty(MARKER, dtype=torch.uint8)
        del marker
        step()
    peak, nodes = _live_at_peak(profiler)
    out[rank] = peak
    if rank == explained:
        out["explained"] = explain(nodes)
    dist.barrier()
    dist.destroy_process_group()


def measure(shape: dict, vpp: int, return_outputs: bool, explain_rank: int | None = None) -> tuple[list[int], list]:
    """Each pipeline rank's measured peak bytes (see the module docstring; with dp above 1 its fullest process),
    and with ``explain_rank`` what its first process's peak holds (:func:`explain`)."""
    import torch.multiprocessing as mp

    d = shape.get("dp", 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    explained = -1 if explain_rank is None else explain_rank * d
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(rank_main, args=(shape, vpp, return_outputs, port, out, explained), nprocs=shape["pp"] * d)
        return [max(out[r * d + i] for i in range(d)) for r in range(shape["pp"])], list(out.get("explained", []))


def planner_config(shape: dict, vpp: int, return_outputs: bool) -> dict:
    """The run as the planner's input. With FSDP the side streams' reserve (a CUDA caching-allocator effect, absent
    on CPU) is left out: ``fsdp_runtime`` megatron counts the same tensors without it."""
    schedule = {"schedule": "interleaved-1f1b", "vpp": vpp} if vpp > 1 else {"schedule": "1f1b"}
    p, d, m, b = shape["pp"], shape.get("dp", 1), shape["microbatches"], shape["micro_batch"]
    return {"model": {"layers": shape["layers"], "hidden": shape["hidden"], "heads": shape["heads"],
                      "kv_heads": shape["kv_heads"], "vocab": shape["vocab"], "seq_len": shape["seq"],
                      "ffn_hidden": ffn_hidden(shape), "ffn_kind": "swiglu", "dropout": False},
            "cluster": {"gpu": "nvidia-h100", "gpus": p * d},
            "layout": {"tp": 1, "pp": p, "dp": d, "micro_batch": b, "global_batch": b * m * d, "zero": 2,
                       "recompute": "full", "framework": "torchtitan", "pp_return_outputs": return_outputs,
                       "fsdp_runtime": "megatron", **schedule}}


def counted(shape: dict, vpp: int, return_outputs: bool) -> list[float]:
    """Each rank's counted bytes on the measured side's terms (see the module docstring): without FSDP the
    weights exist before the profiler starts and the gradients are bf16; with it the bf16 weights are gathered
    during the step and the gradients accumulate in fp32, as counted."""
    sharded = shape.get("dp", 1) > 1
    grad_scale = 1.0 if sharded else RUN_GRAD_BYTES / GRAD_BYTES
    per_rank = rank_memory_counts(planner_config(shape, vpp, return_outputs))
    return [((gb["params"] if sharded else 0.0) + gb["grads"] * grad_scale + gb["activations"] + gb["other"]
             - OTHER_GB) * 1e9 for gb in per_rank]


def compare(shape_name: str, explain_rank: int | None = None) -> list[dict]:
    shape = SHAPES[shape_name]
    rows = []
    for vpp, return_outputs in RUNS[shape_name]:
        start = time.perf_counter()
        measured, explained = measure(shape, vpp, return_outputs, explain_rank)
        row = {"shape": shape_name, "schedule": "interleaved-1f1b" if vpp > 1 else "1f1b", "vpp": vpp,
               "return_outputs": return_outputs, "measured_bytes": measured,
               "counted_bytes": counted(shape, vpp, return_outputs), "seconds": round(time.perf_counter() - start, 1)}
        if explain_rank is not None:
            row["explained_rank"] = explain_rank
            row["explained"] = [{"bytes": nbytes, "made_by": label} for nbytes, label in explained]
        rows.append(row)
    return rows


def report(rows: list[dict]) -> None:
    for row in rows:
        print(f"{row['shape']}  {row['schedule']}  return_outputs={row['return_outputs']}  ({row['seconds']} s)")
        print("  rank  measured_MB  counted_MB  counted/measured")
        for r, (meas, count) in enumerate(zip(row["measured_bytes"], row["counted_bytes"])):
            print(f"  {r:>4}  {meas / 1e6:11.2f}  {count / 1e6:10.2f}  {count / meas:16.3f}")
        meas, count = max(row["measured_bytes"]), max(row["counted_bytes"])
        errors = [abs(c / mm - 1) for mm, c in zip(row["measured_bytes"], row["counted_bytes"])]
        print(f"  fullest rank: measured {meas / 1e6:.2f} MB, counted {count / 1e6:.2f} MB ({count / meas - 1:+.1%});"
              f" mean |error| over ranks {sum(errors) / len(errors):.1%}, max {max(errors):.1%}")
        if "explained" in row:
            print(f"  rank {row['explained_rank']}'s peak, by the op and Python frame that allocated it:")
            for item in row["explained"]:
                print(f"    {item['bytes'] / 1e6:8.3f} MB  {item['made_by']}")
    by_key = {(r["shape"], r["vpp"], r["return_outputs"]): r for r in rows}
    for (shape, vpp, kept), row in by_key.items():
        base = by_key.get((shape, 1, kept))
        if vpp > 1 and base:
            meas = max(row["measured_bytes"]) / max(base["measured_bytes"])
            count = max(row["counted_bytes"]) / max(base["counted_bytes"])
            print(f"{shape}: interleaved / 1F1B, fullest rank: measured {meas:.3f}, counted {count:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--explain", type=int, metavar="RANK",
                        help="also group what pipeline rank RANK holds at its peak by the op and frame that made it")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.explain is not None and not 0 <= args.explain < SHAPES[args.shape]["pp"]:
        parser.error(f"--explain: a pipeline rank in 0..{SHAPES[args.shape]['pp'] - 1}, got {args.explain}")
    rows = compare(args.shape, args.explain)
    if args.json:
        print(json.dumps({"schema_version": 1, "kind": "pipeline_memory", "rows": rows}))
    else:
        report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
