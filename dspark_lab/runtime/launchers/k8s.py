"""``dspark-lab k8s manifest``: a Kubeflow ``PyTorchJob`` (kubeflow.org/v1) whose pods run ``dspark-lab run``.

The training operator starts one pod per node and gives each torchrun's ``PET_*`` variables from the job's
``elasticPolicy`` (pkg/controller.v1/pytorch/elastic.go in kubeflow/training-operator, release 1.9): the c10d
rendezvous endpoint ``<name>-worker-0:<port of the container port named pytorchjob-port>``, the rendezvous id, the
node count ``MIN:MAX``, the restarts and the ranks per node. The manifest writes the same variables into the
container's environment too, so a pod reads the same rendezvous whichever of the two it sees, and
``dspark-lab run`` (which reads ``PET_*`` itself, :mod:`.multinode`) joins that rendezvous rather than its
single-node loopback one. The token comes from a Secret mounted as a file, never from an environment variable.
``--policy`` values are checked here as ``dspark-lab run`` checks them, and the command is written so Kubernetes
passes every word through unchanged (it expands ``$(VAR)`` in a container's command: :func:`k8s_literal`).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from dspark_lab.errors import DSparkError
from dspark_lab.runtime.launch import parse_policies
from dspark_lab.runtime.program import bootstrap_words, check_name

API_VERSION = "kubeflow.org/v1"
CONTAINER = "pytorch"  # the operator finds the rendezvous port on the container of this name
PORT_NAME = "pytorchjob-port"
RDZV_PORT = 29400
TOKEN_DIR = "/etc/dspark"
NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?")  # a DNS-1123 label short enough for <name>-worker-N
MAX_NODES = MAX_NPROC = 1024
MAX_RESTARTS = 100
MAX_IMAGE = 512


def secret_name(name: str) -> str:
    return f"{name}-dspark-token"


def pet_environment(name: str, nodes: int, nproc: int, max_restarts: int) -> dict[str, str]:
    """The ``PET_*`` variables the operator derives from the manifest's ``elasticPolicy`` and ``nprocPerNode``."""
    return {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": f"{name}-worker-0:{RDZV_PORT}",
            "PET_RDZV_ID": name, "PET_NNODES": f"{nodes}:{nodes}", "PET_NPROC_PER_NODE": str(nproc),
            "PET_MAX_RESTARTS": str(max_restarts)}


def _check(name: str, image: str, nodes: int, nproc: int, max_restarts: int, script: str) -> None:
    if not NAME.fullmatch(name):
        raise DSparkError(f"--name: {name[:60]!r} is not allowed; allowed: 1 to 40 lowercase letters, digits or '-', "
                          "starting and ending with a letter or digit")
    if not image or len(image) > MAX_IMAGE or any(c.isspace() for c in image):
        raise DSparkError(f"--image: {image[:60]!r} is not an image reference (no spaces, at most {MAX_IMAGE} "
                          "characters)")
    for flag, value, top in (("--nodes", nodes, MAX_NODES), ("--nproc-per-node", nproc, MAX_NPROC),
                             ("--max-restarts", max_restarts, MAX_RESTARTS)):
        low = 0 if flag == "--max-restarts" else 1
        if not low <= value <= top:
            raise DSparkError(f"{flag}: must be {low} to {top}, got {value}")
    if not script:
        raise DSparkError("script: give the training script's path inside the image")


def k8s_literal(word: str) -> str:
    """``word`` written so that Kubernetes hands it to the container as it is: in ``command`` and ``args`` it
    replaces ``$(VAR)`` with the variable's value and ``$$`` with ``$``, so every ``$`` is doubled."""
    return word.replace("$", "$$")


def default_name(script: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", script.rsplit("/", 1)[-1].rsplit(".", 1)[0].lower()).strip("-")
    return (stem or "train")[:40].rstrip("-") or "train"


def manifest(*, image: str, nodes: int, nproc: int, script: str, script_args: Sequence[str] = (),
             name: str | None = None, max_restarts: int = 3, control_host: str | None = None,
             policies: Sequence[str] = (), module: bool = False) -> dict[str, Any]:
    """The PyTorchJob as a dict (render it with PyYAML or JSON; ``kubectl apply -f`` takes either).

    With ``module``, ``script`` is a module's name inside the image (``dspark-lab run -m MODULE`` in every pod);
    only its spelling is checked here, as a script's path is not looked for."""
    if module:
        check_name(script)
    name = name or default_name(script.replace(".", "-") if module else script)
    _check(name, image, nodes, nproc, max_restarts, script)
    parse_policies(policies)  # refused here in one line, as `dspark-lab run --policy` would in the pod
    command = ["dspark-lab", "run", "--token-file", f"{TOKEN_DIR}/token", "--name", name]
    if control_host:
        command += ["--control-host", control_host]
    for policy in policies:
        command += ["--policy", policy]
    command += bootstrap_words(script, script_args, module)
    env = [{"name": k, "value": v} for k, v in pet_environment(name, nodes, nproc, max_restarts).items()]
    container = {
        "name": CONTAINER, "image": image, "command": [k8s_literal(word) for word in command], "env": env,
        "ports": [{"name": PORT_NAME, "containerPort": RDZV_PORT}],
        "volumeMounts": [{"name": "dspark-token", "mountPath": TOKEN_DIR, "readOnly": True}],
    }
    return {
        "apiVersion": API_VERSION, "kind": "PyTorchJob", "metadata": {"name": name},
        "spec": {
            "nprocPerNode": str(nproc),
            "elasticPolicy": {"rdzvBackend": "c10d", "rdzvId": name, "minReplicas": nodes, "maxReplicas": nodes,
                              "maxRestarts": max_restarts},
            "pytorchReplicaSpecs": {"Worker": {
                "replicas": nodes, "restartPolicy": "OnFailure",
                "template": {"spec": {
                    "containers": [container],
                    "volumes": [{"name": "dspark-token",
                                 "secret": {"secretName": secret_name(name), "defaultMode": 0o400}}],
                }},
            }},
        },
    }


def to_yaml(document: dict[str, Any]) -> str:
    try:
        import yaml
    except ImportError:
        raise DSparkError("k8s manifest: PyYAML is not installed (pip install 'dspark-lab[k8s]'), or use --json, "
                          "which kubectl also applies") from None
    return yaml.safe_dump(document, sort_keys=False)
