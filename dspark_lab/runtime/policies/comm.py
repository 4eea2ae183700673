"""Communication policies: which collective reduces gradients (``comm.grad_sync``) and DDP's bucket size.

DDP accepts one communication hook per model, registered before the first forward, so the runtime installs one
dispatcher (:class:`GradSync`) when DDP is constructed and switches what it does at step boundaries:

- ``builtin``: torch.distributed's all_reduce after dividing by the world size, which is exactly what DDP does
  without a hook (torch's ``default_hooks.allreduce_hook``), so numerics are unchanged.
- ``ring`` / ``tree``: the backend plugin's collectives (``dspark_make_collective``), equal within fp32 rounding.
- ``packed-trees``: spanning trees packed over the job's link graph (Blink; :mod:`dspark_lab.collectives.packing`),
  the topology from ``comm.topology`` (the backend's own, a preset, or a file), links optionally emulated
  (``comm.emulate_links``) on a machine without them; equal within fp32 rounding.
- ``bf16`` / ``fp8``: compressed with error feedback (Seide et al. 2014; Karimireddy et al. 2019), lossy.

A script that registers its own comm hook keeps it: the dispatcher forwards to it and ``grad_sync`` changes are
refused with that reason.

DDP rebuilds its buckets once, after the first step, in the order gradients became ready: bucket ``i`` may then
hold other parameters (and another number of elements). Error-feedback residuals are kept per bucket *layout*
(the parameters it holds), so a rebuilt bucket starts with a fresh residual instead of adding a stale one.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from dspark_lab.runtime.policies.choices import COMPRESSED



class GradSync:
    """The DDP comm hook the runtime owns; ``mode`` selects the collective for the next step's buckets."""

    def __init__(self, make_collective, group=None):
        self.mode = "builtin"
        self.group = group
        self.user_hook = None  # (state, hook) when the script registered its own
        self._make_collective = make_collective
        self._impl = None
        self._layouts: dict[int, tuple] = {}  # bucket index -> residual key of its current layout
        self.comm_s = 0.0

    def refusal(self) -> str | None:
        """Why grad_sync cannot change on this model, or None."""
        if self.user_hook is not None:
            name = getattr(self.user_hook[1], "__name__", "a hook")
            return f"the script registered its own DDP comm hook ({name})"
        return None

    def set_mode(self, mode: str) -> None:
        """Switch the collective; builds it first so a failure leaves the old mode in force."""
        if mode == "builtin":
            impl = None
        elif mode in COMPRESSED:
            from dspark_lab.collectives.compress import ErrorFeedbackAllReduce

            impl = ErrorFeedbackAllReduce(mode, group=self.group)
        else:
            impl = self._make_collective(mode, self.group)
        self._impl, self.mode, self._layouts = impl, mode, {}

    def _residual_key(self, bucket) -> tuple:
        """The bucket's index and the parameters it holds; a rebuilt layout drops the old layout's residual."""
        key = (bucket.index(), bucket.buffer().numel(), tuple(id(p) for p in bucket.parameters()))
        old = self._layouts.get(key[0])
        if old is not None and old != key:
            self._impl.reset(old)
        self._layouts[key[0]] = key
        return key

    def take_comm_time(self) -> float:
        spent, self.comm_s = self.comm_s, 0.0
        return spent

    def __call__(self, state, bucket):  # DDP inspects annotations; leave them off
        if self.user_hook is not None:
            return self.user_hook[1](self.user_hook[0], bucket)
        start = time.perf_counter()
        tensor = bucket.buffer()
        tensor.div_(dist.get_world_size(self.group))
        if self._impl is None:
            def finished(fut):
                self.comm_s += time.perf_counter() - start
                return fut.value()[0]

            return dist.all_reduce(tensor, group=self.group, async_op=True).get_future().then(finished)
        if self.mode in COMPRESSED:
            self._impl.all_reduce(tensor, key=self._residual_key(bucket))
        else:
            self._impl.all_reduce(tensor)
        self.comm_s += time.perf_counter() - start
        done = torch.futures.Future()
        done.set_result(tensor)
        return done


def install_on_ddp(ddp_module, grad_sync: GradSync) -> None:
    """Register ``grad_sync`` as the module's comm hook and route a later script registration into it."""
    def dspark_grad_sync(state, bucket):  # DDP wants a plain function (it reads __name__ and annotations)
        return grad_sync(state, bucket)

    ddp_module.register_comm_hook(None, dspark_grad_sync)

    def register_comm_hook(state, hook):
        grad_sync.user_hook = (state, hook)

    ddp_module.register_comm_hook = register_comm_hook


class GradSyncs:
    """The dispatchers of every DDP model of the job (a GAN has two), switched together: a mode that fails to
    build on one leaves every one in the mode it had."""

    def __init__(self):
        self.members: list[GradSync] = []

    @property
    def mode(self) -> str:
        return self.members[0].mode

    def refusal(self) -> str | None:
        return next((r for r in (m.refusal() for m in self.members) if r), None)

    def set_mode(self, mode: str) -> None:
        before = self.mode
        done = []
        try:
            for member in self.members:
                member.set_mode(mode)
                done.append(member)
        except Exception:
            for member in done:
                member.set_mode(before)
            raise

    def take_comm_time(self) -> float:
        return sum(m.take_comm_time() for m in self.members)


class CommState:
    """The comm policies' per-job state (created by ``dspark_job_started``): the gradient-sync dispatchers, once
    DDP is constructed (one per DDP model, all in one mode), and the link graph ``packed-trees`` plans on."""

    def __init__(self):
        self.grad_sync: GradSyncs | None = None
        self.topology_spec = "backend"  # comm.topology
        self.emulate = 0.0  # comm.emulate_links: 0 runs at full speed

    def on_ddp(self, job, ddp) -> None:
        group = getattr(ddp, "process_group", None)
        group = None if group is dist.GroupMember.WORLD else group

        def make(name, grp):
            if name == "packed-trees":
                from dspark_lab.collectives.packed_trees import PackedTreesCollective

                return PackedTreesCollective(self.topology(job), grp, emulate=self.emulate or None)
            return job.manager.make_collective(job.backend, name, grp)

        member = GradSync(make, group=group)
        if self.grad_sync is None:
            self.grad_sync = GradSyncs()
        elif self.grad_sync.mode != member.mode:
            member.set_mode(self.grad_sync.mode)  # a later DDP model joins in the mode in force
        self.grad_sync.members.append(member)
        install_on_ddp(ddp, member)

    def topology(self, job):
        """The job's link graph: a preset or file named by ``comm.topology``, else what the backend reports for
        this many ranks. Raises DSparkError with the reason when there is none or it is too small."""
        from dspark_lab.collectives.topology import backend_topology, load_topology
        from dspark_lab.errors import DSparkError

        if self.topology_spec == "backend":
            topology = backend_topology(job.manager, job.backend, list(range(job.world)))
            if topology is None:
                raise DSparkError(f"backend {job.backend.name} reports no topology; set comm.topology=PRESET|FILE "
                                  "at launch")
        else:
            topology = load_topology(self.topology_spec)
        if len(topology.devices) < job.world:
            raise DSparkError(f"topology {topology.name} has {len(topology.devices)} devices for {job.world} ranks")
        return topology

    def take_comm_time(self) -> float | None:
        return self.grad_sync.take_comm_time() if self.grad_sync else None
