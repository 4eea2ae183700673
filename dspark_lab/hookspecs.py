"""Every hook a DSpark Lab plugin can implement, grouped by when the core calls it.

A plugin is a module or object with functions marked ``@dspark_lab.hookimpl`` whose names match these specs.
Plugins load through the ``dspark_lab`` entry-point group (built-in backends too), so a third party ships one as
its own pip package. docs/plugins.md has a section with an example for each hook.

Hooks that take ``backend`` are called once per registered backend; a plugin returns ``None`` for a backend that
is not its own. ``firstresult`` hooks stop at the first non-``None`` answer: later-registered plugins are asked
first, so a third-party plugin can override a built-in one.
"""

from __future__ import annotations

import pluggy

from dspark_lab import PROJECT_NAME

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


# --- discovery: called when the tool starts looking at what is installed -------------------------------------


@hookspec
def dspark_register_backends():
    """Register device kinds.

    Called once per plugin manager, the first time backends are listed.
    Returns a list of :class:`dspark_lab.backend.Backend` (each with its ``DeviceSpec`` and a probe that never
    raises and is never run at import). A backend name registered twice is reported and the later one is skipped.
    """


@hookspec
def dspark_register_kernels(backend):
    """Register compute kernels for ``backend`` (a :class:`~dspark_lab.backend.Backend`).

    Called once per backend when the kernel registry is built. Returns a list of
    :class:`dspark_lab.kernels.registry.Kernel` (name, source file, a launcher for the device path and a CPU
    reference in torch), or ``None`` when the plugin has no kernels for this backend.
    """


@hookspec
def dspark_register_policies():
    """Register policy schemas.

    Called once per plugin manager, when the runtime or the CLI lists policies. Returns a list of
    :class:`dspark_lab.policy.PolicySpec`. Keys are ``area.name`` and must be unique across plugins.
    """


@hookspec
def dspark_collective_names(backend):
    """Name the collective implementations this plugin can make for ``backend``.

    Called when a user lists collectives or validates ``comm.grad_sync``. Returns a list of names (each one a
    ``name`` that ``dspark_make_collective`` accepts), or ``None``.
    """


@hookspec(firstresult=True)
def dspark_topology(backend, devices):
    """The link graph of the devices a job uses on ``backend``.

    ``devices`` is a list of device indices on this host (for the cpu backend, one per rank). Called by
    ``dspark-lab backends``, the collectives planner and the ``packed-trees`` collective. Returns the topology file
    format, a dict ``{"nodes": [name | {"name", "kind": "device" | "switch"}], "links": [{"src", "dst", "gb_s"}]}``
    with GB/s per direction (see docs/collectives.md), or ``None`` when the plugin cannot tell.
    """


@hookspec
def dspark_doctor_checks():
    """Check what this plugin's devices need on this machine (driver, vendor libraries, compilers).

    Called once per ``dspark-lab doctor``, never at import. Returns a list of :class:`dspark_lab.doctor.Check`
    (``name``, ``status`` "ok" | "missing" | "problem", ``detail``, and a ``hint`` saying how to fix anything not
    "ok"), or ``None``. A missing optional piece is "missing", not "problem"; a check must not need the device.
    """


@hookspec
def dspark_launchers():
    """Register launchers: what ``dspark-lab run --launcher NAME`` starts a script's ranks with.

    Called when ``dspark-lab run`` picks its launcher. Returns a list of
    :class:`dspark_lab.runtime.launchers.base.Launcher` (``name``, ``validate(nproc, options)``,
    ``ranks(nproc, options)``, ``command(script, script_args, nproc, options)``, ``environment(env)``); every
    rank the command starts must run ``python -m dspark_lab.runtime.bootstrap script args...``. A launcher that
    also runs modules (``dspark-lab run -m MODULE``) overrides ``module_command(module, module_args, nproc,
    options)``, whose ranks run ``python -m dspark_lab.runtime.bootstrap -m MODULE args...``; one that does not is
    refused in one line for ``-m``. Names are unique across plugins; the built-ins are ``torchrun`` (the default)
    and ``python``.
    """


# --- construction: called by the runtime when a run starts or a policy changes ------------------------------


@hookspec(firstresult=True)
def dspark_make_allocator(backend, config):
    """Make the host allocator the runtime uses for staging and activation-offload buffers.

    ``config`` is a dict (``{"pinned": bool | None, "pool_mb": int}``; missing keys mean the plugin's default).
    Called once per rank when the first policy that needs host buffers is applied. Returns an object with
    ``empty(shape, dtype) -> torch.Tensor``, ``release(tensor)`` and ``stats() -> dict`` (pinned on CUDA,
    plain on CPU), or ``None`` when ``backend`` is not the plugin's.
    """


@hookspec(firstresult=True)
def dspark_make_collective(backend, name, group):
    """Make the collective called ``name`` for ``backend`` over the process ``group`` (``None``: the world).

    Called by the runtime when ``comm.grad_sync`` selects ``name``, and by benchmarks. Returns an object with
    ``all_reduce(tensor)`` (in place, sum), ``reduce_scatter(tensor) -> shard`` and ``all_gather(tensor) ->
    tensor`` (see :mod:`dspark_lab.collectives.base`), or ``None`` when the plugin does not make ``name``.
    """


# --- observation: called while a run is live ---------------------------------------------------------------


@hookspec(firstresult=True)
def dspark_device_sampler(backend):
    """Make a sampler of live device metrics for ``backend``.

    Called once per rank (and per dashboard) when sampling starts, never at import. Returns a zero-argument
    callable that returns a plain dict: ``utilization_pct``, ``memory_used_gb``, ``memory_total_gb`` and, where
    the vendor exposes them, ``power_w``, ``temperature_c``, ``link_tx_gb_s``/``link_rx_gb_s``; or ``None``.
    """


# --- live runtime: called on every rank at the step boundary where a change applies ------------------------


@hookspec
def dspark_job_started(job):
    """Called once on every rank when the runtime's ``job`` (:class:`dspark_lab.runtime.attach.Job`) is created,
    before the script's model exists.

    A plugin keeps its per-job policy state here instead of in fields of the job: store one object under
    ``job.state[name]`` (``name``: the plugin's own key). The runtime then calls that object's optional methods
    ``on_model(job)`` (the model was found or handed over by ``attach``; ``job.model``, ``job.blocks`` and
    ``job.registered`` are set) and ``on_ddp(job, ddp)`` (right after a DistributedDataParallel is built, before
    its first forward: the place to register a comm hook). Returns ``None``.
    A state may also have ``busy`` (a reason string, "" when idle) and ``busy_keys`` (policy keys): while ``busy``
    is set, or a change of one of ``busy_keys`` is announced and not yet applied, rank 0 holds every other change
    back until it is not (``profile.steps`` does this for the length of a capture).
    """



@hookspec(firstresult=True)
def dspark_apply_policy(job, key, value, old):
    """Apply policy ``key`` (a key this plugin registered) with the validated ``value`` on this rank.

    ``job`` is the rank's :class:`dspark_lab.runtime.attach.Job` (``job.model``, ``job.optimizer``,
    ``job.blocks``, ``job.manager``, ``job.backend``); ``old`` is the value in force. Called at a step boundary,
    on every rank, for each key of a change; to roll back, the runtime calls it again with ``value=old``.
    Return a short note for the event log (``""`` when there is nothing to say) when the key is the plugin's, or
    ``None`` when it is not. Raise :class:`dspark_lab.errors.PolicyError` to refuse: every rank then rolls back.
    """


@hookspec
def dspark_step_end(job, step):
    """Called on every rank at every step boundary, after step ``step`` and before any change applies.

    For per-step work a plugin's policy needs (record loads, re-place experts on a schedule). Must be cheap: it
    runs every step. Return a dict of extra fields for this rank's metrics record (e.g. ``{"expert_loads": ...}``)
    or ``None``. A periodic action that every rank must take together is keyed on ``step`` (equal on all ranks).
    """


# --- analysis: called when a profiler trace is read ------------------------------------------------------------


@hookspec
def dspark_trace_classifiers():
    """Name the trace events of this plugin's libraries: communication kernels, waits, or compute.

    Called once each time ``dspark-lab trace`` builds its classifier. Returns a list of
    :class:`dspark_lab.trace.classify.Pattern` (``name``, ``category`` in ``compute | comm | wait``, and a
    ``regex`` searched in the event name and/or a Kineto ``kineto_cat``), or ``None``. Plugin patterns are tried
    before the built-in ones, so a plugin can also claim a kernel as compute.
    """
