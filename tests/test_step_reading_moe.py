"""The MoE load recorder reads its counts with the step's loss, one step late (no per-step sync on CUDA): each
record still carries its own step's loads, and a re-placement sums the window's loads, its own step's included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dspark_lab.moe import eplb_reference
from dspark_lab.plugins import make_manager
from dspark_lab.runtime.attach import Job
from dspark_lab.runtime.policies import builtin as builtin_policies
from dspark_lab.runtime.records import RunDir
from moe_contract import ContractMoE

EXPERTS, STEPS = 4, 7


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, EXPERTS)

    def forward(self, x):
        return (self.gate(x).argmax(-1),)


class MoE(ContractMoE):
    """The MoE layer contract of docs/runtime.md on one rank: every expert in its one slot."""

    def __init__(self):
        super().__init__(Router(), EXPERTS)

    def forward(self, x):
        (chosen,) = self.router(x)
        self.last_rank_load = len(chosen)
        return torch.stack([self.experts[int(self.phy2log.tolist().index(int(e)))](row) for row, e in zip(x, chosen)])


def train(tmp_path, monkeypatch, policies, device="cpu", no_sync=False):
    from dspark_lab.backends import cpu

    monkeypatch.setenv("DSPARK_LOSS_READ", "late")  # the CUDA path's late read, forced on the CPU
    seen = []
    real = eplb_reference.rebalance_experts

    def recording(weight, *args):
        seen.append(np.asarray(weight, dtype=np.int64))
        return real(weight, *args)

    monkeypatch.setattr(eplb_reference, "rebalance_experts", recording)
    torch.manual_seed(0)
    layers = [MoE(), MoE()]
    model = nn.Sequential(nn.Linear(16, 16), layers[0], layers[1]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    job = Job(RunDir.create("20260101-000000-abcdef", {"name": "moe-late"}, root=tmp_path), rank=0, world=1,
              manager=make_manager([cpu, builtin_policies], entry_points=False),
              launch_policies=policies, registered={"moe_layers": layers})
    job.set_model(model)
    chosen: list = []  # this step's routers' choices, in call order, seen by the test's own hooks
    for layer in layers:
        layer.router.register_forward_hook(lambda module, args, output: chosen.append(output[0].clone()))
    expected, written, landed_at_own_boundary = [], [], []
    try:
        for step in range(1, STEPS + 1):
            x = torch.randn(5 + 3 * step, 16, device=device)  # another token count every step
            chosen.clear()
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
            expected.append([np.bincount(c.cpu().numpy(), minlength=EXPERTS).tolist() for c in chosen])
            job.on_step_begin(optimizer)
            if no_sync and step > 1:  # past the first boundary (it applies the launch policies)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync in the boundary raises
            try:
                job.on_step_end(optimizer)
            finally:
                if no_sync:
                    torch.cuda.set_sync_debug_mode("default")
            written.append(len(job.run_dir.metrics()))
            landed_at_own_boundary.append(job.state["moe"].placement.history[-1].host is not None)
    finally:
        job.close()
    return job.run_dir.metrics(), expected, written, seen, landed_at_own_boundary


def test_each_record_carries_its_own_steps_loads_read_one_step_late(tmp_path, monkeypatch):
    records, expected, written, seen, landed = train(tmp_path, monkeypatch, {})
    assert written == list(range(STEPS))  # at step k's boundary, records 1 .. k-1 are written: the late path
    assert landed == [False] * STEPS  # step k's loads reach the host at a later boundary, not at their own
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["expert_loads"] for r in records] == expected
    assert [r["moe_rank_tokens"] for r in records] == [[5 + 3 * s] * 2 for s in range(1, STEPS + 1)]
    assert len({str(e) for e in expected}) == STEPS and seen == []  # loads differ per step; no re-placement


def test_replacement_sums_the_window_its_own_steps_loads_included(tmp_path, monkeypatch):
    policies = {"moe.placement": "eplb", "moe.placement_interval": 3, "moe.placement_window": 2}
    records, expected, written, seen, landed = train(tmp_path, monkeypatch, policies)
    assert [step for step, now in enumerate(landed, 1) if now] == [3, 6]  # read at once (a sync) only to re-place
    assert [r["expert_loads"] for r in records] == expected
    # steps 3 and 6 re-place from steps 2+3 and 5+6: step 3's (6's) loads were not on the host yet at its boundary
    assert [w.tolist() for w in seen] == [(np.array(expected[1]) + expected[2]).tolist(),
                                          (np.array(expected[4]) + expected[5]).tolist()]


@pytest.mark.gpu
def test_on_cuda_the_boundary_records_the_loads_without_a_host_sync(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_MEMORY_EVERY", "100000")  # memory counters are read without a sync, but not needed
    records, expected, written, _, landed = train(tmp_path, monkeypatch, {}, device="cuda", no_sync=True)
    assert [r["expert_loads"] for r in records] == expected and written[-1] < STEPS and not any(landed)
