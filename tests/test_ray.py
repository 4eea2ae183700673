"""Ray Train: a TorchTrainer whose training function calls dspark_lab.attach gets a run the CLI sees and steers."""

from __future__ import annotations

import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'dspark-lab[ray]')")
pytest.importorskip("ray.train.torch", reason="Ray Train is not installed (pip install 'dspark-lab[ray]')")

from dspark_lab.examples import ray_train  # noqa: E402
from dspark_lab.runtime import commands  # noqa: E402
from dspark_lab.runtime.records import list_runs  # noqa: E402


@pytest.mark.slow
def test_a_ray_train_run_is_seen_and_steered_like_any_other(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_STORAGE", str(tmp_path / "ray"))
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"DSPARK_HOME": str(tmp_path / "home")}})
    try:
        results = []
        fit = threading.Thread(target=lambda: results.append(ray_train.trainer(2, 200, 0.05, "ray-test").fit()))
        fit.start()
        deadline = time.monotonic() + 150
        while not list_runs() or not commands.jobs().data["jobs"][0]["step"]:
            assert time.monotonic() < deadline and fit.is_alive(), "no run appeared under DSPARK_HOME"
            time.sleep(0.5)
        (row,) = commands.jobs().data["jobs"]
        assert row["name"] == "ray-test" and row["ranks"] == 2 and row["state"] == "running"
        reply = commands.set_policies(row["id"], ["memory.activation_checkpointing=full"], timeout=90)
        assert reply.data["state"] == "applied", reply.data
        applies = [e for e in commands.events(row["id"]).data["events"]
                   if e["kind"] == "apply" and e["change_id"] == reply.data["change_id"]]
        assert sorted(e["rank"] for e in applies) == [0, 1] and {e["step"] for e in applies} == {reply.data["step"]}
        fit.join(240)
        assert results and results[0].error is None, results
        metrics = commands.metrics(row["id"], tail=1000).data["metrics"]
        assert {m["rank"] for m in metrics} == {0, 1} and max(m["step"] for m in metrics) == 200
    finally:
        ray.shutdown()
