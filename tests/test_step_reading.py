"""The step boundary reads the loss one step late (each record still carries its own step's loss, the last one is
written at the job's end) and memory counters only every few steps or when asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dspark_lab.errors import DSparkError
from dspark_lab.runtime import step_env, step_reads
from dspark_lab.runtime.attach import Job
from dspark_lab.runtime.records import RunDir

ROOT = Path(__file__).resolve().parents[1]


def test_late_loss_writes_each_record_with_its_own_loss_one_step_late_in_order():
    written = []
    late = step_reads.LateLoss(written.append, late_on_cpu=True)
    for step in range(1, 5):
        late.put({"step": step, "loss": None}, torch.tensor(float(step) / 7))
        assert [r["step"] for r in written] == list(range(1, step))  # step k is written at boundary k + 1
    late.put({"step": 5, "loss": None}, None)  # a step without backward: no loss
    late.flush()
    assert [(r["step"], r["loss"]) for r in written] == [(s, float(torch.tensor(s / 7))) for s in range(1, 5)] + \
        [(5, None)]


def test_a_cpu_loss_is_read_at_once_by_default():
    written = []
    step_reads.LateLoss(written.append).put({"step": 1, "loss": None}, torch.tensor(0.5))
    assert written == [{"step": 1, "loss": 0.5}]


@pytest.mark.parametrize("name, value, allowed", [
    ("DSPARK_LOSS_READ", "soon", "auto | late"), ("DSPARK_MEMORY_EVERY", "0", "an integer in [1, 100000]"),
    ("DSPARK_MEMORY_EVERY", "ten", "an integer in [1, 100000]")])
def test_bad_settings_are_refused_in_one_line(monkeypatch, name, value, allowed):
    monkeypatch.setenv(name, value)
    with pytest.raises(DSparkError) as info:
        step_env.loss_read() if name == "DSPARK_LOSS_READ" else step_env.memory_every()
    assert str(info.value) == f"{name}: {value!r} is not allowed; allowed: {allowed}"


def test_memory_is_read_every_n_steps_and_every_step_while_wanted(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_MEMORY_EVERY", "4")
    job = Job(RunDir.create("20260101-000000-3e3e3e", {"name": "meter"}, root=tmp_path), rank=0, world=1)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    job.set_model(model)
    job.optimizer = optimizer
    reads = psutil_calls(monkeypatch, job)
    try:
        for step in range(1, 11):
            if step == 6:
                job.meter.want_memory("test")
            if step == 8:
                job.meter.want_memory("test", False)
            model(torch.randn(2, 4)).sum().backward()
            job.on_step_begin(optimizer)
            job.on_step_end(optimizer)
    finally:
        job.close()
    records = job.run_dir.metrics()
    read = [r["step"] for r in records if r["rss_bytes"] is not None]
    assert read == [1, 4, 6, 7, 8] and reads == read  # step 8: a multiple of 4 (still wanted at 6 and 7)


def test_under_gradient_accumulation_the_loss_is_the_sum_of_the_micro_batches_shares(tmp_path):
    job = Job(RunDir.create("20260101-000000-4f4f4f", {"name": "accumulate"}, root=tmp_path), rank=0, world=1)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    job.set_model(model)
    job.optimizer = optimizer
    batch_losses = []
    try:
        for step in range(3):
            shares = [model(torch.randn(2, 4)).pow(2).mean() / 2 for _ in range(2)]
            for share in shares:
                job.on_backward(share, share.backward)  # what the torch.autograd.backward wrapper calls
            batch_losses.append(float(shares[0].detach() + shares[1].detach()))
            job.on_step_begin(optimizer)
            job.on_step_end(optimizer)
    finally:
        job.close()
    assert [r["loss"] for r in job.run_dir.metrics()] == batch_losses  # each step starts its own sum


def psutil_calls(monkeypatch, job) -> list[int]:
    calls = []
    real = job.meter._process.memory_info

    def counted():
        calls.append(job.step)
        return real()

    monkeypatch.setattr(job.meter._process, "memory_info", counted)
    return calls


TRAIN = textwrap.dedent("""
    import json, sys
    import torch
    import dspark_lab
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    dspark_lab.attach(model, optimizer, name="late-loss")
    losses = []
    for step in range(7):
        x = torch.randn(8, 16)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(json.dumps(losses))
""")


def test_an_attached_script_gets_its_own_losses_per_step_and_the_last_one_at_exit(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    env = {**os.environ, "DSPARK_HOME": str(tmp_path / "home"), "DSPARK_LOSS_READ": "late",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("DSPARK_RUN_DIR", None)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    run_dir, = (tmp_path / "home" / "runs").iterdir()
    records = RunDir(run_dir).metrics()
    assert [r["step"] for r in records] == list(range(1, 8))
    assert [r["loss"] for r in records] == printed  # bit for bit, the last step's included


@pytest.mark.slow
def test_dspark_lab_run_records_the_scripts_losses_one_step_late(tmp_path):
    losses = tmp_path / "losses.json"
    env = {**os.environ, "DSPARK_HOME": str(tmp_path / "home"), "DSPARK_LOSS_READ": "late"}
    done = subprocess.run([sys.executable, "-m", "dspark_lab", "run", "--nproc", "1",
                           str(ROOT / "dspark_lab" / "examples" / "demo_train.py"), "--steps", "6", "--layers", "1",
                           "--dim", "32", "--loss-file", str(losses)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir, = (tmp_path / "home" / "runs").iterdir()
    records = RunDir(run_dir).metrics()
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["loss"] for r in records] == json.loads(losses.read_text())


def test_a_cuda_loss_is_written_once_its_copy_event_is_done_never_waited_on_unless_over_eight_wait(monkeypatch):
    events = []

    class Event:  # torch.cuda.Event as the boundary uses it
        def __init__(self):
            self.done = self.waited = False
            events.append(self)

        def record(self, stream):
            pass

        def query(self):
            return self.done

        def synchronize(self):
            self.waited = self.done = True

    class DeviceLoss:  # a 1-element loss on "cuda": the copy to the host is an ordinary CPU tensor here
        device = torch.device("cuda", 0)

        def __init__(self, value):
            self.value = value

        def detach(self):
            return self

        def to(self, device, non_blocking=False):
            assert device == "cpu" and non_blocking
            return torch.tensor(self.value)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    written = []
    late = step_reads.LateLoss(written.append)
    for step in range(1, 4):
        late.put({"step": step, "loss": None}, DeviceLoss(step / 4))
    assert written == [] and late.pending == 3  # no event done: nothing read, nothing waited on
    events[1].done = True
    late.put({"step": 4, "loss": None}, DeviceLoss(1.0))
    assert written == []  # step 2's copy is done but step 1's is not: records stay in step order
    events[0].done = True
    late.put({"step": 5, "loss": None}, DeviceLoss(1.25))
    assert [(r["step"], r["loss"]) for r in written] == [(1, 0.25), (2, 0.5)]
    for step in range(6, 6 + step_reads.MAX_PENDING):
        late.put({"step": step, "loss": None}, DeviceLoss(0.0))
    # a boundary that finds more than 8 records waiting waits for the oldest (steps 3 and 4 here), and only that
    assert [i + 1 for i, e in enumerate(events) if e.waited] == [3, 4] and late.pending == step_reads.MAX_PENDING + 1
    late.flush()
    assert [r["step"] for r in written] == list(range(1, 6 + step_reads.MAX_PENDING))
    assert written[3]["loss"] == 1.0 and written[4]["loss"] == 1.25
