"""The allocation trace of a training step (planner/model/step_trace.py): its block against PyTorch autograd run on
meta tensors, against the planner's byte counts (memory.py), and the rank's step balanced and bounded."""

from __future__ import annotations

import itertools
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

from dspark_lab.planner.model import memory
from dspark_lab.planner.model.block_trace import MIN_BYTES, BlockRunner, Shape, Trace, block_graph, sac_kept
from dspark_lab.planner.model.step_trace import RankSpec, RankStep
from dspark_lab.planner.predict import predict


# --- a transcription of torchtitan 9dec370's Llama block (models/llama/model.py), eager, one GPU ---------------

class Flash(torch.autograd.Function):
    """What flash attention allocates: its output, written sequence-major and returned heads-major (so the model's
    ``transpose(1, 2).contiguous()`` copies nothing), saving q, k, v and the output; backward makes dq, dk, dv and
    an fp32 dq accumulator."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, _ = ctx.saved_tensors
        accumulator = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del accumulator
        return dq, dk, dv


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device="meta", dtype=torch.bfloat16))

    def forward(self, x):
        f = x.float()
        return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * self.weight


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, ffn):
        super().__init__()
        kw = dict(bias=False, device="meta", dtype=torch.bfloat16)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq, self.wk = nn.Linear(dim, dim, **kw), nn.Linear(dim, kv_heads * self.head_dim, **kw)
        self.wv, self.wo = nn.Linear(dim, kv_heads * self.head_dim, **kw), nn.Linear(dim, dim, **kw)
        self.w1, self.w3, self.w2 = nn.Linear(dim, ffn, **kw), nn.Linear(dim, ffn, **kw), nn.Linear(ffn, dim, **kw)
        self.attention_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.freqs = torch.ones(1, 1, 1, self.head_dim // 2, device="meta", dtype=torch.complex64)

    def rope(self, x):
        return x.float().reshape(*x.shape[:-1], -1, 2)

    def attention(self, x):
        bs, s, _ = x.shape
        xq = self.wq(x).view(bs, s, -1, self.head_dim)
        xk = self.wk(x).view(bs, s, -1, self.head_dim)
        xv = self.wv(x).view(bs, s, -1, self.head_dim)
        q_, k_ = torch.view_as_complex(self.rope(xq)), torch.view_as_complex(self.rope(xk))
        q, k = torch.view_as_real(q_ * self.freqs).flatten(3), torch.view_as_real(k_ * self.freqs).flatten(3)
        q, k = q.type_as(xq), k.type_as(xk)
        n = self.heads // self.kv_heads
        k = k.unsqueeze(3).expand(bs, s, self.kv_heads, n, self.head_dim).reshape(bs, s, -1, self.head_dim)
        v = xv.unsqueeze(3).expand(bs, s, self.kv_heads, n, self.head_dim).reshape(bs, s, -1, self.head_dim)
        out = Flash.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).contiguous().view(bs, s, -1))

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        n = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(n)) * self.w3(n))


class Recorder(TorchDispatchMode):
    """Live bytes of every storage made under it (storages of at least MIN_BYTES, as the trace keeps)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.ids = 0, 0, itertools.count()

    def _gone(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if getattr(st, "_seen", False) or st.nbytes() < MIN_BYTES:
                    continue
                st._seen = True
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._gone, st.nbytes())
        return out


DIM, HEADS, KV, FFN, SEQ, BATCH = 256, 4, 2, 512, 256, 2
SMALL = Shape(s=SEQ, b=BATCH, h=DIM, t=1, sp=False, kv_ratio=KV / HEADS, ffn=FFN, swiglu=True,
              fused=False, fp8=False)


def _pytorch(recompute: str) -> tuple[int, int]:
    """(bytes held after the forward, peak bytes during forward and backward) of the transcription, beyond its
    input, on meta tensors."""
    block = Block(DIM, HEADS, KV, FFN)
    for p in block.parameters():
        p.untyped_storage()._seen = True
    x = torch.empty(BATCH, SEQ, DIM, device="meta", dtype=torch.bfloat16, requires_grad=True)
    x.untyped_storage()._seen = True
    with Recorder() as rec:
        out = checkpoint(block, x, use_reentrant=False) if recompute == "full" else block(x)
        held = rec.live - out.untyped_storage().nbytes()
        out.backward(torch.empty_like(out))
    return held, rec.peak


def _ours(recompute: str) -> tuple[float, float]:
    trace = Trace()
    runner = BlockRunner(block_graph(SMALL), recompute, trace)
    x = trace.alloc(2 * SEQ * BATCH * DIM)
    out, kept = runner.forward(x)
    trace.free(x)
    held = sum(n for k, n in trace.events if n and k in {key for key in kept.values()} and k != x)
    grads: list = []
    dout = trace.alloc(2 * SEQ * BATCH * DIM)
    trace.free(out)
    dx = runner.backward(kept, dout, grads)
    live = peak = 0
    sizes = {}
    for key, n in trace.events:
        if key == x:
            continue
        if n:
            sizes[key] = n
            live += n
            peak = max(peak, live)
        else:
            live -= sizes[key]
    for key in (dx, *grads):
        trace.free(key)
    return held, peak


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_the_block_holds_and_peaks_as_pytorch_autograd_does(recompute):
    """The block's nodes, run by the trace's own rules (what each op saves, when an unsaved output is freed, which
    backward allocates what), against PyTorch autograd running the same block on meta tensors."""
    theirs_held, theirs_peak = _pytorch(recompute)
    ours_held, ours_peak = _ours(recompute)
    assert ours_held == pytest.approx(theirs_held, rel=0.02), (ours_held, theirs_held)
    assert ours_peak == pytest.approx(theirs_peak, rel=0.05), (ours_peak, theirs_peak)


# --- against the planner's byte counts -----------------------------------------------------------------------

def _kept_bytes(shape: Shape, recompute: str) -> float:
    trace = Trace()
    runner = BlockRunner(block_graph(shape), recompute, trace)
    x = trace.alloc(2 * shape.s * shape.b * shape.h / (shape.t if shape.sp else 1))
    _, kept = runner.forward(x)
    keys = set(kept.values())
    return sum(n for k, n in trace.events if n and k in keys)


@pytest.mark.parametrize("t,sp,swiglu", [(1, False, True), (8, True, True), (4, True, False), (2, False, False)])
def test_op_level_ac_keeps_what_memory_op_sac_bytes_counts(t, sp, swiglu):
    shape = Shape(s=4096, b=2, h=4096, t=t, sp=sp, kv_ratio=0.25, ffn=14336, swiglu=swiglu, fused=True,
                  fp8=False)
    expected = memory.op_sac_bytes(4096, 2, 4096, t, sp, 0.25, 14336, swiglu)
    assert _kept_bytes(shape, "selective-op") == pytest.approx(expected, rel=1e-9)
    assert sac_kept(block_graph(shape)) >= {"wq", "wv", "w1", "attention"}
    assert _kept_bytes(shape, "full") == pytest.approx(memory.full_recompute_bytes(4096, 2, 4096, t, sp))


def test_fp8_matmuls_keep_their_one_byte_input_casts():
    bf16 = Shape(s=4096, b=1, h=4096, t=1, sp=False, kv_ratio=0.25, ffn=14336, swiglu=True, fused=True,
                 fp8=False)
    fp8 = Shape(**{**{f: getattr(bf16, f) for f in bf16.__slots__}, "fp8": True})
    sbh, f = 4096 * 4096, 4096 * 14336
    # The matmuls keep one-byte casts instead of bf16 inputs: the two norms' outputs (2 sbh bytes each) and the
    # SwiGLU product (2 f) go; casts of those and of the attention output (which flash attention keeps anyway)
    # come: sbh + sbh + sbh + f.
    assert _kept_bytes(fp8, "none") == pytest.approx(_kept_bytes(bf16, "none") - 4 * sbh - 2 * f + 3 * sbh + f)


# --- one rank's steps ------------------------------------------------------------------------------------------

def _spec(**overrides) -> RankSpec:
    shape = Shape(s=8192, b=4, h=16384, t=8, sp=True, kv_ratio=1 / 16, ffn=53248, swiglu=True,
                  fused=True, fp8=True)
    base = dict(shape=shape, stage_layers=(3, 4, 4, 3), ops=(), microbatches=4, block_params=3.2e9 / 8,
                embedding_params=128256 * 16384 / 8, output_params=128256 * 16384 / 8, vocab=128256 / 8, zero=2,
                shard=8, gathered_bytes=1)
    return RankSpec(**{**base, **overrides})


def _replay(trace: Trace) -> tuple[int, int]:
    """(bytes live at the end, peak bytes live)."""
    live, peak, sizes = 0, 0, {}
    for key, n in trace.events:
        if n:
            sizes[key] = n
            live += n
            peak = max(peak, live)
        else:
            live -= sizes.pop(key)
    return live, peak


@pytest.mark.parametrize("keep_outputs", [True, False])
@pytest.mark.parametrize("stage", [0, 1, 3])
@pytest.mark.parametrize("recompute", ["full", "selective-op", "none"])
def test_a_rank_ends_each_step_holding_only_what_outlives_it(stage, recompute, keep_outputs):
    """After the steps, what is live is exactly the state that outlives a step: the fp32 parameter shards, Adam's
    moments, the receive buffers, the last step's input gradients and, where ``step()`` returns outputs, its
    stage outputs (or logits), which torch.distributed.pipelining keeps until the next step; nothing a block,
    FSDP or the loss made leaks."""
    from dspark_lab.planner.model.liveness import schedule

    sched = schedule("1f1b", 4, 4, 1)
    ops = tuple((kind, mb, stage) for op in sched.ops[stage] for kind, mb, _ in op.parts())
    spec = _spec(ops=ops, keep_outputs=keep_outputs)
    end, _ = _replay(RankStep(spec).run(recompute, steps=2))
    params = spec.stage_layers[stage] * spec.block_params + (spec.embedding_params if stage == 0 else 0) + (
        spec.output_params if stage == 3 else 0)
    boundary = 2 * 8192 * 4 * 16384 / 8
    persistent = 3 * 4 * params / spec.shard  # fp32 shards, exp_avg, exp_avg_sq
    persistent += 4 * boundary * ((stage > 0) + (stage < 3))  # a receive buffer per micro-batch each way
    kept = 4 * (2 * 8192 * 4 * 128256 / 8 if stage == 3 else boundary) * keep_outputs  # outputs (logits last)
    kept += 4 * boundary * (stage > 0)  # input gradients
    assert end == pytest.approx(persistent + kept, rel=1e-6)


def _row(name: str) -> dict:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import planner_accuracy

    source = planner_accuracy.load_sources()["torchtitan-h100-2412"]
    row = next(r for r in source["rows"] if r["name"].startswith(name))
    return planner_accuracy.row_config(source, row)[0]


def test_the_trace_peak_agrees_with_the_planners_count_on_torchtitans_405b_1f1b_row():
    """Two independent writings of one rank's memory: memory.py's per-term count at the peak the schedule walk
    finds, and the step trace's tensor-by-tensor replay. On the 1F1B row they must agree (the planner's figure
    less what lives outside the default stream: CUDA context, FSDP2's side streams), to the byte."""
    import dspark_lab.planner.predict as P
    import dspark_lab.planner.rank_memory as R

    cfg = _row("T5 405B 1F1B")
    inp = P.parse(cfg)
    model, lay = inp.model, inp.layout
    counts = P.split_layers(model.layers, lay.pp)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    mem = predict(cfg)["memory_gb"]
    side = R._fsdp2_reserved(model, lay, counts, starts, [lay.pp - 1], lay.pp, 0.0) / 1e9
    side += memory.GRAD_BYTES * R.stage_params(model, counts, starts, [lay.pp - 1], lay.tp, 1) / 8 / 1e9
    counted = mem["total"] - mem["allocator"] - R.OTHER_GB - side
    _, peak = _replay(RankStep(P.rank_trace_spec(cfg, lay.pp - 1)).run("full"))
    assert peak / 1e9 == pytest.approx(counted, rel=1e-4)


def test_torchtitan_predictions_add_the_allocators_overhead_and_megatron_ones_do_not():
    cfg = _row("T5 405B 1F1B")
    mem = predict(cfg)["memory_gb"]
    assert 0.5 < mem["allocator"] < 10
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))
    megatron = predict({**cfg, "layout": {**cfg["layout"], "framework": "megatron", "pp_runtime": "torch",
                                          "fsdp_runtime": "torch", "loss": "eager", "sp_regather": False}})
    assert megatron["memory_gb"]["allocator"] == 0.0


def test_the_allocators_overhead_never_takes_a_layout_past_the_device():
    """At the device's limit the allocator unmaps its cached free pages and retries rather than fail, so the
    overhead is capped by what is left."""
    cfg = _row("T2 8B CP1")
    free = predict(cfg)["memory_gb"]
    counted = free["total"] - free["allocator"]
    tight = {**cfg, "cluster": {**cfg["cluster"], "memory_gb": round(counted + 1.0, 3)}}
    mem = predict(tight)["memory_gb"]
    assert mem["allocator"] == pytest.approx(counted + 1.0 - counted, abs=2e-3)
    assert free["allocator"] > 1.0  # so the cap did bind


def test_the_allocator_benchmark_replays_what_the_planner_predicts_with():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "allocator_replay.py"
    done = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {r["row"]: r for r in map(json.loads, done.stdout.splitlines())}
    t5 = rows["T5 405B 1F1B fp8"]["model"]
    assert (t5["reserved"] - t5["allocated"]) / 1e9 == pytest.approx(predict(_row("T5 405B 1F1B"))["memory_gb"]
                                                                     ["allocator"], rel=1e-6)
    assert all(r["model"]["reserved"] >= r["model"]["allocated"] > 1e10 for r in rows.values())
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, str(script), "--device", "cuda"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [
            "allocator_replay: --device cuda: no CUDA device here"]


def test_the_latency_benchmark_times_each_layout_with_and_without_the_replay():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "planner_latency.py"
    done = subprocess.run([sys.executable, str(script), "--per-space", "3"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("9 torchtitan layouts")
    times = {name: float(m) for name, m in re.findall(r"(with the allocator replay|without).*?max\s+([\d.]+) s",
                                                     done.stdout)}
    assert times["with the allocator replay"] > times["without"]  # the replay ran (it is what costs)
    assert re.search(r"within 1 s with the replay: \d of 9$", done.stdout.strip())


@pytest.mark.parametrize("stage", [0, 2])
def test_without_torch_pipelining_a_stage_keeps_no_boundary_tensors(stage):
    """Megatron's p2p (pp_runtime megatron): each micro-batch's input and output gradient is its own tensor, freed
    once used; nothing outlives the step but the shards and Adam's moments."""
    from dspark_lab.planner.model.liveness import schedule

    sched = schedule("1f1b", 4, 4, 1)
    ops = tuple((kind, mb, stage) for op in sched.ops[stage] for kind, mb, _ in op.parts())
    spec = _spec(ops=ops, pipelined=False)
    end, peak = _replay(RankStep(spec).run("full", steps=2))
    params = spec.stage_layers[stage] * spec.block_params + (spec.embedding_params if stage == 0 else 0)
    assert end == pytest.approx(3 * 4 * params / spec.shard, rel=1e-6)
    assert peak > end + 4 * params  # the fp32 accumulators at least


def test_a_torchtitan_layout_on_megatrons_pipeline_or_without_fsdp_is_predicted():
    cfg = _row("T5 405B 1F1B")
    for change in ({"pp_runtime": "megatron"}, {"zero": 1}, {"recompute": "selective-op", "kernels": "eager"}):
        mem = predict({**cfg, "layout": {**cfg["layout"], **change}})["memory_gb"]
        assert mem["allocator"] >= 0 and mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))


def test_the_replay_is_bounded_however_many_micro_batches_or_layers_a_config_names():
    """A user can ask for any micro-batch count: one prediction's replays write at most TRACE_PASSES block passes,
    RANK_PASSES per rank and step (a multiple of 2p micro-batches, which every schedule accepts), and none where
    one rank alone is deeper."""
    import time

    from dspark_lab.planner.model.step_trace import STEPS
    from dspark_lab.planner.rank_memory import RANK_PASSES, TRACE_PASSES, traced_microbatches

    assert 3 * STEPS * RANK_PASSES <= TRACE_PASSES  # first, last and fullest rank
    assert traced_microbatches(8, 8, 16) == 8  # within the bound: all of them
    for m, p, blocks in ((100_000, 1, 32), (4096, 8, 16), (513, 4, 33)):
        traced = traced_microbatches(m, p, blocks)
        assert traced * blocks <= RANK_PASSES < m * blocks and traced % (2 * p) == 0 and traced >= 2 * p
    assert traced_microbatches(4, 1, 600) is None
    cfg = {"model": "llama3-8b", "cluster": {"gpu": "nvidia-h100", "gpus": 8},
           "layout": {"tp": 1, "pp": 1, "dp": 8, "micro_batch": 1, "global_batch": 8 * 100_000,
                      "framework": "torchtitan"}}
    start = time.perf_counter()
    pred = predict(cfg)
    assert pred["microbatches"] == 100_000 and pred["memory_gb"]["allocator"] > 0
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("name,change", [
    ("T5 405B 1F1B", {}),
    ("T5 405B interleaved", {}),
    ("T1 8B FSDP8", {}),
    ("T1 8B FSDP8", {"tp": 2, "pp": 2, "dp": 2, "vpp": 2, "micro_batch": 1, "global_batch": 16, "zero": 2}),
])
def test_a_third_step_moves_no_replay_peak(name, change):
    """The replay runs ``STEPS`` (two) steps: the second is the first with Adam's moments. Were fragmentation still
    growing there, a third step would raise the peak reserved on some of these (1F1B, interleaved, no pipeline)."""
    from dspark_lab.planner.model.allocator import CachingAllocator
    from dspark_lab.planner.model.step_trace import STEPS
    from dspark_lab.planner.predict import rank_trace_spec

    cfg = _row(name)
    cfg = {**cfg, "layout": {**cfg["layout"], **change}}
    last = cfg["layout"].get("pp", 1) - 1
    spec = rank_trace_spec(cfg, last)
    peaks = []
    for steps in (STEPS, STEPS + 1):
        allocator = CachingAllocator()
        allocator.replay(RankStep(spec).run(cfg["layout"]["recompute"], steps).events)
        peaks.append((allocator.peak_reserved, allocator.peak_allocated))
    assert STEPS == 2 and peaks[0] == peaks[1]
