"""The built-in launchers, registered through the ``dspark_launchers`` hook like a third party's."""

from __future__ import annotations

from dspark_lab import hookimpl
from dspark_lab.runtime.launchers.python import PythonLauncher
from dspark_lab.runtime.launchers.torchrun import TorchrunLauncher


@hookimpl
def dspark_launchers():
    return [TorchrunLauncher(), PythonLauncher()]
