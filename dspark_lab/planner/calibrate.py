"""Fit the efficiency constants (``e_max``, ``d0``) of each calibrated GPU on its one declared source.

``python -m dspark_lab.planner.calibrate`` prints the fit and the per-row errors; ``--write`` stores the constants in
``data/calibration.json``. The fit minimises the mean absolute relative step-time error over the source's rows with
a coarse-to-fine grid (deterministic). No validation source is read here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

from dspark_lab.planner.model import efficiency as eff_module
from dspark_lab.planner.model import flops
from dspark_lab.planner.model.config import ModelConfig
from dspark_lab.planner.predict import predict

DATA = Path(__file__).resolve().parent / "data"
ROWS = DATA / "calibration_rows.json"


def row_config(table: dict, row: dict) -> dict:
    common = table["common"]
    model = {**common["model"], "layers": row["layers"], "hidden": row["hidden"], "heads": row["heads"]}
    dp = row["gpus"] // (row["tp"] * row["pp"])
    layout = {**common["layout"], "tp": row["tp"], "pp": row["pp"], "dp": dp, "global_batch": row["batch"]}
    if row.get("vpp", 1) > 1:
        layout.update(vpp=row["vpp"], schedule="interleaved-1f1b")
    return {"model": model, "cluster": {**common["cluster"], "gpus": row["gpus"]}, "layout": layout}


def measured_step(table: dict, row: dict) -> float:
    model = ModelConfig.from_dict(row_config(table, row)["model"])
    tokens = row["batch"] * model.seq_len
    if table["flops_formula"] == "narayanan_hardware":
        b, s, L, h, V = row["batch"], model.seq_len, model.layers, model.hidden, model.vocab
        total = 96 * b * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    else:
        total = flops.model_flops_per_token(model) * tokens
    return total / (row["tflops"] * 1e12 * row["gpus"])


def errors(backend: str, table: dict, e_max: float, d0: float) -> list[float]:
    constants = {backend: {"e_max": e_max, "d0": d0, "source": table["source"]}}
    with mock.patch.object(eff_module, "_table", lambda: constants):
        return [predict(row_config(table, row))["step_time_s"] / measured_step(table, row) - 1
                for row in table["rows"]]


def fit(backend: str, table: dict) -> tuple[float, float, float]:
    def score(e, d):
        return sum(abs(x) for x in errors(backend, table, e, d)) / len(table["rows"])

    best = min(((score(e, d), e, d) for e in [0.4 + 0.05 * i for i in range(13)] for d in (0, 64, 128, 256, 512)))
    step_e, step_d = 0.025, 32.0
    for _ in range(5):
        _, e0, d0 = best
        cands = [(e0 + i * step_e, max(0.0, d0 + j * step_d)) for i in (-1, 0, 1) for j in (-1, 0, 1)]
        best = min([best] + [(score(e, d), e, d) for e, d in cands if 0.05 < e <= 1.0])
        step_e, step_d = step_e / 2, step_d / 2
    return round(best[1], 4), round(best[2], 1), best[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="store the fitted constants in data/calibration.json")
    args = parser.parse_args(argv)
    tables = json.loads(ROWS.read_text())["tables"]
    constants = {}
    for backend, table in tables.items():
        e_max, d0, mean = fit(backend, table)
        constants[backend] = {"e_max": e_max, "d0": d0, "source": table["source"].split(":")[0],
                              "fit_mean_abs_error": round(mean, 4)}
        print(f"{backend}: e_max {e_max}  d0 {d0}  mean |error| {mean:.2%}")
        for row, err in zip(table["rows"], errors(backend, table, e_max, d0)):
            print(f"  {row['name']:>6}  {err:+.1%}")
    if args.write:
        (DATA / "calibration.json").write_text(json.dumps({"constants": constants}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
