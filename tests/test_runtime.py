"""The live runtime end to end: real 2-rank torchrun jobs over gloo, changed through the real control endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import plain_torchrun, terminal_sigint, wait_for_step
from dspark_lab.runtime import commands
from dspark_lab.cli import main as cli_main
from dspark_lab.errors import ControlError, DSparkError, PolicyError
from dspark_lab.runtime.bootstrap import CtrlC
from dspark_lab.runtime.records import find_run

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
FIXTURES = HERE / "runtime_fixtures"
DEMO = Path(commands.__file__).parent.parent / "examples" / "demo_train.py"
SMALL = ["--layers", "3", "--dim", "32", "--seq", "16", "--batch", "4", "--vocab", "64"]


@pytest.fixture(scope="module", autouse=True)
def dspark_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("dspark_home")
    saved = {k: os.environ.get(k) for k in ("DSPARK_HOME", "DSPARK_PLUGIN_MODULES", "PYTHONPATH")}
    os.environ["DSPARK_HOME"] = str(home)
    os.environ["DSPARK_PLUGIN_MODULES"] = "flaky_policy"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FIXTURES), saved["PYTHONPATH"]]))
    sys.path.insert(0, str(FIXTURES))
    from dspark_lab.plugins import reset_manager

    reset_manager()
    yield home
    sys.path.remove(str(FIXTURES))
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    reset_manager()


# The policies the live-job tests change, at their defaults: every test starts from these, whatever ran before.
DEFAULTS = {"memory.activation_checkpointing": "none", "memory.activation_offload": "off", "comm.grad_sync": "builtin"}


@pytest.fixture(scope="module")
def shared_job(dspark_home):
    """Holds the module's running demo job (a launch costs seconds); the last one is stopped at the end."""
    holder = {}
    yield holder
    job = holder.get("job")
    if job is not None and job.poll() is None:
        job.stop()


@pytest.fixture
def live_job(shared_job):
    """A running 2-rank demo job with ``DEFAULTS`` in force, in any test order: launched again when a test
    stopped it, and the policies reset when a test left them changed."""
    job = shared_job.get("job")
    if job is None or job.poll() is not None:
        job = commands.launch(DEMO, [*SMALL, "--steps", "100000", "--step-sleep", "0.02"], nproc=2, name="live")
        shared_job["job"] = job
        wait_for_step(job, 2)
    values = {p["key"]: p["value"] for p in commands.policies(job.id).data["policies"]}
    changes = [f"{key}={value}" for key, value in DEFAULTS.items() if values.get(key) != value]
    if changes:
        assert commands.set_policies(job.id, changes).data["state"] == "applied"
    return job


def latest_step(job) -> int:
    return max(m["step"] for m in job.run_dir.metrics())


def events_of(job, change_id):
    return [e for e in job.run_dir.events() if e.get("change_id") == change_id]


def test_change_applies_on_both_ranks_at_one_step(live_job):
    start = latest_step(live_job)  # from here on the defaults are in force (the fixture waited for them)
    wait_for_step(live_job, start + 2)
    report = commands.set_policies(live_job.id, ["memory.activation_checkpointing=full"])
    assert report.data["state"] == "applied"
    applied = events_of(live_job, report.data["change_id"])
    applies = [e for e in applied if e["kind"] == "apply"]
    assert sorted(e["rank"] for e in applies) == [0, 1]
    assert {e["step"] for e in applies} == {report.data["step"]}
    got = commands.get(live_job.id, "memory.activation_checkpointing").data["policies"][0]
    assert (got["value"], got["since_step"]) == ("full", report.data["step"])
    # the runtime's own count: checkpointing every block cuts what is held for backward
    wait_for_step(live_job, report.data["step"] + 2)
    metrics = live_job.run_dir.metrics()
    before = [m["peak_activation_bytes"] for m in metrics if start < m["step"] < report.data["step"]]
    after = [m["peak_activation_bytes"] for m in metrics if m["step"] >= report.data["step"]]
    assert before and max(after) < 0.6 * min(before)


def test_bad_value_is_refused_in_one_line_and_logged_once(live_job):
    with pytest.raises(PolicyError) as err:
        commands.set_policies(live_job.id, ["memory.activation_checkpointing=sometimes"])
    message = str(err.value)
    assert "\n" not in message and "none | full | every-2 | every-4" in message
    refusals = [e for e in live_job.run_dir.events() if e["kind"] == "refuse" and "sometimes" in e["reason"]]
    assert len(refusals) == 1  # this test is the only one that asks for "sometimes"
    with pytest.raises(PolicyError, match="launch-only"):
        commands.set_policies(live_job.id, ["comm.bucket_mb=50"])
    with pytest.raises(PolicyError, match="unknown policy"):
        commands.set_policies(live_job.id, ["memory.nonsense=1"])
    assert live_job.poll() is None  # the job goes on


def test_failed_apply_on_one_rank_rolls_back_every_key_on_every_rank(live_job):
    report = commands.set_policies(live_job.id, ["memory.activation_offload=host", "test.flaky=fail-rank-1"])
    assert report.data["state"] == "rolled_back"
    assert "rank 1" in report.data["reason"]
    rollbacks = [e for e in events_of(live_job, report.data["change_id"]) if e["kind"] == "rollback"]
    assert sorted((e["rank"], e["key"]) for e in rollbacks) == [
        (0, "memory.activation_offload"), (0, "test.flaky"), (1, "memory.activation_offload"), (1, "test.flaky")]
    assert commands.get(live_job.id, "memory.activation_offload").data["policies"][0]["value"] == "off"
    assert live_job.poll() is None


def test_grad_sync_switches_live_and_no_wait_returns_the_pending_step(live_job):
    report = commands.set_policies(live_job.id, ["comm.grad_sync=tree"], wait=False)
    assert report.data["state"] in ("pending", "applied") and report.data["step"] > 0
    wait_for_step(live_job, report.data["step"] + 1)
    assert commands.get(live_job.id, "comm.grad_sync").data["policies"][0]["value"] == "tree"


def test_wrong_token_and_malformed_requests_change_nothing(live_job):
    control = json.loads((live_job.run_dir.path / "control.json").read_text())  # rank 0's endpoint file
    url = f"http://{control['host']}:{control['port']}"

    def post(path, data, token):
        req = urllib.request.Request(url + path, data=data, method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        return err.value.code, json.loads(err.value.read())["error"]

    body = json.dumps({"changes": {"memory.activation_checkpointing": "full"}}).encode()
    assert post("/set", body, "not-the-token")[0] == 401
    token = live_job.run_dir.token()
    assert post("/set", b"{not json", token) == (400, "request: body is not JSON")
    assert post("/set", b'{"changes": {}}', token)[0] == 400
    assert oct(live_job.run_dir.token_path.stat().st_mode & 0o777) == "0o600"
    assert commands.get(live_job.id, "memory.activation_checkpointing").data["policies"][0]["value"] == "none"


def test_cli_json_outputs(live_job, capsys):
    assert cli_main(["jobs", "--json"]) == 0
    jobs = json.loads(capsys.readouterr().out)
    assert jobs["schema_version"] == 1 and jobs["kind"] == "jobs"
    mine = next(j for j in jobs["jobs"] if j["id"] == live_job.id)
    assert mine["state"] == "running" and mine["ranks"] == 2 and mine["step"] >= 2
    assert cli_main(["status", "live", "--json"]) == 0  # by name
    status = json.loads(capsys.readouterr().out)
    assert status["run"]["live"]["step"] >= 2
    assert cli_main(["policies", live_job.id[:15], "--json"]) == 0  # by prefix
    keys = {p["key"] for p in json.loads(capsys.readouterr().out)["policies"]}
    assert {"memory.activation_checkpointing", "comm.grad_sync", "comm.bucket_mb"} <= keys
    assert cli_main(["metrics", live_job.id, "--tail", "3", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["metrics"]
    assert len(records) == 3 and all(r["schema_version"] == 1 for r in records)
    assert cli_main(["set", live_job.id, "memory.activation_offload=sideways"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: memory.activation_offload") and "\n" not in err


def test_stop_ends_every_rank_at_a_boundary(live_job):
    commands.stop(live_job.id)
    listed = {j["id"]: j["state"] for j in commands.jobs().data["jobs"]}
    assert listed[live_job.id] == "stopped"  # the answer comes once the run reads ended, as `jobs` says
    assert (live_job.run_dir.path / "output.log").stat().st_mode & 0o777 == 0o600  # private like every record
    assert live_job.wait(60) == 0
    info = live_job.run_dir.info()
    assert info["state"] == "stopped"
    stops = [e for e in live_job.run_dir.events() if e["kind"] == "stop"]
    assert sorted(e["rank"] for e in stops) == [0, 1] and len({e["step"] for e in stops}) == 1
    with pytest.raises(ControlError, match="stopped"):
        commands.set_policies(live_job.id, ["memory.activation_checkpointing=full"])


def test_bucket_mb_reaches_ddp_reducer(tmp_path):
    """``comm.bucket_mb=2`` must reach DDP's reducer: its cap, and the buckets it hands the comm hook after the
    rebuild. With DDP's default 25 MB cap the same script gets buckets of 1 MB and 7 MB (one past the first)."""
    out = tmp_path / "buckets.json"
    run = subprocess.run([sys.executable, "-m", "dspark_lab", "run", "--nproc", "2", "--policy", "comm.bucket_mb=2",
                          str(FIXTURES / "ddp_buckets_train.py"), str(out)], capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["bucket_bytes_cap"] == 2 * 2**20
    sizes = got["bucket_sizes"]
    assert sum(sizes) == got["gradient_bytes"]
    largest_param = (512 * 512 + 512) * 4  # a bucket closes on the parameter that takes it past the cap
    assert len(sizes) >= 4 and max(sizes) <= 2 * 2**20 + largest_param


def test_losses_and_state_dict_keys_equal_plain_torchrun(tmp_path):
    args = [*SMALL, "--steps", "12"]
    plain_torchrun([DEMO, *args, "--loss-file", tmp_path / "plain.json", "--save", tmp_path / "plain.pt"])
    ours = subprocess.run([sys.executable, "-m", "dspark_lab", "run", "--nproc", "2",
                           "--policy", "memory.activation_checkpointing=full", str(DEMO), *args,
                           "--loss-file", str(tmp_path / "ours.json"), "--save", str(tmp_path / "ours.pt")],
                          capture_output=True, text=True, timeout=180)
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert json.loads((tmp_path / "ours.json").read_text()) == json.loads((tmp_path / "plain.json").read_text())
    assert list(torch.load(tmp_path / "ours.pt")) == list(torch.load(tmp_path / "plain.pt"))


def test_crashed_rank_marks_the_run_failed(tmp_path):
    job = commands.launch(FIXTURES / "crash_train.py", nproc=2, name="crash")
    assert job.wait(120) != 0
    jobs = {j["id"]: j for j in commands.jobs().data["jobs"]}
    assert jobs[job.id]["state"] == "failed"
    errors = [e for e in job.run_dir.events() if e["kind"] == "error"]
    assert any("crashed on purpose" in e["reason"] for e in errors)
    info = job.run_dir.info()  # the run says why in the crashed rank's words, not "torchrun exited with code 1"
    assert (info["exit_code"], info["error"]) == (1, "rank 1: RuntimeError: rank 1 crashed on purpose")
    survivors = [e["reason"] for e in errors if e["rank"] == 0]  # unless torchrun's SIGTERM ended rank 0 first
    assert all(r.startswith("peer rank 1 failed first (RuntimeError: rank 1 crashed on purpose); here: ")
               for r in survivors), survivors
    started = time.monotonic()
    with pytest.raises(DSparkError, match="failed"):
        commands.set_policies(job.id, ["memory.activation_checkpointing=full"])
    assert time.monotonic() - started < 5


def test_a_rank_that_exits_with_3_makes_the_run_exit_with_3_and_say_so():
    done = subprocess.run([sys.executable, "-m", "dspark_lab", "run", "--nproc", "2", "--name", "exit3",
                           str(FIXTURES / "crash_train.py"), "exit"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 3, done.stderr[-2000:]
    info = find_run({j["name"]: j["id"] for j in commands.jobs().data["jobs"]}["exit3"]).info()
    assert (info["state"], info["exit_code"], info["error"]) == ("failed", 3, "rank 1: script exited with 3")


def test_a_rank_killed_by_sigkill_is_the_runs_reason_not_the_survivors_closed_connection():
    done = subprocess.run([sys.executable, "-m", "dspark_lab", "run", "--nproc", "2", "--name", "killed",
                           str(FIXTURES / "crash_train.py"), "kill"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 137, done.stderr[-2000:]  # 128 + 9, as a shell reports a process SIGKILL ended
    run_dir = find_run({j["name"]: j["id"] for j in commands.jobs().data["jobs"]}["killed"])
    info = run_dir.info()
    assert (info["state"], info["exit_code"], info["error"]) == ("failed", 137, "rank 1: killed by signal 9 (SIGKILL)")
    assert done.stderr.rstrip().endswith(f"run {run_dir.id} failed (exit code 137): "
                                      "rank 1: killed by signal 9 (SIGKILL)"), done.stderr[-2000:]
    killed = [e for e in run_dir.events() if e["kind"] == "error" and e["rank"] == 1]
    assert [(e["signal"], e["exit_code"], e["source"]) for e in killed] == [(9, 137, "agent")]


def test_ctrl_c_stops_a_torchrun_job_with_exit_code_130_and_no_traceback():
    # the script spends its time in a finalizer, where Python would swallow the KeyboardInterrupt (bootstrap.CtrlC)
    run = subprocess.Popen([sys.executable, "-m", "dspark_lab", "run", "--nproc", "2", "--name", "ctrl-c",
                            str(FIXTURES / "crash_train.py"), "finalizer"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=terminal_sigint)
    try:
        run_id = run.stderr.readline().split()[2]
        run_dir = find_run(run_id)
        deadline = time.monotonic() + 90
        while not run_dir.metrics() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(run.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
        assert run.wait(timeout=120) == 130
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    err = run.stderr.read()
    assert "Traceback" not in err and err.rstrip().endswith(
        f"run {run_id} stopped (exit code 130): interrupted (SIGINT, Ctrl-C)"), err[-2000:]
    info = run_dir.info()
    assert (info["state"], info["exit_code"], info["error"]) == ("stopped", 130, "interrupted (SIGINT, Ctrl-C)")


def test_a_ctrl_c_that_lands_in_a_finalizer_is_raised_again_outside_it():
    class PressesCtrlC:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C arriving while the finalizer runs

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    ctrl_c = CtrlC()
    try:
        with pytest.raises(KeyboardInterrupt):
            PressesCtrlC()
            for _ in range(1000):
                time.sleep(0.001)
    finally:
        ctrl_c.restore()
        signal.signal(signal.SIGINT, previous)
    assert ctrl_c.pressed and sys.unraisablehook is not ctrl_c.unraisable


def test_killed_job_is_reported_failed_and_attach_api_works():
    proc = subprocess.Popen([sys.executable, str(FIXTURES / "attach_train.py"), "100000"],
                            stdout=subprocess.PIPE, text=True)
    try:
        run_id = proc.stdout.readline().strip()
        run_dir = find_run(run_id)
        deadline = time.monotonic() + 30
        while not run_dir.metrics() and time.monotonic() < deadline:
            time.sleep(0.1)
        report = commands.set_policies(run_id, ["memory.activation_checkpointing=every-2"])
        assert report.data["state"] == "applied"
        apply = [e for e in run_dir.events() if e["kind"] == "apply"]
        assert apply[-1]["reason"] == "2 of 4 blocks checkpointed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = {j["id"]: j["state"] for j in commands.jobs().data["jobs"]}[run_id]
    assert state == "failed"
    with pytest.raises(DSparkError):
        commands.policies(run_id)


def test_single_process_compiled_script_refuses_memory_policies_with_the_reason():
    job = commands.launch(FIXTURES / "compile_train.py", ["100000"], nproc=1, name="compiled")
    try:
        wait_for_step(job, 2)
        with pytest.raises(PolicyError, match="torch.compile"):
            commands.set_policies(job.id, ["memory.activation_checkpointing=full"])
        with pytest.raises(PolicyError, match="no DistributedDataParallel"):
            commands.set_policies(job.id, ["comm.grad_sync=ring"])
        assert commands.status(job.id).data["run"]["ranks"] == 1
        assert job.poll() is None
    finally:
        job.stop()
    assert job.run_dir.info()["state"] == "stopped"


def test_torchrun_options_pass_through():
    from dspark_lab.runtime.launch import torchrun_command

    multi = torchrun_command("/x/train.py", ["--lr", "1"], 4, {"nnodes": "2", "node_rank": "1",
                                                                "rdzv_backend": "c10d", "rdzv_endpoint": "h:29400",
                                                                "max_restarts": "3"})
    assert multi[multi.index("-m") + 1] == "dspark_lab.runtime.launchers.agent"  # torchrun's main, hooked
    for flag in ("--nproc-per-node=4", "--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=h:29400", "--max-restarts=3"):
        assert flag in multi
    assert "--standalone" not in multi
    assert multi[-4:] == ["dspark_lab.runtime.bootstrap", "/x/train.py", "--lr", "1"]
    assert "--rdzv-backend=dspark-loopback" in torchrun_command("/x/train.py", [], 1, {})


def test_a_module_runs_as_main_with_its_arguments_on_two_ranks_and_takes_a_live_change(tmp_path):
    """``dspark-lab run -m module_job.train ARGS`` (torchrun's -m): each rank runs the module as ``python -m`` does
    (``__main__``, ``sys.argv[0]`` its file, its own arguments after it), and a live ``set`` reaches both ranks."""
    out = tmp_path / "ran.json"
    job = commands.launch("module_job.train", [str(out), "--step-sleep", "0.02"], nproc=2, name="module",
                          module=True)
    try:
        wait_for_step(job, 2)
        module_file = str(FIXTURES / "module_job" / "train.py")
        assert json.loads(out.read_text()) == {"name": "__main__", "file": module_file,
                                               "argv": [module_file, str(out), "--step-sleep", "0.02"]}
        report = commands.set_policies(job.id, ["comm.grad_sync=tree"])
        assert report.data["state"] == "applied"
        applies = [e for e in events_of(job, report.data["change_id"]) if e["kind"] == "apply"]
        assert sorted(e["rank"] for e in applies) == [0, 1] and len({e["step"] for e in applies}) == 1
        info = commands.status(job.id).data["run"]
        assert (info["script"], info["module"], info["name"]) == ("-m module_job.train", "module_job.train", "module")
    finally:
        job.stop()
    assert job.wait(60) == 0 and job.run_dir.info()["state"] == "stopped"
