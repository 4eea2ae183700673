"""The default stream's allocations of one pipeline rank through training steps, tensor by tensor, for
:mod:`~dspark_lab.planner.model.allocator` to replay.

``memory.py`` counts bytes at the peak; what a caching allocator holds also depends on the order in which tensors of
different lifetimes come and go (a long-lived tensor allocated amid short-lived ones pins the space around it). This
module writes that order down for a torchtitan-style job (torchtitan 9dec370 on torch 1963fc8, Dec 2024), from the
same shapes the planner uses, around the blocks of :mod:`~dspark_lab.planner.model.block_trace`:

- FSDP2: gathered weights copied out on the default stream (kept all step under ZeRO 2, made per use under ZeRO 3;
  the root unit, embedding and output layer, from the root's forward to its backward), each group's bf16 weight
  gradients folded into an fp32 accumulator across micro-batches while gradient sync is off (ZeRO 2 under PP) or
  copied into the fp32 reduce-scatter input (ZeRO 3, and every group at the last backward; two in flight). The
  reduce-scatter outputs live on their own stream (``memory.fsdp2_side_stream_bytes``) and are not here;
- ``torch.distributed.pipelining`` (``pipelined``): a receive buffer per micro-batch for each stage's input and
  output gradient, every input gradient left on its receive buffer until the next step, and each stage output
  either kept in ``output_chunks`` until then, the last stage's concatenated by ``step()`` at the end
  (``keep_outputs``: ``return_outputs=True``, torch 1963fc8) or held to its micro-batch's backward; without it,
  each micro-batch's input and output gradient is a tensor of its own;
- the first stage's embedding, the last stage's final norm (eager: its fp32 input copy and bf16 output kept), the
  output layer's gathered input, the logits and the loss (``memory.loss_bytes_per_logit``'s tensors) per
  micro-batch;
- the optimizer: the fp32 parameter shards made at init, Adam's moments at the first step, and one fp32 temporary
  per parameter in each ``foreach`` update.

The ops come from the schedule's own op list (``liveness.schedule``, in the runtime's order); a split backward's
``W`` is folded into its ``B``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dspark_lab.planner.model.allocator import CachingAllocator
from dspark_lab.planner.model.block_trace import BlockRunner, Shape, Trace, block_graph

# Steps replayed: the first makes Adam's moments at its end, the second is the first to run with them. A third
# changed no replay's peak on the validation rows or on 75 searched Llama 3 8B / 70B pipeline layouts (a test holds
# two against three on several), and each step costs as much as the first.
STEPS = 2

EMBEDDING, OUTPUT = -1, -2  # FSDP groups besides the blocks (torchtitan's root unit, split here by stage)


@dataclass(frozen=True, slots=True)
class RankSpec:
    """What one pipeline rank runs. ``stage_layers[k]``: transformer blocks of stage ``k`` (all stages);
    ``ops``: the rank's ``(kind, micro-batch, stage)`` in schedule order; ``block_params``: one block's parameters
    on this GPU; ``zero``: the FSDP stage (2: gathered all step, gradients accumulated unsharded in fp32; 3: gathered
    per use, each backward reduce-scattered); ``shard``: the FSDP degree; ``gathered_bytes``: bytes per gathered
    block weight (1 under fp8 all-gather); ``vocab``: the output layer's rows on this GPU."""

    shape: Shape
    stage_layers: tuple[int, ...]
    ops: tuple[tuple[str, int, int], ...]
    microbatches: int
    block_params: float
    embedding_params: float
    output_params: float
    vocab: float
    zero: int
    shard: int
    gathered_bytes: int
    pipelined: bool = True  # torch.distributed.pipelining: receive buffers, input gradients kept to the next step
    keep_outputs: bool = True  # step(return_outputs=True): outputs kept to the next step, the last stage's merged
    loss: str = "eager"  # eager: cross_entropy on fp32 logits (loss_parallel's handlers when vocab is split)


class RankStep:
    """Writes ``steps`` training steps of one rank (see the module docstring for what each holds)."""

    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        self.trace = Trace()
        sh = spec.shape
        self.sbh = sh.s * sh.b * sh.h
        self.boundary = 2 * self.sbh / (sh.t if sh.sp else 1)
        self.logits = sh.s * sh.b * spec.vocab
        self.last = len(spec.stage_layers) - 1

    def run(self, recompute: str, steps: int = STEPS) -> Trace:
        spec, t = self.spec, self.trace
        self.block = BlockRunner(block_graph(spec.shape), recompute, t)
        mine = sorted({stage for _, _, stage in spec.ops})
        blocks = sum(spec.stage_layers[k] for k in mine)
        root = (spec.embedding_params if 0 in mine else 0) + (spec.output_params if self.last in mine else 0)
        sharded = (blocks * spec.block_params + root) / (spec.shard if spec.zero >= 2 else 1)
        pieces = max(1, blocks)  # Adam works per parameter; one piece per block is as fine as this needs
        t.alloc(4 * sharded)  # fp32 parameters (FSDP's shards), made at init
        m, piped = spec.microbatches, spec.pipelined
        self.recv = {k: [t.alloc(self.boundary) for _ in range(m)] for k in mine if k > 0 and piped}
        self.grad_recv = {k: [t.alloc(self.boundary) for _ in range(m)] for k in mine if k < self.last and piped}
        kept_outputs: list[int | None] = []
        for step in range(steps):
            for key in kept_outputs:  # clear_runtime_states at the start of step()
                t.free(key)
            kept_outputs = self._step(mine)
            if self.last in mine and spec.pipelined and spec.keep_outputs:
                t.free(t.alloc(2 * self.logits * m))  # step() returns the kept logits concatenated
            if step == 0:  # Adam's exp_avg and exp_avg_sq, made at the first optimizer step and kept
                for _ in range(2 * pieces):
                    t.alloc(4 * sharded / pieces)
            scratch = [t.alloc(4 * sharded / pieces) for _ in range(pieces)]  # foreach: sqrt(v) + eps
            for key in scratch:
                t.free(key)
        return t

    def _input(self, stage: int, mb: int) -> tuple[int | None, bool]:
        """A stage's input for one micro-batch and whether it is ours to free once the first block has kept what
        it needs: the pipeline's receive buffer stays; the embedding's output or a plain receive is ours."""
        if stage == 0:
            return self._embed(), True
        if self.spec.pipelined:
            return self.recv[stage][mb], False
        return self.trace.alloc(self.boundary), True

    def _output_grad(self, stage: int, mb: int) -> int | None:
        if self.spec.pipelined:
            return self.trace.ref(self.grad_recv[stage][mb])
        return self.trace.alloc(self.boundary)

    def _step(self, mine: list[int]) -> list[int | None]:
        spec, t = self.spec, self.trace
        self.gathered: dict[tuple[int, int], int | None] = {}  # FSDP group -> gathered weights (ZeRO 2)
        self.accumulated: dict[tuple[int, int], int | None] = {}  # FSDP group -> fp32 unsharded gradients
        self.reduce_inputs: list[int | None] = []
        saved: dict[tuple[int, int], tuple] = {}  # (stage, micro-batch) -> per-block kept tensors, head state
        kept_outputs: list[int | None] = []
        for kind, mb, stage in spec.ops:
            layers = spec.stage_layers[stage]
            if kind == "F":
                if stage == 0:
                    self._gather((stage, EMBEDDING), 2 * spec.embedding_params)
                x, ours = self._input(stage, mb)
                held = []
                for i in range(layers):
                    w = self._gather((stage, i), spec.gathered_bytes * spec.block_params)
                    out, kept = self.block.forward(x)
                    t.free(w)
                    if ours or i > 0:  # the block holds what it keeps
                        t.free(x)
                    held.append(kept)
                    x = out
                sent = None
                if stage == self.last:
                    self._gather((stage, OUTPUT), 2 * spec.output_params)
                    head = self._head_forward(x, kept_outputs)
                elif spec.pipelined and spec.keep_outputs:
                    head = None
                    kept_outputs.append(x)  # output_chunks; the send reads the same tensor
                elif spec.pipelined:
                    head, sent = None, x  # fwd_cache holds it for its backward
                else:
                    head = None
                    t.free(x)  # sent, then dropped
                saved[(stage, mb)] = (held, head, sent)
            elif kind in ("B", "Bi"):
                held, head, sent = saved.pop((stage, mb))
                dout = self._head_backward(stage, head) if head is not None else self._output_grad(stage, mb)
                for i in range(layers - 1, -1, -1):
                    w = self._gather((stage, i), spec.gathered_bytes * spec.block_params)
                    wgrads: list[int | None] = []
                    dout = self.block.backward(held[i], dout, wgrads)
                    t.free(w)
                    self._post_backward((stage, i), wgrads)
                t.free(sent)
                if stage > 0 and spec.pipelined:
                    kept_outputs.append(dout)  # the input gradient stays on the receive buffer's .grad
                elif stage > 0:
                    t.free(dout)  # sent, then dropped
                else:
                    embedding = t.alloc(2 * spec.embedding_params)  # the embedding's dense weight gradient
                    t.free(dout)
                    self._post_backward((stage, EMBEDDING), [embedding])
        # The last backward: FSDP's post_backward for every group still accumulating (fp32 reduce-scatter inputs,
        # two in flight), then every group reshards.
        for group, accumulator in list(self.accumulated.items()):
            self._reduce(group)
            t.free(accumulator)
        for key in self.reduce_inputs:
            t.free(key)
        for key in self.gathered.values():
            t.free(key)
        return kept_outputs

    def _params(self, group: tuple[int, int]) -> float:
        kind = group[1]
        spec = self.spec
        return spec.embedding_params if kind == EMBEDDING else spec.output_params if kind == OUTPUT else \
            spec.block_params

    def _gather(self, group: tuple[int, int], nbytes: float) -> int | None:
        """FSDP's copy-out of a group's gathered weights on the default stream. ZeRO 2, and the root unit (the
        embedding and output layer, which FSDP2 never reshards between the root's forward and backward): made at
        the first use and kept all step (returns None). ZeRO 3 blocks: made for this use alone; the caller frees
        it."""
        spec = self.spec
        if spec.shard <= 1 or spec.zero < 2:
            return None
        if spec.zero >= 3 and group[1] >= 0:
            return self.trace.alloc(nbytes)
        if group not in self.gathered:
            self.gathered[group] = self.trace.alloc(nbytes)
        return None

    def _reduce(self, group: tuple[int, int]) -> None:
        """An fp32 reduce-scatter input (on the default stream since PyTorch PR 129721), alive until the next
        group's reduce-scatter is issued."""
        self.reduce_inputs.append(self.trace.alloc(4 * self._params(group)))
        if len(self.reduce_inputs) > 2:
            self.trace.free(self.reduce_inputs.pop(0))

    def _post_backward(self, group: tuple[int, int], wgrads: list) -> None:
        """FSDP2's post-backward of one group: ZeRO 3 reduce-scatters this backward's bf16 gradients; otherwise
        they are folded into an fp32 unsharded accumulator made at the first micro-batch (FSDP with gradient sync
        off, as ``torch.distributed.pipelining`` runs it, or plain gradients without FSDP)."""
        if self.spec.zero >= 3 and self.spec.shard > 1:
            self._reduce(group)
        elif group not in self.accumulated:
            self.accumulated[group] = self.trace.alloc(4 * self._params(group))
        for key in wgrads:
            self.trace.free(key)

    def _embed(self) -> int | None:
        """The embedding's output: the whole sequence's partial sums, reduce-scattered under SP."""
        t = self.trace
        full = t.alloc(2 * self.sbh)
        if self.spec.shape.sp:
            shard = t.alloc(self.boundary)
            t.free(full)
            return shard
        return full

    def _head_forward(self, x: int | None, kept_outputs: list) -> tuple:
        """The final norm (eager: fp32 input copy and bf16 output saved), the gathered input of the output layer,
        the logits (when pipelined, kept in ``output_chunks`` to the next step, or else in ``fwd_cache`` to this
        micro-batch's backward) and the loss's saved fp32 tensor (the log-softmax, or the fused loss's fp32
        copy)."""
        t, sh = self.trace, self.spec.shape
        shard = self.boundary / 2
        f32 = t.alloc(4 * shard)
        normed = t.alloc(2 * shard)
        t.free(x)
        gathered = t.alloc(2 * self.sbh) if sh.sp else t.ref(normed)
        logits = t.alloc(2 * self.logits)
        cached = None
        if self.spec.pipelined and self.spec.keep_outputs:
            kept_outputs.append(t.ref(logits))
        elif self.spec.pipelined:
            cached = t.ref(logits)
        upcast = t.alloc(4 * self.logits)
        if self.spec.loss == "eager":
            saved = t.alloc(4 * self.logits)  # log_softmax's output
            t.free(upcast)
        else:
            saved = upcast
        t.free(logits)
        return f32, normed, gathered, saved, cached

    def _loss_backward(self, saved: int | None) -> int | None:
        """The loss's fp32 gradient of the logits (see ``memory.loss_bytes_per_logit``): loss_parallel's
        ``(zeros_like(x) + exp(x)) * grad``; ``cross_entropy``'s nll gradient then log_softmax's backward; the
        fused loss's gradient written over its own fp32 copy."""
        t, n = self.trace, 4 * self.logits
        if self.spec.loss != "eager":
            return saved
        if self.spec.shape.t > 1:
            zeros, exp = t.alloc(n), t.alloc(n)
            total = t.alloc(n)
            t.free(zeros)
            t.free(exp)
            out = t.alloc(n)
            t.free(total)
        else:
            nll = t.alloc(n)
            out = t.alloc(n)
            t.free(nll)
        t.free(saved)
        return out

    def _head_backward(self, stage: int, head: tuple) -> int | None:
        """The loss's backward, the cast back to bf16, the output layer's input and weight gradients, the
        reduce-scatter to the shard and the norm's backward."""
        t, sh = self.trace, self.spec.shape
        f32, normed, gathered, saved, cached = head
        grad = self._loss_backward(saved)
        dlogits = t.alloc(2 * self.logits)
        t.free(grad)
        dinput = t.alloc(2 * self.sbh)
        dweight = t.alloc(2 * self.spec.output_params)
        t.free(dlogits)
        t.free(gathered)
        if sh.sp:
            shard = t.alloc(self.boundary)
            t.free(dinput)
            dinput = shard
        dx = t.alloc(self.boundary)
        t.free(dinput)
        t.free(f32)
        t.free(normed)
        t.free(cached)
        self._post_backward((stage, OUTPUT), [dweight])
        return dx


def reserved_overhead(spec: RankSpec, recompute: str, steps: int = STEPS) -> float:
    """Bytes the caching allocator keeps mapped beyond the most it ever has allocated, over ``steps`` steps of
    this rank."""
    allocator = CachingAllocator()
    allocator.replay(RankStep(spec).run(recompute, steps).events)
    return float(allocator.peak_reserved - allocator.peak_allocated)
