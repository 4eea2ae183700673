"""`dspark-lab k8s manifest`: valid against the PyTorchJob CRD's published schema, and its PET_* variables make
`dspark-lab run` join the rendezvous the operator sets up (two local agents stand in for two pods)."""

from __future__ import annotations

import copy
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_lab.localhost import free_port
from dspark_lab.runtime.launchers import k8s, multinode

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the k8s extra")

CRD = Path(__file__).parent / "data" / "kubeflow.org_pytorchjobs.yaml"
SCRIPT = Path(__file__).parent / "runtime_fixtures" / "nodes_train.py"
CLI = [sys.executable, "-m", "dspark_lab.cli"]


def strict(schema):
    """The CRD's schema as the API server applies it with strict field validation (kubectl's default): an object
    with listed properties takes no others, unless it says x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator():
    # imported here, not at collection: jsonschema's format checkers build a URI grammar at import (seconds)
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with the dev extra")
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert crd["spec"]["group"] == "kubeflow.org" and crd["spec"]["names"]["kind"] == "PyTorchJob"
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def cli_manifest(*args) -> dict:
    done = subprocess.run([*CLI, "k8s", "manifest", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_the_manifest_is_a_valid_pytorchjob(validator):
    document = cli_manifest("--image", "ghcr.io/me/train:1", "--nodes", "3", "--nproc-per-node", "4",
                            "--name", "llama", "--max-restarts", "2", "train.py", "--steps", "100")
    errors = sorted(validator.iter_errors(document), key=str)
    assert not errors, [e.message for e in errors]
    assert document["apiVersion"] == "kubeflow.org/v1" and document["kind"] == "PyTorchJob"
    worker = document["spec"]["pytorchReplicaSpecs"]["Worker"]
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and worker["replicas"] == 3
    assert container["command"][:2] == ["dspark-lab", "run"] and container["command"][-3:] == ["train.py", "--steps",
                                                                                                "100"]
    assert document["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    assert "token" not in json.dumps(container["env"]).lower()  # the token is a mounted Secret, never a variable


def test_the_validator_catches_what_the_api_server_refuses(validator):
    good = k8s.manifest(image="img", nodes=2, nproc=2, script="t.py")
    for path, value in ((("spec", "elasticPolicy", "minReplicas"), "two"),
                        (("spec", "elasticPolicy", "rdzvIdd"), "x"),
                        (("spec", "nprocPerNode"), 2)):
        bad = copy.deepcopy(good)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert list(validator.iter_errors(bad)), path


def test_the_pet_variables_are_what_the_operator_derives_from_the_elastic_policy():
    document = k8s.manifest(image="img", nodes=4, nproc=8, script="t.py", name="job", max_restarts=5)
    policy = document["spec"]["elasticPolicy"]
    container = document["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "pytorchjob-port")
    # training-operator release-1.9, pkg/controller.v1/pytorch/elastic.go and envvar.go
    assert env == {"PET_RDZV_ENDPOINT": f"job-worker-0:{port}", "PET_RDZV_BACKEND": policy["rdzvBackend"],
                   "PET_NNODES": f"{policy['minReplicas']}:{policy['maxReplicas']}",
                   "PET_MAX_RESTARTS": str(policy["maxRestarts"]), "PET_RDZV_ID": policy["rdzvId"],
                   "PET_NPROC_PER_NODE": document["spec"]["nprocPerNode"]}
    options, nproc = multinode.from_environment({}, None, env)
    assert nproc == 8 and multinode.max_nodes(options) == 4 and multinode.run_id_for(options["rdzv_id"]) == "rdzv-job"


def kubernetes_expand(word: str, env: dict[str, str]) -> str:
    """What Kubernetes makes of a word of a container's command or args (third_party/forked/golang/expansion,
    expand.go): ``$(NAME)`` of a defined variable is its value, ``$$`` is ``$``, anything else stays."""
    out, i = [], 0
    while i < len(word):
        if word[i] == "$" and i + 1 < len(word):
            if word[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            close = word.find(")", i + 2) if word[i + 1] == "(" else -1
            if close != -1:
                name = word[i + 2:close]
                out.append(env.get(name, f"$({name})"))
                i = close + 1
                continue
        out.append(word[i])
        i += 1
    return "".join(out)


def test_script_arguments_reach_the_pod_unexpanded():
    """Kubernetes substitutes $(VAR) in a command: the manifest doubles every '$' so the script gets its words."""
    words = ["--out", "$(PET_RDZV_ID)/ckpt", "$$(HOME)", "cost$5", "$", "$(", "a)$(b"]
    document = k8s.manifest(image="img", nodes=2, nproc=1, script="t$(PET_NNODES).py", script_args=words,
                            name="job", policies=["profile.steps=2"])
    container = document["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]} | {"HOME": "/root"}
    seen = [kubernetes_expand(word, env) for word in container["command"]]
    assert seen[-len(words) - 1:] == ["t$(PET_NNODES).py", *words]
    assert seen[:2] == ["dspark-lab", "run"] and "profile.steps=2" in seen
    assert kubernetes_expand("$(PET_RDZV_ID)", env) == "job"  # the emulation does substitute


@pytest.mark.parametrize("policy, message", [
    ("a=b\n---\nkind: Pod", "--policy: unknown policy 'a'; known: "),
    ("memory.activation_checkpointing=bogus", "memory.activation_checkpointing: 'bogus' is not allowed; allowed: "),
    ("no-equals-sign", "policy: expected KEY=VALUE"),
])
def test_policies_are_checked_when_the_manifest_is_written(policy, message):
    """As `dspark-lab run --policy` checks them in the pod, with the same parser and schemas: one line, no file."""
    done = subprocess.run([*CLI, "k8s", "manifest", "--image", "img", "--nodes", "2", "--policy", policy, "t.py"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.startswith(f"error: {message}"), done.stderr
    assert done.stderr.count("\n") == 1
    document = cli_manifest("--image", "img", "--nodes", "2", "--policy", "memory.activation_checkpointing=full",
                            "t.py")
    command = document["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--policy") + 1] == "memory.activation_checkpointing=full"


@pytest.mark.slow
def test_two_pods_with_those_variables_form_one_run(tmp_path):
    """Two agents started the way the pods are: the container's command and exactly its PET_* variables, except
    the rendezvous host (``job-worker-0`` resolves only in the cluster: 127.0.0.1 here) and the token path."""
    document = k8s.manifest(image="img", nodes=2, nproc=2, script=str(SCRIPT), script_args=["20", "0.02"],
                            name="podjob", max_restarts=0)
    container = document["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    pet = {e["name"]: e["value"] for e in container["env"]}
    pet["PET_RDZV_ENDPOINT"] = pet["PET_RDZV_ENDPOINT"].replace("podjob-worker-0:29400", f"127.0.0.1:{free_port()}")
    token = tmp_path / "token"
    token.write_text(secrets.token_urlsafe(24))
    command = [*CLI, *container["command"][1:]]
    command[command.index(f"{k8s.TOKEN_DIR}/token")] = str(token)
    log = tmp_path / "ranks"
    log.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    procs = [subprocess.Popen(command, env={**clean, **pet, "PET_LOCAL_ADDR": "127.0.0.1", "NODES_LOG": str(log),
                                            "DSPARK_HOME": str(tmp_path / f"pod{n}")},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for n in (0, 1)]
    try:
        outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = [tmp_path / f"pod{n}" / "runs" / "rdzv-podjob" for n in (0, 1)]
    infos = [json.loads((run / "run.json").read_text()) for run in runs]
    assert [i["ranks"] for i in infos] == [4, 4] and [i["state"] for i in infos] == ["finished", "finished"]
    assert all("loopback" not in " ".join(i["command"]) for i in infos)
    starts = [json.loads(line) for run in runs for line in (run / "events.jsonl").read_text().splitlines()]
    starts = [e for e in starts if e["kind"] == "start"]
    assert {e["rank"] for e in starts} == {0, 1, 2, 3} and all(e["reason"].endswith("world 4") for e in starts)



def test_a_module_runs_in_every_pod_as_dspark_lab_run_m():
    document = k8s.manifest(image="img", nodes=2, nproc=2, script="torchtitan.train", module=True,
                            script_args=["--job.config_file", "$(X).toml"])
    container = document["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["command"][-4:] == ["-m", "torchtitan.train", "--job.config_file", "$$(X).toml"]
    assert document["metadata"]["name"] == "torchtitan-train"
