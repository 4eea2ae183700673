"""In-process tests of the runtime's pieces: records, memory policies, refusals, validation, discovery."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.nn as nn

from dspark_lab.errors import DSparkError, PolicyError, RunNotFound
from dspark_lab.plugins import make_manager
from dspark_lab.runtime import discover
from dspark_lab.runtime.attach import Job
from dspark_lab.runtime.policies import builtin as builtin_policies
from dspark_lab.runtime.policies.memory import SavedActivations, blocks_to_checkpoint, set_checkpointing
from dspark_lab.runtime.records import JsonlWriter, RunDir, find_run, read_jsonl


def make_model(layers=4, width=32):
    """An MLP whose repeated blocks (Linear, GELU, Linear) keep 4x-wide activations inside, as transformers do."""
    block = lambda: nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
    return nn.Sequential(nn.Linear(8, width), nn.Sequential(*[block() for _ in range(layers)]), nn.Linear(width, 1))


def new_cpu_job(root) -> Job:
    from dspark_lab.backends import cpu

    manager = make_manager([cpu, builtin_policies], entry_points=False)
    run_dir = RunDir.create("20260101-000000-abcdef", {"name": "unit"}, root=root)
    return Job(run_dir, rank=0, world=1, manager=manager)


@pytest.fixture
def cpu_job(tmp_path):
    job = new_cpu_job(tmp_path)
    job.set_model(make_model())
    yield job
    job.close()


# --- records ---------------------------------------------------------------------------------------------------


def test_jsonl_reader_skips_a_torn_last_line_and_reads_it_once_whole(tmp_path):
    path = tmp_path / "m.jsonl"
    writer = JsonlWriter(path)
    writer.write({"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')
    records, offset = read_jsonl(path)
    assert [r["step"] for r in records] == [1] and records[0]["schema_version"] == 1
    with open(path, "a") as f:
        f.write('ss": 0.5}\n')
    more, _ = read_jsonl(path, offset)
    assert more == [{"step": 2, "loss": 0.5}]


def test_a_jobs_metrics_rotate_at_the_bound_its_environment_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_METRICS_MAX_MB", "1")
    job = new_cpu_job(tmp_path)
    for step in range(1, 151):
        job.write_metrics_record({"step": step, "rank": 0, "pad": "p" * 10_000})
    assert (job.run_dir.path / "metrics.1.jsonl").stat().st_size >= 1 << 20
    assert [m["step"] for m in job.run_dir.metrics()] == list(range(1, 151))
    monkeypatch.setenv("DSPARK_METRICS_MAX_MB", "huge")
    with pytest.raises(DSparkError, match="^DSPARK_METRICS_MAX_MB: 'huge' is not allowed"):
        new_cpu_job(tmp_path / "other")


def test_run_lookup_by_id_name_and_prefix(tmp_path):
    a = RunDir.create("20260101-000000-aaaaaa", {"name": "alpha"}, root=tmp_path)
    RunDir.create("20260101-000001-bbbbbb", {"name": "beta"}, root=tmp_path)
    assert find_run("alpha", tmp_path).id == a.id
    assert find_run("20260101-000000", tmp_path).id == a.id
    with pytest.raises(RunNotFound, match="matches 2 runs"):
        find_run("2026", tmp_path)
    with pytest.raises(RunNotFound, match="no run matches"):
        find_run("gamma", tmp_path)
    multi = RunDir.create("rdzv-job-42", {"name": "train"}, root=tmp_path)  # a multi-node run, by its --rdzv-id
    assert find_run("job-42", tmp_path).id == multi.id == find_run("rdzv-job-42", tmp_path).id
    assert oct(os.stat(a.token_path).st_mode & 0o777) == "0o600"
    assert json.loads(a.run_json.read_text())["state"] == "starting"


# --- discovery ---------------------------------------------------------------------------------------------------


def test_discovers_model_of_optimizer_and_its_repeated_blocks():
    model = make_model(layers=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert discover.model_of_optimizer(optimizer) is model
    blocks = discover.repeated_blocks(model)
    assert len(blocks) == 5 and all(b is model[1][i] for i, b in enumerate(blocks))


def test_blocks_to_checkpoint():
    assert blocks_to_checkpoint("none", 8) == []
    assert blocks_to_checkpoint("full", 3) == [0, 1, 2]
    assert blocks_to_checkpoint("every-2", 5) == [0, 2, 4]
    assert blocks_to_checkpoint("every-4", 9) == [0, 4, 8]


# --- memory policies --------------------------------------------------------------------------------------------


def train_steps(model, steps=3, tracker=None, policy="none", offload="off"):
    torch.manual_seed(0)
    blocks = discover.repeated_blocks(model)
    if tracker is not None:
        tracker.mode = offload
    set_checkpointing(blocks, policy, tracker)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses, peaks = [], []
    for _ in range(steps):
        loss = model(torch.randn(64, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if tracker is not None:
            peaks.append(tracker.reset_peak())
    set_checkpointing(blocks, "none", tracker)
    return losses, peaks


@pytest.mark.parametrize("policy", ["full", "every-2", "every-4"])
def test_checkpointing_is_lossless_and_keeps_state_dict_keys(policy):
    torch.manual_seed(1)
    reference = make_model()
    model = make_model()
    model.load_state_dict(reference.state_dict())
    keys = list(model.state_dict())
    set_checkpointing(discover.repeated_blocks(model), policy)
    assert list(model.state_dict()) == keys
    set_checkpointing(discover.repeated_blocks(model), "none")
    assert train_steps(model, policy=policy)[0] == train_steps(reference)[0]
    assert all("forward" not in b.__dict__ for b in discover.repeated_blocks(model))  # fully unwrapped


def test_saved_activation_count_drops_with_checkpointing_and_fp8_offload():
    model = make_model(layers=6, width=256)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tracker = SavedActivations(lambda: params)
    tracker.install()
    try:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        base_losses, base = train_steps(model, tracker=tracker)
        model.load_state_dict(state)
        _, full = train_steps(model, tracker=tracker, policy="full")
        model.load_state_dict(state)
        host_losses, host = train_steps(model, tracker=tracker, offload="host")
        model.load_state_dict(state)
        fp8_losses, fp8 = train_steps(model, tracker=tracker, offload="host-fp8")
    finally:
        tracker.uninstall()
    assert min(base) > 0 and max(full) < 0.25 * min(base)  # only each block's input is kept
    assert host_losses == base_losses  # a host copy is exact
    assert max(fp8) < 0.4 * min(base)  # 1 byte per element plus a scale per 128, against 4 bytes
    assert fp8_losses != base_losses and abs(fp8_losses[-1] - base_losses[-1]) < 0.05 * abs(base_losses[-1])
    assert tracker.held == 0  # everything saved was released after backward


def test_shared_storage_is_counted_once():
    tracker = SavedActivations()
    x = torch.randn(1000, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        y = x.exp()  # saves its result
        z = y * y  # saves y twice
        w = (z + 1).sin()
    assert tracker.held == 2 * 4000  # y (saved by exp and twice by the product, counted once) and z + 1
    w.sum().backward()
    assert tracker.held == 0


# --- refusals and validation ------------------------------------------------------------------------------------


def test_validation_refuses_in_one_line_with_allowed_values(cpu_job):
    with pytest.raises(PolicyError, match=r"^memory.activation_offload: 'disk' is not allowed; allowed: "
                                          r"off \| host \| host-fp8$"):
        cpu_job.validate({"memory.activation_offload": "disk"})
    with pytest.raises(PolicyError, match="launch-only"):
        cpu_job.validate({"comm.bucket_mb": "50"})
    with pytest.raises(PolicyError, match="unknown policy"):
        cpu_job.validate({"memory.nope": "1"})
    assert cpu_job.validate({"comm.bucket_mb": "50"}, live_only=False) == {"comm.bucket_mb": 50.0}
    with pytest.raises(PolicyError):
        cpu_job.request({"memory.activation_offload": "disk"})
    [refused] = [e for e in cpu_job.run_dir.events() if e["kind"] == "refuse"]
    assert (refused["key"], refused["new"]) == ("memory.activation_offload", "disk")  # the events table's columns


@pytest.mark.parametrize("flag, key, value, reason", [
    ("compiled", "memory.activation_checkpointing", "full", "torch.compile"),
    ("fsdp", "memory.reshard_after_forward", "false", "FSDP2"),
    ("fsdp", "comm.grad_sync", "ring", "FSDP"),
    (None, "comm.grad_sync", "ring", "no DistributedDataParallel"),
])
def test_policies_that_cannot_work_are_refused_with_the_reason(cpu_job, flag, key, value, reason):
    if flag:
        setattr(cpu_job, flag, True)
    with pytest.raises(PolicyError, match=reason):
        cpu_job.validate({key: value})
    failure, applied = cpu_job.apply_changes({key: value})  # and never half-applied if it got that far
    assert reason in failure and applied == []


def test_a_failing_key_leaves_the_earlier_keys_for_rollback(cpu_job):
    failure, applied = cpu_job.apply_changes({"memory.activation_checkpointing": "full",
                                              "comm.grad_sync": "ring"})
    assert "comm.grad_sync" in failure and [a[0] for a in applied] == ["memory.activation_checkpointing"]
    cpu_job.rollback_changes(applied, {"step": 3, "changes": {"memory.activation_checkpointing": "full",
                                                              "comm.grad_sync": "ring"}, "change_id": "c1"},
                             failure)
    assert all("forward" not in b.__dict__ for b in cpu_job.blocks)
    kinds = [(e["kind"], e["key"]) for e in cpu_job.run_dir.events()]
    assert kinds == [("rollback", "memory.activation_checkpointing"), ("rollback", "comm.grad_sync")]


def test_fp8_offload_keeps_infinities_exact_without_a_host_check():
    tracker = SavedActivations()
    tracker.mode = "host-fp8"
    masked = torch.randn(64, 256)
    masked[:, 128:] = float("-inf")  # attention scores under a causal mask
    masked[0, 200] = float("inf")
    back = tracker.unpack(tracker.pack(masked))
    finite = torch.isfinite(masked)
    assert torch.equal(back[~finite], masked[~finite])  # every infinity comes back exactly, sign included
    assert not torch.equal(back[finite], masked[finite])  # the finite values really were stored as FP8
    assert (back[finite] - masked[finite]).abs().max() <= 0.07 * masked[finite].abs().max()


def test_a_runtime_failure_inside_the_step_is_logged_once_and_never_raised(cpu_job, monkeypatch):
    from dspark_lab.runtime import patches
    from dspark_lab.runtime.coordinator import StopRun

    def broken(optimizer):
        raise RuntimeError("bookkeeping bug")

    monkeypatch.setattr(Job, "current", cpu_job)
    monkeypatch.setattr(cpu_job, "on_step_end", broken)
    patches._guarded(cpu_job, "on_step_end", None)
    patches._guarded(cpu_job, "on_step_end", None)
    errors = [e for e in cpu_job.run_dir.events() if e["kind"] == "error"]
    assert len(errors) == 1 and "bookkeeping bug" in errors[0]["reason"] and "the job goes on" in errors[0]["reason"]

    def stop(optimizer):
        raise StopRun()

    monkeypatch.setattr(cpu_job, "on_step_end", stop)
    with pytest.raises(StopRun):  # a requested stop is the one thing that leaves the hook
        patches._guarded(cpu_job, "on_step_end", None)


def test_metrics_follow_prints_every_record_and_ends_with_the_run(tmp_path, monkeypatch, capsys):
    from dspark_lab.cli import main as cli_main

    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    run_dir = RunDir.create("20260101-000000-f0110e", {"name": "followed", "state": "finished"},
                            root=tmp_path / "runs")
    run_dir.update_info(state="finished")
    writer = JsonlWriter(run_dir.metrics_path)
    for step in (1, 2, 3):
        writer.write({"step": step, "rank": 0, "step_time_s": 0.1 * step, "loss": 1.0 / step})
    assert cli_main(["metrics", "followed", "--follow", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_compressed_grad_sync_survives_ddps_bucket_rebuild(mode):
    """Error-feedback residuals follow DDP's bucket layout: the rebuild after step 1 starts fresh residuals."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(root / "tests" / "runtime_fixtures" / "ddp_rebuild.py"), mode,
                           str(port)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [line for line in done.stdout.splitlines() if line.startswith("step")]
    # one bucket of 19272 elements at step 0, rebuilt into 16968 + 2304: the stale residual is gone
    assert steps == ["step 0 [19272]"] + [f"step {i} [2304, 16968]" for i in (1, 2, 3)]


def test_host_offload_moves_every_large_saved_tensor_into_the_host_pool():
    """Equal losses alone would pass with offload as a no-op: check the bytes the host pool holds during the forward
    pass against what the same step saves with offload off, that backward gives them all back, and that later steps
    reuse the pooled buffers instead of allocating."""
    from dspark_lab.allocator import HostPool
    from dspark_lab.runtime.policies.memory import MIN_OFFLOAD_BYTES

    torch.manual_seed(2)
    model = make_model(layers=3, width=256)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    pool = HostPool()
    tracker = SavedActivations(lambda: params, allocator_factory=lambda: pool)
    x = torch.randn(64, 8)
    storages = {}  # what autograd saves in one step, by storage, parameters left out (torch's own hooks)

    def note(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
        model(x).pow(2).mean().backward()
    large = sum(n for n in storages.values() if n >= MIN_OFFLOAD_BYTES)
    assert large > 1 << 20 and large < sum(storages.values())  # some small ones (the input, the output) stay
    tracker.install()
    try:
        loss = model(x).pow(2).mean()
        saved_off = tracker.held  # offload off: bytes kept for backward
        assert saved_off == sum(storages.values()) and pool.stats()["bytes_in_use"] == 0
        loss.backward()
        tracker.mode = "host"
        allocations = []
        for _ in range(3):
            loss = model(x).pow(2).mean()
            moved = pool.stats()["bytes_in_use"]
            assert moved == large  # every large saved tensor was copied into the pool, once
            assert tracker.held == saved_off  # the count is of the copies and the small tensors kept
            loss.backward()
            stats = pool.stats()
            assert stats["bytes_in_use"] == 0 and stats["bytes_pooled"] == moved
            allocations.append(stats["allocations"])
    finally:
        tracker.uninstall()
    assert allocations[0] > 0 and allocations[-1] == allocations[0]


def test_plain_status_shows_the_live_job(cpu_job, monkeypatch, tmp_path):
    """`dspark-lab status RUN` as text: the block path, the parallelism and the policies that cannot apply, why."""
    from dspark_lab.runtime import commands

    class Client:  # rank 0's endpoint, answering with this job's own description
        def __init__(self, run_dir, timeout=10.0):
            pass

        def request(self, method, path, body=None):
            return {"step": 3, "job": cpu_job.describe()}

    monkeypatch.setenv("DSPARK_HOME", str(tmp_path.parent))
    monkeypatch.setattr(commands, "ControlClient", Client)
    monkeypatch.setattr(commands, "find_run", lambda ref: cpu_job.run_dir)
    cpu_job.run_dir.update_info(state="running")
    report = commands.status(cpu_job.run_dir.id)
    rows, text = {r["field"]: r["value"] for r in report.rows}, report.to_text()
    assert rows["blocks"] == "4 x Sequential at model.1" and "4 x Sequential at model.1" in text
    assert rows["data parallel"] == rows["pipeline"] == rows["tensor parallel"] == "none"
    reasons = {k: v["reason"] for k, v in cpu_job.describe()["policies"].items() if v["applies"] is False}
    assert "comm.grad_sync" in reasons and "memory.activation_checkpointing" not in reasons
    assert {k.removeprefix("cannot apply: "): v for k, v in rows.items() if k.startswith("cannot")} == reasons
    assert all(f"cannot apply: {k}" in text for k in reasons)


# --- what the runtime leaves on a script's modules -----------------------------------------------------------------


class NormBlock(nn.Module):
    """A residual block holding BatchNorm, whose running statistics a training forward updates."""

    def __init__(self):
        super().__init__()
        self.linear, self.norm = nn.Linear(16, 16), nn.BatchNorm1d(16)

    def forward(self, x):
        return x + torch.relu(self.norm(self.linear(x)))


def bn_model():
    return nn.Sequential(nn.Linear(8, 16), *[NormBlock() for _ in range(3)], nn.Linear(16, 1))


def test_checkpointing_leaves_batchnorm_running_statistics_as_they_are_without_it():
    # The checkpoint runs each block's forward again in backward; a second training-mode BatchNorm forward would
    # move running_mean / running_var again and count num_batches_tracked twice.
    torch.manual_seed(2)
    reference = bn_model()
    model = bn_model()
    model.load_state_dict(reference.state_dict())
    assert train_steps(model, policy="full")[0] == train_steps(reference)[0]
    for (key, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), key


def test_a_copy_or_a_pickle_of_the_model_carries_none_of_the_runtime(tmp_path):
    import copy
    import io

    from dspark_lab.runtime.module_hooks import InstanceForward

    cpu_job = new_cpu_job(tmp_path)
    model = bn_model()
    cpu_job.set_model(model)
    builtin_policies.dspark_apply_policy(cpu_job, "memory.activation_checkpointing", "full", "none")
    assert all(isinstance(b.__dict__.get("forward"), InstanceForward) for b in cpu_job.blocks)
    x = torch.randn(4, 8)
    model(x)
    counted = cpu_job.meter._samples
    assert counted == 4
    twin = copy.deepcopy(model)  # an EMA model, a "best so far" snapshot
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    model.eval()
    expected = model(x)
    for other in (twin, loaded):
        assert all("forward" not in b.__dict__ or not isinstance(b.forward, InstanceForward) for b in other[1:4])
        other.eval()
        assert torch.equal(other(x), expected)
        other.train()
        other(x).sum().backward()  # a plain backward: no checkpoint, no count
    assert cpu_job.meter._samples == counted + 4  # only the original's eval forward above counted
    cpu_job.close()


def test_the_step_boundary_follows_a_new_optimizer_but_not_one_taking_turns(tmp_path):
    import gc

    job = new_cpu_job(tmp_path)
    model = make_model()
    job.set_model(model)

    def step(optimizer, times=1):
        for _ in range(times):
            job.on_step_begin(optimizer)
            job.on_step_end(optimizer)

    head = torch.optim.SGD(model[-1].parameters(), lr=0.1)
    step(head, 3)
    assert job.step == 3 and job.optimizer is head
    rival = torch.optim.SGD(model.parameters(), lr=0.1)
    step(head)
    step(rival)  # taking turns (a GAN's two optimizers): the first one keeps the boundary
    step(head)
    step(rival)
    assert job.step == 5 and job.optimizer is head
    full = torch.optim.AdamW(model.parameters())  # the next phase of a fine-tune: its own optimizer, head still held
    step(full, 4)
    assert job.optimizer is full and job.step == 8  # followed from its second step on
    del head, rival
    gc.collect()
    last = torch.optim.SGD(model.parameters(), lr=0.1)
    del full
    gc.collect()  # the script dropped the optimizer: the next one to step ends the step at once
    step(last)
    assert job.optimizer is last and job.step == 9
    reasons = [e["reason"] for e in job.run_dir.events() if e["kind"] == "boundary"]
    assert len(reasons) == 2 and "AdamW" in reasons[0] and "stepped 2 times" in reasons[0]
    assert "dropped" in reasons[1]
    job.close()


def test_an_attached_optimizer_keeps_the_step_boundary(tmp_path, monkeypatch):
    from dspark_lab.runtime import attach as attach_module

    job = new_cpu_job(tmp_path)
    monkeypatch.setattr(Job, "current", job)
    model = make_model()
    main = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_module.attach(model, main)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    for optimizer in (main, other, other, other):
        job.on_step_end(optimizer)
    assert job.optimizer is main and job.step == 1
    job.close()


def test_a_script_that_spawns_its_own_workers_is_told_why_policies_cannot_reach_them(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    from dspark_lab.runtime import patches
    from dspark_lab.runtime.control import ControlServer, RequestError

    job = new_cpu_job(tmp_path)
    monkeypatch.setattr(Job, "current", job)
    patches.install_patches(lambda: Job.current)
    mp.spawn(_spawned_worker, args=(str(tmp_path),), nprocs=1)  # the classic mp.spawn DDP script's launch
    assert (tmp_path / "worker-0").exists()
    errors = [e["reason"] for e in job.run_dir.events() if e["kind"] == "error"]
    assert len(errors) == 1 and "1 worker process(es) of its own" in errors[0]
    job.server = ControlServer(job)
    started = time.monotonic()
    with pytest.raises(RequestError, match="trains in 1 worker process"):
        job.server._wait_for_first_step(30.0)
    assert time.monotonic() - started < 5  # refused at once, not after the wait for a first step
    job.close()


def _spawned_worker(index: int, root: str) -> None:
    open(os.path.join(root, f"worker-{index}"), "w").close()


def test_a_disk_that_takes_no_record_costs_records_never_the_step_boundary(tmp_path, monkeypatch, capsys):
    job = new_cpu_job(tmp_path)
    job.set_model(make_model())
    optimizer = torch.optim.SGD(job.model.parameters(), lr=0.1)

    def full(record):
        raise OSError(28, "No space left on device")

    boundaries = []
    monkeypatch.setattr(job._metrics, "write", full)
    monkeypatch.setattr(job._events, "write", full)
    monkeypatch.setattr(job.coordinator, "at_boundary", boundaries.append)
    for _ in range(3):
        job.on_step_end(optimizer)
        job.record_event("error", step=job.step, rank=0, reason="anything")
    job.meter.flush()
    assert boundaries == [1, 2, 3] and job.records_lost >= 6  # changes and stops still apply at every boundary
    assert capsys.readouterr().err.count("could not be written") == 1
    job.close()


def test_a_change_back_to_the_default_survives_a_restart_over_the_launch_value(tmp_path):
    from types import SimpleNamespace

    from dspark_lab.runtime import restarts
    from dspark_lab.runtime.coordinator import Sealer

    class Store(dict):
        def set(self, key, value):
            self[key] = value.encode() if isinstance(value, str) else value

        def check(self, keys):
            return all(k in self for k in keys)

        def get(self, key):
            return self[key]

    store, sealer = Store(), Sealer("token", "run")
    job = new_cpu_job(tmp_path)
    launched = SimpleNamespace(policies={**job.policies, "memory.activation_checkpointing": "none"},
                               specs=job.specs, step=7, launch_policies={"memory.activation_checkpointing": "full"})
    restarts.Saver(store, sealer, launched, 0)()  # `set ... =none` (the default) was committed after `--policy full`
    version, saved = restarts.load(store, sealer)
    assert version == 1 and saved == {"memory.activation_checkpointing": "none"}
    assert {**launched.launch_policies, **saved}["memory.activation_checkpointing"] == "none"  # what the group gets
    job.close()


def test_an_effect_compares_three_steps_before_a_change_or_is_not_reported():
    # a launch value of memory.reshard_after_forward applies at step 2: its effect compared step 1 alone (the
    # first step, start-up included) with steps 2-4 and said "step_time_s -97.0%" as "median of 3 steps before"
    import time as clock
    from types import SimpleNamespace

    from dspark_lab.runtime.metering import StepMeter

    def meter_with(steps_before: int) -> list:
        events = []
        job = SimpleNamespace(rank=0, write_metrics_record=lambda record: None,
                              activations=SimpleNamespace(reset_peak=lambda: 0),
                              backend=SimpleNamespace(torch_device="cpu"),
                              manager=SimpleNamespace(device_sampler=lambda backend: None),
                              record_event=lambda kind, **fields: events.append((kind, fields["step"])))
        meter = StepMeter(job)
        for step in range(1, steps_before + 1):
            meter.record(clock.perf_counter(), step, None)
        meter.watch_effect("memory.reshard_after_forward", True, False, steps_before + 1)
        for step in range(steps_before + 1, steps_before + 4):
            meter.record(clock.perf_counter(), step, None)
        return events

    assert meter_with(1) == [] and meter_with(2) == []
    assert meter_with(3) == [("effect", 6)]
