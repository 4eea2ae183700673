"""Planner predictions against published measured runs it was not fitted on, per source, side by side.

Prints per row the measured and predicted step time and the error; per source the mean and max absolute error and
Kendall's tau of predicted vs measured throughput. Rows and citations: dspark_lab/planner/data/validation.json.
Calculon's figures on Korthikanti's Table 5 (Isaev et al. SC'23): 3.65% mean, 8.87% max.

    python benchmarks/planner_accuracy.py [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scipy.stats import kendalltau

from dspark_lab.planner.model import flops
from dspark_lab.planner.model.config import ModelConfig
from dspark_lab.planner.predict import predict
from dspark_lab.planner.presets import preset

DATA = Path(__file__).resolve().parent.parent / "dspark_lab" / "planner" / "data" / "validation.json"


def row_config(source: dict, row: dict) -> tuple[dict, float]:
    model = preset(row["model"], row.get("seq_len")) if isinstance(row["model"], str) else row["model"]
    layout = {**source["common"]["layout"], **row["layout"]}
    if layout.get("vpp", 1) > 1:
        layout.setdefault("schedule", "interleaved-1f1b")
    cfg = {"model": model, "cluster": {**source["common"]["cluster"], "gpus": row["gpus"]}, "layout": layout}
    if "measured_step_s" in row:
        return cfg, row["measured_step_s"]
    m = ModelConfig.from_dict(model)
    total = flops.model_flops_per_token(m) * layout["global_batch"] * m.seq_len
    return cfg, total / (row["tflops"] * 1e12 * row["gpus"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sources = json.loads(DATA.read_text())["sources"]
    report = {}
    for name, source in sources.items():
        rows = []
        for row in source["rows"]:
            cfg, measured = row_config(source, row)
            pred = predict(cfg)
            rows.append({"row": row["name"], "measured_s": measured, "predicted_s": pred["step_time_s"],
                         "error": pred["step_time_s"] / measured - 1, "memory_gb": pred["memory_gb"]["total"]})
        errors = [abs(r["error"]) for r in rows]
        tau = kendalltau([1 / r["measured_s"] for r in rows], [1 / r["predicted_s"] for r in rows]).statistic \
            if len(rows) > 1 else None
        report[name] = {"rows": rows, "mean_abs_error": sum(errors) / len(errors), "max_abs_error": max(errors),
                        "kendall_tau": tau, "citation": source["citation"]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, r in report.items():
        print(f"== {name}: {r['citation']}")
        for row in r["rows"]:
            print(f"  {row['row']:<22} measured {row['measured_s']:8.3f} s  predicted {row['predicted_s']:8.3f} s"
                  f"  error {row['error']:+6.1%}  memory {row['memory_gb']:6.1f} GB")
        print(f"  mean |error| {r['mean_abs_error']:.2%}   max |error| {r['max_abs_error']:.2%}   "
              f"Kendall tau {r['kendall_tau']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
