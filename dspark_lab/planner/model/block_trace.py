"""One transformer block's allocations, kernel output by kernel output, through its forward and backward, for
:mod:`~dspark_lab.planner.model.step_trace` to place in a training step.

``block_graph`` writes torchtitan's Llama ``TransformerBlock`` (``models/llama/model.py`` at 9dec370, Dec 2024) on
one GPU as nodes in forward order: RMSNorm, the sequence-parallel all-gather, wq/wk/wv, RoPE, ``repeat_kv``, flash
attention, wo and its reduce-scatter, the residual adds, and the FFN (SwiGLU or GeLU). Eager kernels write each
element-wise step; compiled (fused) ones one output per fused region. Float8Linear casts each matmul's input to fp8
(one byte) and keeps the cast instead of the bf16 input. Each node says what its backward reads (``saves``).

``BlockRunner`` runs the nodes under a recompute policy as autograd would: everything saved (``none``), only the
block input with the forward run again in backward (``full``, ``torch.utils.checkpoint``), or torchtitan's op-level
policy (``selective-op``: every second matmul output, flash attention and the reduce-scatters kept). An output no
backward reads is freed after its last reader; a saved one when the earliest node saving it has run backward; a
gradient once consumed; the residual adds and casts pass their gradient through, and a second contribution is
added in place unless the buffer is held elsewhere (autograd's rule; a received gradient is held by the pipeline
stage). Tensors under 64 KiB (norm statistics, scales) are left out. ``tests/test_planner_step_trace.py`` checks
the held and peak bytes against PyTorch autograd running the same block on meta tensors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

MIN_BYTES = 1 << 16  # tensors smaller than this are left out
MATMULS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")


@dataclass(frozen=True, slots=True)
class Node:
    """One kernel's output in a block's forward: ``nbytes``, the tensors it reads, those its backward needs
    (``saves``), its weight's element count (``weight``: a matmul or a norm scale, which gets a gradient) and
    whether its backward hands the output gradient through unchanged (``passthrough``: adds, casts, views)."""

    name: str
    nbytes: float
    inputs: tuple[str, ...]
    saves: tuple[str, ...] = ()
    weight: float = 0.0
    passthrough: bool = False


@dataclass(frozen=True, slots=True)
class Shape:
    """Per-GPU sizes of one micro-batch: local sequence ``s`` (after CP), ``b`` sequences, hidden ``h``, TP ``t``."""

    s: int
    b: int
    h: int
    t: int
    sp: bool
    kv_ratio: float
    ffn: int
    swiglu: bool
    fused: bool
    fp8: bool
    cp: int = 1


def _norm(name: str, x: str, elems: float, h: int, fused: bool) -> list[Node]:
    """torchtitan's RMSNorm: ``self._norm(x.float()).type_as(x) * self.weight``, where ``_norm`` is
    ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``. Compiled: one bf16 output."""
    if fused:
        return [Node(name, 2 * elems, (x,), (x,), weight=h)]
    rows = elems / h
    return [Node(name + ".f32", 4 * elems, (x,)),
            Node(name + ".sq", 4 * elems, (name + ".f32",), (name + ".f32",)),
            Node(name + ".rms", 4 * rows, (name + ".sq",)),
            Node(name + ".normed", 4 * elems, (name + ".f32", name + ".rms"), (name + ".f32", name + ".rms")),
            Node(name + ".bf16", 2 * elems, (name + ".normed",)),
            Node(name, 2 * elems, (name + ".bf16",), (name + ".bf16",), weight=h)]


def block_graph(sh: Shape) -> list[Node]:
    """torchtitan's Llama ``TransformerBlock`` on one GPU (``models/llama/model.py`` at 9dec370), as kernel outputs
    in forward order. Element counts: ``sbh`` tokens x hidden of the whole local sequence; the block's input and
    output are the sequence shard under SP."""
    sbh = sh.s * sh.b * sh.h
    shard = sbh / sh.t if sh.sp else sbh
    qo = sbh / sh.t  # q, the attention output: heads / t
    kv = sbh * sh.kv_ratio / sh.t
    f = sh.s * sh.b * sh.ffn / sh.t
    h = sh.h
    nodes: list[Node] = []

    def gathered(name: str, x: str) -> str:
        if sh.sp:
            nodes.append(Node(name, 2 * sbh, (x,)))
            return name
        return x

    def matmul(name: str, x: str, out: float, weight: float) -> None:
        """A (Float8)Linear: with fp8 the input is cast once and the cast is what backward keeps."""
        if sh.fp8:
            if not any(n.name == x + ".fp8" for n in nodes):
                nodes.append(Node(x + ".fp8", sum(n.nbytes for n in nodes if n.name == x) / 2, (x,),
                                  passthrough=True))
            x = x + ".fp8"
        nodes.append(Node(name, out, (x,), (x,), weight=weight))

    def reduced(name: str) -> str:
        """A row-parallel matmul's partial sums (the whole sequence), reduce-scattered to the shard under SP."""
        if sh.sp:
            nodes.append(Node(name + ".rs", 2 * shard, (name,)))
            return name + ".rs"
        return name

    nodes += _norm("attention_norm", "x", shard, h, sh.fused)
    xa = gathered("xa", "attention_norm")
    matmul("wq", xa, 2 * qo, h * h / sh.t)
    matmul("wk", xa, 2 * kv, h * h * sh.kv_ratio / sh.t)
    matmul("wv", xa, 2 * kv, h * h * sh.kv_ratio / sh.t)
    if sh.fused:
        nodes += [Node("q.rope", 2 * qo, ("wq",)), Node("k.rope", 2 * kv, ("wk",))]
    else:
        # apply_rotary_emb: both upcasts, both complex products, both casts back, in that order
        pairs = (("q", "wq", qo), ("k", "wk", kv))
        nodes += [Node(x + ".f32", 4 * n, (w,)) for x, w, n in pairs]
        nodes += [Node(x + ".rot", 4 * n, (x + ".f32",)) for x, w, n in pairs]
        nodes += [Node(x + ".rope", 2 * n, (x + ".rot",)) for x, w, n in pairs]
    k, v = "k.rope", "wv"
    if sh.kv_ratio < 1:  # repeat_kv: expand + reshape copies K and V to every query head
        nodes += [Node("k.rep", 2 * qo, (k,)), Node("v.rep", 2 * qo, (v,))]
        k, v = "k.rep", "v.rep"
    if sh.cp > 1:  # context parallelism's all-gather of every rank's K and V
        nodes += [Node("k.cp", 2 * qo * sh.cp, (k,)), Node("v.cp", 2 * qo * sh.cp, (v,))]
        k, v = "k.cp", "v.cp"
    # Flash attention writes its output sequence-major, so ``output.transpose(1, 2).contiguous()`` copies nothing.
    nodes.append(Node("attention", 2 * qo, ("q.rope", k, v), ("q.rope", k, v, "attention")))
    matmul("wo", "attention", 2 * sbh, h * h / sh.t)
    nodes.append(Node("h", 2 * shard, ("x", reduced("wo")), passthrough=True))
    nodes += _norm("ffn_norm", "h", shard, h, sh.fused)
    xf = gathered("xf", "ffn_norm")
    matmul("w1", xf, 2 * f, h * sh.ffn / sh.t)
    if sh.swiglu:
        matmul("w3", xf, 2 * f, h * sh.ffn / sh.t)
        if sh.fused:
            nodes.append(Node("act", 2 * f, ("w1", "w3"), ("w1", "w3")))
        else:
            nodes += [Node("silu", 2 * f, ("w1",), ("w1",)), Node("act", 2 * f, ("silu", "w3"), ("silu", "w3"))]
    else:
        nodes.append(Node("act", 2 * f, ("w1",), ("w1",)))
    matmul("w2", "act", 2 * sbh, h * sh.ffn / sh.t)
    nodes.append(Node("out", 2 * shard, ("h", reduced("w2")), passthrough=True))
    return nodes


def sac_kept(nodes: list[Node]) -> set[str]:
    """What torchtitan's op-level selective AC keeps: every second matmul output (counting wq, wk, wv, wo, w1, w3,
    w2 in order, the first kept), flash attention's outputs, and the reduce-scatter outputs."""
    kept = {"attention"}
    mms = [n.name for n in nodes if n.name in MATMULS]
    kept |= set(mms[::2])
    kept |= {n.name for n in nodes if n.name.endswith(".rs")}
    return kept


class Trace:
    """An allocation event list, ``(key, nbytes)`` to allocate and ``(key, 0)`` to free, with reference counts so a
    tensor held by two owners (a saved input that is also a receive buffer) is freed when the last lets go."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int]] = []
        self._refs: dict[int, int] = {}
        self._keys = itertools.count()

    def alloc(self, nbytes: float) -> int | None:
        if nbytes < MIN_BYTES:
            return None
        key = next(self._keys)
        self._refs[key] = 1
        self.events.append((key, int(nbytes)))
        return key

    def ref(self, key: int | None) -> int | None:
        if key is not None:
            self._refs[key] += 1
        return key

    def shared(self, key: int | None) -> bool:
        return key is not None and self._refs[key] > 1

    def free(self, key: int | None) -> None:
        if key is None:
            return
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.events.append((key, 0))


class BlockRunner:
    """One block's forward and backward under a recompute policy, into a :class:`Trace`."""

    def __init__(self, nodes: list[Node], recompute: str, trace: Trace) -> None:
        self.nodes, self.trace = nodes, trace
        self.size = {n.name: n.nbytes for n in nodes}
        self.size["x"] = nodes[-1].nbytes  # the block's input has its output's shape
        self.needed = {name for n in nodes for name in n.saves}  # what some backward reads
        if recompute == "full":
            self.kept = {"x"}
        elif recompute == "selective-op":
            self.kept = sac_kept(nodes) | {"x"}
        else:
            self.kept = self.needed | {"x"}
        self.recompute = recompute in ("full", "selective-op")
        last_use = {name: i for i, n in enumerate(nodes) for name in n.inputs}
        first_saver: dict[str, int] = {}  # backward order: the earliest saver runs last, and frees the tensor
        for i, n in enumerate(nodes):
            for name in n.saves:
                first_saver.setdefault(name, i)
        # per node, worked out once: the inputs read for the last time, the saved tensors its backward releases,
        # its backward's scratch (flash attention's fp32 dq accumulator; an fp8 matmul's output gradient cast)
        self.dying = [tuple(x for x in dict.fromkeys(n.inputs) if last_use[x] == i) for i, n in enumerate(nodes)]
        self.released = [tuple(x for x in dict.fromkeys(n.saves) if first_saver[x] == i) for i, n in enumerate(nodes)]
        self.scratch = [(2 * n.nbytes,) if n.name == "attention" else
                        (n.nbytes / 2,) if n.name in MATMULS and any(x.endswith(".fp8") for x in n.inputs) else ()
                        for n in nodes]
        self.grad_inputs = [tuple(dict.fromkeys(n.inputs)) for n in nodes]

    def _run(self, live: dict[str, int | None], keep: set[str]) -> None:
        """Run the nodes not yet live; free each input after its last reader unless ``keep`` holds it."""
        alloc, free = self.trace.alloc, self.trace.free
        for n, dying in zip(self.nodes, self.dying):
            if n.name not in live:
                live[n.name] = alloc(n.nbytes)
            for name in dying:
                if name not in keep and name in live:
                    free(live.pop(name))

    def forward(self, x: int | None) -> tuple[int | None, dict[str, int | None]]:
        """Returns the output (the caller's) and what the block keeps for its backward (the input included)."""
        live = {"x": self.trace.ref(x)}
        self._run(live, self.kept | {"out"})
        out = live.pop("out")
        for name in [name for name in live if name not in self.kept]:
            self.trace.free(live.pop(name))
        return out, live

    def backward(self, kept: dict[str, int | None], dout: int | None,
                 weight_grads: list[int | None]) -> int | None:
        """Consumes ``kept`` and ``dout``; appends the bf16 weight gradients; returns the input's gradient."""
        t = self.trace
        alloc, free = t.alloc, t.free
        live = dict(kept)
        if self.recompute:
            self._run(live, self.needed)
            free(live.pop("out", None))
        grads: dict[str, int | None] = {"out": dout}
        for i in range(len(self.nodes) - 1, -1, -1):
            n = self.nodes[i]
            g = grads.pop(n.name, None)
            if n.weight:
                weight_grads.append(alloc(2 * n.weight))
            scratch = [alloc(nbytes) for nbytes in self.scratch[i]]
            for name in self.grad_inputs[i]:
                contribution = t.ref(g) if n.passthrough else alloc(self.size[name])
                if name not in grads:
                    grads[name] = contribution
                    continue
                # autograd adds in place only into a buffer nobody else holds (a received gradient is held by
                # the pipeline stage): otherwise the sum is a new tensor
                if t.shared(grads[name]):
                    total = alloc(self.size[name])
                    free(grads[name])
                    grads[name] = total
                free(contribution)
            for key in scratch:
                free(key)
            free(g)
            for name in self.released[i]:
                if name in live:
                    free(live.pop(name))
        for name, key in live.items():
            if name != "x":
                free(key)
        free(live.get("x"))
        return grads.pop("x", None)
