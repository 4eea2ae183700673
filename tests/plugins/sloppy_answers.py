"""Fixture plugin: registers fine, then answers every hook with the wrong type (or raises at each step end)."""

from dspark_lab import hookimpl
from dspark_lab.kernels.registry import Kernel


def _double(x):
    return x * 2


@hookimpl
def dspark_register_kernels(backend):
    return Kernel(name="lonely", backend=backend.name, reference=_double)  # one Kernel, not a list


@hookimpl
def dspark_device_sampler(backend):
    return {"utilization_pct": 1.0}  # a sample, not a sampler


@hookimpl
def dspark_make_allocator(backend, config):
    return object()


@hookimpl
def dspark_apply_policy(job, key, value, old):
    return 42 if key == "toy.level" else None


@hookimpl
def dspark_step_end(job, step):
    raise RuntimeError(f"plugin bug at step {step}")
