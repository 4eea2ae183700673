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


def predict_report(config_path: str) -> Report:
    """``plan predict CONFIG.json``: one prediction per input object, in input order."""
    from dspark_lab.planner.predict import predict_many

    predictions = predict_many(_load_json(config_path, "CONFIG"))
    rows = [_row(p, {"#": i}) for i, p in enumerate(predictions)]
    return Report("plan.predict", {"predictions": predictions}, rows=rows,
                  columns=("#", "step_s", "tok/s/gpu", "mfu", "mem_gb", "fits", "bubble_s"),
                  title=f"plan predict: {len(predictions)} layout(s)")


def search_report(model: str, gpu: str, gpus: int, global_batch: int, seq: int | None = None, top: int = 5,
                  max_memory_gb: float | None = None, gpus_per_node: int = 8) -> Report:
    """``plan search``: the best layouts that fit, by predicted throughput."""
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
    result = search(ModelConfig.from_dict(obj, "--model"), cluster, global_batch, top, max_memory_gb)
    rows = [_row(r, {"rank": i + 1, **{k: r["layout"][k] for k in ("tp", "pp", "dp", "cp", "ep", "vpp",
                                                                   "micro_batch", "recompute")}})
            for i, r in enumerate(result["results"])]
    return Report("plan.search", result, rows=rows,
                  columns=("rank", "tp", "pp", "dp", "cp", "ep", "vpp", "micro_batch", "recompute", "step_s",
                           "tok/s/gpu", "mfu", "mem_gb"),
                  title=f"plan search: {result['model']} on {gpus} x {gpu}, global batch {global_batch}",
                  lines=[f"{result['evaluated']} layouts evaluated, {result['fitting']} fit; "
                         f"search time {result['search_time_s']:.2f} s"])
