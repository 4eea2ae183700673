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
