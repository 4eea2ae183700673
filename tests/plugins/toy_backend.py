"""Fixture plugin: a complete plugin for a fake device kind ``toy``, implementing every hook with known answers."""

import sys

from dspark_lab import hookimpl
from dspark_lab.allocator import HostPool
from dspark_lab.backend import Availability, Backend, DeviceSpec
from dspark_lab.kernels.registry import Kernel
from dspark_lab.errors import DSparkError
from dspark_lab.policy import PolicySpec
from dspark_lab.runtime.launchers.base import BOOTSTRAP, Launcher

NAME = "toy"
SPEC = DeviceSpec(bf16_tflops=1.5, memory_gb=2, memory_bandwidth_gb_s=30, link_gb_s=4, source="made up for tests")
APPLIED: list = []  # (key, value, old) for every dspark_apply_policy call


class ToyCollective:
    name = "toy-sum"

    def __init__(self, group):
        self.group = group

    def all_reduce(self, tensor):
        return tensor

    def reduce_scatter(self, tensor):
        return tensor

    def all_gather(self, tensor):
        return tensor


def toy_kernel(x):
    return x * 2


@hookimpl
def dspark_register_backends():
    return [Backend(name=NAME, vendor="toyco", spec=SPEC, probe=lambda: Availability.yes(3, "3 toys"))]


@hookimpl
def dspark_register_kernels(backend):
    return [Kernel(name="double", backend=NAME, reference=toy_kernel, doc="x * 2")] if backend.name == NAME else None


@hookimpl
def dspark_register_policies():
    return [PolicySpec(key="toy.level", type="int", default=1, min=0, max=3, doc="how toy")]


@hookimpl
def dspark_collective_names(backend):
    return ["toy-sum"] if backend.name == NAME else None


@hookimpl
def dspark_make_collective(backend, name, group):
    return ToyCollective(group) if backend.name == NAME and name == "toy-sum" else None


@hookimpl
def dspark_topology(backend, devices):
    """Two toy chips per board: a fast bridge inside a pair, a slow one between pairs; ``devices == [-1]`` is a
    request for a malformed answer (so a test can check it is recorded as this plugin's problem)."""
    if backend.name != NAME:
        return None
    if devices == [-1]:
        return {"nodes": ["a"], "links": "not a list"}
    links = []
    for i in devices:
        for j in devices:
            if i != j:
                links.append({"src": f"toy{i}", "dst": f"toy{j}", "gb_s": 40.0 if i // 2 == j // 2 else 5.0})
    return {"nodes": [f"toy{i}" for i in devices], "links": links}


@hookimpl
def dspark_make_allocator(backend, config):
    return HostPool(pinned=False, pool_mb=config.get("pool_mb", 8)) if backend.name == NAME else None


@hookimpl
def dspark_device_sampler(backend):
    if backend.name != NAME:
        return None
    return lambda: {"utilization_pct": 50.0, "memory_used_gb": 1.0, "memory_total_gb": 2.0}


@hookimpl
def dspark_apply_policy(job, key, value, old):
    if not key.startswith("toy."):
        return None
    APPLIED.append((key, value, old))
    return f"toy level {old} -> {value}"


@hookimpl
def dspark_doctor_checks():
    from dspark_lab.doctor import Check

    return [Check("toy driver", "missing", "no toy driver here", "install toyco's driver")]


class ToyLauncher(Launcher):
    """Runs the bootstrap under `env TOY_LAUNCHED=1`: a launcher that is neither torchrun nor plain python."""

    name = "toy"

    def validate(self, nproc, options):
        if nproc > 2:
            raise DSparkError(f"--nproc: the toy launcher starts at most 2, got {nproc}")

    def ranks(self, nproc, options):
        return nproc

    def command(self, script, script_args, nproc, options):
        return ["env", "TOY_LAUNCHED=1", sys.executable, *BOOTSTRAP, script, *script_args]


@hookimpl
def dspark_launchers():
    return [ToyLauncher()]
