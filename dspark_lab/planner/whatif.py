"""``plan whatif RUN``: what a running (or finished) job would do on another GPU count or type.

The job is read from the runtime's records (``run.json``, ``metrics.jsonl``) and, while it runs, its control
endpoint's ``/status``. The model comes from, in order: ``--model`` (a preset or a JSON file), the ``job.model``
the runtime reads from the live model (:mod:`dspark_lab.runtime.modelshape`: ``layers``, ``hidden``, ``heads``,
``vocab``, ``seq_len``, ...), or a parameter count the job reports (``job.model.params``, ``job.params`` or a
metrics record's ``params``), planned as a GPT-shaped model of that size (``hidden`` about ``128 * layers``, near
the aspect ratio Kaplan et al. 2020 found optimal, rounded to a multiple of 1024). The world is the job's rank
count and the ``job.parallelism`` the runtime reads from its meshes (``tp``, ``pp``, ``dp``, ``zero``); else pure
data parallelism. The framework is ``--framework``, else torchtitan's defaults for a job that runs FSDP2 or
torch.distributed.pipelining (PyTorch's own stack), else Megatron's. The global batch is ``--global-batch`` or what
the metrics show (samples per step on a rank times the data-parallel size).
"""

from __future__ import annotations

from typing import Any

from dspark_lab.errors import DSparkError
from dspark_lab.planner.model.config import Cluster, Layout, ModelConfig
from dspark_lab.planner.predict import Inputs, predict_inputs
from dspark_lab.planner.presets import PRESETS, preset
from dspark_lab.planner.search import search
from dspark_lab.runtime.control import ControlClient, ControlError
from dspark_lab.runtime.records import RunDir

MODEL_FIELDS = ("layers", "hidden", "heads", "vocab", "seq_len")
MAX_PARAMS = 1e14
DEFAULT_SEQ = 2048  # a sequence length the job does not publish; --seq gives the real one


def live_status(run: RunDir) -> dict[str, Any]:
    """The job's ``/status`` while it runs; an empty dict when it has no live endpoint."""
    try:
        return ControlClient(run, timeout=5.0, start_wait=0.0).request("GET", "/status")
    except (ControlError, OSError):
        return {}


def model_from_params(params: float, seq_len: int, vocab: int = 50257) -> dict[str, Any]:
    """A GPT-shaped model of about ``params`` parameters (``12 L h^2 + V h``): ``h`` near ``128 L`` and a multiple of
    1024, so heads of width 128 come in multiples of 8 (any tensor-parallel size up to 8 divides them)."""
    if not 1e6 <= params <= MAX_PARAMS:
        raise DSparkError(f"params: the job reports {params:.3g} parameters; plannable range is 1e6..{MAX_PARAMS:g}")

    def shape(layers: int) -> tuple[int, int]:
        hidden = max(1024, round(128 * layers / 1024) * 1024)
        return hidden, 12 * layers * hidden * hidden + vocab * hidden

    layers = min(range(1, 513), key=lambda n: abs(shape(n)[1] - params))
    hidden = shape(layers)[0]
    return {"layers": layers, "hidden": hidden, "heads": hidden // 128, "vocab": vocab, "seq_len": seq_len,
            "name": f"gpt-shaped-{params / 1e9:.3g}b"}


def _metrics_last(run: RunDir, key: str) -> Any:
    for record in reversed(run.metrics()):
        if record.get(key) is not None:
            return record[key]
    return None


def job_model(run: RunDir, job: dict, model: str | dict | None, seq: int | None) -> tuple[dict, str]:
    """The model to plan on and where it came from."""
    if isinstance(model, dict):
        return ({**model, "seq_len": seq} if seq else model), "--model"
    if isinstance(model, str):
        if model not in PRESETS:
            raise DSparkError(f"--model: unknown preset {model!r}; choose from {', '.join(PRESETS)} or give a file")
        return preset(model, seq), "--model"
    published = job.get("model")
    if isinstance(published, dict):
        fields = {k: v for k, v in published.items() if k in ModelConfig.__slots__}
        if isinstance(published.get("class"), str):
            fields.setdefault("name", published["class"].rsplit(".", 1)[-1])
        if seq:
            fields["seq_len"] = seq
        if all(k in fields for k in MODEL_FIELDS):
            return fields, "job.model"
        if all(k in fields for k in MODEL_FIELDS if k != "seq_len"):
            return {**fields, "seq_len": DEFAULT_SEQ}, f"job.model, seq_len {DEFAULT_SEQ} assumed (give --seq)"
    params = (published or {}).get("params") if isinstance(published, dict) else None
    params = params or job.get("params") or _metrics_last(run, "params")
    if params:
        return model_from_params(float(params), seq or DEFAULT_SEQ), "parameter count"
    if job.get("discovered") is False:
        raise DSparkError("model: the job is not discovered yet (the runtime finds the model at the first optimizer "
                          "step); ask again after it, or give --model PRESET|FILE")
    raise DSparkError("model: the run publishes no model description or parameter count; give --model "
                      "PRESET|FILE")


def live_settings(status: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Layout fields the running job shows: full recompute where ``memory.activation_checkpointing=full`` is in force
    (``none`` says only that DSpark applied none: a script may checkpoint by itself), and fused kernels where
    torch.compile compiled its modules."""
    out: dict[str, Any] = {}
    if (status.get("policies") or {}).get("memory.activation_checkpointing") == "full":
        out["recompute"] = "full"
    if isinstance(job.get("compile"), dict) and job["compile"].get("compiled") is True:
        out["kernels"] = "fused"
    return out


def job_framework(job: dict[str, Any]) -> tuple[str, str]:
    """The framework whose defaults fit the job, and why: PyTorch's own FSDP2 or pipelining -> torchtitan's."""
    dp = job.get("data_parallel") if isinstance(job.get("data_parallel"), dict) else {}
    pipe = job.get("pipeline") if isinstance(job.get("pipeline"), dict) else {}
    if dp.get("kind") == "fsdp2":
        return "torchtitan", "the job runs FSDP2"
    if pipe.get("kind") == "torch.distributed.pipelining":
        return "torchtitan", "the job runs torch.distributed.pipelining"
    return "megatron", "default; the job runs neither FSDP2 nor torch pipelining"


def whatif(run: RunDir, *, model: str | dict | None = None, gpu: str | None = None, gpus: int | None = None,
           global_batch: int | None = None, seq: int | None = None, top: int = 3, manager=None,
           framework: str | None = None, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    info = run.info()
    status = live_status(run)
    job = {**(info.get("job") or {}), **(status.get("job") or {})}
    model_obj, model_from = job_model(run, job, model, seq)
    model_cfg = ModelConfig.from_dict(model_obj, "--model")
    ranks = int(status.get("rank_count") or info.get("ranks") or 1)
    par = job.get("parallelism") if isinstance(job.get("parallelism"), dict) else {}
    framework, framework_from = (framework, "--framework") if framework else job_framework(job)
    current_gpu = job.get("gpu") or status.get("backend") or info.get("backend")
    tp, pp, cp = int(par.get("tp", 1)), int(par.get("pp", 1)), int(par.get("cp", 1))
    dp = int(par.get("dp", max(1, ranks // (tp * pp * cp))))
    if global_batch is None:
        per_rank = _metrics_last(run, "samples_per_s")
        step = _metrics_last(run, "step_time_s")
        if per_rank and step:
            global_batch = max(1, round(per_rank * step)) * dp
    if not global_batch:
        raise DSparkError("--global-batch: the run's metrics show no samples per step; give --global-batch")
    target_gpu = gpu or current_gpu
    if not target_gpu:
        raise DSparkError("--gpu: the run does not say which GPU it runs on; give --gpu NAME")
    target_gpus = gpus or ranks
    out: dict[str, Any] = {"run": run.id, "model": model_cfg.name or "custom", "model_from": model_from,
                           "framework": framework, "framework_from": framework_from,
                           "current": {"gpu": current_gpu, "gpus": ranks, "tp": tp, "pp": pp, "dp": dp, "cp": cp,
                                       "global_batch": global_batch},
                           "target": {"gpu": target_gpu, "gpus": target_gpus}}
    if current_gpu:
        try:
            published = {**live_settings(status, job), **{k: par[k] for k in ("zero", "recompute") if k in par}}
            if "zero" not in published and framework == "megatron" and dp == 1:
                published["zero"] = 0  # nothing to shard the optimizer over
            layout = Layout.from_dict({**published, **(fixed or {}), "tp": tp, "pp": pp, "dp": dp, "cp": cp,
                                       "micro_batch": int(par.get("micro_batch", 1)), "global_batch": global_batch,
                                       "framework": framework})
            pred = predict_inputs(Inputs(model_cfg, Cluster(gpu=current_gpu, gpus=ranks), layout), manager)
            out["current"]["prediction"] = pred
        except DSparkError as exc:  # e.g. a CPU backend has no figures to plan on
            out["current"]["not_planned"] = str(exc)
    result = search(model_cfg, Cluster(gpu=target_gpu, gpus=target_gpus), global_batch, top, None, manager,
                    framework=framework, fixed=fixed)
    out["target"].update(search_time_s=result["search_time_s"], evaluated=result["evaluated"],
                         fitting=result["fitting"], results=result["results"])
    return out


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row for the current layout (if planned) and one per proposed layout on the target."""
    out = []
    cur = result["current"]
    if "prediction" in cur:
        p = cur["prediction"]
        out.append({"what": "now", "gpu": cur["gpu"], "gpus": cur["gpus"],
                    **{k: cur[k] for k in ("tp", "pp", "dp", "cp")}, "vpp": 1, "mb": "", "recompute": "",
                    "step_s": p["step_time_s"],
                    "tok/s/gpu": p["tokens_per_s_per_gpu"], "mfu": p["mfu"], "mem_gb": p["memory_gb"]["total"]})
    for i, r in enumerate(result["target"]["results"]):
        lay = r["layout"]
        out.append({"what": f"#{i + 1}", "gpu": result["target"]["gpu"], "gpus": result["target"]["gpus"],
                    **{k: lay[k] for k in ("tp", "pp", "dp", "cp", "vpp")}, "mb": lay["micro_batch"],
                    "recompute": lay["recompute"], "step_s": r["step_time_s"],
                    "tok/s/gpu": r["tokens_per_s_per_gpu"], "mfu": r["mfu"], "mem_gb": r["memory_gb"]["total"]})
    return out

