"""What ``dspark-lab run`` checks and derives for a run of several nodes (torchrun's c10d rendezvous).

Every node runs its own ``dspark-lab run`` with the same ``--rdzv-id``; the run id is derived from it, so each
node's run directory (under its own ``DSPARK_HOME``) has the same name, and the ranks' store keys
(``dspark/<run-id>/...``) meet. The control token comes from ``--token-file`` (the same file on every node, e.g. a
Kubernetes Secret): it never travels through the store, a log or an environment variable.

Inside a Kubeflow ``PyTorchJob`` pod the operator sets torchrun's ``PET_*`` variables; :func:`from_environment`
reads them as if they were given on the command line (an explicit option wins), so the run takes the cluster's
rendezvous and never the single-node loopback one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from dspark_lab.errors import DSparkError
from dspark_lab.runtime.limits import is_whole_number
from dspark_lab.runtime.nodes import STORE_VARIABLE
from dspark_lab.runtime.records import RDZV_RUN_PREFIX

# torchrun reads each of its options from PET_<OPTION> when the flag is absent (torch.distributed.argparse_util).
PET_VARIABLES = {"nnodes": "PET_NNODES", "node_rank": "PET_NODE_RANK", "rdzv_backend": "PET_RDZV_BACKEND",
                 "rdzv_endpoint": "PET_RDZV_ENDPOINT", "rdzv_id": "PET_RDZV_ID", "max_restarts": "PET_MAX_RESTARTS",
                 "master_addr": "PET_MASTER_ADDR", "master_port": "PET_MASTER_PORT",
                 "monitor_interval": "PET_MONITOR_INTERVAL", "local_addr": "PET_LOCAL_ADDR"}
PET_NPROC = "PET_NPROC_PER_NODE"
RDZV_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TOKEN = re.compile(r"[A-Za-z0-9_.~+/=-]{16,512}")
MAX_TOKEN_FILE = 4096
HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}")


def from_environment(options: Mapping[str, Any], nproc: int | None,
                     env: Mapping[str, str] | None = None) -> tuple[dict[str, Any], int]:
    """``options`` and ``nproc`` with every one not given filled from its ``PET_*`` variable (1 rank by default)."""
    env = os.environ if env is None else env
    filled = dict(options)
    for name, variable in PET_VARIABLES.items():
        if filled.get(name) is None and env.get(variable):
            filled[name] = env[variable]
    if nproc is None:
        text = env.get(PET_NPROC) or "1"
        if not is_whole_number(text):
            raise DSparkError(f"{PET_NPROC}: expected a whole number of ranks per node, got {text[:40]!r}")
        nproc = int(text)
    return filled, nproc


def max_nodes(options: Mapping[str, Any]) -> int:
    text = str(options.get("nnodes") or 1)
    parts = text.split(":")
    if len(parts) > 2 or not all(is_whole_number(p) and int(p) >= 1 for p in parts) or int(parts[0]) > int(parts[-1]):
        raise DSparkError(f"--nnodes: expected N or MIN:MAX (whole numbers, 1 <= MIN <= MAX), got {text[:40]!r}")
    return int(parts[-1])


def run_id_for(rdzv_id: str) -> str:
    """The run id every node derives from the rendezvous id."""
    if not RDZV_ID.fullmatch(rdzv_id):
        raise DSparkError(f"--rdzv-id: {rdzv_id[:70]!r} is not allowed; allowed: 1 to 64 letters, digits, '.', '_' "
                          "or '-', starting with a letter or digit")
    return RDZV_RUN_PREFIX + rdzv_id


def read_token_file(path: str) -> str:
    """The run's token from ``--token-file`` (surrounding whitespace stripped)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_FILE + 1)
    except OSError as exc:
        raise DSparkError(f"--token-file: cannot read {path}: {exc.strerror}") from None
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if len(data) > MAX_TOKEN_FILE or not TOKEN.fullmatch(token):
        raise DSparkError(f"--token-file: {path} must hold one token of 16 to 512 URL-safe or base64 characters "
                          "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return token


def check_control_host(host: str | None) -> str | None:
    if host is not None and not HOST.fullmatch(host):
        raise DSparkError(f"--control-host: {host[:70]!r} is not an IP address or host name")
    return host


def check(options: Mapping[str, Any], token_file: str | None) -> None:
    """Refuse a multi-node launch that cannot form one run: no rendezvous id, endpoint or token."""
    if max_nodes(options) == 1:
        return
    nnodes = options.get("nnodes")
    if not options.get("rdzv_id"):
        raise DSparkError(f"--rdzv-id: required when --nnodes is above 1 (got --nnodes {nnodes}); every node "
                          "passes the same one, and the run id is derived from it")
    if not options.get("rdzv_endpoint") and not options.get("master_addr"):
        raise DSparkError(f"--rdzv-endpoint: required when --nnodes is above 1 (got --nnodes {nnodes}): HOST:PORT "
                          "of the node that hosts the rendezvous")
    if not token_file:
        raise DSparkError(f"--token-file: required when --nnodes is above 1 (got --nnodes {nnodes}): the same "
                          "token file on every node (e.g. a Kubernetes Secret), never sent through the store")
    if not Path(token_file).is_file():
        raise DSparkError(f"--token-file: {token_file} is not a file")


C10D_PORT = 29400  # torchrun's default port of a c10d rendezvous endpoint


def store_environment(options: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """The variables a multi-node c10d run adds for its ranks.

    ``DSPARK_STORE``: the rendezvous store (HOST:PORT of ``--rdzv-endpoint``), which lives as long as the agent
    hosting it, so the runtime's keys (the saved policies, the endpoint, the relayed records) outlive a restart.
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` with ``--max-restarts`` above 0: under torch 2.13 a restarted group
    on a shared store fails in ``init_process_group`` (gloo's connectFullMesh times out on the addresses of the
    group before; plain torchrun does the same), while a store per group restarts cleanly. A value the user set
    is kept.
    """
    if max_nodes(options) == 1 or (options.get("rdzv_backend") or "c10d") != "c10d" or \
            not options.get("rdzv_endpoint"):
        return {}
    endpoint = str(options["rdzv_endpoint"])
    host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", str(C10D_PORT))
    added = {STORE_VARIABLE: f"{host}:{port or C10D_PORT}"}
    if str(options.get("max_restarts") or "0") != "0" and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env:
        added["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return added
