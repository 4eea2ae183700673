"""What a launcher is: the one interface ``dspark-lab run`` starts a script through.

A launcher turns (script, arguments, ranks per node, its options) into the command and the environment the
supervisor (:mod:`dspark_lab.runtime.launch`) starts; every rank it starts runs :mod:`dspark_lab.runtime.bootstrap`
in front of the user's script, so the run directory, control endpoint, records and live policies are the same
whatever launched it. Built-in launchers (:mod:`.torchrun`, :mod:`.python`) and third-party ones (a cluster
launcher) are registered through the ``dspark_launchers`` hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

BOOTSTRAP = ("-m", "dspark_lab.runtime.bootstrap")

# torchrun's options as ``dspark-lab run`` spells them (argparse dest names); a launcher that is not torchrun
# refuses every one it does not accept.
TORCHRUN_OPTIONS = ("nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "max_restarts",
                    "master_addr", "master_port", "monitor_interval", "local_addr")


class Launcher(ABC):
    """Starts the ranks of one run. Subclasses set ``name`` and ``description`` and implement the methods."""

    name: str = ""
    description: str = ""

    @abstractmethod
    def validate(self, nproc: int, options: Mapping[str, Any]) -> None:
        """Raise :class:`~dspark_lab.errors.DSparkError` (one line naming the option) for what it cannot do.

        ``options`` maps option names (``TORCHRUN_OPTIONS`` and any the launcher adds) to values; ``None`` means
        not given.
        """

    @abstractmethod
    def ranks(self, nproc: int, options: Mapping[str, Any]) -> int:
        """How many ranks the run has in all (every node)."""

    @abstractmethod
    def command(self, script: str, script_args: Sequence[str], nproc: int, options: Mapping[str, Any]) -> list[str]:
        """The command line the supervisor runs; each rank it starts must run ``python -m
        dspark_lab.runtime.bootstrap script args...``."""

    def module_command(self, module: str, module_args: Sequence[str], nproc: int,
                       options: Mapping[str, Any]) -> list[str]:
        """The command line of ``dspark-lab run -m MODULE``; each rank it starts must run ``python -m
        dspark_lab.runtime.bootstrap -m MODULE args...`` (:func:`dspark_lab.runtime.program.bootstrap_words`).

        A launcher written before module mode (a plugin's) implements only :meth:`command` and keeps working for
        scripts; a module run through it is refused here in one line, before anything starts."""
        from dspark_lab.errors import DSparkError

        raise DSparkError(f"-m: --launcher {self.name} runs a script's path only (it has no module_command); give "
                          "the module's file as the script, or use --launcher torchrun or python")

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """The environment the command runs in, given the supervisor's (which carries ``DSPARK_*``)."""
        return dict(env)

    def __repr__(self) -> str:
        return f"<launcher {self.name}>"
