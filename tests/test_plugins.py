"""The plugin manager: registration, problems, one test per hook, tracing, and entry-point loading."""

from __future__ import annotations

from pathlib import Path

import pluggy
import pytest

import dspark_lab
from dspark_lab import commands, hookspecs
from dspark_lab.allocator import HostPool
from dspark_lab.errors import DSparkError, PolicyError
from dspark_lab.kernels.registry import registered_kernels
from dspark_lab.plugins import RETURNS, make_manager
from dspark_lab.policy import PolicySpec

from conftest import FIXTURE_PLUGINS, write_dist_info


def _hooks_of(plugin) -> set[str]:
    return {name for name in dir(plugin) if name.startswith("dspark_")}


def test_hookimpl_is_importable_from_the_package():
    assert isinstance(dspark_lab.hookimpl, pluggy.HookimplMarker)
    assert dspark_lab.hookimpl.project_name == dspark_lab.PROJECT_NAME == "dspark_lab"


def test_builtin_plugins_register_cleanly(builtin_plugins):
    manager = make_manager(builtin_plugins, entry_points=False)
    manager.backends()
    manager.pm.check_pending()  # raises PluginValidationError for a hookimpl that matches no spec
    assert manager.problems == []
    assert {b.name for b in manager.backends()} >= {"cpu", "nvidia-h100", "nvidia-b200", "amd-mi300x"}


def test_explicit_manager_loads_nothing_installed(fixture_plugin):
    manager = make_manager([fixture_plugin("toy_backend")], entry_points=False)
    assert manager.plugin_names() == ["dspark_fixture_toy_backend"]
    assert [b.name for b in manager.backends()] == ["toy"]


# --- plugins with problems are reported and skipped; the rest keeps working ----------------------------------


def test_unknown_hook_is_reported_and_plugin_skipped(fixture_plugin):
    manager = make_manager([fixture_plugin("unknown_hook"), fixture_plugin("toy_backend")], entry_points=False)
    [problem] = manager.problems
    assert (problem.plugin, problem.stage) == ("dspark_fixture_unknown_hook", "unknown hook")
    assert "dspark_register_backend" in problem.reason and problem.hint
    assert manager.plugin_names() == ["dspark_fixture_toy_backend"]
    manager.pm.check_pending()


def test_bad_signature_is_reported_and_no_half_of_the_plugin_stays(fixture_plugin):
    toy = fixture_plugin("toy_backend")
    manager = make_manager([fixture_plugin("bad_signature"), toy], entry_points=False)
    [problem] = manager.problems
    assert problem.stage == "register" and "vendor_config" in problem.reason
    assert manager.plugin_names() == ["dspark_fixture_toy_backend"]
    # its valid hook (registered by pluggy before the bad one was met) must be gone too
    assert manager.collective_names(manager.backend("toy")) == ["toy-sum"]
    assert all(i.plugin is toy for i in manager.pm.hook.dspark_collective_names.get_hookimpls())


def test_raising_hook_is_reported_once_and_skipped(fixture_plugin):
    manager = make_manager([fixture_plugin("toy_backend"), fixture_plugin("raises_in_hook")], entry_points=False)
    toy = manager.backend("toy")
    for _ in range(3):
        manager._backends = None  # ask again: the problem must not pile up
        assert [b.name for b in manager.backends()] == ["toy"]
        assert manager.collective_names(toy) == ["toy-sum"]
    stages = sorted((p.stage, p.reason) for p in manager.problems)
    assert stages == [("dspark_collective_names", "KeyError: 'toy'"),
                      ("dspark_register_backends", "RuntimeError: vendor library crashed")]


def test_wrong_answers_are_reported_not_crashing(fixture_plugin):
    class Sloppy:
        @dspark_lab.hookimpl
        def dspark_register_backends(self):
            return fixture_plugin("toy_backend").dspark_register_backends()[0]  # a Backend, not a list

        @dspark_lab.hookimpl
        def dspark_register_policies(self):
            return ["memory.fast=1"]

    manager = make_manager([Sloppy()], entry_points=False)
    assert manager.backends() == [] and manager.policies() == {}
    assert sorted(p.reason for p in manager.problems) == ["returned Backend, not a list",
                                                          "returned a str, not a PolicySpec"]


def test_duplicate_backend_name_keeps_the_first(fixture_plugin):
    first, second = fixture_plugin("toy_backend"), fixture_plugin("toy_backend")
    manager = make_manager([first], entry_points=False)
    manager.register(second, name="toy-again")
    [backend] = manager.backends()
    assert backend.plugin == "dspark_fixture_toy_backend"
    [problem] = manager.problems
    assert problem.plugin == "toy-again" and "already registered" in problem.reason


# --- one test per hook -------------------------------------------------------------------------------------


@pytest.fixture
def toy(fixture_plugin):
    plugin = fixture_plugin("toy_backend")
    manager = make_manager([plugin], entry_points=False)
    return manager, plugin, manager.backend("toy")


def test_every_hook_has_a_test_here():
    specs = {name for name in dir(hookspecs) if name.startswith("dspark_")}
    tested = {name.removeprefix("test_hook_") for name in globals() if name.startswith("test_hook_")}
    assert specs == tested


def test_hook_dspark_register_backends(toy):
    manager, _, backend = toy
    assert (backend.vendor, backend.plugin, backend.spec.bf16_tflops) == ("toyco", "dspark_fixture_toy_backend", 1.5)
    assert backend.availability().devices == 3
    with pytest.raises(DSparkError, match="unknown backend 'nope'; registered: toy"):
        manager.backend("nope")


def test_hook_dspark_register_kernels(toy):
    manager, plugin, backend = toy
    [(name, [kernel])] = manager.call_each("dspark_register_kernels", backend=backend)
    assert name == "dspark_fixture_toy_backend"
    assert (kernel.name, kernel.backend, kernel.reference) == ("double", "toy", plugin.toy_kernel)


def test_hook_dspark_register_policies(toy):
    manager, _, _ = toy
    [spec] = manager.policies().values()
    assert isinstance(spec, PolicySpec) and spec.key == "toy.level" and spec.validate("2") == 2


def test_hook_dspark_collective_names(toy, builtin_plugins):
    manager, _, backend = toy
    assert manager.collective_names(backend) == ["toy-sum"]
    for plugin in builtin_plugins:
        manager.register(plugin)
    assert "toy-sum" not in manager.collective_names(manager.backend("cpu"))


def test_a_plugins_collective_is_a_grad_sync_choice_and_refused_where_its_backend_is_not(toy, builtin_plugins):
    from types import SimpleNamespace

    from dspark_lab.runtime.policies import builtin

    manager, _, _ = toy
    for plugin in builtin_plugins:
        manager.register(plugin)
    manager.register(builtin)
    spec = manager.policies()["comm.grad_sync"]
    assert spec.validate("toy-sum") == "toy-sum" and "toy-sum" in spec.allowed()
    with pytest.raises(PolicyError, match="allowed: builtin .*toy-sum"):
        spec.validate("nope")
    grad_sync = SimpleNamespace(refusal=lambda: None)
    job = SimpleNamespace(model=None, fsdp=False, state={"comm": SimpleNamespace(grad_sync=grad_sync)}, manager=manager,
                          backend=manager.backend("cpu"))
    assert "backend cpu offers no 'toy-sum' collective" in builtin.refusal(job, "comm.grad_sync", "toy-sum")
    job.backend = manager.backend("toy")
    assert builtin.refusal(job, "comm.grad_sync", "toy-sum") is None


def test_hook_dspark_doctor_checks(toy):
    from dspark_lab import commands

    manager, _, _ = toy
    doc = commands.doctor(manager).to_dict()
    [row] = [c for c in doc["checks"] if c["check"] == "toy driver"]
    assert row == {"check": "toy driver", "status": "missing", "detail": "no toy driver here",
                   "hint": "install toyco's driver"}
    assert doc["problems"] == 0  # "missing" is not a problem


def test_hook_dspark_make_collective(toy):
    manager, plugin, backend = toy
    collective = manager.make_collective(backend, "toy-sum", group="g")
    assert isinstance(collective, plugin.ToyCollective) and collective.group == "g"
    with pytest.raises(DSparkError, match="'ring' is not offered for backend toy; allowed: toy-sum"):
        manager.make_collective(backend, "ring")


def test_later_plugin_overrides_a_firstresult_hook(toy):
    manager, plugin, backend = toy

    class Override:
        @dspark_lab.hookimpl
        def dspark_make_collective(self, backend, name, group):
            return plugin.ToyCollective("override") if name == "toy-sum" else None

    manager.register(Override())
    assert manager.make_collective(backend, "toy-sum").group == "override"


def test_hook_dspark_topology(toy, builtin_plugins):
    from dspark_lab.collectives.packing import plan
    from dspark_lab.collectives.topology import backend_topology

    manager, _, backend = toy
    topo = backend_topology(manager, backend, [0, 1, 2, 3])
    assert topo.devices == ["toy0", "toy1", "toy2", "toy3"] and topo.capacity()[("toy0", "toy1")] == 40.0
    # the planner uses what the plugin reported: the cut between the two pairs is four 5 GB/s bridges
    assert plan(topo).bound_gb_s == pytest.approx(20.0)
    assert backend_topology(manager, backend, [-1]) is None
    assert any(p.stage == "dspark_topology" and "links" in p.reason for p in manager.problems)
    # the cpu backend reports its ranks meeting in shared memory
    cpu_manager = make_manager(builtin_plugins, entry_points=False)
    loopback = backend_topology(cpu_manager, cpu_manager.backend("cpu"), [0, 1, 2])
    assert loopback.devices == ["rank0", "rank1", "rank2"] and loopback.switches == ["loopback"]


def test_hook_dspark_make_allocator(toy):
    manager, _, backend = toy
    pool = manager.make_allocator(backend, {"pool_mb": 1})
    assert isinstance(pool, HostPool) and pool.limit_bytes == 2**20
    manager.pm.unregister(name="dspark_fixture_toy_backend")
    with pytest.raises(DSparkError, match="no plugin makes a host allocator for backend toy"):
        manager.make_allocator(backend)


def test_hook_dspark_device_sampler(toy):
    manager, _, backend = toy
    sample = manager.device_sampler(backend)()
    assert sample == {"utilization_pct": 50.0, "memory_used_gb": 1.0, "memory_total_gb": 2.0}


def test_hook_dspark_apply_policy(toy):
    manager, plugin, _ = toy
    note = manager.call_first("dspark_apply_policy", job=None, key="toy.level", value=2, old=1)
    assert note == "toy level 1 -> 2" and plugin.APPLIED == [("toy.level", 2, 1)]
    assert manager.call_first("dspark_apply_policy", job=None, key="memory.other", value=1, old=0) is None


def test_hook_dspark_launchers(toy, tmp_path):
    from dspark_lab.runtime import launchers
    from dspark_lab.runtime.launchers import builtin

    manager, plugin, _ = toy
    manager.register(builtin, name="launchers")
    assert list(launchers.launchers(manager)) == ["python", "torchrun", "toy"]
    toy_launcher = launchers.get_launcher("toy", manager)
    assert toy_launcher.command("/x/t.py", ["-a"], 2, {})[:2] == ["env", "TOY_LAUNCHED=1"]
    with pytest.raises(DSparkError, match="--nproc: the toy launcher"):
        toy_launcher.validate(3, {})
    assert launchers.get_launcher(None, manager).name == "torchrun"


def _step_job(tmp_path, manager, steps: int):
    """A one-rank Job on a tiny model, taken through ``steps`` optimizer steps and closed."""
    import torch

    from dspark_lab.runtime.attach import Job
    from dspark_lab.runtime.records import RunDir

    job = Job(RunDir.create("20260101-000000-feed00", {"name": "probe"}, root=tmp_path), rank=0, world=1,
              manager=manager)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    job.set_model(model)
    for _ in range(steps):
        job.on_step_begin(optimizer)
        job.on_step_end(optimizer)
    job.close()
    return job


def test_hook_dspark_step_end(tmp_path):
    from dspark_lab import hookimpl
    from dspark_lab.backends import cpu
    from dspark_lab.runtime.policies import builtin

    class StepProbe:
        seen = []

        @hookimpl
        def dspark_step_end(self, job, step):
            self.seen.append((job.rank, step))
            return {"probe_step": step}

    manager = make_manager([cpu, builtin, StepProbe()], entry_points=False)
    job = _step_job(tmp_path, manager, steps=2)
    assert StepProbe.seen == [(0, 1), (0, 2)]
    assert [m["probe_step"] for m in job.run_dir.metrics()] == [1, 2]


# --- one dispatch path: every hook call is isolated per implementation and checked against its return type ----


@pytest.mark.parametrize("name, hook", [("wrapper_sampler", "dspark_device_sampler"),
                                        ("old_wrapper", "dspark_step_end")])
def test_wrappers_are_refused_at_registration(fixture_plugin, name, hook):
    manager = make_manager([fixture_plugin("toy_backend"), fixture_plugin(name)], entry_points=False)
    [problem] = manager.problems
    assert (problem.plugin, problem.stage) == (f"dspark_fixture_{name}", "register")
    assert problem.reason == f"{hook}: a wrapper implementation" and "no wrappers" in problem.hint
    assert manager.plugin_names() == ["dspark_fixture_toy_backend"]
    sampler = manager.device_sampler(manager.backend("toy"))
    assert sampler()["utilization_pct"] == 50.0  # the toy's own sampler, not a wrapper's generator


def test_a_wrapper_registered_behind_the_managers_back_is_skipped(fixture_plugin):
    manager = make_manager([fixture_plugin("toy_backend")], entry_points=False)
    manager.pm.register(fixture_plugin("wrapper_sampler"), name="sneaky")
    assert manager.device_sampler(manager.backend("toy"))()["memory_total_gb"] == 2.0
    assert [(p.plugin, p.reason) for p in manager.problems] == [("sneaky", "a wrapper implementation")]


def test_wrong_answers_of_every_kind_are_problems_and_the_good_answers_stay(fixture_plugin):
    toy = fixture_plugin("toy_backend")
    manager = make_manager([toy, fixture_plugin("sloppy_answers")], entry_points=False)
    backend = manager.backend("toy")
    assert [k.name for k in registered_kernels(manager)] == ["double"]
    assert manager.device_sampler(backend)()["memory_used_gb"] == 1.0
    assert isinstance(manager.make_allocator(backend), HostPool)
    assert manager.call_first("dspark_apply_policy", job=None, key="toy.level", value=2, old=1) == "toy level 1 -> 2"
    assert {p.stage: p.reason for p in manager.problems} == {
        "dspark_register_kernels": "returned Kernel, not a list",
        "dspark_device_sampler": "returned dict, not a callable",
        "dspark_make_allocator": "returned object, which has no empty(), release(), stats()",
        "dspark_apply_policy": "returned int, not a str",
    }


def test_kernels_command_survives_a_plugin_that_returns_one_kernel(fixture_plugin):
    manager = make_manager([fixture_plugin("toy_backend"), fixture_plugin("sloppy_answers")], entry_points=False)
    report = commands.kernels(manager)
    assert [(r["backend"], r["kernel"], r["state"]) for r in report.data["kernels"]] == [("toy", "double", "runnable")]
    [problem] = manager.problems
    assert (problem.plugin, problem.reason) == ("dspark_fixture_sloppy_answers", "returned Kernel, not a list")


@pytest.mark.parametrize("answer, reason", [
    (["loads"], "returned list, not a dict"),
    ({"step": 3}, "returned the core field(s) step"),
    ({"bad": float("nan")}, "returned a dict that is not plain JSON (ValueError: Out of range float values are not "
                            "JSON compliant)"),
    ({"bad": object()}, "returned a dict that is not plain JSON (TypeError: Object of type object is not JSON "
                        "serializable)"),
])
def test_step_end_answers_must_be_plain_json_records(answer, reason):
    class Probe:
        @dspark_lab.hookimpl
        def dspark_step_end(self, job, step):
            return answer

    class Good:
        @dspark_lab.hookimpl
        def dspark_step_end(self, job, step):
            return {"good": step}

    manager = make_manager([Good(), Probe()], entry_points=False)
    answers = manager.dispatch("dspark_step_end", job=None, step=7)
    assert [a for _, a in answers] == [{"good": 7}]
    assert [p.reason for p in answers.failed] == [reason] and manager.problems == answers.failed


def test_a_raising_step_end_is_recorded_once_and_the_others_still_answer(fixture_plugin):
    class Good:
        @dspark_lab.hookimpl
        def dspark_step_end(self, job, step):
            return {"good": step}

    manager = make_manager([Good(), fixture_plugin("sloppy_answers")], entry_points=False)
    for step in range(1, 4):
        answers = manager.dispatch("dspark_step_end", job=None, step=step)
        assert [a for _, a in answers] == [{"good": step}]
        assert answers.failed[0].reason == f"RuntimeError: plugin bug at step {step}"
    [problem] = manager.problems  # one per plugin and hook, though the message changed every step
    assert problem.reason == "RuntimeError: plugin bug at step 1"


def test_listeners_hear_each_new_problem_once(fixture_plugin):
    manager = make_manager([fixture_plugin("sloppy_answers")], entry_points=False)
    heard = []
    manager.listeners.append(heard.append)
    for step in range(3):
        manager.dispatch("dspark_step_end", job=None, step=step)
    assert [(p.plugin, p.stage, p.reason) for p in heard] == [
        ("dspark_fixture_sloppy_answers", "dspark_step_end", "RuntimeError: plugin bug at step 0")]


def test_apply_policy_refusal_propagates_and_a_broken_implementation_is_skipped(toy):
    manager, plugin, _ = toy

    class Refuses:
        @dspark_lab.hookimpl
        def dspark_apply_policy(self, job, key, value, old):
            if value == 3:
                raise PolicyError(f"{key}: 3 needs a bigger toy")
            return None

    class Broken:
        @dspark_lab.hookimpl
        def dspark_apply_policy(self, job, key, value, old):
            raise RuntimeError("broken")

    manager.register(Refuses())
    manager.register(Broken())
    answers = manager.dispatch("dspark_apply_policy", job=None, key="toy.level", value=2, old=1)
    assert [a for _, a in answers] == ["toy level 1 -> 2"] and plugin.APPLIED == [("toy.level", 2, 1)]
    assert [p.reason for p in answers.failed] == ["RuntimeError: broken"]
    with pytest.raises(PolicyError, match="3 needs a bigger toy"):
        manager.dispatch("dspark_apply_policy", job=None, key="toy.level", value=3, old=2)
    assert plugin.APPLIED == [("toy.level", 2, 1)]  # the refusal stopped the call before the toy applied


def test_dispatch_refuses_a_call_that_does_not_match_the_spec(toy):
    manager, _, backend = toy
    with pytest.raises(TypeError, match="dspark_device_sampler takes backend, got backend, extra"):
        manager.dispatch("dspark_device_sampler", backend=backend, extra=1)
    with pytest.raises(KeyError, match="dspark_nope is not a dspark_lab hook"):
        manager.dispatch("dspark_nope")


def test_every_hook_declares_its_return_type():
    assert set(RETURNS) == {name for name in dir(hookspecs) if name.startswith("dspark_")}


def test_no_hook_is_called_outside_the_dispatch_path():
    root = Path(dspark_lab.__file__).parent.parent
    sources = [p for d in ("dspark_lab", "backends", "kernels", "plugins") for p in (root / d).rglob("*.py")]
    calls = [f"{p.relative_to(root)}:{n}" for p in sources if p.name != "plugins.py" or p.parent.name != "dspark_lab"
             for n, line in enumerate(p.read_text().splitlines(), 1) if ".hook." in line]
    assert calls == []


def test_a_raising_step_end_plugin_does_not_stop_metrics(tmp_path, fixture_plugin):
    from dspark_lab.backends import cpu
    from dspark_lab.runtime.policies import builtin

    manager = make_manager([cpu, builtin, fixture_plugin("sloppy_answers")], entry_points=False)
    job = _step_job(tmp_path, manager, steps=3)
    assert [m["step"] for m in job.run_dir.metrics()] == [1, 2, 3]
    assert "dspark_step_end" in {p.stage for p in manager.problems}


def test_hook_dspark_job_started(tmp_path):
    import torch

    from dspark_lab import hookimpl
    from dspark_lab.backends import cpu
    from dspark_lab.runtime.attach import Job
    from dspark_lab.runtime.policies import builtin
    from dspark_lab.runtime.records import RunDir

    class Counter:
        def __init__(self):
            self.models = []

        def on_model(self, job):
            self.models.append(type(job.model).__name__)

    class StateOwner:
        @hookimpl
        def dspark_job_started(self, job):
            job.state["probe"] = Counter()

    manager = make_manager([cpu, builtin, StateOwner()], entry_points=False)
    job = Job(RunDir.create("20260101-000000-feed01", {"name": "probe"}, root=tmp_path), rank=0, world=1,
              manager=manager)
    assert job.state["probe"].models == []  # created with the job, before any model
    job.set_model(torch.nn.Linear(2, 2))
    job.close()
    assert job.state["probe"].models == ["Linear"] and set(job.state) == {"comm", "moe", "pipeline", "probe"}


# --- tracing -------------------------------------------------------------------------------------------------


def test_trace_writes_each_hook_call(fixture_plugin, monkeypatch, capsys):
    monkeypatch.setenv("DSPARK_TRACE_PLUGINS", "1")
    make_manager([fixture_plugin("toy_backend")], entry_points=False).backends()
    assert "dspark-lab plugin trace: dspark_register_backends -> dspark_fixture_toy_backend" in capsys.readouterr().err
    monkeypatch.setenv("DSPARK_TRACE_PLUGINS", "0")
    make_manager([fixture_plugin("toy_backend")], entry_points=False).backends()
    assert capsys.readouterr().err == ""


# --- entry points --------------------------------------------------------------------------------------------


@pytest.fixture
def fixture_distribution(tmp_path, monkeypatch):
    """Install the fixture plugins as one distribution's entry points, found by importlib.metadata for real."""
    write_dist_info(tmp_path, "dspark-fixture-plugins", {
        "toy": "toy_backend", "fails-import": "fails_import", "raises": "raises_in_hook",
        "unknown": "unknown_hook", "badsig": "bad_signature",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(FIXTURE_PLUGINS))
    monkeypatch.delenv("DSPARK_PLUGINS", raising=False)
    return ["toy", "fails-import", "raises", "unknown", "badsig"]


def test_entry_points_load_and_problems_are_reported(fixture_distribution):
    manager = make_manager(only=fixture_distribution)
    assert manager.plugin_names() == ["raises", "toy"]
    assert [b.name for b in manager.backends()] == ["toy"]
    by_plugin = {p.plugin: p for p in manager.problems}
    assert set(by_plugin) == {"fails-import", "unknown", "badsig", "raises"}
    failed = by_plugin["fails-import"]
    assert failed.stage == "import" and "toy_vendor_sdk" in failed.reason
    assert failed.hint == "reinstall dspark-fixture-plugins or uninstall it"


def test_dspark_plugins_env_restricts_loading(fixture_distribution, monkeypatch):
    monkeypatch.setenv("DSPARK_PLUGINS", " toy , cpu ")
    manager = make_manager()
    assert manager.plugin_names() == ["cpu", "toy"] and manager.problems == []


def test_builtins_load_through_the_entry_point_group(monkeypatch):
    monkeypatch.delenv("DSPARK_PLUGINS", raising=False)
    manager = make_manager(only=["cpu", "nvidia", "amd"])
    assert manager.plugin_names() == ["amd", "cpu", "nvidia"] and manager.problems == []
    assert {b.name: b.plugin for b in manager.backends()} == {
        "cpu": "cpu", "amd-mi300x": "amd", "nvidia-unlisted": "nvidia",
        **{f"nvidia-{part}": "nvidia" for part in ("a100", "h100", "h200", "gh200", "b200", "gb200")}}


def test_example_plugin_loads_through_its_entry_point(example_plugin_paths):
    manager = make_manager(only=["gaudi3", "cpu"])
    assert manager.problems == []
    gaudi = manager.backend("intel-gaudi3")
    assert gaudi.plugin == "gaudi3" and gaudi.spec.bf16_tflops == 1835
    assert "halving_doubling" in manager.collective_names(manager.backend("cpu"))


def test_hook_dspark_trace_classifiers():
    from dspark_lab import hookimpl
    from dspark_lab.trace.classify import Pattern, default_classifier

    class GaudiTrace:
        @hookimpl
        def dspark_trace_classifiers(self):
            return [Pattern(name="gaudi-hccl", category="comm", regex=r"^hccl_all_reduce")]

    classifier = default_classifier(make_manager([GaudiTrace()], entry_points=False))
    assert classifier.classify("hccl_all_reduce_bf16").pattern == "gaudi-hccl"
    assert default_classifier(make_manager([], entry_points=False)).classify("hccl_all_reduce_bf16").pattern == "hccl"
