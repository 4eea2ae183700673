"""The ``moe`` verbs as plain functions returning a :class:`~dspark_lab.output.Report` (the CLI and magics call them).

``balance``: read expert loads from a file, place replicas with :func:`dspark_lab.moe.balance.rebalance_experts`,
and report balancedness before and after and the experts moved. "Before" is the given current placement, else no
redundancy with expert ``e`` on GPU ``floor(e * P / E)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dspark_lab.errors import DSparkError
from dspark_lab.moe.balance import (balancedness_of_loads, check_shape, check_weight, duplicates_per_gpu,
                                    gpu_loads, presence, rebalance_experts)
from dspark_lab.output import Report

LOAD_SUFFIXES = (".json", ".npy", ".pt")
# Sizes a user may choose, with room above real MoE models (DeepSeek-V3: 58 MoE layers, 256 experts, 288 slots on
# 32 GPUs of 4 nodes balance in 0.2 s). The balancer's time grows with layers x slots: 64 x 4096 took 30 s.
LIMITS = {"--replicas": 16384, "--groups": 4096, "--nodes": 1024, "--gpus": 4096, "layers": 4096, "experts": 4096}
MAX_LAYER_SLOTS = 2**17   # layers x --replicas
MAX_FILE_BYTES = 64 * 2**20  # a --loads / --current file (1M float64 loads as JSON is about 20 MB)

# API argument -> CLI option, so a ValueError from the balancer reads as a one-line CLI error.
_OPTION_OF = {"num_replicas": "--replicas", "num_groups": "--groups", "num_nodes": "--nodes",
              "num_gpus": "--gpus", "weight": "--loads", "current": "--current", "move_cost": "--move-cost"}


def read_array(path: str | Path, option: str) -> np.ndarray:
    """A numeric array from ``.json`` (nested lists, or an object with a ``loads`` / ``phy2log`` list), ``.npy``
    or ``.pt`` (a tensor); DSparkError naming ``option`` otherwise."""
    path = Path(path)
    if path.suffix not in LOAD_SUFFIXES:
        raise DSparkError(f"{option}: {path.name} must end in one of {', '.join(LOAD_SUFFIXES)}")
    if not path.is_file():
        raise DSparkError(f"{option}: no such file {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DSparkError(f"{option}: {path.name} is {path.stat().st_size} bytes; the limit is {MAX_FILE_BYTES} bytes")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                data = next((data[k] for k in ("loads", "phy2log", "weight") if k in data), None)
            array = np.asarray(data, dtype=np.float64)
        elif path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            import torch

            array = torch.load(path, map_location="cpu", weights_only=True).detach().cpu().double().numpy()
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one-line user error
        raise DSparkError(f"{option}: cannot read {path.name}: {str(exc).splitlines()[0] if str(exc) else exc}")
    if array.dtype == object or array.ndim not in (1, 2):
        raise DSparkError(f"{option}: expected shape [layers, experts] or [experts], got {list(array.shape)}")
    return np.atleast_2d(array)


def check_sizes(sizes: dict[str, int]) -> None:
    """DSparkError in one line naming the first size outside ``1..LIMITS[name]``."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LIMITS[name]:
            if name in ("layers", "experts"):  # the shape of the --loads array
                raise DSparkError(f"--loads: {value} {name}; allowed: 1..{LIMITS[name]}")
            raise DSparkError(f"{name}: must be an int in 1..{LIMITS[name]}, got {value!r}")


def _cli_error(exc: ValueError) -> DSparkError:
    message = str(exc)
    for name, option in _OPTION_OF.items():
        message = message.replace(name, option)
    return DSparkError(message)


def _default_current(experts: int, gpus: int, layers: int) -> tuple[np.ndarray, np.ndarray | None]:
    """No redundancy, expert e on GPU floor(e*P/E): ``(has [L, P, E], phy2log or None if slots are uneven)``."""
    gpu = np.arange(experts) * gpus // experts
    has = np.zeros((layers, gpus, experts), dtype=bool)
    has[:, gpu, np.arange(experts)] = True
    phy2log = np.tile(np.arange(experts), (layers, 1)) if experts % gpus == 0 else None
    return has, phy2log


def balance(loads: str, replicas: int, groups: int, nodes: int, gpus: int, current: str | None = None,
            move_cost: float = 0.0) -> Report:
    """``dspark-lab moe balance``: place replicas for the loads in a file and compare with the placement before."""
    check_sizes({"--replicas": replicas, "--groups": groups, "--nodes": nodes, "--gpus": gpus})
    weight = read_array(loads, "--loads")
    check_sizes({"layers": weight.shape[0], "experts": weight.shape[1]})
    if weight.shape[0] * replicas > MAX_LAYER_SLOTS:
        raise DSparkError(f"--loads x --replicas: {weight.shape[0]} layers x {replicas} slots = "
                          f"{weight.shape[0] * replicas} is above the limit {MAX_LAYER_SLOTS}")
    try:
        weight = check_weight(weight)
        shape = check_shape(weight, replicas, groups, nodes, gpus)
    except ValueError as exc:
        raise _cli_error(exc) from None
    layers, experts = weight.shape
    if current is not None:
        old = read_array(current, "--current")
        if not np.all(old == np.round(old)):
            raise DSparkError("--current: expert ids must be integers")
        old = old.astype(np.int64)
        if old.shape[0] != layers:
            raise DSparkError(f"--current: has {old.shape[0]} layers, --loads has {layers}")
        if old.shape[1] % gpus or old.min() < 0 or old.max() >= experts:
            raise DSparkError(f"--current: must be [layers, slots] with slots a multiple of --gpus ({gpus}) "
                              f"and expert ids in 0..{experts - 1}")
        old_has = presence(old, experts, gpus) > 0
        before_loads = gpu_loads(weight, old, gpus)
    else:
        old_has, old = _default_current(experts, gpus, layers)
        before_loads = np.einsum("le,lge->lg", weight, old_has.astype(np.float64))
        if move_cost and old is None:
            raise DSparkError(f"--move-cost: needs --current when experts ({experts}) is not a multiple of "
                              f"--gpus ({gpus})")
    try:
        phy2log, log2phy, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus, current=old,
                                                     move_cost=move_cost)
    except ValueError as exc:
        raise _cli_error(exc) from None
    phy2log = phy2log.numpy()
    after_loads = gpu_loads(weight, phy2log, gpus)
    before, after = balancedness_of_loads(before_loads), balancedness_of_loads(after_loads)
    moved = ((presence(phy2log, experts, gpus) > 0) & ~old_has).sum((1, 2))
    dups = duplicates_per_gpu(phy2log, gpus).sum(1)
    rows = [{"layer": i, "before": float(before[i]), "after": float(after[i]), "moved": int(moved[i]),
             "duplicates": int(dups[i]), "max_load_before": float(before_loads[i].max()),
             "max_load_after": float(after_loads[i].max())} for i in range(layers)]
    per_gpu = phy2log.reshape(layers, gpus, -1)
    placement = [f"layer {i}: " + " ".join(f"g{g}[{' '.join(map(str, per_gpu[i, g]))}]" for g in range(gpus))
                 for i in range(layers)]
    data = {
        "layers": layers, "experts": experts, "replicas": replicas, "groups": groups, "nodes": nodes,
        "gpus": gpus, "mode": "node-limited" if shape.hierarchical else "global", "move_cost": move_cost,
        "before": {"source": "current" if current else "default", "balancedness": float(before.mean())},
        "after": {"balancedness": float(after.mean())},
        "experts_moved": int(moved.sum()), "same_gpu_duplicates": int(dups.sum()), "per_layer": rows,
        "phy2log": phy2log.tolist(), "log2phy": log2phy.tolist(), "logcnt": logcnt.tolist(),
        "gpu_loads_before": before_loads.tolist(), "gpu_loads_after": after_loads.tolist(),
    }
    footer = placement + [
        f"balancedness {before.mean():.4f} -> {after.mean():.4f} ({data['mode']}), experts moved "
        f"{int(moved.sum())}, same-GPU duplicates {int(dups.sum())}"]
    return Report("moe.balance", data, rows=rows, columns=("layer", "before", "after", "moved", "duplicates"),
                  title=f"MoE placement: {experts} experts -> {replicas} slots on {gpus} GPUs, {nodes} node(s)",
                  lines=footer)
