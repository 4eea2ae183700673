"""An example third-party DSpark Lab plugin: the Intel Gaudi 3 backend, one kernel and one collective.

This module is the plugin: pyproject.toml names it in the ``dspark_lab`` entry-point group
(``gaudi3 = "dspark_example_backend"``), and DSpark Lab registers every ``@hookimpl`` function below. Each hook
that receives a ``backend`` answers ``None`` for backends that are not its own, so it never speaks for another
plugin's device. Importing it touches no device and no driver, and imports no torch: DSpark Lab loads every plugin
for every verb (``plan predict`` included), so the kernel and the collective, which need torch, are imported in the
hooks that hand them out.
"""

from __future__ import annotations

from dspark_lab import hookimpl
from dspark_lab.backend import Backend

from dspark_example_backend import gaudi
from dspark_example_backend.names import COLLECTIVE, KERNEL

__version__ = "0.1.0"

# The collective only needs torch.distributed send/recv, so the CPU backend can use it too.
COLLECTIVE_BACKENDS = (gaudi.NAME, "cpu")


@hookimpl
def dspark_register_backends():
    return [Backend(name=gaudi.NAME, vendor="intel", spec=gaudi.GAUDI3, probe=gaudi.probe, torch_device="hpu")]


@hookimpl
def dspark_register_kernels(backend):
    if backend.name != gaudi.NAME:
        return None
    from dspark_lab.kernels.registry import Kernel  # imported on use: the registry is only needed when asked

    from dspark_example_backend import rms_norm  # imports torch

    # No .cu source: the Gaudi graph compiler builds the device code from the reference (see rms_norm.py), so the
    # registry lists it as reference-backed and the launcher is used on a Gaudi.
    return [Kernel(name=KERNEL, backend=gaudi.NAME, reference=rms_norm.reference, launcher=rms_norm.launch,
                   doc="RMSNorm over the last dimension (Zhang and Sennrich 2019)")]


@hookimpl
def dspark_collective_names(backend):
    return [COLLECTIVE] if backend.name in COLLECTIVE_BACKENDS else None


@hookimpl
def dspark_make_collective(backend, name, group):
    if backend.name not in COLLECTIVE_BACKENDS or name != COLLECTIVE:
        return None
    from dspark_example_backend.halving_doubling import HalvingDoublingCollective  # imports torch

    return HalvingDoublingCollective(group)


@hookimpl
def dspark_device_sampler(backend):
    if backend.name != gaudi.NAME or not backend.availability().available:
        return None
    return gaudi.sample
