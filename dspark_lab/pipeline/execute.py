"""Our executor: one rank runs exactly the op order of a :class:`~dspark_lab.pipeline.ir.Schedule` over
torch.distributed point-to-point (gloo or any backend with tagged send/recv).

Activations go forward and gradients backward with ``isend`` (handles kept until the step ends) and a blocking
``recv`` just before the op that needs them; each message is tagged with (pass, stream, stage, micro-batch), so two
directions sharing a pair of ranks (DualPipe) never mix. A split backward follows Zero Bubble (Qi et al. 2023):
B asks autograd for the gradients of the stage input and of every ``nn.Linear`` output only, W turns the kept
(input, output-gradient) pairs into weight gradients.

Each op's compute runs inside ``record_function`` named by its label (``F3.0``, ``B3.0``, ``W3.0``, ``F1.0/B0.1``;
a split backward's input-gradient pass is ``Bi3.0``), so a
profile of a running pipeline job (``dspark-lab profile``) carries the F/B/W ranges that ``dspark-lab trace costs``
reads; the blocking receives stay outside them, where the analysis sees them as waits. Outside a profile a
``record_function`` costs about a microsecond per op.

``PipelineTrainer.schedule`` may be replaced between steps by any schedule with the same layout (same ranks,
micro-batches and stage placement) — the hook a runtime policy uses to switch schedules at a step boundary.
"""

from __future__ import annotations

import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.profiler import record_function

from dspark_lab.pipeline.ir import Op, Schedule


# Every trainer alive in this process: how the runtime's ``sched.pipeline`` policy finds the one to switch.
LIVE_TRAINERS: "weakref.WeakSet[PipelineTrainer]" = weakref.WeakSet()


@dataclass(slots=True)
class _Live:
    """What a forward keeps until its backward (and W) ran."""

    inp: torch.Tensor
    out: torch.Tensor
    linears: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (layer, x, y)
    weight_grads: list | None = None


class PipelineTrainer:
    """Runs one rank's share of a pipeline step.

    ``stages`` maps chunk index to the stage module this rank holds; ``loss_fn(output, mb_index)`` turns the last
    stage's output into that micro-batch's loss (``mb_index`` is global: stream * micro-batches-per-stream + mb).
    """

    def __init__(self, schedule: Schedule, rank: int, stages: dict[int, nn.Module],
                 loss_fn: Callable[[torch.Tensor, int], torch.Tensor], act_shape: tuple[int, ...],
                 group=None):
        self._schedule = schedule
        self.rank, self.stages, self.loss_fn, self.act_shape, self.group = rank, stages, loss_fn, act_shape, group
        self.durations: dict[tuple[int, str], list[float]] = defaultdict(list)  # (chunk, kind) -> seconds
        self.trace: list[tuple[float, float, str]] = []  # last step: (start, end, op label), perf_counter seconds
        LIVE_TRAINERS.add(self)

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @schedule.setter
    def schedule(self, new: Schedule) -> None:
        if new.layout() != self._schedule.layout():
            raise ValueError(f"schedule: {new.name} places stages differently from {self._schedule.name}; "
                             "a switch needs the same ranks, micro-batches and chunks")
        self._schedule = new

    # -- one step ---------------------------------------------------------------------------------------------
    def step(self, inputs: list[torch.Tensor]) -> float:
        """Run the rank's ops for one step; grads accumulate in ``.grad``. Returns this rank's summed loss."""
        s = self._schedule
        self._live: dict[tuple[int, int], _Live] = {}
        self._local: dict[tuple, torch.Tensor] = {}
        self._sends: list = []
        self._inputs, self._loss = inputs, 0.0
        self.trace = []
        # An op's cost runs from the end of the previous op, less the time blocked in recv: the per-op glue
        # (posting sends, hooks, the loss) is part of what the simulator must charge to it.
        last = time.perf_counter()
        for op in s.ops[self.rank]:
            wait0 = time.perf_counter()
            self._recv_for(op)
            t0 = time.perf_counter()
            kind = "Bi" if op.kind == "B" and not op.full else op.kind
            with record_function(f"Bi{op.mb}.{op.chunk}" if kind == "Bi" else op.label()):
                if op.kind in ("F", "FB"):
                    self._forward(op.mb, op.chunk)
                if op.kind == "FB":
                    self._backward(op.b_mb, op.b_chunk, full=True)
                elif op.kind == "B":
                    self._backward(op.mb, op.chunk, full=op.full)
                elif op.kind == "W":
                    self._weights(op.mb, op.chunk)
            t1 = time.perf_counter()
            self.durations[(op.chunk, kind)].append(t1 - last - (t0 - wait0))
            self.trace.append((t0, t1, op.label()))
            last = t1
        for handle in self._sends:
            handle.wait()
        return self._loss

    # -- messages ---------------------------------------------------------------------------------------------
    def _tag(self, kind: int, stream: int, stage: int, mb: int) -> int:
        s = self._schedule
        return ((kind * len(s.streams) + stream) * s.stages + stage) * s.microbatches + mb

    def _recv_for(self, op: Op) -> None:
        """Blocking receives of what ``op`` needs from other ranks (stored where the compute expects them)."""
        s = self._schedule
        for kind, mb, chunk in op.parts():
            stream, stage = s.where(self.rank, chunk)
            path = s.streams[stream]
            if kind == "F" and stage > 0:
                self._fetch(0, stream, stage - 1, mb, path[stage - 1][0])
            elif kind in ("B", "Bi") and stage < len(path) - 1:
                self._fetch(1, stream, stage + 1, mb, path[stage + 1][0])

    def _fetch(self, kind: int, stream: int, stage: int, mb: int, src: int) -> None:
        key = (kind, stream, stage, mb)
        if src == self.rank or key in self._local:
            return
        buf = torch.empty(self.act_shape)
        dist.recv(buf, src=src, tag=self._tag(*key), group=self.group)
        self._local[key] = buf

    def _put(self, kind: int, stream: int, stage: int, mb: int, dst: int, tensor: torch.Tensor) -> None:
        key = (kind, stream, stage, mb)
        if dst == self.rank:
            self._local[key] = tensor.detach()
        else:
            self._sends.append(dist.isend(tensor.detach().contiguous(), dst=dst, tag=self._tag(*key),
                                          group=self.group))

    # -- compute ----------------------------------------------------------------------------------------------
    def _forward(self, mb: int, chunk: int) -> None:
        s = self._schedule
        stream, stage = s.where(self.rank, chunk)
        path = s.streams[stream]
        if stage == 0:
            inp = self._inputs[stream * s.mb_per_stream + mb]
        else:
            inp = self._local.pop((0, stream, stage - 1, mb)).requires_grad_(True)
        module = self.stages[chunk]
        linears: list = []
        hooks = [m.register_forward_hook(lambda mod, args, out: linears.append((mod, args[0], out)))
                 for m in module.modules() if isinstance(m, nn.Linear)]
        try:
            out = module(inp)
        finally:
            for h in hooks:
                h.remove()
        if stage == len(path) - 1:
            out = self.loss_fn(out, stream * s.mb_per_stream + mb)
            self._loss += out.item()
        else:
            self._put(0, stream, stage, mb, path[stage + 1][0], out)
        self._live[(mb, chunk)] = _Live(inp, out, linears)

    def _backward(self, mb: int, chunk: int, full: bool) -> None:
        s = self._schedule
        stream, stage = s.where(self.rank, chunk)
        path = s.streams[stream]
        live = self._live[(mb, chunk)]
        grad_out = None if stage == len(path) - 1 else self._local.pop((1, stream, stage + 1, mb))
        wants_input = live.inp.requires_grad
        if full:
            torch.autograd.backward(live.out, grad_out)
            in_grad = live.inp.grad if wants_input else None
            del self._live[(mb, chunk)]
        else:
            linear_outs = [y for _, _, y in live.linears]
            module = self.stages[chunk]
            others = [p for n, p in module.named_parameters() if not _is_linear_param(module, n)]
            targets = ([live.inp] if wants_input else []) + linear_outs + others
            grads = torch.autograd.grad(live.out, targets, grad_out, allow_unused=True)
            in_grad = grads[0] if wants_input else None
            rest = grads[1:] if wants_input else grads
            live.weight_grads = list(rest[: len(linear_outs)])
            _accumulate(others, rest[len(linear_outs):])
            live.out = live.inp = None  # the graph is consumed; only (x, dY) pairs stay for W
        if stage > 0:
            self._put(1, stream, stage, mb, path[stage - 1][0], in_grad)

    def _weights(self, mb: int, chunk: int) -> None:
        live = self._live.pop((mb, chunk))
        for (layer, x, _), dy in zip(live.linears, live.weight_grads):
            if dy is None:
                continue
            x2, dy2 = x.detach().reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
            _accumulate([layer.weight], [dy2.t() @ x2])
            if layer.bias is not None:
                _accumulate([layer.bias], [dy2.sum(0)])


def _is_linear_param(module: nn.Module, name: str) -> bool:
    owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    return isinstance(owner, nn.Linear)


def _accumulate(params, grads) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad += g
