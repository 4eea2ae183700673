"""One real 2-rank tune end to end on the demo job: a memory cap at half the unconstrained peak, a manual `set`
refused during the tune, `--stop`, the events, and the loss trajectory equal to an untuned run's bit for bit; tunes
of sum-reordering policies (compute.threads, comm.grad_sync) within 1e-5 relative of an untuned run's losses."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import wait_for_step
from dspark_lab.cli import main as cli_main
from dspark_lab.errors import ControlError
from dspark_lab.runtime import commands
from dspark_lab.runtime.control import ControlClient
from dspark_lab.runtime.policies import compute
from dspark_lab.tune import commands as tune_commands

pytestmark = pytest.mark.slow

DEMO = Path(commands.__file__).parent.parent / "examples" / "demo_train.py"
SMALL = ["--layers", "3", "--dim", "32", "--seq", "16", "--batch", "4", "--vocab", "64"]
STEPS = 350  # the cap's tune ends by about step 170 (150 steps of budget), with room for the stopped one
BIT_EXACT_KEYS = "memory.activation_checkpointing,memory.activation_offload"
PLAIN_STEPS = 450  # past the last step the sum-reordering test compares (two tunes of 120 steps: about 300)


@pytest.fixture(scope="module")
def plain_demo(tmp_path_factory):
    """The untuned demo run both demo tests compare with (losses do not depend on --steps: no schedule), made once
    and alone: ``(rank 0's --loss-file losses, {step: loss} from rank 0's metrics records)``."""
    tmp = tmp_path_factory.mktemp("plain")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSPARK_HOME", str(tmp / "home"))
        plain = commands.launch(DEMO, [*SMALL, "--steps", str(PLAIN_STEPS), "--loss-file", str(tmp / "plain.json")],
                                nproc=2, name="plain")
        try:
            assert plain.wait(300) == 0, (plain.run_dir.path / "output.log").read_text()[-3000:]
        finally:
            if plain.poll() is None:
                plain.stop()
    by_step = {m["step"]: m["loss"] for m in plain.run_dir.metrics() if m["rank"] == 0}
    return json.loads((tmp / "plain.json").read_text()), by_step


def test_tune_keeps_a_configuration_under_the_cap_and_leaves_the_losses_bit_identical(tmp_path, monkeypatch,
                                                                                         capsys, plain_demo):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    tuned = commands.launch(DEMO, [*SMALL, "--steps", str(STEPS), "--loss-file", str(tmp_path / "tuned.json")],
                            nproc=2, name="tuned")
    try:
        wait_for_step(tuned, 4)
        unconstrained = max(m["peak_activation_bytes"] for m in tuned.run_dir.metrics())
        cap_mb = unconstrained / 2 / 2**20
        client = ControlClient(tuned.run_dir, timeout=70)
        started = client.request("POST", "/tune", {"budget_steps": 150, "keys": BIT_EXACT_KEYS.split(","),
                                                   "max_activation_mb": cap_mb})
        assert started["state"] == "running" and started["space"]["bit_exact"]
        with pytest.raises(ControlError, match=rf"tune {started['id']} is searching .*--stop"):
            commands.set_policies(tuned.id, ["memory.activation_checkpointing=every-2"])
        deadline = time.monotonic() + 120
        state = started
        while state["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.3)
            state = client.request("GET", "/tune")
        assert state["state"] == "done", state
        out = state["outcome"]
        assert out["feasible"] and out["best_peak_bytes"] <= cap_mb * 2**20
        assert out["best"]["memory.activation_checkpointing"] != "none"  # none is the unconstrained peak
        assert out["steps"] <= 150 + 12
        in_force = {p["key"]: p["value"] for p in commands.policies(tuned.id).data["policies"]}
        assert all(in_force[k] == v for k, v in out["best"].items())
        for trial in state["trials"]:  # a trial measured over the cap never won
            if trial["peak_bytes"] is not None and trial["peak_bytes"] > cap_mb * 2**20:
                assert trial["verdict"] in ("over_cap", "loss", "tie")
        # a second tune, stopped from the CLI at once: the best so far stays, the run trains on
        client.request("POST", "/tune", {"budget_steps": 100, "keys": ["memory.activation_offload"]})
        assert cli_main(["tune", tuned.id, "--stop", "--json"]) == 0
        stopped = json.loads(capsys.readouterr().out)
        assert stopped["kind"] == "tune" and stopped["state"] == "stopped" and stopped["schema_version"]
        assert tuned.wait(180) == 0
    finally:
        if tuned.poll() is None:
            tuned.stop()
    events = [e for e in tuned.run_dir.events() if e["kind"] == "tune"]
    trials = [e["trial"] for e in events if e["reason"] == "trial"]
    assert len(trials) >= len(state["trials"]) and all("ci" in t and "peak_bytes" in t for t in trials)
    assert [e["reason"] for e in events].count("decision") == 2
    tuned_losses = json.loads((tmp_path / "tuned.json").read_text())
    assert len(tuned_losses) == STEPS
    assert tuned_losses == plain_demo[0][:STEPS]  # bit for bit


def test_tune_over_sum_reordering_policies_keeps_the_losses_within_1e5_relative(tmp_path, monkeypatch, plain_demo):
    """compute.threads and comm.grad_sync ring/tree are lossless but reorder sums (inside the kernels, across the
    ranks): after a tune of each, the tuned run's losses stay within 1e-5 relative of an untuned run's, and the
    reordering trials really ran (applied on both ranks for their blocks)."""
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    keys = (["compute.threads"] if compute.cpu_count() >= 2 else []) + ["comm.grad_sync"]
    # The tuned run goes on until stopped, so it never ends under a tune however slow the machine; its losses are
    # compared step by step with the untuned run's from rank 0's metrics records (each carries its own step's loss,
    # as the script read it).
    tuned = commands.launch(DEMO, [*SMALL, "--steps", "1000000"], nproc=2, name="tuned")
    reports = {}
    try:
        wait_for_step(tuned, 1)
        for key in keys:  # one tune per key, so each gets a trial (4 pairs of blocks: about 50 steps)
            reports[key] = tune_commands.tune(tuned.id, budget_steps=120, keys=[key])
        last = max(m["step"] for m in tuned.run_dir.metrics())
    finally:
        if tuned.poll() is None:
            tuned.stop()
    applied = {(e["rank"], e["key"], e["new"]) for e in tuned.run_dir.events() if e["kind"] == "apply"}
    for key, report in reports.items():
        assert report.data["space"]["bit_exact"] is False and "(lossless, some reorder sums)" in report.to_text()
        ran = [t for t in report.data["trials"] if t["verdict"] in ("win", "loss", "tie") and t["steps"] > 0]
        assert ran, report.to_text()
        value = ran[0]["change"][key]
        assert value != report.data["outcome"]["start"][key] and {(0, key, value), (1, key, value)} <= applied
    tuned_losses = {m["step"]: m["loss"] for m in tuned.run_dir.metrics() if m["rank"] == 0}
    plain_losses = plain_demo[1]
    assert last < PLAIN_STEPS, f"the untuned run stops at step {PLAIN_STEPS}, before the tuned run's {last}"
    compared = [step for step in range(1, last + 1) if step in tuned_losses and step in plain_losses]
    assert len(compared) == last >= 100, (len(compared), last)
    worst = max(abs(tuned_losses[s] - plain_losses[s]) / abs(plain_losses[s]) for s in compared)
    assert worst <= 1e-5, worst
