"""The planner's pieces against hand-computed cases, its refusals and the search's determinism."""

from __future__ import annotations

import json

import pytest

from dspark_lab.backends import amd, cpu, nvidia, parts
from dspark_lab.errors import DSparkError
from dspark_lab.planner.model import flops, memory
from dspark_lab.planner.model.config import ModelConfig
from dspark_lab.planner.predict import predict, split_layers
from dspark_lab.planner.presets import PRESETS, PUBLISHED_B, preset
from dspark_lab.plugins import make_manager


@pytest.fixture(scope="module")
def manager():
    return make_manager([cpu, nvidia, amd], entry_points=False)


def config(model="llama3-8b", gpu="nvidia-h100", gpus=8, **layout):
    base = {"tp": 8, "pp": 1, "dp": 1, "micro_batch": 1, "global_batch": 8}
    return {"model": model, "cluster": {"gpu": gpu, "gpus": gpus}, "layout": {**base, **layout}}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_match_published_sizes(name):
    model = ModelConfig.from_dict(preset(name))
    assert flops.total_params(model) / 1e9 == pytest.approx(PUBLISHED_B[name], rel=0.01)


def test_deepseek_active_parameters_near_37b():
    model = ModelConfig.from_dict(preset("deepseek-v3"))
    assert flops.total_params(model, active=True) / 1e9 == pytest.approx(37, rel=0.05)


def test_model_flops_equal_narayanan_formula_for_gpt3():
    model = ModelConfig.from_dict(dict(preset("gpt3-175b"), tied_embeddings=False))
    s, L, h, V = model.seq_len, model.layers, model.hidden, model.vocab
    narayanan = 72 * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h)) / s  # per token
    assert flops.model_flops_per_token(model) == pytest.approx(narayanan, rel=1e-3)


def test_activation_memory_matches_korthikanti_formulas():
    s, b, h, a, t = 2048, 1, 12288, 96, 8  # GPT-3 175B, Korthikanti et al. 2022 Table 2 cases
    terms = memory.layer_activation_terms(s, b, h, a, t)
    sbh = s * b * h
    assert memory.layer_activation_bytes(terms, t, False, True) == pytest.approx(
        sbh * (10 + 24 / t + 5 * a * s / (h * t)), rel=1e-9)
    assert memory.layer_activation_bytes(terms, t, True, True) == pytest.approx(sbh / t * (34 + 5 * a * s / h))
    assert memory.layer_activation_bytes(terms, t, True, False) == pytest.approx(34 * sbh / t)
    one = memory.layer_activation_terms(s, b, h, a, 1)
    assert memory.layer_activation_bytes(one, 1, False, True) == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert memory.full_recompute_bytes(s, b, h, t, False) == 2 * sbh


def test_uneven_split_puts_short_stages_at_the_ends():
    assert split_layers(126, 16) == [7] + [8] * 14 + [7]
    assert sum(split_layers(61, 8)) == 61 and split_layers(8, 4) == [2, 2, 2, 2]


def test_uneven_stages_are_accounted_by_the_slowest(manager):
    small_vocab = dict(preset("llama3-8b"), vocab=1024)  # so the output layer does not dominate the last stage
    even = predict(config(small_vocab, gpus=32, tp=8, pp=4, global_batch=32), manager)
    uneven_model = dict(small_vocab, layers=33)
    uneven = predict(config(uneven_model, gpus=32, tp=8, pp=4, global_batch=32), manager)
    assert uneven["layers_per_stage"] == [8, 9, 8, 8]
    assert uneven["step_time_s"] > even["step_time_s"] * 1.05  # one 9-layer stage paces everything


@pytest.mark.parametrize("layout, field", [
    (dict(tp=4), "layout: tp*pp*dp*cp"),
    (dict(tp=3, dp=1, pp=1), "layout: tp*pp*dp*cp"),
    (dict(tp=8, pp=64, global_batch=64), "layout.pp"),
    (dict(recompute="some"), "layout.recompute"),
    (dict(schedule="nope"), "layout.schedule"),
])
def test_refusals_name_the_field(manager, layout, field):
    gpus = 8 * layout.get("pp", 1) * layout.get("dp", 1)
    with pytest.raises(DSparkError, match=field.replace("*", r"\*")):
        predict(config(gpus=gpus, **layout), manager)


def test_heads_not_divisible_by_tp_is_refused(manager):
    model = dict(preset("llama3-8b"), heads=24, kv_heads=8, hidden=3072)
    with pytest.raises(DSparkError, match=r"layout.tp: must divide model.heads \(24\)"):
        predict(config(model, gpus=16, tp=16), manager)


def test_unknown_gpu_is_refused(manager):
    with pytest.raises(DSparkError, match="unknown backend 'nvidia-x'"):
        predict(config(gpu="nvidia-x"), manager)


def test_prediction_answers_schema_fields(manager):
    pred = predict(config(gpus=64, tp=8, pp=2, dp=4, global_batch=64), manager)
    assert set(pred["memory_gb"]) == {"params", "grads", "optimizer", "activations", "other", "total"}
    assert {"compute", "recompute", "tp_comm", "dp_comm", "pipeline_bubble", "optimizer"} <= set(pred["breakdown_s"])
    assert 0 < pred["mfu"] < 1 and pred["hardware_tflops_per_gpu"] >= pred["model_tflops_per_gpu"]
    assert pred["breakdown_s"]["pipeline_bubble"] > 0  # 2 stages, 8 micro-batches: the simulator's bubble


def test_more_microbatches_shrink_the_bubble(manager):
    few = predict(config(gpus=32, tp=8, pp=4, global_batch=4), manager)
    many = predict(config(gpus=32, tp=8, pp=4, global_batch=64), manager)
    assert many["breakdown_s"]["pipeline_bubble"] / many["step_time_s"] < \
        few["breakdown_s"]["pipeline_bubble"] / few["step_time_s"] / 2


def test_faster_gpu_predicts_faster(manager):
    h100 = predict(config(gpus=8), manager)
    b200 = predict(config(gpu="nvidia-b200", gpus=8), manager)
    assert b200["step_time_s"] < h100["step_time_s"]


def test_search_is_deterministic_and_ranked(manager):
    from dspark_lab.planner.model.config import Cluster
    from dspark_lab.planner.search import search

    model = ModelConfig.from_dict(preset("llama3-8b", 4096))
    cluster = Cluster(gpu="nvidia-h100", gpus=64)
    first = search(model, cluster, 128, top=4, manager=manager)
    second = search(model, cluster, 128, top=4, manager=manager)
    strip = lambda r: [(x["layout"], x["step_time_s"]) for x in r["results"]]
    assert strip(first) == strip(second) and len(first["results"]) == 4
    rates = [x["tokens_per_s_per_gpu"] for x in first["results"]]
    assert rates == sorted(rates, reverse=True) and all(x["fits"] for x in first["results"])


# --- the GPU part table --------------------------------------------------------------------------------------

def test_backend_specs_come_from_the_data_file(manager):
    data = json.loads(parts.DATA.read_text())["parts"]
    defaults = {p["backend"]: p for p in data if p.get("default")}
    for name in ("nvidia-a100", "nvidia-h100", "nvidia-h200", "nvidia-b200", "amd-mi300x"):
        spec, part = manager.backend(name).spec, defaults[name]
        for key in ("bf16_tflops", "memory_gb", "memory_bandwidth_gb_s", "link_gb_s", "scale_out_gb_s", "tdp_w"):
            assert getattr(spec, key) == part[key], (name, key)


def test_part_lookup_is_exact_and_uses_memory_for_shared_names():
    assert parts.lookup("NVIDIA H100 80GB HBM3")["part"] == "H100 SXM5"
    assert parts.lookup("NVIDIA H100 PCIe")["part"] == "H100 PCIe"
    assert parts.lookup("NVIDIA H100") is None  # no substring matching
    assert parts.lookup("NVIDIA GH200 480GB", 95.0)["part"] == "GH200 96GB"
    assert parts.lookup("NVIDIA GH200 480GB", 143.0)["part"] == "GH200 144GB"
