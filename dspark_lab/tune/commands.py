"""``dspark-lab tune``: start, follow and stop a search of a running job's policies (one function each).

The search itself runs in rank 0's process (:mod:`.driver`); these functions talk to it through the run's control
endpoint, so ``dspark-lab tune RUN --stop`` works from any shell. Each returns a :class:`~dspark_lab.output.Report`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from dspark_lab.output import Report, cell
from dspark_lab.runtime.control import ControlClient
from dspark_lab.runtime.records import find_run

POLL_S = 0.5
COLUMNS = ("change", "verdict", "steps", "median_step_time_s", "ratio", "ci", "peak_mb", "reason")
EXIT = {"done": 0, "stopped": 0, "failed": 3}


def row(trial: dict[str, Any]) -> dict[str, Any]:
    ci = trial.get("ci")
    return {"change": ", ".join(f"{k}={v}" for k, v in trial["change"].items()), "verdict": trial["verdict"],
            "steps": trial["steps"], "median_step_time_s": trial.get("median_step_time_s"),
            "ratio": trial.get("ratio"), "ci": f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else None,
            "peak_mb": trial["peak_bytes"] / 2**20 if trial.get("peak_bytes") is not None else None,
            "reason": trial.get("reason", "")}


def report(state: dict[str, Any]) -> Report:
    """The tune's state as a table of trials and lines for the space and the decision."""
    if state.get("state") == "none":  # the endpoint's answer when no tune has run on this job
        return Report("tune", {**state, "exit_code": 0},
                      lines=["no tune has run on this job; start one with `dspark-lab tune RUN`"])
    rows = [row(t) for t in state.get("trials", [])]
    lines = []
    space = state.get("space") or {}
    if space:
        lines.append("searched: " + "; ".join(f"{k} in {v}" for k, v in space["keys"].items())
                     + (" (bit-exact only)" if space.get("bit_exact") else " (lossless, some reorder sums)"))
        for item in space.get("needs_restart", []):
            lines.append(f"needs a restart: {item['key']} (now {item['value']}, would try {item['would_try']})")
    out = state.get("outcome")
    if out:
        kept = ", ".join(f"{k}={v}" for k, v in out["best"].items() if out["start"].get(k) != v) or "the start"
        lines.append(f"kept: {kept}; step time {cell(out['best_step_time_s'])} s, peak "
                     f"{cell((out['best_peak_bytes'] or 0) / 2**20)} MB"
                     f"{'' if out['feasible'] else ' (over the memory cap: nothing tried met it)'}; "
                     f"{out['steps']} steps, {out['seconds']:.1f} s")
    lines += _budget_lines(state)
    if state.get("error"):
        lines.append(f"tune failed: {state['error']}")
    lines.append(f"tune {state.get('id')}: {state.get('state')}")
    return Report("tune", {**state, "exit_code": EXIT.get(state.get("state"), 0)}, rows=rows, columns=COLUMNS,
                  lines=lines)


def _budget_lines(state: dict[str, Any]) -> list[str]:
    """A line saying how many candidates the budget left untried and how to try them, when it left any."""
    trials = state.get("trials", [])
    skipped = sum(t["verdict"] == "skipped_budget" for t in trials)
    if not skipped:
        return []
    budget = (state.get("options") or {}).get("budget_steps")
    fix = (f"--budget-steps {state['budget_for_all']} (the default) tries them all" if state.get("budget_for_all")
           else "a larger --budget-steps tries them")
    return [f"skipped for budget: {skipped} of {len(trials)} candidates not tried within --budget-steps {budget}; "
            f"{fix}"]


def start(run: str, *, objective: str = "throughput", max_activation_mb: float | None = None,
          max_memory_gb: float | None = None, budget_steps: int | None = None, keys: list[str] | None = None,
          allow_lossy: bool = False, client: ControlClient | None = None) -> dict[str, Any]:
    """Start a tune on ``run`` and return its first state (``id``, ``space``) without waiting for it."""
    client = client or ControlClient(find_run(run), timeout=70)
    body = {"objective": objective, "budget_steps": budget_steps, "keys": keys, "allow_lossy": allow_lossy,
            "max_activation_mb": max_activation_mb, "max_memory_gb": max_memory_gb}
    return client.request("POST", "/tune", body)


def tune(run: str, *, objective: str = "throughput", max_activation_mb: float | None = None,
         max_memory_gb: float | None = None, budget_steps: int | None = None, keys: list[str] | None = None,
         allow_lossy: bool = False, follow: Callable[[dict], None] | None = None) -> Report:
    """Start a tune on ``run`` and wait until it ends; ``follow(trial)`` is called once per finished trial."""
    client = ControlClient(find_run(run), timeout=70)
    state = start(run, objective=objective, max_activation_mb=max_activation_mb, max_memory_gb=max_memory_gb,
                  budget_steps=budget_steps, keys=keys, allow_lossy=allow_lossy, client=client)
    shown = 0
    while state["state"] == "running":
        time.sleep(POLL_S)
        state = client.request("GET", "/tune")
        for trial in state["trials"][shown:]:
            if follow is not None:
                follow(trial)
        shown = len(state["trials"])
    return report(state)


def stop(run: str, timeout: float = 60.0) -> Report:
    """End the running tune at its next block; the best found so far stays in force."""
    return report(ControlClient(find_run(run), timeout=timeout + 5).request("POST", "/tune/stop",
                                                                            {"timeout": timeout}))


def status(run: str) -> Report:
    return report(ControlClient(find_run(run), timeout=10).request("GET", "/tune"))


def print_trial(trial: dict[str, Any]) -> None:
    cells = row(trial)
    print("  ".join(f"{c}={cell(cells[c])}" for c in COLUMNS if cells[c] not in (None, "")), file=sys.stderr,
          flush=True)
