"""One process, no torchrun: ``dspark-lab run --launcher python script.py`` runs ``python -m
dspark_lab.runtime.bootstrap script.py`` with torchrun's variables taken out of the environment.

For the scripts that switch to DDP whenever torchrun's ``RANK`` is set (nanoGPT's train.py and its copies): under
this launcher the script sees no ``RANK`` and runs as ``python script.py`` would, while the bootstrap still gives it
the run directory, the control endpoint, the records and the live policies (a world of one needs no store).
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

from dspark_lab.errors import DSparkError
from dspark_lab.runtime.launchers.base import BOOTSTRAP, TORCHRUN_OPTIONS, Launcher
from dspark_lab.runtime.program import bootstrap_words

# What torchrun (and torch.distributed's env:// init) sets for a rank; the script must not see any of them.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                "TORCHELASTIC_ERROR_FILE")


class PythonLauncher(Launcher):
    name = "python"
    description = "one process, as `python script.py`: no torchrun environment (no RANK)"

    def validate(self, nproc: int, options: Mapping[str, Any]) -> None:
        if nproc != 1:
            raise DSparkError(f"--nproc: --launcher python runs one process, got {nproc}; use --launcher torchrun")
        given = [name for name in TORCHRUN_OPTIONS if options.get(name) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise DSparkError(f"{flag}: a torchrun option; --launcher python takes none (use --launcher torchrun)")

    def ranks(self, nproc: int, options: Mapping[str, Any]) -> int:
        return 1

    def command(self, script: str, script_args: Sequence[str], nproc: int, options: Mapping[str, Any]) -> list[str]:
        return [sys.executable, *BOOTSTRAP, *bootstrap_words(script, script_args, module=False)]

    def module_command(self, module: str, module_args: Sequence[str], nproc: int,
                       options: Mapping[str, Any]) -> list[str]:
        return [sys.executable, *BOOTSTRAP, *bootstrap_words(module, module_args, module=True)]

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in env.items() if k not in TORCHRUN_ENV}
