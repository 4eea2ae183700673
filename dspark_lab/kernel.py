"""The Kernel type: one named compute routine of a backend, as a plugin registers it (``dspark_register_kernels``).

It lives apart from :mod:`dspark_lab.kernels` (which imports torch) so that the plugin manager can check what a
plugin returns without importing torch, as :mod:`dspark_lab.backend` does for backends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True, kw_only=True, slots=True)
class Kernel:
    """One kernel of one backend.

    ``source`` is a ``.cu`` file name in ``dspark_lab/kernels/`` or an absolute path (a plugin ships its own);
    ``None`` marks a reference-only kernel. ``entries`` are the ``extern "C" __global__`` functions the launcher
    calls; ``arch`` is the target (``sm_90``). ``launcher`` and ``reference`` take the same arguments and return
    the same thing. ``why_reference`` says why a backend that has a device registers a kernel reference-only.
    """

    name: str
    backend: str
    reference: Callable[..., Any]
    launcher: Callable[..., Any] | None = None
    source: str | os.PathLike | None = None
    entries: tuple[str, ...] = ()
    arch: str | None = None
    doc: str = ""
    why_reference: str = ""

    def __post_init__(self):
        if self.source is not None and (self.arch is None or self.launcher is None or not self.entries):
            raise ValueError(f"Kernel {self.name!r}: a kernel with a source needs arch, entries and a launcher")
