"""The default launcher: torch's own torchrun, with the bootstrap in front of the script on every rank.

torchrun's options pass through, so multi-node runs (``--nnodes``, ``--rdzv-*``) work as under plain torchrun; its
``main`` runs behind the agent's hooks (:mod:`.agent`). A single-node run with no rendezvous of its own gets
:mod:`.loopback`'s rendezvous, whose store listens on 127.0.0.1 only (torchrun's ``--standalone`` store listens on
every interface).
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

from dspark_lab.errors import DSparkError
from dspark_lab.runtime.launchers.base import BOOTSTRAP, TORCHRUN_OPTIONS, Launcher
from dspark_lab.runtime.launchers.multinode import max_nodes as _nnodes
from dspark_lab.runtime.limits import is_whole_number
from dspark_lab.runtime.program import bootstrap_words

MAX_NPROC = 1024
MAX_RESTARTS = 100  # what `dspark-lab k8s manifest --max-restarts` allows too


def single_node_loopback(options: Mapping[str, Any]) -> bool:
    """True when nothing about the rendezvous was given: one node, our own loopback store."""
    return _nnodes(options) == 1 and not any(options.get(k) for k in (
        "rdzv_backend", "rdzv_endpoint", "master_addr", "master_port", "node_rank"))


class TorchrunLauncher(Launcher):
    name = "torchrun"
    description = "torch.distributed.run: N ranks per node, torchrun's options pass through (default)"

    def validate(self, nproc: int, options: Mapping[str, Any]) -> None:
        if not 1 <= nproc <= MAX_NPROC:
            raise DSparkError(f"--nproc: must be 1 to {MAX_NPROC}, got {nproc}")
        if _nnodes(options) > 1 and not options.get("rdzv_id"):
            raise DSparkError(f"--rdzv-id: required when --nnodes is above 1 (got --nnodes {options['nnodes']})")
        restarts = str(options.get("max_restarts") or 0)
        if not (is_whole_number(restarts) and int(restarts) <= MAX_RESTARTS):
            raise DSparkError(f"--max-restarts: must be a whole number 0 to {MAX_RESTARTS}, got {restarts[:40]!r}")

    def ranks(self, nproc: int, options: Mapping[str, Any]) -> int:
        return nproc * _nnodes(options)

    def command(self, script: str, script_args: Sequence[str], nproc: int, options: Mapping[str, Any]) -> list[str]:
        return self._command(bootstrap_words(script, script_args, module=False), nproc, options)

    def module_command(self, module: str, module_args: Sequence[str], nproc: int,
                       options: Mapping[str, Any]) -> list[str]:
        return self._command(bootstrap_words(module, module_args, module=True), nproc, options)

    def _command(self, program: Sequence[str], nproc: int, options: Mapping[str, Any]) -> list[str]:
        """torchrun's command line, every rank running the bootstrap with ``program`` (its script or -m MODULE)."""
        if single_node_loopback(options):
            # the loopback module registers its rendezvous with torchrun, then runs torchrun's own main
            command = [sys.executable, "-m", "dspark_lab.runtime.launchers.loopback", f"--nproc-per-node={nproc}",
                       "--nnodes=1", "--rdzv-backend=dspark-loopback", "--rdzv-endpoint=127.0.0.1:0"]
            options = {k: v for k, v in options.items() if k in ("max_restarts", "monitor_interval", "rdzv_id")}
        else:
            # torchrun's own main behind the agent's hooks (a rank killed on any node is named on rank 0's)
            command = [sys.executable, "-m", "dspark_lab.runtime.launchers.agent", f"--nproc-per-node={nproc}"]
            if options.get("rdzv_endpoint") and not options.get("rdzv_backend"):
                options = {**options, "rdzv_backend": "c10d"}  # torchrun's default, static, ignores the endpoint's id
        for name in TORCHRUN_OPTIONS:
            if options.get(name) is not None:
                command.append(f"--{name.replace('_', '-')}={options[name]}")
        return [*command, *BOOTSTRAP, *program]
