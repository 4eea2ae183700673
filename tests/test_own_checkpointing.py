"""A script's own activation checkpointing (torch's checkpoint_wrapper, Hugging Face's gradient_checkpointing) is
seen by ``memory.activation_checkpointing``: reported as the value in force, switched through the script's own
mechanism, never stacked under a second checkpoint; gradients stay what they are."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from dspark_lab.runtime import discover
from dspark_lab.runtime.policies import builtin
from dspark_lab.runtime.policies.memory import checkpointing_in_force, set_checkpointing


class Block(nn.Module):
    """A block that counts its forward runs: 1 per step plain, 2 checkpointed, 3 under two stacked checkpoints."""

    def __init__(self, width=16):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.runs = 0

    def forward(self, x):
        self.runs += 1
        return x + self.inner(x)


def wrapped_model(layers=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(*[Block() for _ in range(layers)]), nn.Linear(16, 1))
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    return model


def step(model, width=8) -> list[int]:
    """One forward and backward; how many times each block's forward ran."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for b in blocks:
        b.runs = 0
    model(torch.randn(32, width, generator=torch.Generator().manual_seed(1))).pow(2).mean().backward()
    return [b.runs for b in blocks]


def job_for(model):
    blocks = discover.repeated_blocks(model)
    return SimpleNamespace(model=model, blocks=blocks, fsdp=False, fsdp_kind="", compiled=[], state={},
                           registered={}, activations=None)


def test_checkpoint_wrapper_is_read_as_in_force_and_switched_without_stacking():
    model = wrapped_model()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    job = job_for(model)
    assert type(job.blocks[0]).__name__ == "CheckpointWrapper"
    assert builtin.observed_values(job)["memory.activation_checkpointing"] == "full"

    note = builtin.dspark_apply_policy(job=job, key="memory.activation_checkpointing", value="full", old="full")
    assert step(model) == [2, 2, 2, 2]  # the script's checkpoint only: no second one stacked on it (was 3)
    assert "through the script's own torch checkpoint_wrapper" in note

    builtin.dspark_apply_policy(job=job, key="memory.activation_checkpointing", value="none", old="full")
    assert step(model) == [1, 1, 1, 1] and checkpointing_in_force(job.blocks) is None
    builtin.dspark_apply_policy(job=job, key="memory.activation_checkpointing", value="every-2", old="none")
    assert step(model) == [2, 1, 2, 1] and checkpointing_in_force(job.blocks) == "every-2"
    assert list(model.state_dict()) == keys

    step(reference)
    got = dict(model.named_parameters())
    for name, param in reference.named_parameters():  # three steps' gradients accumulated vs one: same per step
        assert torch.allclose(got[name].grad, 3 * param.grad, rtol=1e-5, atol=1e-7), name


def test_a_block_the_script_does_not_checkpoint_gets_the_runtimes_checkpoint():
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(4)])
    blocks = list(model)
    assert checkpointing_in_force(blocks) is None
    assert set_checkpointing(blocks, "every-2") == ([0, 2], 0)
    assert step(model, 16) == [2, 1, 2, 1]
    set_checkpointing(blocks, "none")
    assert step(model, 16) == [1, 1, 1, 1]


def test_transformers_gradient_checkpointing_is_switched_through_its_own_flag():
    transformers = pytest.importorskip("transformers", reason="the frameworks extra is not installed")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=4, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    reference = copy.deepcopy(model)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    reference.train()
    job = job_for(model)
    assert len(job.blocks) == 4 and builtin.observed_values(job)["memory.activation_checkpointing"] == "full"

    runs = []
    for block in job.blocks:  # transformers checkpoints a layer's forward: count a module inside it
        block.attn.register_forward_pre_hook(lambda *_: runs.append(1))

    def count(m):
        runs.clear()
        ids = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(2))
        m(input_ids=ids, labels=ids).loss.backward()
        return len(runs)

    note = builtin.dspark_apply_policy(job=job, key="memory.activation_checkpointing", value="full", old="full")
    assert count(model) == 8 and "transformers gradient_checkpointing" in note
    builtin.dspark_apply_policy(job=job, key="memory.activation_checkpointing", value="none", old="full")
    assert count(model) == 4 and [b.gradient_checkpointing for b in job.blocks] == [False] * 4
    assert "forward" not in job.blocks[0].__dict__  # switched through the flag, not by a wrapper of ours
    builtin.dspark_apply_policy(job=job, key="memory.activation_checkpointing", value="every-2", old="none")
    assert count(model) == 6 and [b.gradient_checkpointing for b in job.blocks] == [True, False, True, False]

    ids = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(2))
    for m in (model, reference):
        m.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
    got = dict(model.named_parameters())
    assert all(torch.equal(got[n].grad, p.grad) for n, p in reference.named_parameters())
