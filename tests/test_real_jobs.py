"""Real clients, unmodified, each run plain and under ``dspark-lab run`` with a live policy change; losses compared.

nanoGPT-shaped single process (``--launcher python``), torchtitan FSDP2 and TP (its Trainer on CPU over gloo, through
tests/real_jobs/titan_cpu.py), Hugging Face ``Trainer``, a hand-written Accelerate loop and Lightning DDP. The
frameworks come from the ``frameworks`` extra; a test whose framework is absent is skipped and says so.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_file, plain_torchrun, wait_for_step
from dspark_lab.runtime import commands
from dspark_lab.runtime.launch import launch_background

pytestmark = pytest.mark.slow

JOBS = Path(__file__).parent / "real_jobs"
EXTRA = "the frameworks extra is not installed (pip install -e '.[frameworks]')"
# The plain runs the live ones are compared with leave out the live runs' --step-sleep: a sleep only gives a live
# change time to land before the run ends, and changes no printed figure.


@pytest.fixture(scope="module", autouse=True)
def dspark_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("dspark_home")
    saved = os.environ.get("DSPARK_HOME")
    os.environ["DSPARK_HOME"] = str(home)
    yield home
    os.environ.pop("DSPARK_HOME") if saved is None else os.environ.__setitem__("DSPARK_HOME", saved)


def needs(*modules: str) -> None:
    """Skip unless ``modules`` are installed, without importing them here (seconds of CPU each)."""
    if any(importlib.util.find_spec(name) is None for name in modules):
        pytest.skip(EXTRA)


def losses(text: str, pattern: str) -> dict[int, float]:
    """``{step: loss}`` from a job's output (ANSI colours stripped; ranks printing the same step agree)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    found: dict[int, float] = {}
    for step, loss in re.findall(pattern, plain, flags=re.M):
        assert found.setdefault(int(step), float(loss)) == float(loss), f"ranks disagree at step {step}"
    return found


def run_live(script: Path, args: list[str], *, nproc: int, change: str, launcher: str = "torchrun",
             at_step: int = 3, timeout: float = 240, then: str | None = None):
    """Launch under the runtime, change ``change`` once step ``at_step`` is done (and ``then``, when given, right
    after it applied), wait for the end. The reports are returned as one, or as a pair with ``then``."""
    job = launch_background(str(script), args, nproc=nproc, launcher=launcher, name=script.stem)
    try:
        wait_for_step(job, at_step, timeout=timeout)
        report = commands.set_policies(job.id, [change], timeout=120)
        if then is not None:
            report = (report, commands.set_policies(job.id, [then], timeout=120))
        code = job.wait(timeout)
    finally:
        if job.poll() is None:
            job.process.kill()
            job.process.wait()
    output = (job.run_dir.path / "output.log").read_text()
    assert code == 0, output[-3000:]
    return report, output, job.run_dir


def assert_changed_live(report, run_dir, last_step: int, cuts: bool = True, until: int | None = None) -> int:
    """The change applied on every rank at one step inside the run, and checkpointing cut what backward holds
    (``cuts``; or, switched off, raised it) from that step on (to step ``until``, excluded, when given)."""
    assert report.data["state"] == "applied", report.data
    step = report.data["step"]
    assert 1 < step < last_step
    applies = [e for e in run_dir.events() if e["kind"] == "apply" and e.get("change_id") == report.data["change_id"]]
    assert {e["step"] for e in applies} == {step} and len(applies) == run_dir.info()["ranks"]
    metrics = [m for m in run_dir.metrics() if m["rank"] == 0]
    before = [m["peak_activation_bytes"] for m in metrics if 1 < m["step"] < step]
    after = [m["peak_activation_bytes"] for m in metrics if step <= m["step"] < (until or last_step + 1)]
    smaller, larger = (after, before) if cuts else (before, after)
    assert smaller and larger and max(smaller) < 0.8 * min(larger), (before, after)
    return step


# --- nanoGPT's shape, one process --------------------------------------------------------------------------------

NANOGPT = JOBS / "nanogpt_train.py"
NANOGPT_ARGS = ["--device=cpu", "--compile=False", "--max_iters=40", "--step_sleep=0.05"]
ITER = r"^iter (\d+): loss ([\d.]+)$"


def test_nanogpt_shape_under_the_python_launcher_matches_plain_python(monkeypatch):
    plain = subprocess.run([sys.executable, str(NANOGPT), *NANOGPT_ARGS[:-1], "--step_sleep=0"],
                           capture_output=True, text=True, timeout=120, check=True).stdout
    # a shell left with torchrun's variables must not turn the script into a DDP run
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    report, output, run_dir = run_live(NANOGPT, NANOGPT_ARGS, nproc=1, launcher="python",
                                       change="memory.activation_checkpointing=full")
    assert "ddp=False" in output.splitlines()
    assert run_dir.info()["launcher"] == "python" and run_dir.info()["state"] == "finished"
    assert_changed_live(report, run_dir, 40)
    expected = losses(plain, ITER)
    assert len(expected) == 40 and losses(output, ITER) == expected


# --- a plain DDP script with everyday habits -----------------------------------------------------------------------

HABITS = JOBS / "habits_train.py"


def test_everyday_script_habits_survive_a_live_change_and_match_plain_torchrun(tmp_path, monkeypatch):
    """BatchNorm blocks, gradient accumulation, an EMA and a snapshot made with deepcopy, a second optimizer for a
    second phase, torch.save(model): checkpointing switched on in the second phase changes no printed figure."""
    args = ["--head-steps", "6", "--steps", "24", "--step-sleep", "0.1"]
    plain = plain_torchrun([HABITS, *args[:-1], "0", "--save", str(tmp_path / "plain.pt")], nproc=2).stdout
    # the second optimizer ends the steps from its second step on: step 9 is in the second phase
    report, output, run_dir = run_live(HABITS, [*args, "--save", str(tmp_path / "ours.pt")], nproc=2, at_step=9,
                                       change="memory.activation_checkpointing=full", timeout=180)
    assert report.data["state"] == "applied" and report.data["step"] > 9
    boundary = [e for e in run_dir.events() if e["kind"] == "boundary"]
    assert len(boundary) == 2 and all("AdamW" in e["reason"] for e in boundary)  # one per rank
    expected = losses(plain, STEP)
    assert len(expected) == 30 and losses(output, STEP) == expected
    tail = lambda text: [line for line in text.splitlines() if line.startswith(("bn ", "ema ", "latest "))]
    assert tail(output) == tail(plain) and "latest matches True" in tail(output)
    script = load_file("habits_train", HABITS)
    monkeypatch.setattr(sys.modules["__main__"], "Block", script.Block, raising=False)  # the script's __main__.Block
    ours, theirs = (torch.load(tmp_path / name, weights_only=False) for name in ("ours.pt", "plain.pt"))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # the checkpointed blocks were saved with their class's forward (pickled as getattr(block, "forward"))
    assert all(m.__dict__["forward"].__func__ is type(m).forward for m in ours.modules() if "forward" in m.__dict__)
    # under gradient accumulation the recorded loss is the step's (the micro-batches' shares added)
    recorded = {m["step"]: m["loss"] for m in run_dir.metrics() if m["rank"] == 0 and m.get("loss") is not None}
    assert all(recorded[k] == pytest.approx(expected[k], rel=1e-6) for k in range(2, 6))


# --- torchtitan: its Trainer on 2 CPU ranks, FSDP2 and TP ----------------------------------------------------------

TITAN = JOBS / "titan_cpu.py"
TITAN_STEPS = 20
TITAN_STEP = r"step:\s+(\d+)\s+loss:\s+([\d.]+)"
TITAN_LAYOUTS = {
    "fsdp2": ["--parallelism.data_parallel_shard_degree=2"],
    "tp": ["--parallelism.data_parallel_shard_degree=1", "--parallelism.tensor_parallel_degree=2"],
    # torchtitan's own full AC (checkpoint_wrapper under fully_shard), switched off live through it
    "fsdp2-own-ac": ["--parallelism.data_parallel_shard_degree=2", "--activation_checkpoint.mode=full"],
}
# The plain torchrun run each layout's losses are compared with. torchtitan's own full AC recomputes the same ops on
# the same inputs, so its plain losses are plain fsdp2's to the bit (checked on 20 steps): fsdp2-own-ac is compared
# with the fsdp2 run, and that run is made once for both (and for the tune's first steps: titan_cpu.py's schedule
# makes a step's loss independent of --training.steps).
TITAN_PLAIN = {"fsdp2": "fsdp2", "fsdp2-own-ac": "fsdp2", "tp": "tp"}
_titan_plain: dict[str, dict[int, float]] = {}


def plain_titan_losses(layout: str, dump: Path) -> dict[int, float]:
    """``layout``'s losses under plain torchrun (its dump folder under ``dump``), run once per layout."""
    if layout not in _titan_plain:
        args = [*TITAN_LAYOUTS[layout], f"--training.steps={TITAN_STEPS}", f"--job.dump_folder={dump / 'plain'}"]
        plain = plain_torchrun([TITAN, *args], nproc=2)
        _titan_plain[layout] = losses(plain.stdout + plain.stderr, TITAN_STEP)
    return _titan_plain[layout]


def assert_titan_matches_plain(output: str, layout: str, dump: Path, step: int) -> None:
    """The first TITAN_STEPS losses are plain torchrun's to the bit before ``step``, and within 1e-6 after it."""
    expected = plain_titan_losses(TITAN_PLAIN[layout], dump)
    assert len(expected) == TITAN_STEPS
    ours = {k: v for k, v in losses(output, TITAN_STEP).items() if k <= TITAN_STEPS}
    assert {k: v for k, v in ours.items() if k < step} == {k: v for k, v in expected.items() if k < step}
    assert ours == pytest.approx(expected, rel=1e-6)


@pytest.mark.frameworks
@pytest.mark.parametrize("layout", ["tp", "fsdp2-own-ac"])  # fsdp2: the tune test below
def test_torchtitan_checkpointing_live_matches_plain_torchrun(layout, tmp_path):
    """Under ``dspark-lab run`` (loopback rendezvous, bootstrap, records) torchtitan's losses are plain torchrun's
    to the bit until the live change, and within 1e-6 after it."""
    needs("torchtitan")
    args = [*TITAN_LAYOUTS[layout], f"--training.steps={TITAN_STEPS}", f"--job.dump_folder={tmp_path}"]
    own = layout.endswith("own-ac")
    report, output, run_dir = run_live(TITAN, args, nproc=2,
                                       change=f"memory.activation_checkpointing={'none' if own else 'full'}")
    step = assert_changed_live(report, run_dir, TITAN_STEPS, cuts=not own)  # first: a failing run ends early
    if own:  # read as in force from the start, and switched through torchtitan's own wrappers
        assert report.data["changes"][0]["old"] == "full", report.data
        assert "script's own torch checkpoint_wrapper" in next(e["reason"] for e in run_dir.events()
                                                               if e["kind"] == "apply")
    assert run_dir.info()["state"] == "finished"
    assert_titan_matches_plain(output, layout, tmp_path, step)


@pytest.mark.frameworks
def test_torchtitan_fsdp2_takes_checkpointing_live_then_a_tune_under_a_memory_cap_and_loses_no_step(tmp_path):
    """FSDP2 under ``dspark-lab run``: checkpointing switched on live keeps the losses plain torchrun's (to the bit
    before it, within 1e-6 after); switched off again, ``dspark-lab tune`` on torchtitan's own Trainer meets a cap at
    half the measured activation peak by a checkpointing setting, and the job runs every step once to the end."""
    needs("torchtitan")
    from dspark_lab.tune import commands as tune_commands

    steps = 150  # the tune ends by about step 80 (120 steps of budget, most trials stopped early), with room
    args = [*TITAN_LAYOUTS["fsdp2"], f"--training.steps={steps}", f"--job.dump_folder={tmp_path}"]
    job = launch_background(str(TITAN), args, nproc=2, name="titan-tune")
    try:
        wait_for_step(job, 3, timeout=240)
        report = commands.set_policies(job.id, ["memory.activation_checkpointing=full"], timeout=120)
        wait_for_step(job, report.data["step"] + 2, timeout=120)
        off = commands.set_policies(job.id, ["memory.activation_checkpointing=none"], timeout=120)
        on = report.data["step"]
        cap_mb = max(m["peak_activation_bytes"] for m in job.run_dir.metrics() if m["step"] < on) / 2 / 2**20
        tune = tune_commands.tune(job.id, budget_steps=120, keys=["memory.activation_checkpointing"],
                                  max_activation_mb=cap_mb)
        out = tune.data["outcome"]
        assert tune.data["state"] == "done" and out["feasible"] and out["best_peak_bytes"] <= cap_mb * 2**20
        assert out["start"]["memory.activation_checkpointing"] == "none"
        assert out["best"]["memory.activation_checkpointing"] != "none"
        code = job.wait(300)
    finally:
        if job.poll() is None:
            job.stop()
    output = (job.run_dir.path / "output.log").read_text()
    assert code == 0, output[-3000:]
    assert off.data["state"] == "applied", off.data
    step = assert_changed_live(report, job.run_dir, steps, until=off.data["step"])
    assert job.run_dir.info()["state"] == "finished"
    assert sorted(losses(output, TITAN_STEP)) == list(range(1, steps + 1))
    assert_titan_matches_plain(output, "fsdp2", tmp_path, step)

# --- Hugging Face Trainer (Accelerate builds DDP) and Lightning (strategy="ddp"), 2 CPU ranks ----------------------

STEP = r"^step (\d+) loss ([\d.]+)$"
FRAMEWORK_STEPS = 30
LIGHTNING_ARGS = ("--devices", "2", "--steps", str(FRAMEWORK_STEPS), "--step-sleep", "0.05")


_hf_plain: dict[int, float] = {}


def plain_hf_losses(out: Path) -> dict[int, float]:
    """The Trainer job's losses under plain torchrun, run once for both cases below: the Trainer's own
    checkpointing recomputes the same ops on the same inputs, so with it the plain losses are the same to the bit
    (checked on 30 steps), and the case that starts with it is compared with this run too."""
    if not _hf_plain:
        args = ["--steps", str(FRAMEWORK_STEPS), "--out", str(out)]
        _hf_plain.update(losses(plain_torchrun([JOBS / "hf_trainer.py", *args], nproc=2).stdout, STEP))
    return _hf_plain


@functools.lru_cache(maxsize=None)
def plain_lightning_losses() -> dict[int, float]:
    """The Lightning job's losses under plain torchrun, run once for the tests below that compare with it."""
    return losses(plain_torchrun([JOBS / "lightning_ddp.py", *LIGHTNING_ARGS[:-2]], nproc=2).stdout, STEP)


@pytest.mark.frameworks
@pytest.mark.parametrize("own", [False, True], ids=["ours", "trainer-own"])
def test_hf_trainer_checkpointing_live_matches_plain_torchrun(own, tmp_path):
    """Switched on live; or, where the Trainer checkpoints itself (gradient_checkpointing=True), read as in force
    and switched off live through its own flag. Our case then takes bf16 gradient sync live (the Trainer's DDP is
    Accelerate's): the losses stay plain torchrun's to the bit until its gradients show, close after."""
    needs("transformers", "accelerate")
    script = JOBS / "hf_trainer.py"
    args = ["--steps", str(FRAMEWORK_STEPS), "--step-sleep", "0.1", "--out", str(tmp_path)]
    args += ["--gradient-checkpointing"] if own else []
    report, output, run_dir = run_live(script, args, nproc=2,
                                       change=f"memory.activation_checkpointing={'none' if own else 'full'}",
                                       then=None if own else "comm.grad_sync=bf16")
    report, bf16 = report if not own else (report, None)
    assert_changed_live(report, run_dir, FRAMEWORK_STEPS, cuts=not own)
    assert report.data["changes"][0]["old"] == ("full" if own else "none")
    expected = plain_hf_losses(tmp_path / "plain")
    got = losses(output, STEP)
    assert len(expected) == FRAMEWORK_STEPS and len(got) == FRAMEWORK_STEPS
    if bf16 is None:
        assert got == pytest.approx(expected, rel=1e-6)
        return
    assert bf16.data["state"] == "applied" and report.data["step"] < bf16.data["step"] < FRAMEWORK_STEPS, bf16.data
    applies = [e for e in run_dir.events() if e["kind"] == "apply" and e.get("change_id") == bf16.data["change_id"]]
    assert sorted(e["rank"] for e in applies) == [0, 1] and {e["step"] for e in applies} == {bf16.data["step"]}
    # step N logs the loss of its forward, before its update: bf16 gradients of step b first show at step b+1
    exact = [s for s in expected if s <= bf16.data["step"]]
    assert [got[s] for s in exact] == pytest.approx([expected[s] for s in exact], rel=1e-6)
    assert any(got[s] != expected[s] for s in expected if s not in exact)  # compressed for real
    assert got == pytest.approx(expected, rel=2e-2)


@pytest.mark.frameworks
def test_accelerate_loop_takes_checkpointing_then_bf16_grad_sync_live(tmp_path):
    """A hand-written Accelerate loop (accumulate, clip, scheduler, gather, save_state): the runtime's step is the
    optimizer's real step, checkpointing keeps the losses to the bit, bf16 gradient sync keeps them close."""
    needs("accelerate")
    script = JOBS / "accelerate_loop.py"
    args = ["--steps", str(FRAMEWORK_STEPS), "--step-sleep", "0.1", "--out", str(tmp_path / "state")]
    expected = losses(plain_torchrun([script, *args[:2], *args[4:]], nproc=2).stdout, STEP)
    job = launch_background(str(script), args, nproc=2, name="accelerate")
    try:
        wait_for_step(job, 3, timeout=120)
        checkpointing = commands.set_policies(job.id, ["memory.activation_checkpointing=full"], timeout=60)
        bf16 = commands.set_policies(job.id, ["comm.grad_sync=bf16"], timeout=60)
        assert job.wait(240) == 0, (job.run_dir.path / "output.log").read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.process.kill()
    assert_changed_live(checkpointing, job.run_dir, FRAMEWORK_STEPS)
    assert bf16.data["state"] == "applied" and checkpointing.data["step"] < bf16.data["step"] < FRAMEWORK_STEPS
    got = losses((job.run_dir.path / "output.log").read_text(), STEP)
    assert len(expected) == FRAMEWORK_STEPS and max(m["step"] for m in job.run_dir.metrics()) == FRAMEWORK_STEPS
    # step N prints the loss before its update: bf16 gradients of step b+1 first show at step b+2
    exact = [s for s in expected if s <= bf16.data["step"] + 1]
    assert [got[s] for s in exact] == [expected[s] for s in exact]
    assert any(got[s] != expected[s] for s in expected if s not in exact)  # compressed for real
    assert got == pytest.approx(expected, rel=2e-2)
    assert (tmp_path / "state").is_dir()


@pytest.mark.frameworks
def test_lightning_ddp_takes_checkpointing_then_bf16_grad_sync_live():
    """One live run: checkpointing keeps the losses plain torchrun's to the bit, bf16 gradient sync then keeps them
    close."""
    needs("lightning")
    script = JOBS / "lightning_ddp.py"
    (report, bf16), output, run_dir = run_live(script, list(LIGHTNING_ARGS), nproc=2,
                                               change="memory.activation_checkpointing=full",
                                               then="comm.grad_sync=bf16")
    step = assert_changed_live(report, run_dir, FRAMEWORK_STEPS)
    assert bf16.data["state"] == "applied" and step < bf16.data["step"] < FRAMEWORK_STEPS, bf16.data
    assert not [e for e in run_dir.events() if e["kind"] == "error"]
    expected = plain_lightning_losses()
    got = losses(output, STEP)
    assert len(expected) == FRAMEWORK_STEPS and len(got) == FRAMEWORK_STEPS
    # Lightning prints global_step, the optimizer steps done: a change's step is the first that can show it. Its
    # checkpointing recomputes the same ops on the same inputs: the losses stay plain's to the bit until bf16's show
    exact = range(bf16.data["step"])
    assert [got[s] for s in exact] == [expected[s] for s in exact]
    assert any(got[s] != expected[s] for s in expected if s not in exact)  # compressed for real
    assert got == pytest.approx(expected, rel=2e-2)  # bf16 gradients with error feedback: lossy, close


@pytest.mark.frameworks
def test_lightning_ddp_grad_sync_bf16_at_launch_keeps_training_close_to_plain():
    needs("lightning")
    job = launch_background(str(JOBS / "lightning_ddp.py"), list(LIGHTNING_ARGS), nproc=2,
                            policies=["comm.grad_sync=bf16"], name="bf16")
    assert job.wait(240) == 0, (job.run_dir.path / "output.log").read_text()[-3000:]
    output = (job.run_dir.path / "output.log").read_text()
    assert not [e for e in job.run_dir.events() if e["kind"] == "error"]
    expected = plain_lightning_losses()
    got = losses(output, STEP)
    assert len(got) == FRAMEWORK_STEPS and got[0] == expected[0]  # step 0's loss comes before any gradient
    assert any(got[s] != expected[s] for s in range(1, FRAMEWORK_STEPS))  # compressed for real
    assert got == pytest.approx(expected, rel=2e-2)  # bf16 gradients with error feedback: lossy, close
