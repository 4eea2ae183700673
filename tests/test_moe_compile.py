"""moe.placement on torch.compile'd MoE models (docs/moe.md, "Under torch.compile"): the loads it records equal the
eager run's, counting adds no recompile, re-placing experts invalidates no graph, and what cannot be counted is
refused rather than re-placed from zeros. "No recompile" is Dynamo's own count of the graphs it built."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import dynamo_counters, graphs
from dspark_lab.examples.moe_model import MoEConfig, TinyMoETransformer, sync_gradients
from dspark_lab.examples.moe_train import batch, initial_placement
from dspark_lab.moe import eplb_reference
from dspark_lab.plugins import make_manager
from dspark_lab.runtime.attach import Job
from dspark_lab.runtime.policies import builtin as builtin_policies
from dspark_lab.runtime.records import RunDir
from moe_contract import ContractMoE

CONFIG = MoEConfig(dim=16, hidden=32, seq=8, slots_per_rank=10)  # 2 MoE layers, 8 experts, 10 slots on 1 rank
STEPS = 7
REPLACE = {"moe.placement": "eplb", "moe.placement_interval": 3, "moe.placement_window": 3}


def fresh_dynamo() -> None:
    torch._dynamo.reset()
    dynamo_counters().clear()


def make_job(tmp_path, policies=None, registered=None) -> Job:
    from dspark_lab.backends import cpu

    return Job(RunDir.create("20260101-000000-abcdef", {"name": "moe-compile"}, root=tmp_path), rank=0, world=1,
               manager=make_manager([cpu, builtin_policies], entry_points=False),
               launch_policies=policies or {}, registered=registered or {})


def apply(job, key, value) -> None:
    job.validate({key: value})
    failure, _ = job.apply_changes({key: value})
    assert not failure, failure


@pytest.fixture
def rotating(monkeypatch):
    """EPLB answers with every layer's slots rotated by one: on one rank every expert changes slot, so weights and
    Adam state move (locally) at each re-placement."""
    calls = []

    def rotate(weight, replicas, *args):
        calls.append(np.asarray(weight))
        current = np.stack([layer.phy2log.numpy() for layer in rotate.layers])
        return torch.from_numpy(np.roll(current, 1, axis=1)), None, None

    monkeypatch.setattr(eplb_reference, "rebalance_experts", rotate)
    rotate.calls = calls
    return rotate


def train_example(tmp_path, compile: str, rotating) -> dict:
    """DSpark's example on one rank, as ``dspark-lab run`` sees a script: the runtime finds the model from the
    optimizer at step 1's boundary, after the first (compiled) forward."""
    fresh_dynamo()
    model = TinyMoETransformer(CONFIG, initial_placement(CONFIG, 1))
    rotating.layers = model.moe_layers()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    job = make_job(tmp_path / compile, REPLACE)
    run = model
    if compile == "whole":
        job.on_compile(model)
        run = torch.compile(model, backend="aot_eager")
    elif compile == "blocks":
        for block in model.blocks:
            job.on_compile(block)
            block.compile(backend="aot_eager")
    losses, built, placements = [], [], []
    try:
        for step in range(STEPS):
            tokens = batch(CONFIG, 4, step, 0, 1)
            loss = F.cross_entropy(run(tokens[:, :-1]).reshape(-1, CONFIG.vocab), tokens[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sync_gradients(model)
            optimizer.step()
            losses.append(loss.item())
            job.on_step_begin(optimizer)
            job.on_step_end(optimizer)
            built.append(graphs())
            placements.append([layer.phy2log.tolist() for layer in model.moe_layers()])
    finally:
        job.close()
    return {"losses": losses, "graphs": built, "placements": placements,
            "loads": [r["expert_loads"] for r in job.run_dir.metrics()],
            "events": [e for e in job.run_dir.events() if e["kind"] in ("placement", "error")]}


@pytest.mark.parametrize("compile", ["whole", "blocks"])
def test_the_example_compiled_records_the_eager_loads_and_replaces_without_recompiling(tmp_path, compile, rotating):
    eager = train_example(tmp_path, "none", rotating)
    got = train_example(tmp_path, compile, rotating)
    assert got["loads"] == eager["loads"]  # every step's, step 1's included (the hook-based count read 0 here)
    assert all(sum(map(sum, loads)) == 2 * 4 * CONFIG.seq * CONFIG.top_k for loads in got["loads"])
    assert max(abs(a - b) / abs(b) for a, b in zip(got["losses"], eager["losses"])) <= 1e-5
    # re-placed at steps 3 and 6 (every slot changed expert), from the counted loads, with no new graph
    assert [e["kind"] for e in got["events"]] == ["placement", "placement"]
    assert got["placements"] == eager["placements"] and got["placements"][2] != got["placements"][1]
    assert all(c.sum() > 0 for c in rotating.calls)
    assert got["graphs"][0] > 0 and set(got["graphs"]) == {got["graphs"][0]}, got["graphs"]
    # the dispatch runs eagerly: one graph break per MoE layer and call, none from counting
    assert got["graphs"][0] <= 2 * CONFIG.layers + 1


EXPERTS = 4


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, EXPERTS)

    def forward(self, x):
        return (self.gate(x).topk(2, -1).indices,)


class DenseMoE(ContractMoE):
    """A script's MoE layer (the contract of docs/runtime.md) that compiles without a graph break: every expert
    runs on every token and a mask keeps each token's top 2."""

    def __init__(self):
        super().__init__(Router(), EXPERTS)

    def forward(self, x):
        (chosen,) = self.router(x)
        out = torch.stack([expert(x) for expert in self.experts], 1)
        mask = torch.zeros(x.shape[0], EXPERTS).scatter_(1, chosen, 1.0)
        return x + (out * mask.unsqueeze(-1)).sum(1)


def train_registered(tmp_path, compile: str, layers: int = 10, steps: int = 4, late: bool = False,
                     policies=None, checkpoint: bool = False) -> dict:
    """Script-registered layers: ``dspark_lab.attach(model=..., moe_layers=...)`` before the first forward, or
    (``late``) after it."""
    fresh_dynamo()
    torch.manual_seed(0)
    moe = [DenseMoE() for _ in range(layers)]
    model = nn.Sequential(*moe)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = model
    if compile == "whole":
        run = torch.compile(model, backend="aot_eager")
    elif compile == "blocks":
        for layer in moe:
            layer.compile(backend="aot_eager")
    job = make_job(tmp_path / f"{compile}-{late}", policies, {"moe_layers": moe})
    built = []
    try:
        for step in range(steps):
            if step == 0 and not late:  # else found from the optimizer at step 1's boundary
                job.set_model(run, blocks=moe if checkpoint else None)
            if step == 0 and checkpoint:
                apply(job, "memory.activation_checkpointing", "full")
            x = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            run(x).pow(2).mean().backward()
            optimizer.step()
            job.on_step_begin(optimizer)
            job.on_step_end(optimizer)
            built.append(graphs())
    finally:
        job.close()
    return {"graphs": built, "frames": dict(dynamo_counters()["frames"]), "loads": [r["expert_loads"] for r in
                                                                            job.run_dir.metrics()],
            "events": [e for e in job.run_dir.events() if e["kind"] in ("placement", "error")],
            "placement": [layer.phy2log.tolist() for layer in moe]}


@pytest.mark.parametrize("compile", ["whole", "blocks"])
def test_router_hooks_on_ten_compiled_layers_build_one_graph_not_one_per_layer(tmp_path, compile):
    """The hook used to find its counter by a closure index, which Dynamo guards by value: each layer (each block's
    compiled call) got its own graph, and per block the 9th hit the recompile limit (8) and ran uncompiled."""
    eager = train_registered(tmp_path, "none")
    got = train_registered(tmp_path, compile)
    assert got["loads"] == eager["loads"]
    assert all(sum(map(sum, loads)) == 10 * 32 * 2 for loads in got["loads"])
    # one graph; per block a second for the first block, whose input alone does not require grad
    assert set(got["graphs"]) == {1 if compile == "whole" else 2}, got["graphs"]
    assert got["frames"]["total"] == got["frames"]["ok"]  # no frame fell back to eager


def test_a_hook_put_on_after_compile_traced_the_layer_is_refused_not_replaced_from_zeros(tmp_path, monkeypatch):
    """Dynamo ignores a module hook added after it traced the module (skip_nnmodule_hook_guards): the loads read 0,
    and the re-placement says why instead of balancing nothing."""
    policies = {"moe.placement": "eplb", "moe.placement_interval": 3, "moe.placement_window": 2}
    got = train_registered(tmp_path, "whole", layers=2, steps=4, late=True, policies=policies)
    assert got["loads"] == [[[0] * EXPERTS] * 2] * 4
    [error] = got["events"]
    assert error["kind"] == "error" and error["key"] == "moe.placement" and error["step"] == 3
    assert error["reason"].startswith("moe_layers[0] and 1 more counted no expert loads in the last 2 steps: its "
                                      "router hook did not run (torch.compile ignores a hook added after it traced")
    assert got["placement"] == [list(range(EXPERTS))] * 2


def test_a_checkpointed_block_counts_its_router_once_not_again_in_backward(tmp_path):
    """Activation checkpointing re-runs a block's forward in backward: hooks fired twice and loads read double."""
    plain = train_registered(tmp_path, "none", layers=2)
    checkpointed = train_registered(tmp_path / "ckpt", "none", layers=2, checkpoint=True)
    assert checkpointed["loads"] == plain["loads"]


def test_the_example_counts_a_checkpointed_block_once(tmp_path):
    def loads(checkpoint: bool):
        model = TinyMoETransformer(CONFIG, initial_placement(CONFIG, 1))
        job = make_job(tmp_path / str(checkpoint))
        job.set_model(model, blocks=list(model.blocks))
        if checkpoint:
            apply(job, "memory.activation_checkpointing", "full")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            for step in range(2):
                tokens = batch(CONFIG, 4, step, 0, 1)
                model(tokens[:, :-1]).pow(2).mean().backward()
                optimizer.step()
                job.on_step_begin(optimizer)
                job.on_step_end(optimizer)
        finally:
            job.close()
        return [r["expert_loads"] for r in job.run_dir.metrics()]

    assert loads(True) == loads(False)


@pytest.mark.slow
def test_live_compiled_moe_job_records_eager_loads_and_replaces_with_eager_losses(tmp_path, monkeypatch):
    """``dspark-lab run --nproc 2`` (gloo) of the example compiled whole, re-placed by the runtime every 5 steps:
    the losses and loads of plain torchrun's eager static run, and no graph built after step 1."""
    from conftest import plain_torchrun
    from dspark_lab.runtime import commands
    from dspark_lab.runtime.policies import memory

    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    script = Path(commands.__file__).parent.parent / "examples" / "moe_train.py"
    steps = 16
    args = ["--steps", str(steps), "--placement", "static", "--json"]
    reference = json.loads(plain_torchrun([script, *args]).stdout.splitlines()[-1])
    job = commands.launch(script, [*args, "--compile", "whole", "--compile-backend", "aot_eager"], nproc=2,
                          name="moe-compiled", env={"TORCH_LOGS": "recompiles"},
                          policies=["moe.placement=dspark", "moe.placement_interval=5", "moe.placement_window=5"])
    assert job.wait(400) == 0, (job.run_dir.path / "output.log").read_text()[-3000:]
    output = (job.run_dir.path / "output.log").read_text()
    live = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
    assert max(abs(a - b) / abs(b) for a, b in zip(live["loss"], reference["loss"])) <= 1e-5
    # nothing of the model, the MoE layers or their counting recompiled (the runtime's saved-tensor pack hook, which
    # Dynamo compiles as a frame of its own, recompiles once per rank for a Parameter: memory.py's, not MoE's)
    recompiled = set(re.findall(r"Recompiling function (\S+) in (\S+)", output))
    assert {path.split(":")[0] for _, path in recompiled} <= {str(Path(memory.__file__))}, recompiled
    assert live["graphs"][0] > 0 and set(live["graphs"]) == {live["graphs"][0]}, live["graphs"]
    placements = [e for e in job.run_dir.events() if e["kind"] == "placement"]
    assert {e["step"] for e in placements} == {6, 11, 16} and {e["rank"] for e in placements} == {0, 1}
    assert sum(e["received"] for e in placements) > 0
    assert not [e for e in job.run_dir.events() if e["kind"] == "error"]
    # the runtime's records, summed over ranks, are the loads the eager run's own hooks counted
    by_step: dict[int, np.ndarray] = {}
    for m in job.run_dir.metrics():
        by_step[m["step"]] = by_step.get(m["step"], 0) + np.array(m["expert_loads"])
    assert [by_step[s].tolist() for s in range(1, steps + 1)] == reference["loads"]
