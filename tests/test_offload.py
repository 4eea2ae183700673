"""Activation offload's ordering (which group is fetched when, each tensor once), its round trips, and on CUDA the
memory it really frees at the backward peak (the gpu-marked test)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dspark_lab.allocator import HostPool
from dspark_lab.runtime.policies import offload
from dspark_lab.runtime.policies.memory import SavedActivations
from dspark_lab.runtime.policies.offload import CudaCopies, SyncCopies

WIDTH, BATCH, BLOCKS = 256, 64, 4


def make_blocks(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH))
                           for _ in range(BLOCKS)])


class RecordingCopies(SyncCopies):
    """The CPU engine, logging each call with the block whose forward saved the tensor ("tail" after the last)."""

    def __init__(self, where: dict):
        self.where, self.log, self.owner, self.offloaded = where, [], {}, []

    def to_host(self, sources, buffers):
        for buffer in buffers:
            self.owner[buffer.data_ptr()] = self.where["block"]
            self.offloaded.append(buffer.data_ptr())
        super().to_host(sources, buffers)
        return ("offloaded", self.where["block"])

    def wait(self, ticket):
        self.log.append(("wait", ticket[1]))

    def to_device(self, buffers, device):
        tensors, ticket = super().to_device(buffers, device)
        owners = {self.owner[b.data_ptr()] for b in buffers}
        assert len(owners) == 1
        self.log.append(("fetch", owners.pop(), [b.data_ptr() for b in buffers]))
        for tensor, buffer in zip(tensors, buffers):
            self.owner[tensor.data_ptr()] = self.owner[buffer.data_ptr()]
        return tensors, ticket

    def use(self, tensors, ticket):
        self.log.append(("use", self.owner[tensors[0].data_ptr()]))


def run_step(model, tracker, x):
    tracker.install()
    try:
        loss = model(x).pow(2).mean()
        loss.backward()
    finally:
        tracker.uninstall()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_backward_fetches_one_block_ahead_each_tensor_once_and_bit_exact():
    where = {"block": None}
    model = make_blocks()
    for index, block in enumerate(model):
        block.register_forward_pre_hook(lambda m, a, i=index: where.update(block=i))
    model.register_forward_hook(lambda m, a, o: where.update(block="tail"))
    engine = RecordingCopies(where)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tracker = SavedActivations(lambda: params, allocator_factory=HostPool, copies_factory=lambda device: engine)
    tracker.track_blocks(list(model))
    tracker.mode = "host"
    x = torch.randn(BATCH, WIDTH)
    reference = make_blocks()
    ref_loss, ref_grads = run_step(reference, SavedActivations(), x)
    loss, grads = run_step(model, tracker, x)

    assert torch.equal(loss, ref_loss) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    fetches = [e[1] for e in engine.log if e[0] == "fetch"]
    assert fetches == ["tail", 3, 2, 1, 0]  # backward order, one fetch per group
    fetched = [ptr for e in engine.log if e[0] == "fetch" for ptr in e[2]]
    assert sorted(fetched) == sorted(engine.offloaded) and len(fetched) == 3 * BLOCKS + 1  # each one, once
    # block k's tensors are queued for the device when block k+1's backward starts, before any of them is used
    compact = []
    for entry in engine.log:
        item = entry[:2]
        if not compact or compact[-1] != item:
            compact.append(item)
    assert compact[:3] == [("wait", 0), ("wait", 1), ("wait", 2)]  # group k starts once k-2 is on the host
    assert compact[3:] == [("fetch", "tail"), ("fetch", 3), ("use", "tail"), ("fetch", 2), ("use", 3), ("fetch", 1),
                       ("use", 2), ("fetch", 0), ("use", 1), ("use", 0)]
    assert tracker.held == 0


def test_without_tracked_blocks_each_tensor_is_fetched_alone_when_needed():
    engine_log = []

    class Counting(SyncCopies):
        def to_device(self, buffers, device):
            engine_log.append(len(buffers))
            return super().to_device(buffers, device)

    model = make_blocks()
    tracker = SavedActivations(allocator_factory=HostPool, copies_factory=lambda device: Counting())
    tracker.mode = "host"
    run_step(model, tracker, torch.randn(BATCH, WIDTH))
    assert engine_log == [1] * (3 * BLOCKS + 1)  # each tensor fetched alone, once, when backward needs it


@pytest.mark.parametrize("mode", ["host", "host-fp8"])
def test_a_saved_view_comes_back_with_its_strides(mode):
    # a compiled graph's backward asserts the strides of what it saved (inductor's assert_size_stride): nanoGPT with
    # --compile=True died at its first backward after `memory.activation_offload=host`, on the q/k/v views of one
    # projection (the host copy came back contiguous)
    seen = []

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, qkv):
            view = qkv.view(4, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)[1]  # k: (4, 2, 16, 16), strides of a slice
            ctx.save_for_backward(view)
            return view.sum()

        @staticmethod
        def backward(ctx, grad):
            (view,) = ctx.saved_tensors
            seen.append((view.size(), view.stride()))
            return torch.zeros(4, 16, 96)

    tracker = SavedActivations(allocator_factory=HostPool)
    tracker.mode = mode
    qkv = torch.randn(4, 16, 96, requires_grad=True)
    tracker.install()
    try:
        out = Attention.apply(qkv)
        expected = qkv.view(4, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)[1]
        out.backward()
    finally:
        tracker.uninstall()
    assert seen == [(expected.size(), expected.stride())]
    assert expected.stride() == (1536, 16, 96, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_round_trip_is_within_the_tile_error_and_stores_a_quarter_of_fp32(dtype):
    tracker = SavedActivations()
    tracker.mode = "host-fp8"
    x = torch.randn(96, 384, dtype=dtype)
    packed = tracker.pack(x)
    assert packed.tensor.nbytes == x.numel() + 4 * x.numel() // 128  # fp8 bytes and one fp32 scale per tile
    back = tracker.unpack(packed)
    assert back.dtype == dtype and back.shape == x.shape
    error = (back.float() - x.float()).abs().reshape(-1, 128).amax(dim=1)
    tile_max = x.float().abs().reshape(-1, 128).amax(dim=1)
    assert (error <= tile_max / 16).all() and not torch.equal(back, x)  # e4m3: 3 mantissa bits


def test_host_buffers_go_back_to_the_pool_only_after_their_copy_is_done():
    class Event:
        def __init__(self):
            self.done = False

        def query(self):
            return self.done

    engine = CudaCopies.__new__(CudaCopies)  # the release bookkeeping only: no stream on a CPU machine
    engine._releases, engine._lock = offload.deque(), offload.threading.Lock()
    released = []
    first, second = Event(), Event()
    engine.release_when_done(first, lambda: released.append(1))
    engine.release_when_done(second, lambda: released.append(2))
    assert released == []
    second.done = True
    engine.poll()
    assert released == []  # events finish in stream order: the first is still pending
    first.done = True
    engine.poll()
    assert released == [1, 2]


def test_policy_on_a_cpu_backend_says_it_has_no_memory_effect(tmp_path):
    from dspark_lab.backends import cpu
    from dspark_lab.plugins import make_manager
    from dspark_lab.runtime.attach import Job
    from dspark_lab.runtime.policies import builtin
    from dspark_lab.runtime.records import RunDir

    run_dir = RunDir.create("20260101-000000-0ff10a", {"name": "offload"}, root=tmp_path)
    job = Job(run_dir, rank=0, world=1, manager=make_manager([cpu, builtin], entry_points=False))
    job.set_model(make_blocks())
    try:
        note = builtin.dspark_apply_policy(job=job, key="memory.activation_offload", value="host", old="off")
        assert job.activations.mode == "host" and "no memory effect" in note
    finally:
        job.close()


class StandInCuda:
    """torch.cuda's streams and events as loggers, so :class:`CudaCopies` runs its real code on CPU tensors."""

    def __init__(self, monkeypatch):
        import contextlib

        self.log, self.events = [], []
        outer = self

        class Stream:
            def __init__(self, name):
                self.name = name

            def wait_stream(self, other):
                outer.log.append(("wait_stream", self.name, other.name))

            def wait_event(self, event):
                outer.log.append(("wait_event", self.name, event.index))

        class Event:
            def __init__(self):
                self.index, self.done = len(outer.events), False
                outer.events.append(self)

            def record(self, stream):
                outer.log.append(("record", stream.name, self.index))

            def query(self):
                return self.done

        self.compute, self.side = Stream("compute"), Stream("side")

        @contextlib.contextmanager
        def stream(s):
            outer.log.append(("enter", s.name))
            yield
            outer.log.append(("exit", s.name))

        monkeypatch.setattr(torch.cuda, "Stream", lambda device: self.side)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.compute)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: outer.log.append(("record_stream", s.name)),
                            raising=False)


def test_cuda_engine_orders_copies_with_events_and_frees_buffers_only_after_them(monkeypatch):
    cuda = StandInCuda(monkeypatch)
    pool = HostPool()
    model = make_blocks()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tracker = SavedActivations(lambda: params, allocator_factory=lambda: pool, copies_factory=CudaCopies)
    tracker.track_blocks(list(model))
    tracker.mode = "host"
    x = torch.randn(BATCH, WIDTH)
    ref_loss, ref_grads = run_step(make_blocks(), SavedActivations(), x)
    tracker.install()
    try:
        loss = model(x).pow(2).mean()
        forward = list(cuda.log)
        loss.backward()
    finally:
        tracker.uninstall()
    assert torch.equal(loss, ref_loss) and all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), ref_grads))
    offloads = 3 * BLOCKS + 1
    # each offload: the side stream waits for compute, then copies and marks the source as used by the side stream
    assert forward.count(("wait_stream", "side", "compute")) == offloads
    assert forward.count(("record_stream", "side")) == offloads
    first = forward.index(("wait_stream", "side", "compute"))
    assert forward[first:first + 5] == [("wait_stream", "side", "compute"), ("enter", "side"),
                                        ("record_stream", "side"), ("record", "side", 0), ("exit", "side")]
    waits = [e for e in forward if e[0] == "wait_event"]
    assert len(waits) == BLOCKS - 1  # blocks 2, 3 and the tail each wait for the copies two groups back
    backward = cuda.log[len(forward):]
    uses = [e for e in backward if e[0] == "wait_event"]
    assert len(uses) == offloads and all(e[1] == "compute" for e in uses)  # one wait per unpacked tensor
    assert backward.count(("record_stream", "compute")) == offloads
    fetch_events = {e[2] for e in backward if e[0] == "record"}
    assert len(fetch_events) == BLOCKS + 1 and {e[2] for e in uses} == fetch_events  # one event per group
    assert pool.stats()["bytes_in_use"] > 0  # no event has completed: every buffer is still held
    for event in cuda.events:
        event.done = True
    tracker.reset_peak()  # the step boundary polls the events
    assert pool.stats()["bytes_in_use"] == 0 and pool.stats()["bytes_pooled"] > 0


# --- on a CUDA device -------------------------------------------------------------------------------------------


def _peak_step(model, tracker, x) -> tuple[int, list[torch.Tensor]]:
    """One forward and backward from zeroed gradients: the allocator's peak above the start, and the gradients."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _, grads = run_step(model, tracker, x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, grads


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["host", "host-fp8"])
def test_cuda_offload_frees_the_offloaded_bytes_at_the_backward_peak(mode):
    width, batch, blocks = 2048, 4096, 8
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
                            for _ in range(blocks)]).cuda()
    x = torch.randn(batch, width, device="cuda")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    pools = []

    def pool():
        pools.append(HostPool(pinned=True, pool_mb=8192))
        return pools[-1]

    off = SavedActivations(lambda: params)
    _peak_step(model, off, x)  # warm up the allocator and cuBLAS
    peak_off, grads_off = _peak_step(model, off, x)
    tracker = SavedActivations(lambda: params, allocator_factory=pool)
    tracker.track_blocks(list(model))
    tracker.mode = mode
    _peak_step(model, tracker, x)  # the pinned buffers are allocated once, here
    peak_on, grads_on = _peak_step(model, tracker, x)
    offloaded = 3 * blocks * batch * width * 4  # each block saves three (batch, width) fp32 tensors
    tracker.reset_peak()  # a step boundary: every copy is done (synchronized), so every buffer goes back
    stats = pools[0].stats()
    assert len(pools) == 1 and pools[0].pinned and stats["bytes_in_use"] == 0 and stats["bytes_pooled"] > 0
    # the block in backward and the one prefetched (and the tail's tensor) may be on the device at the peak
    assert peak_off - peak_on >= offloaded * (1 - 3 / blocks), (peak_off, peak_on, offloaded)
    if mode == "host":
        assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off))  # exact copies: bit-identical
    else:
        errors = [((a - b).norm() / b.norm()).item() for a, b in zip(grads_on, grads_off)]
        assert 0 < max(errors) < 0.1, errors  # really FP8 on the way, and close


def test_checkpointed_blocks_inputs_are_copied_once():
    from dspark_lab.runtime.policies.memory import set_checkpointing

    calls = []

    class Counting(SyncCopies):
        def to_host(self, sources, buffers):
            calls.append(len(sources))
            return super().to_host(sources, buffers)

    model = make_blocks()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tracker = SavedActivations(lambda: params, allocator_factory=HostPool, copies_factory=lambda device: Counting())
    tracker.track_blocks(list(model))
    tracker.mode = "host"
    set_checkpointing(list(model), "full", tracker)
    tracker.install()
    try:
        loss = model(torch.randn(BATCH, WIDTH, requires_grad=True)).pow(2).mean()
        assert tracker.held >= BLOCKS * BATCH * WIDTH * 4  # each block's input, counted while kept
        loss.backward()
    finally:
        tracker.uninstall()
        set_checkpointing(list(model), "none", tracker)
    # each block's input (the checkpoint saves it through autograd, so it is offloaded like any saved tensor) and
    # the tail's tensor, once each: the checkpoint's own inputs are not copied (or counted) a second time
    assert calls == [1] * (BLOCKS + 1)
    assert tracker.held == 0
