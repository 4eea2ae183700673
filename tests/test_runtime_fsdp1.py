"""Memory policies on FSDP1 (``FullyShardedDataParallel``) models: 2 gloo ranks on CPU.

Checkpointing goes inside each FSDP1 unit (on the module it wraps, never on the unit, whose forward gathers the
weights), or on the plain blocks inside one unit around the whole model. Two live jobs under ``dspark-lab run``
(tests/runtime_fixtures/fsdp1_train.py, unmodified) switch it on and off again and print the losses of plain
torchrun to the bit; one gloo world checks every wrap style x ``use_orig_params`` x sharding strategy in process.
"""

from __future__ import annotations

import functools
import re
import sys
import threading
from pathlib import Path

import pytest

from conftest import load_file, plain_torchrun, wait_for_step
from gloo_world import assert_passed_everywhere, checks_in, world_results_for
from dspark_lab.runtime import commands, jobtext
from dspark_lab.runtime.launch import launch_background

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "runtime_fixtures" / "fsdp1_train.py"
STEPS = 12
PARAMS = 10752  # sharded_train.Transformer(): what status counts, not the padded shards FSDP1 holds per rank
LOSS = re.compile(r"^step (\d+) loss (\S+) rank (\d+)$", re.M)


@pytest.fixture(autouse=True)
def dspark_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))


@functools.cache
def fixture():
    """tests/runtime_fixtures/fsdp1_train.py as a module (sharded_train's Transformer), in a gloo world's worker."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))  # what running the script puts there: it imports sharded_train
    return load_file("fsdp1_train", SCRIPT)


def losses(text: str) -> dict[tuple[int, int], str]:
    """``{(rank, step): repr of the loss}`` printed by the fixture (every rank, every step)."""
    return {(int(rank), int(step)): loss for step, loss, rank in LOSS.findall(re.sub(r"\x1b\[[0-9;]*m", "", text))}


def live_run(args: list[str], first: list[str], then: list[str]):
    """Plain torchrun (in a thread, while the live job runs) and ``dspark-lab run`` of the fixture; the live job
    takes ``first`` once step 2 is done and ``then`` two steps after ``first`` applied. Returns both reports, the
    status ``job`` read while ``first`` was in force, the run dir, the live and the plain losses."""
    args = [*args, "--steps", str(STEPS), "--step-sleep", "0.25"]
    plain: dict = {}
    reference = threading.Thread(target=lambda: plain.update(done=plain_torchrun([SCRIPT, *args], nproc=2)))
    job = launch_background(str(SCRIPT), args, nproc=2, name="fsdp1")
    reference.start()
    try:
        wait_for_step(job, 2, timeout=120)
        on = commands.set_policies(job.id, first, timeout=60)
        wait_for_step(job, on.data["step"] + 1)
        status = commands.status(job.id).data["run"]["live"]["job"]
        wait_for_step(job, on.data["step"] + 2)
        off = commands.set_policies(job.id, then, timeout=60)
        code = job.wait(120)
    finally:
        if job.poll() is None:
            job.process.kill()
            job.process.wait()
        reference.join()
    output = (job.run_dir.path / "output.log").read_text()
    assert code == 0, output[-3000:]
    return on, off, status, job.run_dir, losses(output), losses(plain["done"].stdout)


def peaks(run_dir) -> dict[int, int]:
    return {m["step"]: m["peak_activation_bytes"] for m in run_dir.metrics() if m["rank"] == 0}


def applied_on_both_ranks(run_dir, report) -> list[str]:
    assert report.data["state"] == "applied", report.data
    applies = [e for e in run_dir.events() if e["kind"] == "apply" and e.get("change_id") == report.data["change_id"]]
    assert sorted(e["rank"] for e in applies) == sorted([0, 1] * len(report.data["changes"])), applies
    assert {e["step"] for e in applies} == {report.data["step"]}
    return [e["reason"] for e in applies]


def test_checkpointing_goes_live_inside_fsdp1_units_and_off_again_with_torchruns_losses():
    """One FSDP1 unit per block (``auto_wrap_policy``), FULL_SHARD, ``use_orig_params=False``: the default that
    Lightning's and Accelerate's FSDP1 strategies build. Refused before ("FSDP1 ... whose wrapper owns forward")."""
    on, off, status, run_dir, live, plain = live_run(["--wrap", "blocks"], ["memory.activation_checkpointing=full"],
                                                     ["memory.activation_checkpointing=none"])
    assert applied_on_both_ranks(run_dir, on) == ["4 of 4 blocks checkpointed"] * 2
    assert applied_on_both_ranks(run_dir, off) == ["0 of 4 blocks checkpointed"] * 2
    assert len(plain) == 2 * STEPS and live == plain  # recompute inside the unit saw the gathered weights
    assert not [e for e in run_dir.events() if e["kind"] in ("error", "refuse", "rollback")]
    peak = peaks(run_dir)
    before = [peak[s] for s in range(2, on.data["step"])]
    during = [peak[s] for s in range(on.data["step"], off.data["step"])]
    after = [peak[s] for s in range(off.data["step"], STEPS + 1)]
    assert before and during and after and max(during) < 0.5 * min(before), (before, during, after)
    assert min(after) == max(before)  # off again: the blocks keep their activations as before
    assert status["data_parallel"] == {"kind": "fsdp1", "units": 5, "world": 2, "sharding_strategy": "FULL_SHARD",
                                       "use_orig_params": False,
                                       "mixed_precision": {"param_dtype": None, "reduce_dtype": None}}
    assert status["blocks"]["path"] == "model.layers" and status["blocks"]["type"] == "TransformerBlock"
    assert status["model"]["class"] == "sharded_train.Transformer" and status["model"]["params"] == PARAMS
    assert status["parallelism"]["dp"] == 2 and status["parallelism"]["zero"] == 3
    assert status["policies"]["memory.activation_checkpointing"] == {"applies": True, "reason": None}
    rows = dict(jobtext.rows(status))
    assert rows["data parallel"] == ("FSDP1 (FullyShardedDataParallel, 5 units), world 2, FULL_SHARD, "
                                     "use_orig_params=False")
    assert rows["blocks"] == "4 x TransformerBlock at model.layers"


def test_every_2nd_block_and_offload_go_live_inside_one_root_fsdp1_unit_with_torchruns_losses():
    """One FSDP1 unit around the whole model (the blocks are plain modules inside its flat parameter),
    SHARD_GRAD_OP, ``use_orig_params=True``; checkpointing every 2nd block with activation offload at one step."""
    on, off, status, run_dir, live, plain = live_run(
        ["--wrap", "root", "--sharding", "SHARD_GRAD_OP", "--orig-params"],
        ["memory.activation_checkpointing=every-2", "memory.activation_offload=host"],
        ["memory.activation_checkpointing=none", "memory.activation_offload=off"])
    reasons = applied_on_both_ranks(run_dir, on)
    assert reasons.count("2 of 4 blocks checkpointed") == 2, reasons
    applied_on_both_ranks(run_dir, off)
    assert len(plain) == 2 * STEPS and live == plain
    assert not [e for e in run_dir.events() if e["kind"] in ("error", "refuse", "rollback")]
    peak = peaks(run_dir)
    before = [peak[s] for s in range(2, on.data["step"])]
    during = [peak[s] for s in range(on.data["step"], off.data["step"])]
    assert before and during and max(during) < 0.8 * min(before), (before, during)
    assert status["data_parallel"]["units"] == 1 and status["data_parallel"]["use_orig_params"] is True
    assert status["data_parallel"]["sharding_strategy"] == "SHARD_GRAD_OP" and status["parallelism"]["zero"] == 2
    assert status["blocks"]["path"] == "model.layers" and status["blocks"]["count"] == 4


# --- every wrap style x use_orig_params x sharding strategy, in one gloo world ---------------------------------------

WRAPS = [(wrap, orig, sharding) for wrap in ("blocks", "root") for orig in (False, True)
         for sharding in ("FULL_SHARD", "SHARD_GRAD_OP")] + [("nested", False, "FULL_SHARD")]


def _build(wrap, orig, sharding):
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    script = fixture()
    units = {"blocks": {script.TransformerBlock}, "nested": {script.TransformerBlock, torch.nn.Linear}}.get(wrap)
    per_block = ModuleWrapPolicy(units) if units else None  # nested: units around the Linears inside block units
    model = FullyShardedDataParallel(script.Transformer(), auto_wrap_policy=per_block, use_orig_params=orig,
                                     sharding_strategy=ShardingStrategy[sharding], device_id=torch.device("cpu"))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _train(model, optimizer, rank, at=None, activations=None):
    """8 steps; ``at[step]()`` runs before that step. Returns the losses and each step's peak saved bytes."""
    import torch

    out, peak = [], []
    for step in range(1, 9):
        (at or {}).get(step, lambda: None)()
        tokens = torch.randint(0, fixture().VOCAB, (8, 64), generator=torch.Generator().manual_seed(1000 * step + rank))
        loss = model(tokens).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(loss.item())
        peak.append(activations.reset_peak() if activations else 0)
    return out, peak


def _tracked(model):
    from dspark_lab.runtime.attach import param_storages
    from dspark_lab.runtime.policies.memory import SavedActivations

    storages = param_storages(model)
    activations = SavedActivations(lambda: storages)
    activations.install()
    return activations


def check_checkpointing_every_wrap_style_and_strategy(rank, world):
    """full, every-2 and none in turn: the torchrun losses to the bit, and each setting's own activation peak."""
    from dspark_lab.runtime import discover
    from dspark_lab.runtime.policies.memory import set_checkpointing

    for wrap, orig, sharding in WRAPS:
        reference, _ = _train(*_build(wrap, orig, sharding), rank)
        model, optimizer = _build(wrap, orig, sharding)
        blocks = discover.find_blocks(model)
        assert (blocks.kind, blocks.path, len(blocks.modules)) == ("TransformerBlock", "model.layers", 4), blocks
        assert all(type(b).__name__ == "TransformerBlock" for b in blocks.modules)  # inside the units, never one
        assert discover.param_count(model) == PARAMS
        activations = _tracked(model)
        switch = functools.partial(set_checkpointing, blocks.modules, tracker=activations)
        try:
            live, peak = _train(model, optimizer, rank, {3: lambda: switch("full"), 5: lambda: switch("every-2"),
                                                         7: lambda: switch("none")}, activations)
        finally:
            activations.uninstall()
        where = (wrap, orig, sharding)
        assert live == reference, where
        assert peak[2] == peak[3] < peak[4] == peak[5] < peak[0] == peak[1] == peak[6] == peak[7], (where, peak)


def check_offload_and_the_scripts_own_checkpoint_wrapper_inside_units(rank, world):
    """Offload on FSDP1 keeps the losses; torch's recipe (``apply_activation_checkpointing`` after wrapping) is
    read as ``full`` in force and switched off and on through the script's own wrappers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)
    from dspark_lab.runtime import discover
    from dspark_lab.runtime.policies.memory import checkpointing_in_force, set_checkpointing

    reference, _ = _train(*_build("blocks", False, "FULL_SHARD"), rank)
    model, optimizer = _build("blocks", False, "FULL_SHARD")
    activations = _tracked(model)
    try:
        live, _ = _train(model, optimizer, rank, {3: lambda: setattr(activations, "mode", "host")}, activations)
    finally:
        activations.uninstall()
    assert live == reference
    model, optimizer = _build("blocks", False, "FULL_SHARD")
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper,
                                   check_fn=lambda m: isinstance(m, fixture().TransformerBlock))
    blocks = discover.find_blocks(model).modules
    assert checkpointing_in_force(blocks) == "full"
    activations = _tracked(model)
    try:
        live, peak = _train(model, optimizer, rank, {3: lambda: set_checkpointing(blocks, "none", activations),
                                                     5: lambda: set_checkpointing(blocks, "full", activations)},
                            activations)
    finally:
        activations.uninstall()
    assert live == reference
    assert peak[0] == peak[1] == peak[4] < peak[2] == peak[3], peak
    assert set_checkpointing(blocks, "full", activations) == ([0, 1, 2, 3], 4)  # by the script's own wrappers


CHECKS = checks_in(globals())
world_results = world_results_for(__name__, timeout_s=60)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_in_world(world_results, check):
    assert_passed_everywhere(world_results(2), check)
