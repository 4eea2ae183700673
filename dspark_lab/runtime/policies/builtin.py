"""The built-in policies, registered and applied through the same hooks a third-party plugin would use.

Memory: ``memory.activation_checkpointing``, ``memory.activation_offload``, ``memory.reshard_after_forward``
(FSDP2's ``reshard_after_forward``, switched through ``FSDPModule.set_reshard_after_forward``). Communication:
``comm.grad_sync``, ``comm.bucket_mb`` (launch-only). Compute: ``compute.threads``. Scheduling: ``sched.pipeline``,
``moe.placement`` with its interval, window and move cost. How each is applied lives in :mod:`.memory`,
:mod:`.comm`, :mod:`.sched` and :mod:`.moe`; this module only says which keys exist, when a change must be refused,
and routes an apply to the right function. Their per-job state lives in ``job.state`` ("comm", "moe", "pipeline"),
made by :func:`dspark_job_started`.

The allowed values come from :mod:`.choices`; :mod:`.memory`, :mod:`.comm` and :mod:`.moe` import torch, so they are
imported in the hooks that act on a job, not here: every verb loads this plugin (``plan predict`` reads backends'
specs through the same manager), and only the verbs that run a job should pay torch's start-up.
"""

from __future__ import annotations

from dspark_lab import hookimpl
from dspark_lab.errors import DSparkError, PolicyError
from dspark_lab.policy import PolicySpec
from dspark_lab.runtime.policies import compiled, compute, sched
from dspark_lab.runtime.policies.choices import CHECKPOINTING, COMPRESSED, GRAD_SYNC, OFFLOAD, PLACEMENT

SPECS = (
    PolicySpec(key="memory.activation_checkpointing", type="enum", choices=CHECKPOINTING, default="none",
               doc="recompute the forward of all / every 2nd / every 4th repeated block during backward "
                   "instead of keeping its activations"),
    PolicySpec(key="memory.activation_offload", type="enum", choices=OFFLOAD, default="off",
               lossy_values=("host-fp8",),
               doc="keep tensors saved for backward in host buffers (host-fp8: as FP8 e4m3 with 1x128 tile "
                   "scales, ~4x fewer bytes, lossy)"),
    PolicySpec(key="memory.reshard_after_forward", type="bool", default=True,
               doc="FSDP2: free each block's gathered weights after its forward and gather them again for "
                   "backward (true, ZeRO-3-like) or keep them until backward (false, ZeRO-2-like: more memory, "
                   "one all-gather fewer per block)"),
    PolicySpec(key="comm.grad_sync", type="enum", choices=GRAD_SYNC, default="builtin",
               lossy_values=COMPRESSED, bit_exact=False, plus_collectives=True,
               doc="collective that reduces DDP gradient buckets (bf16/fp8: compressed with error feedback, lossy; "
                   "a backend plugin's collectives by name)"),
    PolicySpec(key="comm.topology", type="str", default="backend", live=False,
               doc="the link graph comm.grad_sync=packed-trees plans on: backend (what the backend reports), a "
                   "preset (dgx1-v100, hgx-h100, mi300x, nodes:N,gpus:G) or a topology JSON file"),
    PolicySpec(key="comm.emulate_links", type="float", min=0, max=1000, default=0.0, live=False,
               tunable=False,
               doc="pace packed-trees messages at the topology's link rates times this scale (0: off), to see a "
                   "topology's effect on a machine without its links"),
    PolicySpec(key="comm.bucket_mb", type="float", min=1, max=1024, default=25.0, live=False, bit_exact=False,
               doc="DDP gradient bucket size in MB (launch-only: DDP builds its buckets once)"),
    PolicySpec(key="sched.pipeline", type="enum", choices=(sched.NONE, *sched.schedule_names()), default=sched.NONE,
               bit_exact=False,
               doc="pipeline schedule of the job's pipeline executor; switches keep each rank's stages"),
    PolicySpec(key="moe.placement", type="enum", choices=PLACEMENT, default="static", bit_exact=False,
               doc="re-place MoE experts from recorded loads: keep them (static), DeepSeek's EPLB, or ours (dspark)"),
    PolicySpec(key="moe.placement_interval", type="int", min=1, max=1_000_000, default=10,
               doc="re-place every this many steps (while moe.placement is not static)"),
    PolicySpec(key="moe.placement_window", type="int", min=1, max=10_000, default=10,
               doc="steps of load history a re-placement balances"),
    PolicySpec(key="moe.move_cost", type="float", min=0, max=100, default=0.0,
               doc="dspark only: balance traded per expert moved (0: best balance, larger: fewer moves)"),
)
SPECS = SPECS + (
    PolicySpec(key="compute.threads", type="int", min=1, max=compute.MAX_THREADS, default=1, bit_exact=False,
               doc="intra-op CPU threads of each rank (torch.set_num_threads); lossless but not bit-exact on cpu: "
                   "1 vs 2 threads changed the demo model's losses by up to 7.5e-8 relative (sums reordered)"),
)
SPECS_BY_KEY = {spec.key: spec for spec in SPECS}


def _compiled_reason(job, key: str) -> str | None:
    """Why a memory policy cannot apply to this compiled job, or None (:mod:`.compiled`: offload applies to any
    compiled graph, checkpointing to blocks compiled one by one)."""
    return compiled.checkpointing_refusal(job) if key == "memory.activation_checkpointing" else None


def refusal(job, key: str, value) -> str | None:
    """Why ``key=value`` cannot apply to this job at all (checked when the request arrives), or None."""
    if job.model is None and key.startswith("memory."):
        return ("no model found: the optimizer's parameters belong to no live nn.Module; pass the model to "
                "dspark_lab.attach")
    if key == "memory.reshard_after_forward":
        if job.fsdp_kind != "fsdp2":
            return ("the model is not sharded with FSDP2's fully_shard: there is no reshard_after_forward to "
                    "switch (FSDPModule.set_reshard_after_forward)")
        return None
    if key.startswith("memory."):
        if job.compiled and (reason := _compiled_reason(job, key)):
            return reason
        if key == "memory.activation_checkpointing" and not job.blocks and value != "none":
            return f"no repeated blocks were found in the model ({job.found_blocks.why}); pass blocks= to " \
                   "dspark_lab.attach"
    if key in ("comm.bucket_mb", "comm.topology", "comm.emulate_links"):
        return _no_gradient_sync(job)  # DDP's buckets and the collective they run: nothing to act on without them
    if key == "comm.grad_sync":
        if reason := _no_gradient_sync(job):
            return reason
        grad_sync = job.state["comm"].grad_sync
        if grad_sync.refusal():
            return grad_sync.refusal()
        if value == "packed-trees":
            try:
                job.state["comm"].topology(job)
            except DSparkError as exc:
                return f"packed-trees needs a topology: {exc}"
            return None
        if value not in COMPRESSED + ("builtin",) and value not in job.manager.collective_names(job.backend):
            offered = ", ".join(job.manager.collective_names(job.backend))
            return f"backend {job.backend.name} offers no {value!r} collective (offered: {offered})"
    if key == "sched.pipeline":
        return sched.refusal(value, job)
    if key == "compute.threads":
        return compute.refusal(value)
    if key.startswith("moe."):
        from dspark_lab.runtime.policies import moe  # imports torch: once a job runs (module docstring)

        return moe.refusal(job)
    return None


def _no_gradient_sync(job) -> str | None:
    """Why this job has no DDP gradient sync for the ``comm.*`` policies to act on, or None."""
    if job.fsdp:
        return "the model is sharded with FSDP, which reduces gradients itself (reduce-scatter in backward)"
    if (job.state["comm"].grad_sync if "comm" in job.state else None) is None:
        return "no DistributedDataParallel model in this job: there is no gradient sync to change"
    return None


def observed_values(job) -> dict:
    """Values the script chose itself (read once the first step ran), so `get` shows what is really in force."""
    from dspark_lab.runtime.policies import memory  # imports torch: once a job runs (module docstring)

    found = {"sched.pipeline": sched.current(job), "compute.threads": compute.current()}
    if job.fsdp_kind == "fsdp2":
        setting = memory.reshard_after_forward(job.model)
        if isinstance(setting, bool):
            found["memory.reshard_after_forward"] = setting
    if job.blocks and (checkpointing := memory.checkpointing_in_force(job.blocks)):
        found["memory.activation_checkpointing"] = checkpointing
    return found


@hookimpl
def dspark_job_started(job):
    from dspark_lab.runtime.policies import comm, moe  # imports torch: once a job runs (module docstring)

    job.state["comm"] = comm.CommState()
    job.state["moe"] = moe.MoEState()
    job.state["pipeline"] = sched.PipelineState()


@hookimpl
def dspark_step_end(job, step):
    from dspark_lab.runtime.policies import moe  # imports torch: once a job runs (module docstring)

    return moe.step_end(job, step)


@hookimpl
def dspark_register_policies():
    return list(SPECS)


@hookimpl
def dspark_apply_policy(job, key, value, old):
    if key not in {spec.key for spec in SPECS}:
        return None
    reason = refusal(job, key, value)
    if reason:
        raise PolicyError(f"{key}: {reason}")
    from dspark_lab.runtime.policies import memory, own_checkpointing  # import torch: once a job runs (docstring)

    if key == "memory.activation_checkpointing":
        wrapped, by_script = memory.set_checkpointing(job.blocks, value, job.activations)
        said = f"{len(wrapped)} of {len(job.blocks)} blocks checkpointed"
        own = own_checkpointing.describe(job.blocks)
        if own and by_script == len(wrapped):
            said += f" (through the script's own {own})"
        elif own:
            said += f" ({by_script} through the script's own {own}, {len(wrapped) - by_script} by the runtime)"
        return said
    if key == "memory.reshard_after_forward":
        count = memory.set_reshard_after_forward(job.model, value)
        return f"{count} FSDP2 modules {'reshard' if value else 'keep gathered weights'} after forward"
    if key == "memory.activation_offload":
        job.activations.mode = value
        if value != "off" and job.backend.torch_device == "cpu":
            return ("on a cpu backend host buffers are the same memory: no memory effect"
                    + ("; fp8 cuts stored bytes ~4x" if value == "host-fp8" else ""))
        return ""
    if key == "comm.grad_sync":
        job.state["comm"].grad_sync.set_mode(value)
        return ""
    if key == "comm.bucket_mb":
        return "applied when DDP was constructed"
    if key == "comm.topology":
        from dspark_lab.collectives.topology import load_topology

        if value != "backend":
            load_topology(value)  # a bad preset or file refuses the launch change, naming the field
        job.state["comm"].topology_spec = value
        return ""
    if key == "comm.emulate_links":
        job.state["comm"].emulate = value
        return "packed-trees messages paced at the modelled link rates" if value else ""
    if key == "sched.pipeline":
        return sched.apply(value, job)
    if key == "compute.threads":
        return compute.apply(value)
    if key.startswith("moe."):
        return ""  # read at each step boundary by dspark_step_end
    return None
