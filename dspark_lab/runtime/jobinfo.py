"""What the job is, as a plain dict for ``status --json`` (``job``) and the dashboard.

Read from the live objects, never guessed from the script: data parallelism (DDP; FSDP2's ``fully_shard`` with its
DeviceMesh and ``reshard_after_forward``; FSDP1's units, sharding strategy and ``use_orig_params``), tensor
parallelism (DTensor parameters whose mesh dimensions are not FSDP's: their placements and mesh), pipeline
parallelism (a ``torch.distributed.pipelining`` schedule or DSpark's executor), which modules run under
``torch.compile``, mixed precision, the model's class and its shape for the planner (:mod:`.modelshape`), the
parallel degrees, the blocks found and why, and for every policy whether it can apply here and, if not, the reason.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from typing import Any

from torch import nn

from dspark_lab.runtime import discover, fsdp1, modelshape
from dspark_lab.runtime.policies import sched


# FSDP1's sharding strategies as ZeRO stages: SHARD_GRAD_OP keeps gathered weights from forward to backward
FSDP1_ZERO = {"FULL_SHARD": 3, "HYBRID_SHARD": 3, "SHARD_GRAD_OP": 2, "_HYBRID_SHARD_ZERO2": 2, "NO_SHARD": 0}


def _mesh(mesh) -> dict[str, Any] | None:
    if mesh is None:
        return None
    return {"shape": list(mesh.shape), "dim_names": list(mesh.mesh_dim_names or ()), "device_type": mesh.device_type}


def _fsdp2(model: nn.Module) -> dict[str, Any] | None:
    modules = discover.fsdp2_modules(model)
    if not modules:
        return None
    groups = [(name, g) for name, m in modules for g in discover.fsdp2_groups(m)]
    if not groups:
        return {"kind": "fsdp2", "modules": len(modules), "mesh": None, "reshard_after_forward": None}
    # FSDP2 never reshards the root after forward (it would all-gather again at once for backward)
    inner = [(n, g) for n, g in groups if n] or groups
    settings = {g.post_forward_mesh_info is not None for _, g in inner}
    mp = groups[0][1].mp_policy
    return {"kind": "fsdp2", "modules": len(modules), "mesh": _mesh(groups[0][1].mesh_info.mesh),
            "reshard_after_forward": settings.pop() if len(settings) == 1 else "mixed",
            "mixed_precision": {"param_dtype": str(mp.param_dtype) if mp.param_dtype else None,
                                "reduce_dtype": str(mp.reduce_dtype) if mp.reduce_dtype else None}}


def data_parallel(job) -> dict[str, Any] | None:
    if job.model is not None:
        found = _fsdp2(job.model)
        if found:
            return found
        found = fsdp1.describe(job.model)
        if found:
            return found
    if job.ddp is not None:
        group = getattr(job.ddp, "process_group", None)
        return {"kind": "ddp", "world": group.size() if group is not None else job.world,
                "bucket_mb": getattr(job.ddp, "bucket_bytes_cap", 0) / 2**20,
                "find_unused_parameters": bool(getattr(job.ddp, "find_unused_parameters", False))}
    return None


def tensor_parallel(model: nn.Module, fsdp_mesh) -> dict[str, Any] | None:
    """DTensor parameters' placements on the mesh dimensions FSDP does not use (the TP mesh)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None:
        return None
    fsdp_names = set(fsdp_mesh.mesh_dim_names or ()) if fsdp_mesh is not None else set()
    placements, tp_mesh, params = Counter(), None, 0
    for param in model.parameters():
        if not isinstance(param, dtensor.DTensor) or (fsdp_mesh is not None and param.device_mesh == fsdp_mesh):
            continue
        mesh = param.device_mesh
        names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
        tp_dims = [i for i, name in enumerate(names) if name not in fsdp_names]
        if not tp_dims:
            continue
        params += 1
        placements.update(repr(param.placements[i]) for i in tp_dims)
        if tp_mesh is None:  # FSDP2 + TP: the parameter lives on the 2-D mesh; name its TP part
            tp_mesh = mesh if len(tp_dims) == mesh.ndim else mesh[tuple(names[i] for i in tp_dims)]
    if not params:
        return None
    return {"dtensor_params": params, "placements": dict(placements), "mesh": _mesh(tp_mesh)}


def pipeline(job) -> dict[str, Any] | None:
    schedule = sched.torch_schedule(job)
    if schedule is not None:
        stages = getattr(schedule, "_stages", None) or [getattr(schedule, "_stage", None)]
        live = [s for s in stages if s is not None]
        return {"kind": "torch.distributed.pipelining", "schedule": type(schedule).__name__,
                "ranks": getattr(live[0], "group_size", None) if live else None,
                "stages_on_rank": len(live),
                "stage_indices": [s.stage_index for s in stages if s is not None],
                "microbatches": getattr(schedule, "_n_microbatches", None)}
    trainer = sched.trainer(job)
    if trainer is not None:
        return {"kind": "dspark", "schedule": trainer.schedule.name, "ranks": trainer.schedule.ranks,
                "microbatches": trainer.schedule.microbatches}
    return None


def parallelism(world: int, dp: dict | None, tp: dict | None, pipe: dict | None) -> dict[str, Any]:
    """The degrees the planner takes (``tp``, ``pp``, ``dp``, and ``zero`` where the sharding says it): TP from the
    TP mesh, PP from the pipeline's rank count, DP from FSDP2's mesh or DDP's group, else what the world leaves."""
    tp_size = math.prod(tp["mesh"]["shape"]) if tp and tp.get("mesh") else 1
    pp_size = int((pipe or {}).get("ranks") or 1)
    out: dict[str, Any] = {"tp": tp_size, "pp": pp_size}
    if dp and dp.get("kind") == "fsdp2" and dp.get("mesh"):
        out["dp"] = math.prod(dp["mesh"]["shape"])
        out["zero"] = 2 if dp.get("reshard_after_forward") is False else 3
    elif dp and dp.get("kind") == "fsdp1" and dp.get("world"):
        out["dp"] = int(dp["world"])
        out["zero"] = FSDP1_ZERO.get(dp.get("sharding_strategy"), 3)
    elif dp and dp.get("kind") == "ddp":
        out["dp"], out["zero"] = int(dp["world"]), 0
    else:
        out["dp"] = max(1, world // (tp_size * pp_size))
    if pipe and pipe.get("microbatches"):
        out["microbatches"] = pipe["microbatches"]
    return out


def describe(job) -> dict[str, Any]:
    """The ``job`` object of ``status``: plain JSON-able values."""
    model = job.model
    dp = data_parallel(job)
    fsdp_mesh = None
    if dp and dp.get("kind") == "fsdp2" and model is not None:
        groups = [g for _, m in discover.fsdp2_modules(model) for g in discover.fsdp2_groups(m)]
        fsdp_mesh = groups[0].mesh_info.mesh if groups else None
    compiled = list(job.compiled) if isinstance(job.compiled, list) else (["model"] if job.compiled else [])
    dtypes = Counter(str(p.dtype) for p in model.parameters()) if model is not None else Counter()
    tp = tensor_parallel(model, fsdp_mesh) if model is not None else None
    pipe = pipeline(job)
    blocks = job.found_blocks.modules
    return {
        "discovered": job.discovered,
        "model": {"class": f"{discover.user_class(model).__module__}.{discover.user_class(model).__qualname__}",
                  **modelshape.describe(model, blocks, whole=pipe is None)}
        if model is not None else None,
        "rank": job.rank, "world": job.world,
        "data_parallel": dp,
        "tensor_parallel": tp,
        "pipeline": pipe,
        "parallelism": parallelism(job.world or 1, dp, tp, pipe),
        "compile": {"compiled": bool(compiled), "modules": compiled,
                    "functions_compiled": job.compiled_functions},
        "mixed_precision": {"autocast": job.meter.autocast, "param_dtypes": dict(dtypes),
                            "fsdp": (dp or {}).get("mixed_precision")},
        "blocks": job.found_blocks.as_dict(),
        "policies": job.policy_state.applicability(),
    }
