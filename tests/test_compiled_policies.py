"""Memory policies on torch.compile'd models (runtime/policies/compiled.py): checkpointing wraps a block compiled on
its own from outside its graph, offload goes through the saved-tensor hooks every compiled graph saves through, and
a block inside a bigger compiled graph stays refused. "No recompile" is Dynamo's own count of graphs it built."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from conftest import graphs, wait_for_step
from dspark_lab.errors import PolicyError
from dspark_lab.plugins import make_manager
from dspark_lab.runtime import commands
from dspark_lab.runtime.attach import Job
from dspark_lab.runtime.policies import builtin as builtin_policies
from dspark_lab.runtime.records import RunDir

FIXTURES = Path(__file__).parent / "runtime_fixtures"
sys.path.append(str(FIXTURES))
from residual import mixed_model  # noqa: E402  (the fixture scripts' model)

CHECKPOINTING, OFFLOAD = "memory.activation_checkpointing", "memory.activation_offload"
STEPS = 24  # of the live run


def model_of(blocks: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return mixed_model(32, 128, blocks)


@pytest.fixture
def job(tmp_path):
    from dspark_lab.backends import cpu

    manager = make_manager([cpu, builtin_policies], entry_points=False)
    job = Job(RunDir.create("20260101-000000-abcdef", {"name": "unit"}, root=tmp_path), rank=0, world=1,
              manager=manager)
    job.activations.install()  # what start_job does before the script runs
    yield job
    job.activations.uninstall()
    job.close()


def compile_blocks(job, model, style: str) -> None:
    """Compile each block on its own: torchtitan's ``torch.compile(block)`` put back, or ``block.compile()``."""
    for index in range(1, len(model) - 1):
        if style == "torch.compile(block)":
            model[index] = torch.compile(model[index], backend="aot_eager", fullgraph=True)
        else:
            model[index].compile(backend="aot_eager", fullgraph=True)


def step(job, model, run=None) -> tuple[float, list[torch.Tensor], int]:
    """One forward and backward: the loss, the gradients and the peak bytes held for backward."""
    data = torch.randn(128, 8, generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    loss = (run or model)(data).pow(2).mean()
    job.activations.reset_peak()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()], job.activations.reset_peak()


def apply(job, key, value) -> str:
    job.validate({key: value})
    failure, applied = job.apply_changes({key: value})
    assert not failure, failure
    return applied[0][3]


@pytest.mark.parametrize("style", ["torch.compile(block)", "block.compile()"])
def test_checkpointing_blocks_compiled_one_by_one_runs_their_graphs_again_without_recompiling(job, style):
    model = model_of()
    compile_blocks(job, model, style)
    job.set_model(model)
    assert len(job.compiled) == 3 and len(job.blocks) == 3
    loss, grads, peak = step(job, model)
    built = graphs()
    for value in ("full", "none", "every-2", "full"):
        assert apply(job, CHECKPOINTING, value).startswith(f"{0 if value == 'none' else 3 if value == 'full' else 2} ")
        got_loss, got_grads, got_peak = step(job, model)
        assert got_loss == loss and all(torch.equal(a, b) for a, b in zip(got_grads, grads))
        assert graphs() == built, f"checkpointing={value} recompiled"
        if value == "full":
            assert got_peak < peak / 3  # only each block's input is kept, not the graphs' saved activations
        if value == "none":
            assert got_peak == peak


def test_a_block_compile_checkpoint_wraps_the_compiled_call_and_switching_off_restores_it(job):
    model = model_of()
    compile_blocks(job, model, "block.compile()")
    compiled_calls = [block._compiled_call_impl for block in model[1:4]]
    job.set_model(model)
    apply(job, CHECKPOINTING, "full")
    assert all("forward" not in block.__dict__ for block in model[1:4])  # forward is what Dynamo traced
    apply(job, CHECKPOINTING, "none")
    assert [block._compiled_call_impl for block in model[1:4]] == compiled_calls


def test_offload_goes_through_a_whole_model_compile_without_recompiling(job):
    model = model_of()
    job.on_compile(model)
    run = torch.compile(model, backend="aot_eager")
    job.set_model(run)
    loss, grads, peak = step(job, model, run)
    assert peak > 0  # the hooks stayed installed: the compiled graph's saved tensors are counted
    built = graphs()
    assert step(job, model, run)[0] == loss and graphs() == built  # no runtime hook is traced into the graph
    assert "no memory effect" in apply(job, OFFLOAD, "host")
    got_loss, got_grads, got_peak = step(job, model, run)
    assert got_loss == loss and all(torch.equal(a, b) for a, b in zip(got_grads, grads)) and got_peak == peak
    apply(job, OFFLOAD, "host-fp8")
    assert step(job, model, run)[2] < peak / 2 and graphs() == built


def test_checkpointing_blocks_inside_a_whole_model_compile_stays_refused_with_the_reason(job):
    model = model_of()
    job.on_compile(model)
    job.set_model(torch.compile(model, backend="aot_eager"))
    with pytest.raises(PolicyError, match=r"torch.compile compiled model, which holds the repeated blocks: a "
                                          r"checkpoint put on a block inside a compiled graph is traced into it"):
        job.validate({CHECKPOINTING: "full"})


class FSDPModule:
    """Stands for FSDP2's class of that name: ``fully_shard`` swaps a module's class for ``FSDP<Name>(FSDPModule,
    <Name>)``, so torchtitan's compiled blocks are ``FSDPOptimizedModule``s."""


@pytest.mark.parametrize("sharded", [False, True], ids=["OptimizedModule", "FSDPOptimizedModule"])
def test_the_scripts_own_checkpoint_compiled_into_each_block_stays_refused(job, sharded):
    """torchtitan with AC on and compile: checkpoint_wrapper first, then torch.compile of the wrapped block, then
    (sharded) fully_shard of the compiled block."""
    model = model_of(5)
    for index in range(1, 6):
        model[index] = torch.compile(checkpoint_wrapper(model[index]), backend="aot_eager")
        if sharded:
            model[index].__class__ = type("FSDPOptimizedModule", (FSDPModule, type(model[index])), {})
    job.set_model(model)
    assert job.compiled == [f"model.{i}" for i in range(1, 6)]
    with pytest.raises(PolicyError, match=r"the script's own torch checkpoint_wrapper is compiled into the graphs "
                                          r"of model.1, model.2, model.3 and 2 more: switching it would recompile"):
        job.validate({CHECKPOINTING: "none"})
    job.validate({OFFLOAD: "host"})


def test_the_first_step_boundary_looks_through_dead_weak_proxies_torch_compile_leaves_on_the_heap(job):
    """torchtitan with --compile.enable: the boundary's scan for a pipeline schedule raised ReferenceError."""
    import weakref

    from torch.distributed.pipelining import schedules  # noqa: F401  (the scan looks only once it is imported)

    class Gone:
        pass

    gone = Gone()
    dead = weakref.proxy(gone)
    del gone
    job.set_model(model_of())
    assert builtin_policies.observed_values(job)["sched.pipeline"] == "none" and dead is not None


@pytest.mark.slow
def test_a_per_block_compiled_job_checkpoints_live_with_its_plain_losses_and_no_recompile(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    plain, ours = tmp_path / "plain.json", tmp_path / "ours.json"
    reference = subprocess.Popen([sys.executable, str(FIXTURES / "compile_blocks_train.py"), str(STEPS), str(plain)])
    job = commands.launch(FIXTURES / "compile_blocks_train.py", [str(STEPS), str(ours), "0.1"], nproc=1,
                          name="compiled-blocks")
    try:
        wait_for_step(job, 3)
        assert commands.set_policies(job.id, [f"{CHECKPOINTING}=full"]).data["state"] == "applied"
        assert job.wait(120) == 0, (job.run_dir.path / "output.log").read_text()[-3000:]
        [applied] = [e for e in job.run_dir.events() if e["kind"] == "apply" and e["key"] == CHECKPOINTING]
        metrics = {m["step"]: m for m in job.run_dir.metrics()}
    finally:
        if job.poll() is None:
            job.stop()
    assert reference.wait(120) == 0
    assert applied["reason"] == "4 of 4 blocks checkpointed" and applied["step"] < STEPS - 4
    got, want = json.loads(ours.read_text()), json.loads(plain.read_text())
    assert got["losses"] == want["losses"]
    # Dynamo built its graphs in the first step and none after, across the switch
    assert got["graphs"][0] > 0 and set(got["graphs"]) == {got["graphs"][0]}, got["graphs"]
    before = [metrics[s]["peak_activation_bytes"] for s in range(2, applied["step"])]
    after = [metrics[s]["peak_activation_bytes"] for s in range(applied["step"] + 1, STEPS)]
    assert min(before) > 0 and max(after) < min(before) / 3, (before, after)


TITAN = Path(__file__).parent / "real_jobs" / "titan_cpu.py"


def titan_losses(text: str) -> dict[int, float]:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)  # torchtitan colours its log lines
    return {int(step): float(loss) for step, loss in re.findall(r"step:\s+(\d+)\s+loss:\s+([\d.]+)", plain)}


@pytest.mark.frameworks
@pytest.mark.slow
def test_torchtitan_compile_enable_checkpoints_its_compiled_blocks_live_with_plain_losses(tmp_path, monkeypatch):
    """torchtitan 0.2.2's debug model, FSDP2 on 2 CPU ranks, ``--compile.enable`` (each TransformerBlock through
    torch.compile, then fully_shard): checkpointing switched on live gives plain torchrun's losses, no recompile."""
    pytest.importorskip("torchtitan", reason="the frameworks extra is not installed")
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    steps = 10
    args = ["--parallelism.data_parallel_shard_degree=2", f"--training.steps={steps}", "--compile.enable",
            "--compile.backend=aot_eager"]
    reference = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                  str(TITAN), *args, f"--job.dump_folder={tmp_path / 'plain'}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # meanwhile
    job = commands.launch(TITAN, [*args, f"--job.dump_folder={tmp_path / 'ours'}"], nproc=2, name="titan-compiled",
                          env={"TORCH_LOGS": "recompiles"})
    try:
        wait_for_step(job, 3, timeout=240)
        report = commands.set_policies(job.id, [f"{CHECKPOINTING}=full"], timeout=120)
        assert job.wait(240) == 0
    finally:
        if job.poll() is None:
            job.stop()
    output = (job.run_dir.path / "output.log").read_text()
    plain = reference.communicate(timeout=240)[0]
    assert report.data["state"] == "applied" and 1 < report.data["step"] < steps
    applies = [e for e in job.run_dir.events() if e["kind"] == "apply"]
    assert [e["reason"] for e in applies] == ["4 of 4 blocks checkpointed"] * 2
    assert not [e for e in job.run_dir.events() if e["kind"] == "error"]
    assert "Recompiling" not in output
    assert titan_losses(output) == titan_losses(plain) and len(titan_losses(plain)) == steps
    peak = {m["step"]: m["peak_activation_bytes"] for m in job.run_dir.metrics() if m["rank"] == 0}
    step = report.data["step"]
    assert max(peak[s] for s in range(step, steps + 1)) < min(peak[s] for s in range(1, step)) / 3, peak
