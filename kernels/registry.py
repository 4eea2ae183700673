"""The kernel registry: what each backend's plugin registers through ``dspark_register_kernels`` and in what state.

A :class:`Kernel` is a named compute routine of one backend: its ``.cu`` source (or none for a reference-only
kernel), the ``__global__`` entries its launcher calls, the architecture it is built for, a launcher and a torch
reference. :func:`describe_kernels` asks every plugin for every backend and says, per kernel:

- ``runnable``: it can run here (a reference-only kernel, or CuPy can launch the source on a GPU of its arch);
- ``compiled``: nvcc compiles the source for its arch (``nvcc -ptx`` then ptxas) but it cannot be launched here;
- ``fallback``: neither; calls take the torch reference, and ``reason`` says why.
"""

from __future__ import annotations

import os
from typing import Any

from dspark_lab.kernel import Kernel
from dspark_lab.kernels import cuda, nvcc, reference
from dspark_lab.plugins import Manager

__all__ = ["Kernel", "builtin_kernels", "describe_kernels", "kernel_state", "registered_kernels"]


# The kernels DSpark Lab ships: name -> (launcher, reference, doc); sources and entries are in cuda.ENTRIES.
_BUILTIN = {
    "fp8_quantize": (cuda.fp8_quantize, reference.fp8_quantize,
                     "float -> float8 e4m3 with one float32 scale per 1x128 tile (DeepSeek-V3 layout)"),
    "fp8_dequantize": (cuda.fp8_dequantize, reference.fp8_dequantize,
                       "float8 e4m3 x per-tile scale -> float32 | bfloat16 | float16"),
    "flatten_scale": (cuda.flatten_scale, reference.flatten_scale,
                      "many tensors -> one flat bucket times a scale, in one launch"),
}
# The oldest target a source builds for: PTX's cvt to e4m3 needs sm_89 (Ada, Hopper and later).
_MIN_ARCH = {"fp8_quantize": 89, "fp8_dequantize": 89}


def _arch_number(arch: str) -> int:
    return int(arch.removeprefix("sm_").rstrip("af"))


def builtin_kernels(backend: str, arch: str | None = None) -> list[Kernel]:
    """The shipped kernels for ``backend``: reference-only without ``arch``, the CUDA sources built for it with."""
    kernels = []
    for name, (launcher, ref, doc) in _BUILTIN.items():
        if arch is None:
            kernels.append(Kernel(name=name, backend=backend, reference=ref, doc=doc))
        elif _arch_number(arch) < _MIN_ARCH.get(name, 0):
            kernels.append(Kernel(name=name, backend=backend, reference=ref, doc=doc, arch=arch,
                                  why_reference=f"its source needs sm_{_MIN_ARCH[name]}+, this backend is {arch}"))
        else:
            source, entry = cuda.ENTRIES[name]
            kernels.append(Kernel(name=name, backend=backend, reference=ref, launcher=launcher, source=source,
                                  entries=(entry,), arch=arch, doc=doc))
    return kernels


def kernel_state(kernel: Kernel) -> dict[str, Any]:
    """The row ``dspark-lab kernels`` shows for one kernel (state, path, reason)."""
    row = {"backend": kernel.backend, "kernel": kernel.name, "arch": kernel.arch, "doc": kernel.doc,
           "source": None if kernel.source is None else os.path.basename(kernel.source)}
    if kernel.source is None:
        why = f"; {kernel.why_reference}" if kernel.why_reference else ""
        return {**row, "state": "runnable", "path": "reference", "reason": f"torch reference; runs on any device{why}"}

    built = nvcc.compile_ptx(kernel.source, kernel.arch)
    missing = [e for e in kernel.entries if e not in built.entries]
    if built.ok and missing:
        built = nvcc.CompileResult(False, kernel.arch, f"{built.detail}, but no entry {', '.join(missing)} in the PTX")
    launch = _launch_problem(kernel)
    if launch is None:
        return {**row, "state": "runnable", "path": "device", "reason": f"{cuda.cupy_status().reason}; {built.detail}"}
    return {**row, "state": "compiled" if built.ok else "fallback", "path": "reference",
            "reason": f"{built.detail}; not launchable: {launch}"}


def _launch_problem(kernel: Kernel) -> str | None:
    status = cuda.cupy_status()
    if not status.ok:
        return status.reason
    if status.arch != kernel.arch:
        return f"this GPU is {status.arch}, the kernel is built for {kernel.arch}"
    return cuda.load_error(str(kernel.source), tuple(kernel.entries))


def registered_kernels(manager: Manager) -> list[Kernel]:
    """Every kernel every plugin registers, backend by backend (the manager reports and drops answers that are not
    lists of Kernel)."""
    return [kernel for backend in manager.backends()
            for _, answer in manager.dispatch("dspark_register_kernels", backend=backend) for kernel in answer]


def describe_kernels(manager: Manager) -> list[dict[str, Any]]:
    """One plain dict per registered kernel: backend, kernel, state, path, reason, source, arch, doc."""
    return [kernel_state(kernel) for kernel in registered_kernels(manager)]
