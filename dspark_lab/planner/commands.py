"""The ``dspark-lab plan`` verbs as functions returning :class:`~dspark_lab.output.Report` (CLI and notebooks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dspark_lab.errors import DSparkError
from dspark_lab.output import Report

MAX_CONFIG_BYTES = 16 << 20


def _load_json(path: str, field: str) -> Any:
    p = Path(path)
    if not p.is_file():
        if field == "--model":
            from dspark_lab.planner.presets import PRESETS

            raise DSparkError(f"--model: {path!r} is neither a preset nor a file; allowed: {' | '.join(PRESETS)} "
                              "or a model JSON file")
        raise DSparkError(f"{field}: no such file {path!r}")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise DSparkError(f"{field}: {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DSparkError(f"{field}: {path} is not JSON ({exc})") from None


def _row(pred: dict, extra: dict | None = None) -> dict:
    return {**(extra or {}), "step_s": pred["step_time_s"], "tok/s/gpu": pred["tokens_per_s_per_gpu"],
            "mfu": pred["mfu"], "mem_gb": pred["memory_gb"]["total"], "fits": pred["fits"],
            "bubble_s": pred["breakdown_s"]["pipeline_bubble"]}


def predict_report(config_path: str, allocator: bool = True) -> Report:
    """``plan predict CONFIG.json``: one prediction per input object, in input order; ``allocator`` false skips the
    caching-allocator replay (``--no-allocator``)."""
    from dspark_lab.planner.predict import predict_many

    predictions = predict_many(_load_json(config_path, "CONFIG"), allocator=allocator)
    rows = [_row(p, {"#": i}) for i, p in enumerate(predictions)]
    return Report("plan.predict", {"predictions": predictions}, rows=rows,
                  columns=("#", "step_s", "tok/s/gpu", "mfu", "mem_gb", "fits", "bubble_s"),
                  title=f"plan predict: {len(predictions)} layout(s)")


def search_report(model: str, gpu: str, gpus: int, global_batch: int, seq: int | None = None, top: int = 5,
                  max_memory_gb: float | None = None, gpus_per_node: int = 8, html: str | None = None,
                  framework: str = "megatron", fixed: dict | None = None) -> Report:
    """``plan search``: the best layouts that fit, by predicted throughput; ``html``: also write the bokeh view;
    ``framework`` and ``fixed``: :func:`dspark_lab.planner.search.candidates`."""
    from dspark_lab.planner.model.config import Cluster, ModelConfig
    from dspark_lab.planner.presets import PRESETS, preset
    from dspark_lab.planner.search import search

    if model in PRESETS:
        obj = preset(model, seq)
    else:
        obj = _load_json(model, "--model")
        if seq is not None and isinstance(obj, dict):
            obj = {**obj, "seq_len": seq}
    cluster = Cluster.from_dict({"gpu": gpu, "gpus": gpus, "gpus_per_node": gpus_per_node}, "--gpu/--gpus")
    if html is not None and not Path(html).parent.resolve().is_dir():
        raise DSparkError(f"--html: the folder of {html!r} does not exist")
    result = search(ModelConfig.from_dict(obj, "--model"), cluster, global_batch, top, max_memory_gb,
                    points=html is not None, framework=framework, fixed=fixed)
    lines = []
    if html is not None:
        from dspark_lab.planner.view import write_html

        lines.append(f"view written to {write_html(result, html)}")
        del result["points"]  # the view holds them; the report stays the size of --top
    rows = [_row(r, {"rank": i + 1, **{k: r["layout"][k] for k in ("tp", "pp", "dp", "cp", "ep", "vpp",
                                                                   "micro_batch", "recompute")}})
            for i, r in enumerate(result["results"])]
    return Report("plan.search", result, rows=rows,
                  columns=("rank", "tp", "pp", "dp", "cp", "ep", "vpp", "micro_batch", "recompute", "step_s",
                           "tok/s/gpu", "mfu", "mem_gb"),
                  title=f"plan search: {result['model']} on {gpus} x {gpu}, global batch {global_batch}"
                        + (f", {framework}" if framework != "megatron" else ""),
                  lines=[f"{result['evaluated']} layouts evaluated, {result['fitting']} fit; "
                         f"search time {result['search_time_s']:.2f} s", *lines])


def whatif_report(run: str, model: str | None = None, gpu: str | None = None, gpus: int | None = None,
                  global_batch: int | None = None, seq: int | None = None, top: int = 3,
                  framework: str | None = None, fixed: dict | None = None) -> Report:
    """``plan whatif RUN``: the job's layout now (predicted) and the best layouts on another GPU count or type."""
    from dspark_lab.planner.whatif import rows, whatif
    from dspark_lab.runtime.records import find_run

    from dspark_lab.planner.presets import PRESETS

    model_arg = model if model is None or model in PRESETS else _load_json(model, "--model")
    result = whatif(find_run(run), model=model_arg, gpu=gpu, gpus=gpus, global_batch=global_batch, seq=seq, top=top,
                    framework=framework, fixed=fixed)
    cur, tgt = result["current"], result["target"]
    lines = [f"model {result['model']} (from {result['model_from']}); now {cur['gpus']} x {cur['gpu'] or '?'}, "
             f"global batch {cur['global_batch']}; framework {result['framework']} ({result['framework_from']})"]
    if "not_planned" in cur:
        lines.append(f"current layout not predicted: {cur['not_planned']}")
    lines.append(f"{tgt['evaluated']} layouts evaluated on {tgt['gpus']} x {tgt['gpu']}, {tgt['fitting']} fit; "
                 f"search time {tgt['search_time_s']:.2f} s")
    return Report("plan.whatif", result, rows=rows(result),
                  columns=("what", "gpu", "gpus", "tp", "pp", "dp", "cp", "vpp", "mb", "recompute", "step_s",
                           "tok/s/gpu", "mfu", "mem_gb"),
                  title=f"plan whatif: run {result['run']}", lines=lines)
