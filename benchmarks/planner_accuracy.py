"""Planner predictions against published measured runs it was not fitted on, per source, side by side.

Per row: measured and predicted step time, the error, and predicted vs reported peak memory where the source reports
it. Per source: mean, median and max absolute step-time error, Kendall's tau of predicted vs measured throughput
(scipy), and the memory error. Rows, citations and the assumptions each source needs:
dspark_lab/planner/data/validation*.json. Goals (issue 16): Korthikanti Table 5 mean <= 3.6% and max <= 8.8%
(Calculon, Isaev et al. SC'23: 3.65% / 8.87%); median <= 10% and tau >= 0.7 on every other source; memory within 15%.

    python benchmarks/planner_accuracy.py [--json] [--source NAME] [--calculon PATH]

``--calculon PATH``: a checkout of calculon-ai/calculon; its prediction is run on the rows it can express (GPT-style
models on its A100 / H100 system files) and printed next to ours. Its code is imported from PATH, never copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

from scipy.stats import kendalltau

from dspark_lab.planner.model import flops
from dspark_lab.planner.model.config import ModelConfig
from dspark_lab.planner.predict import predict
from dspark_lab.planner.presets import preset

DATA = Path(__file__).resolve().parent.parent / "dspark_lab" / "planner" / "data"
GIB = 1.073741824
CALCULON_SYSTEMS = {"nvidia-a100": "a100_80g.json", "nvidia-h100": "h100_80g_nvl8.json"}


def load_sources() -> dict:
    sources = {}
    for path in sorted(DATA.glob("validation*.json")):
        sources.update(json.loads(path.read_text())["sources"])
    return sources


def row_config(source: dict, row: dict) -> tuple[dict, float]:
    """The planner's config for a row and the measured step time (given, or derived from the reported rate)."""
    model = preset(row["model"], row.get("seq_len")) if isinstance(row["model"], str) else row["model"]
    layout = {**source["common"]["layout"], **row["layout"]}
    if layout.get("vpp", 1) > 1:
        layout.setdefault("schedule", "interleaved-1f1b")
    cluster = {**source["common"]["cluster"], "gpus": row["gpus"]}
    cluster.update({k: row[k] for k in ("gpu", "gpus_per_node") if k in row})
    cfg = {"model": model, "cluster": cluster, "layout": layout}
    m = ModelConfig.from_dict(model)
    tokens = layout["global_batch"] * m.seq_len
    if "measured_step_s" in row:
        return cfg, row["measured_step_s"]
    if "tokens_per_s_per_gpu" in row:
        return cfg, tokens / (row["tokens_per_s_per_gpu"] * row["gpus"])
    return cfg, flops.model_flops_per_token(m) * tokens / (row["tflops"] * 1e12 * row["gpus"])


def reported_memory_gb(row: dict) -> float | None:
    if "memory_gib" in row:
        return row["memory_gib"] * GIB
    return row.get("memory_gb")


def calculon_step(path: Path, cfg: dict) -> float | None:
    """Calculon's predicted step time for a GPT-style row on a system file it ships, else None."""
    model, cluster, lay = ModelConfig.from_dict(cfg["model"]), cfg["cluster"], cfg["layout"]
    system = CALCULON_SYSTEMS.get(cluster["gpu"])
    if system is None or model.kv_heads != model.heads or model.ffn_kind != "gelu" or lay.get("cp", 1) > 1:
        return None
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import calculon  # noqa: PLC0415 - an optional checkout given on the command line
    from calculon.llm import Llm, System

    app = Llm.Application({"hidden": model.hidden, "feedforward": model.ffn_hidden, "seq_size": model.seq_len,
                           "attn_heads": model.heads, "attn_size": model.hidden // model.heads,
                           "num_blocks": model.layers})
    recompute = {"none": "none", "selective": "attn_only", "full": "full"}[lay.get("recompute", "selective")]
    sp = lay.get("sequence_parallel", lay["tp"] > 1)
    exe = Llm.Execution.from_json({
        "num_procs": cluster["gpus"], "tensor_par": lay["tp"], "pipeline_par": lay["pp"], "data_par": lay["dp"],
        "tensor_par_net": 0, "pipeline_par_net": 1, "data_par_net": 1, "batch_size": lay["global_batch"],
        "microbatch_size": lay["micro_batch"], "datatype": "float16" if cluster["gpu"] == "nvidia-a100" else "bfloat16",
        "fused_activation": False, "attention_type": "multihead", "activation_recompute": recompute,
        "pipeline_interleaving": lay.get("vpp", 1), "optimizer_sharding": lay.get("zero", 1) >= 1,
        "tensor_par_comm_type": "rs_ag" if sp else "ar", "tensor_par_overlap": "none", "seq_par_ag_redo": sp,
        "data_par_overlap": lay.get("overlap_grad_reduce", True), "weight_offload": False,
        "activations_offload": False, "optimizer_offload": False, "training": True})
    syst = System(calculon.io.read_json_file(str(path / "systems" / system)))
    llm = Llm(app, logging.getLogger("calculon"))
    try:
        llm.compile(syst, exe)
        llm.run(syst)
    except Exception as exc:  # Calculon refuses layouts it cannot place (its own checks); report, do not stop
        print(f"  calculon: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return llm.get_total_time()


def evaluate(name: str, source: dict, calculon: Path | None) -> dict:
    rows = []
    for row in source["rows"]:
        cfg, measured = row_config(source, row)
        pred = predict(cfg)
        out = {"row": row["name"], "measured_s": measured, "predicted_s": pred["step_time_s"],
               "error": pred["step_time_s"] / measured - 1, "memory_gb": pred["memory_gb"]["total"],
               "allocator_gb": pred["memory_gb"]["allocator"]}
        reported = reported_memory_gb(row)
        if reported:
            out["reported_memory_gb"] = reported
            out["memory_error"] = pred["memory_gb"]["total"] / reported - 1
        if calculon is not None:
            step = calculon_step(calculon, cfg)
            if step:
                out["calculon_s"], out["calculon_error"] = step, step / measured - 1
        rows.append(out)
    errors = [abs(r["error"]) for r in rows]
    tau = kendalltau([1 / r["measured_s"] for r in rows], [1 / r["predicted_s"] for r in rows])[0] \
        if len(rows) > 1 else None
    report = {"citation": source["citation"], "assumed": source.get("assumed", ""), "rows": rows,
              "mean_abs_error": statistics.fmean(errors), "median_abs_error": statistics.median(errors),
              "max_abs_error": max(errors), "kendall_tau": tau}
    mem = [abs(r["memory_error"]) for r in rows if "memory_error" in r]
    if mem:
        report.update(memory_median_abs_error=statistics.median(mem), memory_max_abs_error=max(mem),
                      memory_within_15pct=sum(m <= 0.15 for m in mem), memory_rows=len(mem))
    calc = [abs(r["calculon_error"]) for r in rows if "calculon_error" in r]
    if calc:
        report.update(calculon_mean_abs_error=statistics.fmean(calc), calculon_max_abs_error=max(calc),
                      calculon_rows=len(calc))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--source", help="only this source (default: all)")
    parser.add_argument("--calculon", type=Path, help="a calculon-ai/calculon checkout to compare with")
    args = parser.parse_args(argv)
    sources = load_sources()
    if args.source and args.source not in sources:
        parser.error(f"--source: unknown {args.source!r}; choose from {', '.join(sources)}")
    if args.calculon and not (args.calculon / "calculon").is_dir():
        parser.error(f"--calculon: {args.calculon} is not a calculon checkout (no calculon/ package)")
    report = {name: evaluate(name, src, args.calculon) for name, src in sources.items()
              if not args.source or name == args.source}
    if args.json:
        print(json.dumps({"schema_version": 1, "sources": report}, indent=2))
        return 0
    for name, r in report.items():
        print(f"== {name}: {r['citation']}")
        for row in r["rows"]:
            mem = f"  memory {row['memory_gb']:6.1f} GB"
            if "reported_memory_gb" in row:
                mem += f" (reported {row['reported_memory_gb']:5.1f}, {row['memory_error']:+6.1%};"
                mem += f" allocator {row['allocator_gb']:3.1f})"
            calc = f"  calculon {row['calculon_error']:+6.1%}" if "calculon_error" in row else ""
            print(f"  {row['row']:<26} measured {row['measured_s']:8.3f} s  predicted {row['predicted_s']:8.3f} s"
                  f"  error {row['error']:+6.1%}{mem}{calc}")
        tau = f"{r['kendall_tau']:.2f}" if r["kendall_tau"] is not None else "n/a"
        print(f"  mean |error| {r['mean_abs_error']:.2%}   median {r['median_abs_error']:.2%}   "
              f"max {r['max_abs_error']:.2%}   Kendall tau {tau}")
        if "memory_rows" in r:
            print(f"  memory: median |error| {r['memory_median_abs_error']:.1%}, max {r['memory_max_abs_error']:.1%},"
                  f" {r['memory_within_15pct']}/{r['memory_rows']} rows within 15%")
        if "calculon_rows" in r:
            print(f"  calculon on {r['calculon_rows']} rows: mean |error| {r['calculon_mean_abs_error']:.2%}   "
                  f"max {r['calculon_max_abs_error']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
