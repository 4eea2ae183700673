"""The per-rank runtime: one :class:`Job` per process finds the model, owns the step boundary and writes records.

``dspark-lab run`` starts it in every rank before the user's script runs (:mod:`.bootstrap`); a script can also
opt in with ``dspark_lab.attach(model, optimizer)``. Either way the torch entry points it listens to are wrapped
once per process (:mod:`.patches`), and autograd saved-tensor hooks count the bytes held for backward (and offload
them when a policy asks).

Wrapping order (the one place it is written down; docs/runtime.md repeats it). From the outside in, as a step
runs through them:

1. ``torch.compile`` (the script's, outermost when it compiles the whole model): a compiled graph saves its
   activations through autograd, so the saved-tensor hooks (5.) count and offload them; checkpointing wraps a
   block compiled on its own from outside its graph, and is refused on blocks inside a bigger compiled graph
   rather than forcing a recompile (:mod:`.policies.compiled`); compiling a plain function (torchtitan's
   ``flex_attention``) touches no module and changes nothing here.
2. FSDP2 / FSDP1 / TP (the script's ``fully_shard``, ``FullyShardedDataParallel`` and ``parallelize_module``,
   applied before the first step): the runtime never re-wraps these. FSDP2's module hooks run around
   ``module.forward`` and an FSDP1 unit's forward around its wrapped module's, so anything the runtime puts inside
   that ``forward`` sees unsharded parameters in forward and, since both unshard again before a block's backward,
   in recompute too.
3. Activation checkpointing: an instance ``forward`` on each chosen block, inside FSDP2's hooks (what torchtitan
   gets by wrapping blocks before ``fully_shard``) or, under FSDP1, on the module an FSDP1 unit wraps (what
   ``apply_activation_checkpointing`` after wrapping gets), so ``state_dict`` keys and FSDP units never change.
4. DDP comm hook: registered once when DDP is constructed (DDP allows one, before the first forward); the
   runtime's dispatcher switches collectives inside it, so it never has to be re-registered.
5. Saved-tensor hooks (innermost, a thread-wide context pushed at start): they see every tensor autograd keeps,
   after checkpointing decided what is kept, so the byte count is of what is really held; parameters (and
   DTensor shards) are passed through untouched.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

from dspark_lab.errors import DSparkError, PolicyError
from dspark_lab.plugins import Manager, get_manager
from dspark_lab.runtime import discover, fsdp1
from dspark_lab.runtime.cluster import Cluster
from dspark_lab.runtime.nodes import run_store as connect_run_store
from dspark_lab.runtime.coordinator import Coordinator, PendingChange
from dspark_lab.runtime.jobinfo import describe
from dspark_lab.runtime.metering import StepMeter
from dspark_lab.runtime.module_hooks import RuntimeHook
from dspark_lab.runtime.patches import install_patches
from dspark_lab.runtime.limits import short
from dspark_lab.runtime.policies import builtin as builtin_policies, compiled
from dspark_lab.runtime.policies.memory import SavedActivations
from dspark_lab.runtime.policy_state import PolicyState
from dspark_lab.runtime.launchers.multinode import run_id_for
from dspark_lab.runtime.records import (CONTROL_HOST_VARIABLE, RUN_DIR_VARIABLE, JsonlWriter, RunDir, new_run_id,
                                        runs_root, trusted_run_dir)


RIVAL_STEPS = 2  # steps of another optimizer, while the job's does not step, that make it the job's


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _backend_for(manager: Manager, device_type: str):
    for backend in manager.backends():
        if backend.torch_device == device_type and backend.availability().available:
            return backend
    return manager.default_backend()


class Job:
    """One rank's view of a run. ``Job.current`` is the process's job once attached.

    Three pieces do the work: :class:`.policy_state.PolicyState` (values in force, validate / apply / commit /
    rollback), :class:`.metering.StepMeter` (one metrics record per step) and discovery (:mod:`.discover`, the
    ``job`` description in :mod:`.jobinfo`). Policies keep their own per-job state in ``job.state``, created by
    their ``dspark_job_started(job)`` hook; a state object may define ``on_model(job)`` and ``on_ddp(job, ddp)``.
    """

    current: "Job | None" = None

    def __init__(self, run_dir: RunDir, *, rank: int, world: int, manager: Manager | None = None,
                 launch_policies: dict[str, Any] | None = None, store=None,
                 registered: dict[str, Any] | None = None):
        self.run_dir = run_dir
        self.rank, self.world = rank, world
        self.manager = manager or get_manager()
        self.backend = self.manager.default_backend()
        self._events = JsonlWriter(run_dir.events_path)
        self._metrics = run_dir.metrics_writer()  # rotates past DSPARK_METRICS_MAX_MB (runtime/rotation.py)
        self.model = self.ddp = None
        self._optimizer: Callable[[], Any] | None = None  # the one whose steps are the job's steps (see on_step_end)
        self.optimizer_pinned = False  # handed over by attach(optimizer=...)
        self._rival: tuple[Callable[[], Any], int] | None = None  # another optimizer, and its steps since ours last did
        self.discovered = False  # set at the first optimizer step, or when attach() hands over the model
        self.found_blocks = discover.Blocks()
        self.blocks: list = []
        self.fsdp = False
        self.fsdp_kind = ""  # "fsdp2" (fully_shard) or "fsdp1" (FullyShardedDataParallel) when sharded
        self.compiled: list[str] | bool = []  # paths of modules running under torch.compile
        self.compiled_ids: set[int] = set()
        self.compiled_functions = 0
        self.spawned = 0  # worker processes the script started itself (on_spawn)
        self.registered: dict[str, Any] = dict(registered or {})  # attach(pipeline=..., moe_layers=...)
        self.step = 0
        self.stepped = threading.Condition()  # notified at every step's end, for threads that wait on steps
        self._param_storages: set[int] = set()
        self.activations = SavedActivations(lambda: self._param_storages, self._make_host_allocator)
        self.policy_state = PolicyState(self, launch_policies)
        self.specs, self.policies, self.since = (self.policy_state.specs, self.policy_state.values,
                                                 self.policy_state.since)
        self.launch_policies = self.policy_state.launch
        self.meter = StepMeter(self)
        self.coordinator = Coordinator(self, store, rank, world)
        self.server = None
        self.cluster = None  # runtime.cluster.Cluster under torchrun: restarts and other nodes
        self._runtime_error_logged = False
        self.records_lost = 0  # records a full or failing disk did not take (_write)
        self.state: dict[str, Any] = {}
        # a plugin's bug must not stop the job from starting: dispatch records it, the job logs it once
        for problem in self.manager.dispatch("dspark_job_started", job=self).failed:
            self.record_event("error", step=0, rank=rank, reason=f"dspark_job_started: {problem.plugin} failed: "
                                                                 f"{problem.reason}")

    # --- policy state (kept by PolicyState; the coordinator and control endpoint call these) ------------------

    def validate(self, changes: dict[str, Any], *, live_only: bool = True) -> dict[str, Any]:
        return self.policy_state.validate(changes, live_only=live_only)

    def request(self, changes: dict[str, Any], kind: str = "change") -> PendingChange:
        """Rank 0: validate and queue a change (or a stop); a refusal is logged once and raised."""
        try:
            parsed = self.validate(changes) if kind == "change" else {}
        except PolicyError as exc:
            one = next(iter(changes.items())) if len(changes) == 1 else (None, None)  # the key, for event tables
            self.record_event("refuse", step=self.step, rank=None, reason=short(str(exc), 300),
                              key=short(one[0]) if one[0] is not None else None,
                              new=short(one[1]) if one[0] is not None else None,
                              changes={short(k): short(v) for k, v in changes.items()})
            raise
        return self.coordinator.submit(parsed, kind)

    def apply_changes(self, changes: dict[str, Any]) -> tuple[str, list[tuple]]:
        return self.policy_state.apply(changes)

    def commit_changes(self, applied, announcement, note: str = "") -> None:
        self.policy_state.commit(applied, announcement, note)

    def rollback_changes(self, applied, announcement, reason: str) -> None:
        self.policy_state.rollback(applied, announcement, reason)

    def pending_changes(self) -> dict[str, PendingChange]:
        return {key: p for p in list(self.coordinator._local.values()) if p.state == "pending" for key in p.changes}

    # --- discovery ---------------------------------------------------------------------------------------------

    def _make_host_allocator(self):
        return self.manager.make_allocator(self.backend, {})

    def set_model(self, model, blocks=None) -> None:
        inner = discover.unwrap(model)
        self.compiled = discover.compiled_paths(model, self.compiled_ids) or \
            discover.compiled_paths(inner, self.compiled_ids)
        self.model = inner
        self.fsdp = discover.is_fsdp(inner)
        self.fsdp_kind = "fsdp2" if discover.fsdp2_modules(inner) else ("fsdp1" if self.fsdp else "")
        if blocks is not None:
            blocks = [fsdp1.inner(block) for block in blocks]  # checkpointed inside an FSDP1 unit, never the unit
            kind = type(blocks[0]).__name__ if blocks else ""
            self.found_blocks = discover.Blocks(blocks, kind, "blocks=", "passed to dspark_lab.attach(blocks=...)")
        else:
            self.found_blocks = discover.find_blocks(inner)
        self.blocks = self.found_blocks.modules
        self.activations.track_blocks(compiled.hookable_blocks(self))  # offload prefetches a block ahead of backward
        self._param_storages = param_storages(inner)
        self.activations.refresh_params()
        first = next(inner.parameters(), None)
        if first is not None:
            self.backend = _backend_for(self.manager, first.device.type)
        if not self.discovered:
            # on torch.compile's wrapper, whose hooks run outside the graph: traced into it, the batch counter's
            # attributes become guards and every step with another count recompiles
            outer = model if discover.is_optimized_module(model) else inner
            outer.register_forward_pre_hook(RuntimeHook(self.meter.count_batch), with_kwargs=True)
            if self.blocks and not self.compiled:  # autocast entered inside the model's forward (Accelerate's
                # mixed precision); a one-shot hook on a compiled block would be traced into its graph
                self.meter.watch_autocast(self.blocks[0])
        self.discovered = True
        self.notify_states("on_model")

    def on_ddp(self, ddp) -> None:
        """Called right after a DistributedDataParallel is constructed, before its first forward. The first one
        is the job's model; a later one (a GAN's second network) gets the same gradient sync."""
        if self.ddp is not None:
            self.notify_states("on_ddp", ddp)
            return
        self.ddp = ddp
        self.set_model(ddp.module)
        self.notify_states("on_ddp", ddp)
        self.policy_state.apply_launch(("comm.",), self.step + 1)

    def notify_states(self, method: str, *args) -> None:
        """Call ``method(job, *args)`` on every policy state that has it; one failing state does not stop the
        others. A :class:`PolicyError` (a registration that breaks a contract) goes to the caller."""
        for name, state in list(self.state.items()):
            if not hasattr(state, method):
                continue
            try:
                getattr(state, method)(self, *args)
            except PolicyError:
                raise
            except Exception as exc:
                self.record_event("error", step=self.step, rank=self.rank,
                                  reason=f"{name}.{method} failed: {type(exc).__name__}: {exc}")

    def on_compile(self, target) -> None:
        """``torch.compile(target)`` was called: a module is compiled (:mod:`.policies.compiled` says which memory
        policies still apply), a function is not. The saved-tensor hooks stay: compiled graphs save through them."""
        owner = getattr(target, "__self__", None)  # module.compile() compiles the bound module._call_impl
        target = owner if isinstance(owner, torch.nn.Module) else target
        if isinstance(target, torch.nn.Module):
            self.compiled_ids.update(id(m) for m in target.modules())
            if self.model is not None:
                self.compiled = discover.compiled_paths(self.model, self.compiled_ids)
                self.activations.track_blocks(compiled.hookable_blocks(self))
        else:
            self.compiled_functions += 1

    def on_spawn(self, processes: int) -> None:
        """The script starts ``processes`` workers of its own (``torch.multiprocessing.spawn``): they train outside
        the runtime, which stays attached to this process only."""
        self.spawned += processes
        self.record_event("error", step=self.step, rank=self.rank,
                          reason=f"the script started {processes} worker process(es) of its own "
                                 "(torch.multiprocessing); they train without the runtime, so policies cannot "
                                 "reach them: launch the training function once per rank with "
                                 "`dspark-lab run --nproc N` instead")

    def describe(self) -> dict[str, Any]:
        """What this job is (parallelism, compile, precision, blocks, which policies apply): see :mod:`.jobinfo`."""
        try:
            return describe(self)
        except Exception as exc:  # read from another thread while the job trains: never fail the status request
            return {"error": f"discovery failed: {type(exc).__name__}: {exc}"}

    # --- per-step bookkeeping ----------------------------------------------------------------------------------

    def on_backward(self, tensors, run):
        return self.meter.on_backward(tensors, run)

    @property
    def optimizer(self):
        """The optimizer whose ``step()`` ends the job's step (None before the first; held weakly, so an optimizer
        the script dropped is freed)."""
        return self._optimizer() if self._optimizer is not None else None

    @optimizer.setter
    def optimizer(self, optimizer) -> None:
        self._optimizer = _weak(optimizer) if optimizer is not None else None
        self._rival = None

    def on_step_begin(self, optimizer) -> None:
        current = self.optimizer
        if current is None or optimizer is current:
            self.meter.on_step_begin()

    def _follows(self, optimizer) -> bool:
        """Whether ``optimizer``'s step ends the job's step. The first optimizer to step does, until the script
        drops it or (unless attach() named it) another steps twice while it does not: a script that trains in
        phases makes a new optimizer for the next phase, and a GAN's optimizers take turns."""
        current = self.optimizer
        if optimizer is current:
            self._rival = None
            return True
        if current is not None:
            rival = self._rival
            count = rival[1] + 1 if rival is not None and rival[0]() is optimizer else 1
            self._rival = (_weak(optimizer), count)
            if self.optimizer_pinned or count < RIVAL_STEPS:
                return False
        if self.step:
            self.record_event("boundary", step=self.step, rank=self.rank,
                              reason=f"{type(optimizer).__name__} ends each step from now: "
                                     + ("the optimizer before it was dropped" if current is None
                                        else f"it stepped {RIVAL_STEPS} times while {type(current).__name__} "
                                             "did not"))
        self.optimizer = optimizer
        return True

    def on_step_end(self, optimizer) -> None:
        if not self._follows(optimizer):
            return
        if self.model is None and self.step == 0:  # also when attach() handed over only the optimizer
            model = discover.model_of_optimizer(optimizer)
            if model is not None:
                self.set_model(model)
        now = time.perf_counter()
        self.step += 1
        self._write_metrics(now)
        self.meter.reset(now)
        if self.step == 1:
            self.discovered = True
            self.policies.update(builtin_policies.observed_values(self))
            self.policy_state.apply_launch(("memory.", "sched.", "moe.", "compute."), self.step + 1)
        self.coordinator.at_boundary(self.step)
        with self.stepped:
            self.stepped.notify_all()

    def _write_metrics(self, now: float) -> None:
        comm = self.state.get("comm")
        record = self.meter.record(now, self.step, comm.take_comm_time() if comm is not None else None)
        for _, extra in self.manager.dispatch("dspark_step_end", job=self, step=self.step):
            record.update(extra)
        self.meter.write(record)  # its loss may be read one step late (runtime/step_reads.py)

    # --- records -----------------------------------------------------------------------------------------------

    def record_event(self, kind: str, *, step: int | None, rank: int | None, key: str | None = None,
                     old: Any = None, new: Any = None, reason: str = "", change_id: str | None = None,
                     **extra: Any) -> None:
        self._write(self._events, {"time": time.time(), "step": step, "rank": rank, "kind": kind, "key": key,
                                   "old": old, "new": new, "reason": reason, "change_id": change_id, **extra})

    def write_metrics_record(self, record: dict[str, Any]) -> None:
        self._write(self._metrics, record)

    def _write(self, writer, record: dict[str, Any]) -> None:
        """Append a record; a disk that cannot take it (full, gone) costs the record, never the step or the step
        boundary where changes and stops apply. Said once on stderr; ``records_lost`` counts them."""
        try:
            writer.write(record)
        except OSError as exc:
            self.records_lost += 1
            if self.records_lost == 1:
                print(f"dspark-lab: rank {self.rank}: a record could not be written ({exc}); the job goes on, "
                      "records are lost until the disk takes them again", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.meter.flush()
        if self.server is not None:
            self.server.close()
        if self.cluster is not None:
            self.cluster.close()
        self.activations.uninstall()


def _weak(obj) -> Callable[[], Any]:
    """A weak reference to ``obj``, or a strong one where its type allows none (``__slots__`` without
    ``__weakref__``)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def param_storages(model) -> set[int]:
    """Data pointers of the parameters' storages (a DTensor's local shard; a subclass without storage is skipped)."""
    found = set()
    for param in model.parameters():
        local = getattr(param, "_local_tensor", param)
        try:
            found.add(local.untyped_storage().data_ptr())
        except RuntimeError:  # a tensor subclass with no real storage of its own
            continue
    return found


def start_job(run_dir: RunDir, *, launch_policies: dict[str, Any] | None = None, store=None,
              manager: Manager | None = None, registered: dict[str, Any] | None = None) -> Job:
    """Create this process's Job, install the hooks, and (rank 0) serve the control endpoint."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    cluster = None
    if store is None:
        run_store = connect_run_store(run_dir.id)
        if run_store is not None:  # torchrun: restarts, other nodes; announcements under this group's keys
            cluster = Cluster(run_dir, rank, world, run_store)
            store = cluster.group_store
            launch_policies = cluster.launch_policies(launch_policies)
    job = Job(run_dir, rank=rank, world=world, manager=manager, launch_policies=launch_policies, store=store,
              registered=registered)
    Job.current = job
    install_patches(lambda: Job.current)
    job.activations.install()
    if rank == 0:
        from dspark_lab.runtime.control import LOOPBACK, ControlServer

        # publishes its endpoint in control.json; run.json is the supervisor's
        job.server = ControlServer(job, host=os.environ.get(CONTROL_HOST_VARIABLE) or LOOPBACK)
    if cluster is not None:
        job.cluster = cluster
        cluster.attach(job)
    job.record_event("start", step=0, rank=rank, reason=f"backend {job.backend.name}, world {world}")
    return job


def attach(model=None, optimizer=None, *, blocks=None, policies: dict[str, Any] | None = None,
           name: str | None = None, pipeline=None, moe_layers=None) -> Job:
    """Opt a script into the live runtime: ``job = dspark_lab.attach(model, optimizer)``.

    Under ``dspark-lab run`` this hands the runtime the model and optimizer instead of letting it discover them.
    Run directly (``python train.py`` or plain torchrun), it creates the run directory itself and rank 0 serves
    the control endpoint, so ``dspark-lab set`` works the same. ``blocks`` overrides the repeated-block discovery.
    ``pipeline`` registers the job's pipeline schedule (a ``torch.distributed.pipelining`` schedule or DSpark's
    ``PipelineTrainer``) for ``sched.pipeline``; ``moe_layers`` the MoE layers ``moe.placement`` steers (the
    contract they meet is in docs/runtime.md).
    """
    registered = {k: v for k, v in (("pipeline", pipeline), ("moe_layers", moe_layers)) if v is not None}
    if "moe_layers" in registered:
        registered["moe_layers"] = list(registered["moe_layers"])
    job = Job.current
    if job is None:
        run_dir = _own_run_dir(name, policies or {})
        job = start_job(run_dir, launch_policies=policies, registered=registered)
    else:
        job.registered.update(registered)
    if model is not None:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and job.ddp is None:
            raise PolicyError("attach: call dspark_lab.attach before wrapping the model in DistributedDataParallel, "
                              "or pass the DDP model's module")
        job.set_model(model, blocks)
    elif registered:
        job.notify_states("on_model")
    if optimizer is not None:
        job.optimizer = optimizer
        job.optimizer_pinned = True
    return job


def _own_run_dir(name: str | None, policies: dict[str, Any]) -> RunDir:
    """The run directory of a script that attached by itself, never a path read from torchrun's store (anyone who
    reaches the store can write it): ``DSPARK_RUN_DIR`` when set, else the run id every rank derives alike
    (:func:`_shared_run_id`), which rank 0 creates under the user's :func:`.records.runs_root` and the others wait
    for. A directory that is not the user's own 0700 one right under it is refused in one line."""
    if os.environ.get(RUN_DIR_VARIABLE):
        return trusted_run_dir(Path(os.environ[RUN_DIR_VARIABLE]), RUN_DIR_VARIABLE)
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    run_id = new_run_id() if world == 1 else _shared_run_id(world)
    if rank != 0:
        return _await_run_dir(runs_root() / run_id)
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "<interactive>"
    try:
        return RunDir.create(run_id, {
            "name": name or os.path.basename(script), "state": "running", "command": sys.argv, "script": script,
            "script_args": sys.argv[1:], "cwd": os.getcwd(), "start_time": time.time(), "ranks": world,
            "launcher_pid": os.getpid(), "launcher_start": psutil.Process().create_time(),
            "launch_policies": policies,
        })
    except FileExistsError:
        raise DSparkError(f"attach: run directory {runs_root() / run_id} exists already: an earlier launch had the "
                          "same torchrun rendezvous id, master address and port; give torchrun a new --rdzv-id, "
                          "or launch with `dspark-lab run`") from None


def _shared_run_id(world: int) -> str:
    """The run id every rank of this launch derives alike from what the launcher gave them all; nothing in it is
    read from the store. On one node: the launcher process (torchrun's agent; else the rank's parent, as under
    Ray or mpirun), with the rendezvous id, master address and port and the restart count, so each launch and
    each restart gets a new run. On several nodes: ``rdzv-<torchrun's --rdzv-id>`` (DSPARK_HOME then has to be
    on a file system the nodes share)."""
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "")
    restart = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    if _env_int("LOCAL_WORLD_SIZE", world) < world:
        if rdzv in ("", "none"):
            raise DSparkError("attach: a run of several nodes needs torchrun's --rdzv-id (rendezvous c10d) for its "
                              "ranks to agree on one run directory, or `dspark-lab run`")
        run_id = run_id_for(rdzv)
        return run_id if restart == 0 else f"{run_id}-restart{restart}"
    launcher = _launcher_process()
    started = round(launcher.create_time(), 2)
    key = "\n".join(map(str, (launcher.pid, started, rdzv, os.environ.get("MASTER_ADDR"),
                              os.environ.get("MASTER_PORT"), world, restart)))
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    return f"{stamp}-{hashlib.sha256(key.encode()).hexdigest()[:6]}"


LAUNCHER_NAMES = ("torch.distributed.run", "torchrun")  # a command line with one of these is torchrun's agent
LAUNCHER_DEPTH = 4  # parents searched for the agent (a rank may run under a shell script torchrun started)


def _launcher_process() -> psutil.Process:
    """The process that started this node's ranks: the nearest ancestor that is torchrun's agent, else the parent."""
    parent = psutil.Process().parent()
    here = parent
    for _ in range(LAUNCHER_DEPTH):
        if here is None:
            break
        try:
            if any(n in part for part in here.cmdline()[:3] for n in LAUNCHER_NAMES):
                return here
        except psutil.Error:
            break
        here = here.parent()
    if parent is None:
        raise DSparkError("attach: this rank has no parent process to agree on a run directory with the others")
    return parent


ATTACH_WAIT_S = 120.0  # how long a rank other than 0 waits for rank 0 to create the run directory


def _await_run_dir(path: Path) -> RunDir:
    """Rank 0's run directory once it holds its token and run.json (checked to be the user's own, 0700, right under
    the runs root); one-line :class:`DSparkError` after :data:`ATTACH_WAIT_S`."""
    deadline = time.monotonic() + ATTACH_WAIT_S
    while not ((path / "token").exists() and (path / "run.json").exists()):
        if time.monotonic() > deadline:
            raise DSparkError(f"attach: rank 0 did not create the run directory {path} within {ATTACH_WAIT_S:g} s "
                              "(every rank calls dspark_lab.attach; ranks on other nodes need DSPARK_HOME on a file "
                              "system shared with rank 0)")
        time.sleep(0.1)
    return trusted_run_dir(path, "attach")
