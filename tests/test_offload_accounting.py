"""The saved-activation byte count (``held`` / the step's ``peak_activation_bytes``) in every combination of
activation checkpointing and offload, against figures computed by hand for a model whose saved tensors are known,
and against the bytes the copy engine really moved to the host."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dspark_lab.allocator import HostPool
from dspark_lab.runtime.policies.memory import SavedActivations, set_checkpointing
from dspark_lab.runtime.policies.offload import SyncCopies

ROWS, WIDTH, BLOCKS = 64, 128, 3  # each saved tensor is >= 32 KiB, above MIN_OFFLOAD_BYTES


def make_model() -> nn.Sequential:
    """Block: x -> mm -> relu -> mm. It saves x (first mm's input) and relu's output r (ROWS x 2*WIDTH, saved by
    relu and by the second mm: one storage); the weights are parameters and never count."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH, bias=False), nn.ReLU(),
                                         nn.Linear(2 * WIDTH, WIDTH, bias=False)) for _ in range(BLOCKS)])


def expected_bytes(checkpointing: str, offload: str) -> float:
    """By hand. Without checkpointing: every block's input and relu output, and the last output (saved by pow).
    Fully checkpointed: only each block's input (kept for recomputation) and the last output."""
    unit = ROWS * WIDTH
    elements = (BLOCKS + 1) * unit + (BLOCKS * 2 * unit if checkpointing == "none" else 0)
    per_element = {"off": 4, "host": 4, "host-fp8": 1 + 4 / 128}[offload]  # fp8 e4m3 + one fp32 scale per 128
    return elements * per_element


class CountingCopies(SyncCopies):
    def __init__(self):
        self.bytes = 0

    def to_host(self, sources, buffers):
        self.bytes += sum(b.numel() * b.element_size() for b in buffers)
        return super().to_host(sources, buffers)


@pytest.mark.parametrize("offload", ["off", "host", "host-fp8"])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_held_bytes_match_the_hand_count_in_every_combination(checkpointing, offload):
    model = make_model()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    copies = CountingCopies()
    tracker = SavedActivations(lambda: params, allocator_factory=HostPool, copies_factory=lambda device: copies)
    tracker.track_blocks(list(model))
    tracker.mode = offload
    set_checkpointing(list(model), checkpointing, tracker)
    tracker.install()
    try:
        for _ in range(2):  # the second step starts from what the first left: nothing
            loss = model(torch.randn(ROWS, WIDTH)).pow(2).mean()
            held_after_forward = tracker.held
            loss.backward()
            assert tracker.held == 0
            peak = tracker.reset_peak()
    finally:
        tracker.uninstall()
        set_checkpointing(list(model), "none", tracker)
    expected = expected_bytes(checkpointing, offload)
    assert held_after_forward == peak == expected
    # independently: what crossed to the host is what is held (every saved tensor here is offloadable)
    assert copies.bytes == (0 if offload == "off" else 2 * expected)


def test_a_tensor_keyword_argument_kept_by_the_checkpoint_counts_once():
    """torch's checkpoint keeps tensor keyword arguments in a closure, outside autograd's saved tensors."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(WIDTH, WIDTH, bias=False)

        def forward(self, x, scale=None):
            return self.linear(x) * scale

    torch.manual_seed(0)
    blocks = nn.ModuleList([Scaled() for _ in range(BLOCKS)])
    params = {p.untyped_storage().data_ptr() for p in blocks.parameters()}
    tracker = SavedActivations(lambda: params)
    set_checkpointing(list(blocks), "full", tracker)
    scale = torch.rand(ROWS, WIDTH)
    tracker.install()
    try:
        h = torch.randn(ROWS, WIDTH)
        for block in blocks:
            h = block(h, scale=scale)
        unit = ROWS * WIDTH * 4
        assert tracker.held == BLOCKS * unit + unit  # each block's input, and the shared scale once
        h.sum().backward()
        assert tracker.held == 0
    finally:
        tracker.uninstall()
        set_checkpointing(list(blocks), "none", tracker)


@pytest.mark.parametrize("offload", ["off", "host"])
def test_a_forward_dropped_without_backward_frees_what_it_saved_without_the_garbage_collector(offload):
    """An evaluation forward without ``no_grad``: once its output is dropped, what its ops saved is freed at once, as
    without the hooks, and leaves the count (ops that save their own output, like tanh and sigmoid, would otherwise
    hold it in a reference cycle through autograd's C++ nodes that the collector cannot break)."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Sigmoid())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tracker = SavedActivations(lambda: params, copies_factory=lambda device: SyncCopies())
    tracker.mode = offload
    tracker.install()
    gc.disable()
    try:
        hidden = model[1](model[0](torch.randn(ROWS, WIDTH)))  # tanh saves its output
        out = model[3](model[2](hidden))  # so does sigmoid
        outputs = [weakref.ref(hidden), weakref.ref(out)]
        assert tracker.held > 0
        del hidden, out
        assert [ref() for ref in outputs] == [None, None]
        assert tracker.held == 0
    finally:
        gc.enable()
        tracker.uninstall()


@pytest.mark.parametrize("changed", ["an op's own output", "an op's input", "a weight"])
def test_a_saved_tensor_changed_in_place_before_backward_fails_as_without_the_hooks(changed):
    """PyTorch checks a saved tensor's version at backward only when no saved-tensor hooks are installed; the
    runtime's hooks make the same check, so a script that fails under plain torchrun does not compute wrong
    gradients under dspark-lab run instead."""
    linear = nn.Linear(WIDTH, WIDTH)
    params = {p.untyped_storage().data_ptr() for p in linear.parameters()}
    tracker = SavedActivations(lambda: params)
    tracker.install()
    try:
        x = torch.randn(ROWS, WIDTH, requires_grad=True)
        hidden = torch.tanh(linear(x))  # tanh saves its output; linear saves x and the weight
        loss = (hidden * 2).sum()
        with torch.no_grad():
            {"an op's own output": hidden, "an op's input": x, "a weight": linear.weight}[changed].add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    finally:
        tracker.uninstall()


def test_saved_tensors_left_alone_give_the_gradients_of_a_run_without_the_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Sigmoid())
    x = torch.randn(ROWS, WIDTH)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tracker = SavedActivations(lambda: params)
    tracker.install()
    try:
        model(x).square().sum().backward()
    finally:
        tracker.uninstall()
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, model.parameters()))
