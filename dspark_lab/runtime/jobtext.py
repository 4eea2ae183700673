"""The ``job`` object of ``status`` (:mod:`.jobinfo`) as short ``(field, text)`` rows, for people.

``dspark-lab status RUN`` prints them under the run's fields and the live dashboard shows them as a small table:
the model and its blocks (type, count, path), data / tensor / pipeline parallelism, compile, mixed precision, and
every policy that cannot apply to this job with its reason. Plain data in, plain data out: no torch import.
"""

from __future__ import annotations

from typing import Any

MAX_TEXT = 300  # characters per row: a reason naming a framework feature fits, a pasted traceback does not


def _mesh(mesh: dict | None) -> str:
    if not mesh:
        return ""
    shape, names = mesh.get("shape") or [], mesh.get("dim_names") or []
    dims = " x ".join(f"{n}={s}" for n, s in zip(names, shape)) if len(names) == len(shape) else str(shape)
    return f" on mesh {dims} ({mesh.get('device_type')})"


def _data_parallel(dp: dict | None) -> str:
    if not dp:
        return "none"
    kind = dp.get("kind")
    if kind == "ddp":
        return f"DDP, world {dp.get('world')}, buckets {dp.get('bucket_mb', 0):g} MB"
    if kind == "fsdp2":
        return (f"FSDP2 (fully_shard, {dp.get('modules')} modules){_mesh(dp.get('mesh'))}, "
                f"reshard_after_forward={dp.get('reshard_after_forward')}")
    if kind == "fsdp1":
        return (f"FSDP1 (FullyShardedDataParallel, {dp.get('units')} units), world {dp.get('world')}, "
                f"{dp.get('sharding_strategy')}, use_orig_params={dp.get('use_orig_params')}")
    return str(kind)


def _tensor_parallel(tp: dict | None) -> str:
    if not tp:
        return "none"
    placements = ", ".join(f"{p} x{n}" for p, n in (tp.get("placements") or {}).items())
    return f"{tp.get('dtensor_params')} DTensor parameters{_mesh(tp.get('mesh'))}: {placements}"


def _pipeline(pp: dict | None) -> str:
    if not pp:
        return "none"
    if pp.get("kind") == "dspark":
        return f"DSpark executor, schedule {pp.get('schedule')}, {pp.get('microbatches')} micro-batches"
    return (f"{pp.get('schedule')} (torch.distributed.pipelining), stages {pp.get('stage_indices')} on this rank, "
            f"{pp.get('microbatches')} micro-batches")


def _compile(c: dict | None) -> str:
    if not c or not c.get("compiled"):
        functions = (c or {}).get("functions_compiled") or 0
        return f"no module compiled ({functions} function(s) compiled)" if functions else "no"
    return "torch.compile on " + ", ".join(c.get("modules") or ["the model"])


def _precision(mp: dict | None) -> str:
    if not mp:
        return "-"
    parts = [", ".join(f"{d.removeprefix('torch.')} x{n}" for d, n in (mp.get("param_dtypes") or {}).items())
             or "no parameters"]
    if mp.get("autocast"):
        parts.append(f"autocast {mp['autocast']}")
    fsdp = mp.get("fsdp") or {}
    if fsdp.get("param_dtype") or fsdp.get("reduce_dtype"):
        parts.append(f"FSDP param {fsdp.get('param_dtype')}, reduce {fsdp.get('reduce_dtype')}")
    return "; ".join(parts)


def _blocks(blocks: dict | None) -> str:
    if not blocks or not blocks.get("count"):
        return f"none found ({(blocks or {}).get('why') or 'no model yet'})"
    return f"{blocks['count']} x {blocks.get('type')} at {blocks.get('path')}"


def rows(job: dict[str, Any] | None) -> list[tuple[str, str]]:
    """``(field, text)`` rows describing ``job``; a job not yet discovered says so in one row."""
    if not job:
        return []
    if not job.get("discovered"):
        return [("job", "not discovered yet (the runtime finds the model at the first optimizer step)")]
    model = (job.get("model") or {}).get("class") or "-"
    out = [("model", model), ("blocks", _blocks(job.get("blocks"))),
           ("data parallel", _data_parallel(job.get("data_parallel"))),
           ("tensor parallel", _tensor_parallel(job.get("tensor_parallel"))),
           ("pipeline", _pipeline(job.get("pipeline"))), ("compile", _compile(job.get("compile"))),
           ("precision", _precision(job.get("mixed_precision")))]
    for key, row in sorted((job.get("policies") or {}).items()):
        if row.get("applies") is False:
            out.append((f"cannot apply: {key}", row.get("reason") or "-"))
    return [(field, text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 3] + "...") for field, text in out]
