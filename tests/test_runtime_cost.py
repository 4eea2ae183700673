"""What the runtime runs per step when no policy asks for more: counted deterministically, not timed.

The saved-tensor hooks see every tensor autograd saves (about a hundred a step in the demo model), so their Python
is counted per tensor; the offloader's block hooks exist only while offload is on (docs/runtime.md, "Cost per
step"). Each of these failed on the code before the overhead work (9efad09).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from dspark_lab.runtime.policies import memory
from dspark_lab.runtime.policies.memory import SavedActivations

WIDTH, BLOCKS = 64, 3


def make_blocks() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
                           for _ in range(BLOCKS)])


def python_calls_in(module_file: str, run) -> int:
    """How many Python functions defined in ``module_file`` ``run()`` called (frames entered, generators
    included)."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_filename == module_file:
            calls += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


def test_a_kept_saved_tensor_costs_three_python_calls_pack_unpack_release():
    """Offload off: pack, unpack (its in-place check) and the release (``__del__``) are one Python function each (it
    was seven or more per tensor: pack, _pack, _is_wrapper_subclass, _hold, _Held.__init__, unpack, __del__,
    release)."""
    model = make_blocks()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(32, WIDTH)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x).square().mean().backward()
    tracker = SavedActivations(lambda: params)
    tracker.install()
    try:
        model(x).square().mean().backward()  # warm: nothing imported or cached on the first call is counted

        def step():
            loss = model(x).square().mean()
            assert tracker.held > 0
            loss.backward()

        calls = python_calls_in(memory.__file__, step)
    finally:
        tracker.uninstall()
    counted = [t for t in saved if t.untyped_storage().data_ptr() not in params]
    assert tracker.held == 0 and 0 < len(counted) < len(saved)
    assert calls <= 2 * len(saved) + len(counted), (calls, len(saved), len(counted))


def test_parameter_storages_are_read_once_per_step_not_per_saved_tensor():
    model = make_blocks()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    reads = 0

    def param_storages():
        nonlocal reads
        reads += 1
        return params

    tracker = SavedActivations(param_storages)
    tracker.install()
    try:
        for _ in range(3):
            before = reads
            model(torch.randn(32, WIDTH)).square().mean().backward()
            assert reads == before  # none during forward and backward (it was one per saved tensor)
            tracker.reset_peak()  # the step boundary reads them again
            assert reads == before + 1
    finally:
        tracker.uninstall()


def forward_hooks(block: nn.Module) -> int:
    return len(block._forward_pre_hooks) + len(block._forward_hooks)


@pytest.mark.parametrize("order", ["blocks first", "mode first"])
def test_offload_block_hooks_exist_only_while_offload_is_on(order):
    """With offload off the block hooks only slowed every block's call (they were put on at discovery)."""
    model = make_blocks()
    tracker = SavedActivations()
    if order == "blocks first":
        tracker.track_blocks(list(model))
        assert [forward_hooks(b) for b in model] == [0] * BLOCKS
        tracker.mode = "host"
    else:
        tracker.mode = "host"
        tracker.track_blocks(list(model))
    assert [forward_hooks(b) for b in model] == [2] * BLOCKS
    tracker.mode = "host-fp8"
    assert [forward_hooks(b) for b in model] == [2] * BLOCKS  # switched, not added twice
    tracker.mode = "off"
    assert [forward_hooks(b) for b in model] == [0] * BLOCKS


def test_offload_switched_on_live_still_groups_by_block_and_matches_off():
    """The hooks put on at the switch group the next forward's tensors by block (prefetch one block ahead), and
    the gradients equal those with offload off."""
    model = make_blocks()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tracker = SavedActivations(lambda: params)
    tracker.track_blocks(list(model))
    x = torch.randn(256, WIDTH)
    grads = []
    tracker.install()
    try:
        for mode in ("off", "host", "off"):
            tracker.mode = mode
            model.zero_grad()
            serial = tracker.offloader.serial
            model(x).square().mean().backward()
            assert tracker.offloader.serial - serial == (2 * BLOCKS if mode == "host" else 0)
            grads.append([p.grad.clone() for p in model.parameters()])
            assert tracker.held == 0
    finally:
        tracker.uninstall()
    for got in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, grads[0]))
