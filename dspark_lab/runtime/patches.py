"""The torch entry points the runtime listens to, wrapped once per process; the wrappers ask ``current_job()``
(attach passes ``lambda: Job.current``) which job to call.

- torch's global optimizer step hooks mark step boundaries (the only place policies change);
- ``DistributedDataParallel.__init__`` is wrapped so the runtime's gradient-sync dispatcher is DDP's comm hook and
  a launch-time ``comm.bucket_mb`` reaches DDP;
- ``torch.autograd.backward`` is wrapped to time backward and read the loss;
- ``torch.compile`` is wrapped to notice compiled modules (where some memory policies are refused); compiling a plain
  function (torchtitan compiles ``flex_attention`` at import) is counted, not taken for a compiled model;
- ``torch.multiprocessing``'s ``start_processes`` (what ``mp.spawn`` calls) is wrapped to notice a script that
  trains in worker processes of its own, where the runtime is not attached.

The order in which the runtime's pieces wrap a step is written down once, in :mod:`.attach`'s docstring.

A failure of the runtime inside these wrappers is logged once and never raised into the user's step.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import torch

from dspark_lab.runtime.coordinator import StopRun


def _guarded(job: Any, method: str, *args) -> None:
    """Call a Job hook from inside the user's training step; a runtime bug is logged, never raised into the job.

    Only :class:`StopRun` (a requested stop) leaves through here.
    """
    if job is None:
        return
    try:
        getattr(job, method)(*args)
    except StopRun:
        raise
    except Exception as exc:
        if not job._runtime_error_logged:
            job._runtime_error_logged = True
            job.record_event("error", step=job.step, rank=job.rank,
                             reason=f"runtime {method} failed, the job goes on: {type(exc).__name__}: {exc}")


def install_patches(current_job: Callable[[], Any]) -> None:
    """Wrap the torch entry points the runtime listens to. Idempotent; the wrappers call ``current_job()`` (the
    process's :class:`dspark_lab.runtime.attach.Job`, or None) each time."""
    if getattr(torch, "_dspark_patched", False):
        return
    torch._dspark_patched = True
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(lambda opt, args, kwargs: _guarded(current_job(), "on_step_begin", opt))
    register_optimizer_step_post_hook(lambda opt, args, kwargs: _guarded(current_job(), "on_step_end", opt))

    original_init = DDP.__init__

    @functools.wraps(original_init)
    def ddp_init(self, module, *args, **kwargs):
        current = current_job()
        if current is not None and current.launch_policies.get("comm.bucket_mb") is not None:
            kwargs["bucket_cap_mb"] = current.launch_policies["comm.bucket_mb"]
        original_init(self, module, *args, **kwargs)
        if current is not None:
            _guarded(current, "on_ddp", self)

    DDP.__init__ = ddp_init

    original_backward = torch.autograd.backward

    @functools.wraps(original_backward)
    def backward(tensors, *args, **kwargs):
        current = current_job()
        if current is None:
            return original_backward(tensors, *args, **kwargs)
        return current.on_backward(tensors, lambda: original_backward(tensors, *args, **kwargs))

    torch.autograd.backward = backward

    original_compile = torch.compile

    @functools.wraps(original_compile)
    def compile(*args, **kwargs):
        current = current_job()
        if current is not None:
            target = args[0] if args else kwargs.get("model")
            if target is not None:
                _guarded(current, "on_compile", target)
        return original_compile(*args, **kwargs)

    torch.compile = compile

    import torch.multiprocessing as torch_mp

    torch_spawn = importlib.import_module("torch.multiprocessing.spawn")  # the attribute is the spawn function

    original_start = torch_spawn.start_processes

    @functools.wraps(original_start)
    def start_processes(fn, args=(), nprocs=1, *rest, **kwargs):
        _guarded(current_job(), "on_spawn", nprocs)
        return original_start(fn, args, nprocs, *rest, **kwargs)

    torch_spawn.start_processes = torch_mp.start_processes = start_processes
