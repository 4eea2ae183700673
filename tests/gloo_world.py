"""Run a test module's ``check_*`` functions inside one gloo world per size, once, and report each (world, check).

Every rank runs every check of the module, records "ok" or its traceback, and each (world, check) pair becomes its own
test. A check that fails on one rank can leave the others waiting; the process group's timeout bounds that wait.
The ranks are forked from the test process where that is safe (:func:`start_ranks`): none imports torch again.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dspark_lab.localhost import free_port


def checks_in(namespace: dict) -> dict:
    """``{name: fn}`` of every ``check_<name>`` function in a module's globals."""
    return {name[len("check_"):]: fn for name, fn in namespace.items() if name.startswith("check_")}


def _worker(rank: int, world: int, port: int, out: str, module: str, timeout_s: float) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results = {}
    for name, check in importlib.import_module(module).CHECKS.items():
        try:
            check(rank, world)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    dist.barrier()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    # every rank is done with the group: leave without its teardown, where gloo's threads can abort the process
    # ("terminate called without an active exception"; FSDP1's checks struck it in 1 spawn of 3) and fail them all
    leave_rank()


def start_ranks(fn, args: tuple, nprocs: int, *, fork: bool = True) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)``, forked where that is safe: a forked rank starts with torch and
    the test module already imported (a spawned one spends ~3 CPU-seconds importing them again, which is most of a
    small world's cost). Spawned instead when this process holds a process group of its own, which a fork would copy
    half-alive. Each rank runs ``fn`` with one intra-op thread, as DataLoader's forked workers do (ranks sharing two
    cores only contend with more)."""
    method = "fork" if fork and not dist.is_initialized() else "spawn"
    mp.start_processes(_one_thread, args=(fn, args), nprocs=nprocs, start_method=method)


def _one_thread(rank: int, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    fn(rank, *args)


def leave_rank() -> None:
    """End a rank started by :func:`start_ranks` with exit code 0, now: no interpreter teardown (where gloo's threads
    can abort the process) and none of the atexit handlers a forked rank inherited from the test process (pytest's
    own, which would tidy up after a session that is not over)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def world_results_for(module: str, timeout_s: float = 20, *, fork: bool = True):
    """A module-scoped fixture: ``results(world)`` starts the world once and returns each rank's results (its ranks
    spawned rather than forked with ``fork=False``)."""

    @pytest.fixture(scope="module")
    def world_results(tmp_path_factory):
        cache: dict[int, list[dict]] = {}

        def results(world: int) -> list[dict]:
            if world not in cache:
                out = tmp_path_factory.mktemp(f"{module}-world{world}")
                start_ranks(_worker, (world, free_port(), str(out), module, timeout_s), world, fork=fork)
                cache[world] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
            return cache[world]

        return results

    return world_results


def assert_passed_everywhere(results: list[dict], check: str) -> None:
    failures = {rank: r[check] for rank, r in enumerate(results) if r[check] != "ok"}
    assert not failures, "\n".join(f"rank {rank}:\n{tb}" for rank, tb in failures.items())
