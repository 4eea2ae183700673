"""The per-rank runtime: finds the step boundary, the model and its blocks, owns the policy state, writes records.

``dspark-lab run`` starts it in every rank before the user's script runs (:mod:`.bootstrap`); a script can also
opt in with ``dspark_lab.attach(model, optimizer)``. Either way the torch entry points it listens to are wrapped
once per process (:mod:`.patches`), and autograd saved-tensor hooks count the bytes held for backward (and offload
them when a policy asks).
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import psutil
import torch
import torch.distributed as dist

from dspark_lab.errors import PolicyError
from dspark_lab.plugins import Manager, get_manager
from dspark_lab.runtime import discover
from dspark_lab.runtime.coordinator import Coordinator, PendingChange
from dspark_lab.runtime.limits import short
from dspark_lab.runtime.policies import builtin as builtin_policies
from dspark_lab.runtime.policies import moe as moe_policy
from dspark_lab.runtime.policies.comm import GradSync, install_on_ddp
from dspark_lab.runtime.policies.memory import SavedActivations
from dspark_lab.runtime.records import JsonlWriter, RunDir, new_run_id

SAMPLE_EVERY_S = 1.0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _connect_store(run_id: str):
    """A client of torchrun's TCPStore under a per-run prefix, or None when this process is alone."""
    if _env_int("WORLD_SIZE", 1) == 1 or "MASTER_ADDR" not in os.environ:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    return dist.PrefixStore(f"dspark/{run_id}/", store)


def _backend_for(manager: Manager, device_type: str):
    for backend in manager.backends():
        if backend.torch_device == device_type and backend.availability().available:
            return backend
    return manager.default_backend()


class Job:
    """One rank's view of a run. ``Job.current`` is the process's job once attached."""

    current: "Job | None" = None

    def __init__(self, run_dir: RunDir, *, rank: int, world: int, manager: Manager | None = None,
                 launch_policies: dict[str, Any] | None = None, store=None):
        self.run_dir = run_dir
        self.rank, self.world = rank, world
        self.manager = manager or get_manager()
        self.backend = self.manager.default_backend()
        self.specs = self.manager.policies()
        self.policies = {key: spec.default for key, spec in self.specs.items()}
        self.since = {key: 0 for key in self.specs}
        self.launch_policies = self.validate(launch_policies or {}, live_only=False)
        self.model = self.optimizer = self.ddp = None
        self.blocks: list = []
        self.fsdp = self.compiled = False
        self.grad_sync: GradSync | None = None
        self.moe = None  # ExpertPlacement when the model has expert-parallel MoE layers
        self.step = 0
        self._param_storages: set[int] = set()
        self.activations = SavedActivations(lambda: self._param_storages, self._make_host_allocator)
        self.coordinator = Coordinator(self, store, rank, world)
        self._events = JsonlWriter(run_dir.events_path)
        self._metrics = JsonlWriter(run_dir.metrics_path)
        self._process = psutil.Process()
        self._sampler = None
        self._last_sample = 0.0
        self._reset_step_counters(time.perf_counter())
        self.server = None
        self._runtime_error_logged = False

    # --- policy state ------------------------------------------------------------------------------------------

    def validate(self, changes: dict[str, Any], *, live_only: bool = True) -> dict[str, Any]:
        """Parse ``changes`` against the schema; raise PolicyError (one line) for the first bad key or value."""
        parsed = {}
        for key, value in changes.items():
            spec = self.specs.get(key)
            if spec is None:
                raise PolicyError(f"{key}: unknown policy; known: {', '.join(self.specs)}")
            parsed[key] = spec.validate(value)
            if live_only and not spec.live:
                raise PolicyError(f"{key} is launch-only: set it with `dspark-lab run --policy {key}=VALUE`")
            if live_only and key in builtin_policies.SPECS_BY_KEY:
                reason = builtin_policies.refusal(self, key, parsed[key])
                if reason:
                    raise PolicyError(f"{key}: {reason}")
        return parsed

    def request(self, changes: dict[str, Any], kind: str = "change") -> PendingChange:
        """Rank 0: validate and queue a change (or a stop); a refusal is logged once and raised."""
        try:
            parsed = self.validate(changes) if kind == "change" else {}
        except PolicyError as exc:
            self.record_event("refuse", step=self.step, rank=None, reason=short(str(exc), 300),
                              changes={short(k): short(v) for k, v in changes.items()})
            raise
        return self.coordinator.submit(parsed, kind)

    def apply_changes(self, changes: dict[str, Any]) -> tuple[str, list[tuple]]:
        """Apply every key in order; stop at the first failure. Returns (failure reason or "", what was applied)."""
        applied = []
        for key, value in changes.items():
            old = self.policies[key]
            try:
                note = self.manager.pm.hook.dspark_apply_policy(job=self, key=key, value=value, old=old)
                if note is None:
                    raise PolicyError(f"{key}: no plugin applies this policy")
            except Exception as exc:  # a failing apply must never take the job down: it rolls back
                return f"{key}={value}: {exc}", applied
            applied.append((key, old, value, note))
        return "", applied

    def commit_changes(self, applied, announcement, note: str = "") -> None:
        for key, old, new, apply_note in applied:
            self.policies[key] = new
            self.since[key] = announcement["step"]
            self.record_event("apply", step=announcement["step"], rank=self.rank, key=key, old=old, new=new,
                              reason="; ".join(n for n in (apply_note, note) if n),
                              change_id=announcement["change_id"])

    def rollback_changes(self, applied, announcement, reason: str) -> None:
        for key, old, new, _ in reversed(applied):
            try:
                self.manager.pm.hook.dspark_apply_policy(job=self, key=key, value=old, old=new)
            except Exception as exc:
                reason += f"; restoring {key}={old} failed: {exc}"
        for key, new in announcement["changes"].items():
            self.record_event("rollback", step=announcement["step"], rank=self.rank, key=key,
                              old=self.policies[key], new=new, reason=reason, change_id=announcement["change_id"])

    def pending_changes(self) -> dict[str, PendingChange]:
        return {key: p for p in list(self.coordinator._local.values()) if p.state == "pending" for key in p.changes}

    # --- discovery ---------------------------------------------------------------------------------------------

    def _make_host_allocator(self):
        return self.manager.make_allocator(self.backend, {})

    def set_model(self, model, blocks=None) -> None:
        inner = discover.unwrap(model)
        self.compiled = self.compiled or discover.is_compiled(model)
        self.model = inner
        self.fsdp = discover.is_fsdp(inner)
        self.blocks = list(blocks) if blocks is not None else discover.repeated_blocks(inner)
        self._param_storages = {p.untyped_storage().data_ptr() for p in inner.parameters()}
        first = next(inner.parameters(), None)
        if first is not None:
            self.backend = _backend_for(self.manager, first.device.type)
        inner.register_forward_pre_hook(self._count_batch, with_kwargs=True)
        layers = moe_policy.moe_layers(inner)
        if layers and self.moe is None:
            self.moe = moe_policy.ExpertPlacement(layers, self.rank, self.world)

    def on_ddp(self, ddp) -> None:
        """Called right after a DistributedDataParallel is constructed."""
        self.ddp = ddp
        self.set_model(ddp.module)
        group = getattr(ddp, "process_group", None)
        self.grad_sync = GradSync(lambda name, grp: self.manager.make_collective(self.backend, name, grp),
                                  group=None if group is dist.GroupMember.WORLD else group)
        install_on_ddp(ddp, self.grad_sync)
        self._apply_launch_policies(("comm.",))

    def _apply_launch_policies(self, prefixes: tuple[str, ...]) -> None:
        changes = {k: v for k, v in self.launch_policies.items() if k.startswith(prefixes)}
        changes = {k: v for k, v in changes.items() if v != self.policies[k]}
        if not changes:
            return
        failure, applied = self.apply_changes(changes)
        announcement = {"step": self.step + 1, "changes": changes, "change_id": "launch"}
        if failure:
            self.rollback_changes(applied, announcement, failure)
        else:
            self.commit_changes(applied, announcement, "set at launch")

    # --- per-step bookkeeping ----------------------------------------------------------------------------------

    def _reset_step_counters(self, now: float) -> None:
        self._last_boundary = now
        self._first_backward = None
        self._backward_s = 0.0
        self._optimizer_start = None
        self._loss = None
        self._samples = 0
        self._tokens = 0

    def _count_batch(self, module, args, kwargs):
        first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is not None and first.dim() > 0:
            self._samples += first.shape[0]
            if not first.is_floating_point() and first.dim() >= 2:
                self._tokens += first.numel()

    def on_backward(self, tensors, run):
        start = time.perf_counter()
        if self._first_backward is None:
            self._first_backward = start
        if isinstance(tensors, torch.Tensor) and tensors.numel() == 1:
            self._loss = tensors.detach()
        try:
            return run()
        finally:
            self._backward_s += time.perf_counter() - start

    def on_step_begin(self, optimizer) -> None:
        if self.optimizer is None or optimizer is self.optimizer:
            self._optimizer_start = time.perf_counter()

    def on_step_end(self, optimizer) -> None:
        if self.optimizer is None:
            self.optimizer = optimizer
            if self.model is None:
                model = discover.model_of_optimizer(optimizer)
                if model is not None:
                    self.set_model(model)
        elif optimizer is not self.optimizer:
            return
        now = time.perf_counter()
        self.step += 1
        self._write_metrics(now)
        self._reset_step_counters(now)
        if self.step == 1:
            self.policies.update(builtin_policies.observed_values(self))
            self._apply_launch_policies(("memory.", "sched.", "moe."))
        self.coordinator.at_boundary(self.step)

    def _write_metrics(self, now: float) -> None:
        record = self._metrics_record(now)
        for extra in self.manager.pm.hook.dspark_step_end(job=self, step=self.step):
            record.update(extra)
        self._metrics.write(record)

    def _metrics_record(self, now: float) -> dict[str, Any]:
        step_time = now - self._last_boundary
        record: dict[str, Any] = {
            "time": time.time(), "step": self.step, "rank": self.rank,
            "step_time_s": step_time,
            "forward_s": (self._first_backward - self._last_boundary) if self._first_backward else None,
            "backward_s": self._backward_s or None,
            "optimizer_s": (now - self._optimizer_start) if self._optimizer_start else None,
            "comm_s": self.grad_sync.take_comm_time() if self.grad_sync else None,
            "loss": float(self._loss.item()) if self._loss is not None else None,
            "samples_per_s": self._samples / step_time if self._samples else None,
            "tokens_per_s": self._tokens / step_time if self._tokens else None,
            "peak_activation_bytes": self.activations.reset_peak(),
            "rss_bytes": self._process.memory_info().rss,
        }
        if self.backend.torch_device == "cuda" and torch.cuda.is_available():
            record["memory_allocated_bytes"] = torch.cuda.memory_allocated()
            record["memory_peak_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if now - self._last_sample >= SAMPLE_EVERY_S:
            record["device"] = self._sample()
            self._last_sample = now
        return record

    def _sample(self) -> dict | None:
        if self._sampler is None:
            self._sampler = self.manager.device_sampler(self.backend) or (lambda: None)
        try:
            return self._sampler()
        except Exception as exc:  # a vendor library hiccup must not stop training
            return {"error": str(exc)}

    # --- records -----------------------------------------------------------------------------------------------

    def record_event(self, kind: str, *, step: int | None, rank: int | None, key: str | None = None,
                     old: Any = None, new: Any = None, reason: str = "", change_id: str | None = None,
                     **extra: Any) -> None:
        self._events.write({"time": time.time(), "step": step, "rank": rank, "kind": kind, "key": key,
                            "old": old, "new": new, "reason": reason, "change_id": change_id, **extra})

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.activations.uninstall()


def start_job(run_dir: RunDir, *, launch_policies: dict[str, Any] | None = None, store=None,
              manager: Manager | None = None) -> Job:
    """Create this process's Job, install the hooks, and (rank 0) serve the control endpoint."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    store = store if store is not None else _connect_store(run_dir.id)
    job = Job(run_dir, rank=rank, world=world, manager=manager, launch_policies=launch_policies, store=store)
    Job.current = job
    from dspark_lab.runtime.patches import install_patches

    install_patches()
    job.activations.install()
    if rank == 0:
        from dspark_lab.runtime.control import ControlServer

        job.server = ControlServer(job)  # publishes its endpoint in control.json; run.json is the supervisor's
    job.record_event("start", step=0, rank=rank, reason=f"backend {job.backend.name}, world {world}")
    return job


def attach(model=None, optimizer=None, *, blocks=None, policies: dict[str, Any] | None = None,
           name: str | None = None) -> Job:
    """Opt a script into the live runtime: ``job = dspark_lab.attach(model, optimizer)``.

    Under ``dspark-lab run`` this hands the runtime the model and optimizer instead of letting it discover them.
    Run directly (``python train.py`` or plain torchrun), it creates the run directory itself and rank 0 serves
    the control endpoint, so ``dspark-lab set`` works the same. ``blocks`` overrides the repeated-block discovery.
    """
    job = Job.current
    if job is None:
        run_dir = _own_run_dir(name, policies or {})
        job = start_job(run_dir, launch_policies=policies)
    if model is not None:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and job.ddp is None:
            raise PolicyError("attach: call dspark_lab.attach before wrapping the model in DistributedDataParallel, "
                              "or pass the DDP model's module")
        job.set_model(model, blocks)
    if optimizer is not None:
        job.optimizer = optimizer
    return job


def _own_run_dir(name: str | None, policies: dict[str, Any]) -> RunDir:
    """The run directory of a script that attached by itself; rank 0 makes it and tells the others via the store."""
    import sys

    if os.environ.get("DSPARK_RUN_DIR"):
        return RunDir(os.environ["DSPARK_RUN_DIR"])
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "<interactive>"
    if rank == 0:
        run_dir = RunDir.create(new_run_id(), {
            "name": name or os.path.basename(script), "state": "running", "command": sys.argv, "script": script,
            "script_args": sys.argv[1:], "cwd": os.getcwd(), "start_time": time.time(), "ranks": world,
            "launcher_pid": os.getpid(), "launcher_start": psutil.Process().create_time(),
            "launch_policies": policies,
        })
        if world > 1:
            _connect_store("attach").set("run_dir", str(run_dir.path))
        return run_dir
    return RunDir(_connect_store("attach").get("run_dir").decode())
