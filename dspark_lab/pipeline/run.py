"""Real runs: R gloo processes on this machine execute a schedule with our executor, profile per-op costs, and
compare the measured step time with the simulator's prediction from those costs, and the gradients with a
single-process reference.

Each rank uses one thread (``torch.set_num_threads(1)``) pinned to its own core where the OS allows. Op costs are
the mean duration per (rank, chunk, op kind) in a step, glue included, waits excluded; the point-to-point latency is
a one-way ping-pong time for one activation. Three predictions, each a median of per-step relative errors:

- replay: every measured step predicted from its own op costs (in-sample: it checks the simulator's dependency
  model, not its power to forecast);
- forecast: every measured step predicted from the costs of the warm-up steps (out of sample in time);
- cross-schedule (:func:`transfer_costs`): a schedule's costs per model stage predict another schedule with the
  same stages (out of sample in schedule; the benchmark does this from each result's ``stage_costs``).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dspark_lab.localhost import free_port
from dspark_lab.pipeline.execute import PipelineTrainer
from dspark_lab.pipeline.model import ModelConfig, build_stages, make_batch, mb_loss, reference_grads
from dspark_lab.pipeline.ir import Schedule
from dspark_lab.pipeline.schedules import build
from dspark_lab.pipeline.simulate import Costs, simulate


@dataclass(kw_only=True, slots=True)
class RunConfig:
    schedule: str
    ranks: int
    microbatches: int
    chunks: int | None = None
    steps: int = 3
    warmup: int = 2
    check: bool = True
    mb_size: int = 4
    model: dict = field(default_factory=dict)  # ModelConfig overrides (not ``stages``)
    extra: list[str] = field(default_factory=list)  # more schedules run in the same processes (same layout rules)


def run_schedule(cfg: RunConfig) -> dict:
    """Spawn ``cfg.ranks`` processes, run, and return rank 0's result (for ``extra``: a list, one per schedule)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(asdict(cfg), free_port(), out), nprocs=cfg.ranks, start_method="spawn")
        with open(out, encoding="utf-8") as fh:
            return json.load(fh)


def _worker(rank: int, cfg_dict: dict, port: int, out: str) -> None:
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):  # one core per rank, so ranks do not migrate onto each other's core
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    cfg = RunConfig(**cfg_dict)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg.ranks)
    try:
        results = [_run_one(rank, cfg, name) for name in [cfg.schedule, *cfg.extra]]
        if rank == 0:
            with open(out, "w", encoding="utf-8") as fh:
                json.dump(results if cfg.extra else results[0], fh)
    finally:
        dist.destroy_process_group()


def _p2p_latency(rank: int, shape: tuple, repeats: int = 20) -> float:
    """One-way time of one activation between ranks 0 and 1 (median of ping-pongs), shared with every rank."""
    buf, times = torch.zeros(shape), []
    for _ in range(repeats if rank < 2 else 0):
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        times.append((time.perf_counter() - t0) / 2)
    value = torch.tensor([statistics.median(times) if rank == 0 else 0.0], dtype=torch.float64)
    dist.broadcast(value, 0)
    return float(value.item())


def _run_one(rank: int, cfg: RunConfig, name: str) -> dict:
    schedule = build(name, cfg.ranks, cfg.microbatches, cfg.chunks if name == cfg.schedule else None)
    mcfg = ModelConfig(**{**cfg.model, "stages": schedule.stages})
    all_stages = build_stages(mcfg)
    held = {c: all_stages[schedule.where(rank, c)[1]] for c in range(schedule.chunks)
            if any(pos == (rank, c) for path in schedule.streams for pos in path)}
    act_shape = (cfg.mb_size, mcfg.seq, mcfg.d_model)
    comm = _p2p_latency(rank, act_shape) if cfg.ranks > 1 else 0.0
    targets_by_step = {}

    def loss_fn(logits, index):
        return mb_loss(logits, targets_by_step["now"][index], schedule.microbatches)

    trainer = PipelineTrainer(schedule, rank, held, loss_fn, act_shape)
    measured, predicted, tables, warm_tables, loss = [], [], [], [], 0.0
    for step in range(cfg.warmup + cfg.steps):
        tokens, targets = make_batch(mcfg, schedule.microbatches, cfg.mb_size, step)
        targets_by_step["now"] = targets
        for module in held.values():
            module.zero_grad(set_to_none=True)
        trainer.durations.clear()
        dist.barrier()
        t0 = time.perf_counter()
        loss = trainer.step(tokens)
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        table = _cost_table(trainer, cfg.ranks)
        if step < cfg.warmup:
            warm_tables.append(table)
        else:
            # Predict each step from its own op costs: other load on the machine drifts between steps.
            measured.append(float(elapsed.item()))
            predicted.append(simulate(schedule, Costs(f=0.0, b=0.0, w=0.0, comm=comm, table=table)).step_time)
            tables.append(table)
    last_step = cfg.warmup + cfg.steps - 1
    errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
    table = {key: statistics.median(t[key] for t in tables) for key in tables[0]}
    if warm_tables:
        warm = {key: statistics.median(t[key] for t in warm_tables) for key in warm_tables[0]}
        forecast = simulate(schedule, Costs(f=0.0, b=0.0, w=0.0, comm=comm, table=warm)).step_time
        forecast_errors = [abs(forecast - m) / m for m in measured]
    else:
        forecast, forecast_errors = None, None
    total_loss = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce(total_loss)
    ran = [label for _, _, label in trainer.trace]
    in_order = torch.tensor([int(ran == [op.label() for op in schedule.ops[rank]])])
    dist.all_reduce(in_order, op=dist.ReduceOp.MIN)
    result = {
        "schedule": name, "ranks": cfg.ranks, "microbatches": schedule.microbatches, "chunks": schedule.chunks,
        "measured_step_time": statistics.median(measured), "predicted_step_time": statistics.median(predicted),
        "prediction_error": statistics.median(errors), "step_times": measured, "predicted_step_times": predicted,
        "replay_error": statistics.median(errors), "forecast_step_time": forecast,
        "forecast_error": statistics.median(forecast_errors) if forecast_errors else None,
        "comm_latency": comm,
        "stage_costs": {f"{st},{k}": v for (st, k), v in sorted(stage_costs(schedule, table).items())},
        "op_costs": {f"{r},{c},{k}": v for (r, c, k), v in sorted(table.items())}, "loss": float(total_loss.item()),
        "order_matches_ir": bool(in_order.item()),
    }
    if cfg.check:
        result.update(_grad_check(rank, schedule, mcfg, held, all_stages, cfg, last_step))
    return result


def _cost_table(trainer: PipelineTrainer, ranks: int) -> dict[tuple[int, int, str], float]:
    """Every rank's mean duration per (chunk, op kind) in the last step, keyed ``(rank, chunk, kind)``."""
    means = {f"{c},{k}": statistics.fmean(v) for (c, k), v in trainer.durations.items()}
    gathered: list = [None] * ranks
    dist.all_gather_object(gathered, means)
    return {(r, int(key.split(",")[0]), key.split(",")[1]): v for r, med in enumerate(gathered)
            for key, v in med.items()}


def stage_costs(schedule: Schedule, table: dict[tuple[int, int, str], float]) -> dict[tuple[int, str], float]:
    """Mean cost per (model stage, kind) from a ``(rank, chunk, kind)`` table; FB (two stages in one op) is left out."""
    by_stage: dict[tuple[int, str], list[float]] = {}
    for (rank, chunk, kind), value in table.items():
        if kind != "FB":
            by_stage.setdefault((schedule.where(rank, chunk)[1], kind), []).append(value)
    return {key: statistics.fmean(values) for key, values in by_stage.items()}


def transfer_costs(costs: dict[tuple[int, str], float], target: Schedule) -> dict[tuple[int, int, str], float] | None:
    """A ``(rank, chunk, kind)`` table for ``target`` from another schedule's per-stage costs, or None where they do
    not cover it. Derived kinds: a full B is Bi + W when only the split was measured; an FB is its forward's F plus
    its backward's full B. An input-only B or a W cannot be split out of a full B, so those need a split source."""
    def cost(stage: int, kind: str) -> float | None:
        if (stage, kind) in costs:
            return costs[(stage, kind)]
        if kind == "B" and (stage, "Bi") in costs and (stage, "W") in costs:
            return costs[(stage, "Bi")] + costs[(stage, "W")]
        return None

    if max(stage for stage, _ in costs) + 1 != target.stages:
        return None
    table = {}
    for rank, ops in enumerate(target.ops):
        for op in ops:
            parts = [cost(target.where(rank, chunk)[1], kind) for kind, _, chunk in op.parts()]
            if any(p is None for p in parts):
                return None
            kind = "Bi" if op.kind == "B" and not op.full else op.kind
            table[(rank, op.chunk, kind)] = sum(parts)
    return table


def _grad_check(rank, schedule, mcfg, held, all_stages, cfg, step) -> dict:
    """Sum every rank's stage gradients (DualPipe holds each stage twice) and compare with one process."""
    flat = []
    for index, stage in enumerate(all_stages):
        mine = [c for c, m in held.items() if m is stage]
        for p in stage.parameters():
            flat.append(p.grad.reshape(-1) if mine and p.grad is not None else torch.zeros(p.numel()))
    grads = torch.cat(flat)
    dist.all_reduce(grads)
    if rank != 0:
        return {}
    ref_loss, ref = reference_grads(mcfg, schedule.microbatches, cfg.mb_size, step)
    ref_flat = torch.cat([g.reshape(-1) for stage in ref for g in stage])
    diff = (grads - ref_flat).abs().max() / ref_flat.abs().max()
    return {"grad_rel_diff": float(diff), "grad_ok": bool(diff <= 1e-5), "reference_loss": ref_loss,
            "grad_ref_max": float(ref_flat.abs().max())}
