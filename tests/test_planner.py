"""The planner's pieces against hand-computed cases, its refusals and the search's determinism."""

from __future__ import annotations

import json

import pytest

from dspark_lab.backends import amd, cpu, nvidia, parts
from dspark_lab.errors import DSparkError
from dspark_lab.planner.model import flops, memory
from dspark_lab.planner.model.config import Layout, ModelConfig
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
    (dict(kernels="jit"), "layout.kernels"),
    (dict(loss="chunked"), "layout.loss"),
    (dict(sp_regather="yes"), "layout.sp_regather"),
    (dict(pp_runtime="deepspeed"), "layout.pp_runtime"),
    (dict(fsdp_runtime="deepspeed"), "layout.fsdp_runtime"),
    (dict(framework="deepspeed"), "layout.framework"),
    (dict(cp_rotate="alltoall"), "layout.cp_rotate"),
    (dict(fp8_allgather="yes"), "layout.fp8_allgather"),
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
    assert set(pred["memory_gb"]) == {"params", "grads", "optimizer", "activations", "other", "allocator", "total"}
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



def test_a_framework_sets_the_defaults_and_a_given_field_wins():
    from dspark_lab.planner.model.config import Layout, framework_defaults

    base = {"tp": 8, "pp": 8, "dp": 8, "micro_batch": 1, "global_batch": 64}
    megatron, titan = Layout.from_dict(base), Layout.from_dict({**base, "framework": "torchtitan"})
    assert framework_defaults("megatron", 8, True) == {} and megatron == Layout(**base)  # the fields' defaults
    assert (titan.zero, titan.pp_runtime, titan.fsdp_runtime, titan.loss, titan.sp_regather, titan.cp_rotate,
            titan.recompute, titan.kernels) == (2, "torch", "torch", "eager", False, "allgather", "selective-op",
                                                "eager")
    assert (megatron.zero, megatron.pp_runtime, megatron.loss) == (1, "megatron", "fused")
    assert Layout.from_dict({**base, "pp": 1, "dp": 64, "framework": "torchtitan"}).zero == 3  # FSDP reshards
    assert Layout.from_dict({**base, "pp": 1, "dp": 1, "framework": "torchtitan"}).zero == 0  # nothing to shard
    assert Layout.from_dict({**base, "framework": "torchtitan", "kernels": "fused", "zero": 3}).kernels == "fused"


def test_search_for_torchtitan_runs_only_what_torchtitan_runs(manager):
    from dspark_lab.planner.model.config import Cluster
    from dspark_lab.planner.search import candidates, search

    model = ModelConfig.from_dict(preset("llama3-8b", 4096))
    cluster = Cluster(gpu="nvidia-h100", gpus=16)
    titan = candidates(model, cluster, 32, "torchtitan", {"precision": "fp8"})
    assert titan and all(lay.framework == "torchtitan" and lay.precision == "fp8" for lay in titan)
    for lay in titan:
        assert lay.zero == ((2 if lay.pp > 1 else 3) if lay.dp * lay.cp > 1 else 0)
        if lay.pp == 1:  # no gradient accumulation: the local batch is one micro-batch
            assert 32 // lay.dp == lay.micro_batch
    assert {lay.recompute for lay in titan} == {"none", "selective-op", "full"}
    megatron = candidates(model, cluster, 32)
    assert {lay.recompute for lay in megatron} == {"none", "full"} and {lay.zero for lay in megatron} == {0, 1, 2}
    out = search(model, cluster, 32, top=3, manager=manager, framework="torchtitan", fixed={"kernels": "fused"})
    assert out["framework"] == "torchtitan" and out["fixed"] == {"kernels": "fused"} and len(out["results"]) == 3
    for bad, message in (({"tp": 2}, "--with tp: is searched"), ({"speed": 1}, "--with speed: is not a layout"),
                         ({"precision": "fp4"}, "precision: must be one of bf16 | fp8")):
        with pytest.raises(DSparkError, match=message):
            candidates(model, cluster, 32, "torchtitan", bad)
    with pytest.raises(DSparkError, match="--framework: must be one of megatron | torchtitan"):
        candidates(model, cluster, 32, "deepspeed")


def test_plan_search_cli_takes_framework_and_fixed_fields(capsys):
    from dspark_lab.cli import main as cli_main

    args = ["plan", "search", "--model", "llama3-8b", "--gpu", "nvidia-h100", "--gpus", "8", "--global-batch", "8",
            "--top", "2", "--framework", "torchtitan", "--with", "precision=fp8", "--with", "fp8_allgather=true",
            "--json"]
    assert cli_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["framework"] == "torchtitan" and out["fixed"] == {"precision": "fp8", "fp8_allgather": True}
    assert cli_main(args[:-1] + ["--with", "precision"]) == 2
    assert "argument --with: expected KEY=VALUE" in capsys.readouterr().err

def test_plan_predict_no_allocator_skips_only_the_replay(capsys, tmp_path):
    """``--no-allocator``: the same prediction less the allocator's share, and nothing else changed."""
    from dspark_lab.cli import main as cli_main

    config = tmp_path / "titan.json"
    config.write_text(json.dumps({"model": "llama3-8b", "cluster": {"gpu": "nvidia-h100", "gpus": 8},
                                  "layout": {"framework": "torchtitan", "tp": 1, "pp": 1, "dp": 8,
                                             "micro_batch": 1, "global_batch": 8}}))
    answers = []
    for extra in ([], ["--no-allocator"]):
        assert cli_main(["plan", "predict", str(config), "--json", *extra]) == 0
        answers.append(json.loads(capsys.readouterr().out)["predictions"][0])
    full, bare = answers
    assert full["memory_gb"]["allocator"] > 0 and bare["memory_gb"]["allocator"] == 0
    assert bare["memory_gb"]["total"] == pytest.approx(full["memory_gb"]["total"] - full["memory_gb"]["allocator"])
    assert {k: v for k, v in bare.items() if k not in ("memory_gb", "fits")} == \
        {k: v for k, v in full.items() if k not in ("memory_gb", "fits")}


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


# --- activation memory from the schedule's op order ----------------------------------------------------------

def _per_layer_gb(model: dict, tp: int) -> float:
    s, h = model["seq_len"], model["hidden"]
    return 34 * s * h / tp / 1e9  # Korthikanti: sbh(34)/t with TP+SP, b = 1, scores dropped (flash)


def test_interleaved_first_stage_holds_korthikanti_share(manager):
    # Korthikanti et al. 2022 section 4.2.3: the first stage holds L layers' worth of micro-batches, times
    # 1 + (p-1)/(p v) interleaved. p=4, v=2, L=16: 16 * (1 + 3/8) = 22 layer-micro-batches.
    model = dict(layers=16, hidden=4096, heads=32, vocab=1024, seq_len=2048)
    inter = predict(config(model, gpus=32, tp=8, pp=4, vpp=2, global_batch=16, recompute="none"), manager)
    plain = predict(config(model, gpus=32, tp=8, pp=4, global_batch=16, recompute="none"), manager)
    assert inter["memory_gb"]["activations"] == pytest.approx(22 * _per_layer_gb(model, 8), rel=1e-9)
    assert plain["memory_gb"]["activations"] == pytest.approx(16 * _per_layer_gb(model, 8), rel=1e-9)


def test_no_dropout_stores_no_masks():
    s, b, h, a, t = 8192, 1, 16384, 128, 8
    with_masks = memory.layer_activation_terms(s, b, h, a, t)
    without = memory.layer_activation_terms(s, b, h, a, t, dropout=False)
    assert memory.layer_activation_bytes(with_masks, t, True, False) - \
        memory.layer_activation_bytes(without, t, True, False) == pytest.approx(2 * s * b * h / t)
    assert without.scores == pytest.approx(2 * a * s * s * b / t)


def test_llama3_405b_meta_layout_fits_in_80_gb(manager):
    # Llama 3 paper section 3.3.2: TP8 PP16 DP128, 16 sequences per DP rank, interleaved with one layer per chunk
    # (first chunk only the embedding, last only the output), FSDP sharding optimizer and gradients, no recompute.
    cfg = {"model": "llama3-405b", "cluster": {"gpu": "nvidia-h100", "gpus": 16384},
           "layout": {"tp": 8, "pp": 16, "dp": 128, "micro_batch": 1, "global_batch": 2048, "vpp": 8,
                      "zero": 2, "recompute": "none"}}
    pred = predict(cfg, manager)
    assert pred["layers_per_stage"][:2] == [0, 1] and pred["layers_per_stage"][-1] == 0
    # m = p = 16: every forward runs before the first backward, so a middle rank holds 16 x 8 layers.
    s, h, ffn, t = 8192, 16384, 53248, 8
    per_layer = (8 * s * h + (2 + 2 * 2 / 16 + 2) * s * h + 6 * s * ffn) / t  # no dropout, GQA, SwiGLU
    assert pred["memory_gb"]["activations"] == pytest.approx(16 * 8 * per_layer / 1e9, rel=1e-9)
    assert pred["fits"]
    megatron = predict({**cfg, "layout": {**cfg["layout"], "zero": 1}}, manager)  # preallocated fp32 grads
    assert megatron["memory_gb"]["total"] > pred["memory_gb"]["total"] + 10 and not megatron["fits"]


@pytest.mark.slow
def test_search_llama3_405b_finds_meta_layout(manager):
    from dspark_lab.planner.model.config import Cluster
    from dspark_lab.planner.search import search

    model = ModelConfig.from_dict(preset("llama3-405b", 8192))
    result = search(model, Cluster(gpu="nvidia-h100", gpus=16384), 2048, top=5, manager=manager)
    assert result["search_time_s"] < 60
    best = result["results"][0]["tokens_per_s_per_gpu"]
    meta = [r for r in result["results"] if (r["layout"]["tp"], r["layout"]["pp"], r["layout"]["dp"],
                                              r["layout"]["cp"]) == (8, 16, 128, 1)]
    assert meta and meta[0]["tokens_per_s_per_gpu"] >= 0.95 * best


# --- plan whatif -----------------------------------------------------------------------------------------------

def _fake_run(tmp_path, info_job: dict, metrics: list[dict]):
    from dspark_lab.runtime.records import JsonlWriter, RunDir

    run = RunDir.create("r-whatif", {"name": "w", "ranks": 8, "job": info_job}, root=tmp_path)
    writer = JsonlWriter(run.metrics_path)
    for record in metrics:
        writer.write(record)
    return run


def test_whatif_plans_a_parameter_count_on_more_gpus(tmp_path, manager):
    from dspark_lab.planner.whatif import model_from_params, whatif

    job = {"gpu": "nvidia-h100", "parallelism": {"tp": 8, "pp": 1, "dp": 1}, "params": 8.0e9}
    run = _fake_run(tmp_path, job, [{"step": 1, "rank": 0, "samples_per_s": 4.0, "step_time_s": 1.0}])
    out = whatif(run, gpus=32, seq=4096, manager=manager)
    assert out["model_from"] == "parameter count" and out["current"]["global_batch"] == 4
    assert out["model"] == "gpt-shaped-8b"
    model = ModelConfig.from_dict(model_from_params(8.0e9, 4096))
    assert flops.total_params(model) == pytest.approx(8.0e9, rel=0.15)
    now = out["current"]["prediction"]["step_time_s"]
    best = out["target"]["results"][0]
    assert out["target"]["gpus"] == 32 and best["step_time_s"] < now  # 4x the GPUs finish the step sooner


def test_whatif_without_model_or_params_is_refused(tmp_path, manager):
    from dspark_lab.planner.whatif import whatif

    run = _fake_run(tmp_path, {"gpu": "nvidia-h100"},
                    [{"step": 1, "rank": 0, "samples_per_s": 1.0, "step_time_s": 1.0}])
    with pytest.raises(DSparkError, match="model: the run publishes no model"):
        whatif(run, manager=manager)
    early = _fake_run(tmp_path / "early", {"gpu": "nvidia-h100", "discovered": False}, [])
    with pytest.raises(DSparkError, match="model: the job is not discovered yet .* or give --model"):
        whatif(early, manager=manager)  # before its first optimizer step: not "publishes no model"
    out = whatif(run, model="llama3-8b", gpu="nvidia-b200", gpus=8, seq=2048, manager=manager)
    assert out["model_from"] == "--model" and out["target"]["gpu"] == "nvidia-b200"
    assert out["current"]["global_batch"] == 8  # 1 sample per step per rank x 8 data-parallel ranks
    titan = whatif(run, model="llama3-8b", gpus=8, seq=2048, manager=manager, framework="torchtitan",
                   fixed={"kernels": "fused"})
    now = whatif(run, model="llama3-8b", gpus=8, seq=2048, manager=manager)["current"]["prediction"]
    # the job now (8 data-parallel ranks) under torchtitan: FSDP2 resharding (ZeRO 3), its loss and side streams
    assert titan["current"]["prediction"]["memory_gb"]["params"] < now["memory_gb"]["params"]
    assert all(r["layout"]["zero"] == ((2 if r["layout"]["pp"] > 1 else 3)
                                       if r["layout"]["dp"] * r["layout"]["cp"] > 1 else 0)
               for r in titan["target"]["results"])


def test_search_view_marks_the_pareto_front(tmp_path, manager):
    from dspark_lab.planner.model.config import Cluster
    from dspark_lab.planner.search import search
    from dspark_lab.planner.view import pareto, write_html

    points = [{"memory_gb": 10, "tokens_per_s_per_gpu": 5, "fits": True},
              {"memory_gb": 20, "tokens_per_s_per_gpu": 4, "fits": True},   # dominated by the first
              {"memory_gb": 30, "tokens_per_s_per_gpu": 9, "fits": True},
              {"memory_gb": 90, "tokens_per_s_per_gpu": 20, "fits": False}]  # faster but does not fit
    assert pareto(points) == [0, 2]
    model = ModelConfig.from_dict(preset("llama3-8b", 4096))
    result = search(model, Cluster(gpu="nvidia-h100", gpus=16), 32, top=3, manager=manager, points=True)
    assert len(result["points"]) == result["evaluated"]
    html = write_html(result, tmp_path / "view.html").read_text()
    assert "Pareto front" in html and "where the step time goes" in html and "TP" in html


def test_eager_elementwise_units_count_torchtitan_llama_kernels():
    from dspark_lab.planner.predict import elementwise_units

    model = ModelConfig.from_dict(preset("llama3-8b"))  # 32 heads, 8 KV heads, SwiGLU, no dropout
    # two fp32 RMSNorms 2 x 18, RoPE on q and k 10 x 1.25, repeat_kv 2 x 1.25, output copy 2, residuals 2 x 3
    assert elementwise_units(model, "eager") == (36 + 12.5 + 2.5 + 2 + 6, 5.0)
    assert elementwise_units(model, "fused") == (10.0, 3.0)


def test_eager_kernels_add_their_hbm_traffic_to_the_step(manager):
    from dspark_lab.planner.hardware import device
    from dspark_lab.planner.model.config import Cluster
    from dspark_lab.planner.model.efficiency import MEMORY_EFFICIENCY

    base = dict(tp=1, dp=8, micro_batch=1, global_batch=8, zero=3, recompute="none")
    fused = predict(config(**base), manager)
    eager = predict(config(kernels="eager", **base), manager)
    model = ModelConfig.from_dict(preset("llama3-8b"))
    tokens, h, f = model.seq_len, model.hidden, model.ffn_hidden
    hbm = device(Cluster.from_dict({"gpu": "nvidia-h100", "gpus": 8}), manager).hbm_gb_s * 1e9 * MEMORY_EFFICIENCY
    extra_units = (59 - 10) * tokens * h + (5 - 3) * tokens * f  # eager minus fused, per layer forward
    expected = model.layers * 3 * extra_units * 2 / hbm  # forward + twice in backward, 2-byte elements
    got = eager["breakdown_s"]["compute"] - fused["breakdown_s"]["compute"]
    assert got == pytest.approx(expected, rel=1e-9)


def test_op_sac_recomputes_wk_wo_and_the_second_ffn_matmul():
    model = ModelConfig.from_dict(preset("llama3-8b"))
    h, kv, f = 4096, 1024, 14336
    assert flops.op_sac_recomputed_params(model, 0) == h * kv + h * h + h * f
    per_token = flops.recompute_flops_per_token(model, "selective-op")
    assert per_token == 32 * 2 * (h * kv + h * h + h * f)


def test_op_sac_memory_keeps_the_saved_matmul_outputs():
    s, b, h, f = 8192, 2, 4096, 14336
    sbh = s * b * h
    # block input, wq, wv (a quarter of h), attention output, w1, and w2's full-width output
    expected = 2 * sbh + 2 * (sbh + 0.25 * sbh + sbh + s * b * f) + 2 * sbh
    assert memory.op_sac_bytes(s, b, h, 1, False, 0.25, f, swiglu=True) == pytest.approx(expected)
    # TP 8 with SP: the input and the TP-split tensors / 8, w2's partial sum stays full, + two reduce-scatter outputs
    sp = 2 * sbh / 8 + 2 * (sbh + 0.25 * sbh + sbh + s * b * f) / 8 + 2 * sbh + 4 * sbh / 8
    assert memory.op_sac_bytes(s, b, h, 8, True, 0.25, f, swiglu=True) == pytest.approx(sp)


def test_op_sac_layout_counts_its_recompute_and_stores_less_than_none(manager):
    base = dict(tp=1, dp=8, micro_batch=1, global_batch=8, zero=3)
    op = predict(config(recompute="selective-op", **base), manager)
    none = predict(config(recompute="none", **base), manager)
    model = ModelConfig.from_dict(preset("llama3-8b"))
    ratio = 1 + flops.recompute_flops_per_token(model, "selective-op") / flops.model_flops_per_token(model)
    assert op["hardware_tflops_per_gpu"] / op["model_tflops_per_gpu"] == pytest.approx(ratio)
    assert op["breakdown_s"]["recompute"] > 0 == none["breakdown_s"]["recompute"]
    assert op["step_time_s"] > none["step_time_s"]
    assert op["memory_gb"]["activations"] < none["memory_gb"]["activations"]


def test_eager_loss_holds_three_fp32_copies_of_the_logits():
    assert memory.loss_bytes_per_logit("eager") == 12
    assert memory.loss_bytes_per_logit("fused") == 8
    # DTensor's loss_parallel backward: saved output, zeros_like, exp and their sum, 4 fp32 tensors
    assert memory.loss_bytes_per_logit("eager", vocab_parallel=True) == 16
    assert memory.loss_bytes_per_logit("fused", vocab_parallel=True) == 8


def test_head_input_is_gathered_unless_megatron_regathers_it():
    s, b, h = 8192, 4, 16384
    assert memory.head_input_bytes(s, b, h, 8, True, True) == 2 * s * b * h / 8  # Megatron saves the SP shard
    assert memory.head_input_bytes(s, b, h, 8, True, False) == 2 * s * b * h  # DTensor saves the gathered input
    assert memory.head_input_bytes(s, b, h, 8, False, True) == 2 * s * b * h  # no SP: the input is whole
    assert memory.kept_output_bytes(4, 8192, 128256, 8, 8) == 2 * 4 * 8192 * 128256 / 8 * 8


def test_loss_parallel_and_head_input_in_the_prediction(manager):
    from dspark_lab.planner.rank_memory import OTHER_GB

    model = ModelConfig.from_dict(preset("llama3-8b"))
    s, h, V, L, t = model.seq_len, model.hidden, model.vocab, model.layers, 8
    base = dict(tp=t, dp=1, micro_batch=1, global_batch=8, recompute="full", loss="eager")
    megatron = predict(config(**base), manager)["memory_gb"]
    titan = predict(config(sp_regather=False, **base), manager)["memory_gb"]
    recomputed_layer = titan["activations"] * 1e9 - L * 2 * s * h / t
    # 16 bytes per vocab-sharded logit, the gathered output-layer input (2sh) and the eager RMSNorm's fp32 input
    # and bf16 output of its sequence shard (6sh/t), beyond the recomputed layer
    norm = 6 * s * h / t
    assert titan["other"] == pytest.approx(OTHER_GB + (16 * s * V / t + 2 * s * h + norm - recomputed_layer) / 1e9)
    assert titan["other"] - megatron["other"] == pytest.approx((2 * s * h - 2 * s * h / t) / 1e9)


def test_the_final_norm_saves_its_input_fused_and_more_eager():
    s, b, h, t = 8192, 1, 16384, 8
    assert memory.final_norm_bytes(s, b, h, t, True, False) == 2 * s * b * h / t  # fused: the input's SP shard
    assert memory.final_norm_bytes(s, b, h, t, True, True) == 6 * s * b * h / t  # eager: fp32 input, bf16 output
    assert memory.final_norm_bytes(s, b, h, t, False, True) == 6 * s * b * h


def test_torch_pipelining_keeps_every_micro_batchs_logits_and_receive_buffers(manager):
    from dspark_lab.planner.rank_memory import OTHER_GB

    model = ModelConfig.from_dict(preset("llama3-8b"))
    s, h, V, m = model.seq_len, model.hidden, model.vocab, 4
    # two stages, one sequence per micro-batch, four micro-batches: the last stage's loss is the peak
    base = dict(tp=1, pp=2, dp=1, micro_batch=1, global_batch=m, recompute="full", loss="eager")
    megatron = predict(config(gpus=2, **base), manager)["memory_gb"]
    torch_pp = predict(config(gpus=2, pp_runtime="torch", **base), manager)["memory_gb"]
    # The last stage at the last micro-batch's loss: 4 bf16 logits; 4 input receive buffers, the input gradients
    # of the 3 micro-batches before it left on their buffers, less the in-flight buffer that is its first layer's
    # saved input (already in the activations)
    logits, buffers = m * 2 * s * V, (m + (m - 1) - 1) * 2 * s * h
    assert torch_pp["other"] - megatron["other"] == pytest.approx((logits + buffers) / 1e9)
    assert torch_pp["total"] - megatron["total"] == pytest.approx((logits + buffers) / 1e9)
    recomputed_layer = torch_pp["activations"] * 1e9 - 16 * 2 * s * h  # one micro-batch of 16 layer inputs
    at_loss = 12 * s * V + 2 * s * h + 6 * s * h  # logits' loss, the output layer's input, the eager norm's saves
    assert torch_pp["other"] == pytest.approx(OTHER_GB + (at_loss + logits + buffers - recomputed_layer) / 1e9)
    # without PP nothing is kept (torchtitan deletes its logits before backward) and nothing is received
    one = dict(base, pp=1, dp=2)
    assert predict(config(gpus=2, pp_runtime="torch", **one), manager)["memory_gb"] == \
        predict(config(gpus=2, **one), manager)["memory_gb"]


def test_without_returned_outputs_torch_pipelining_keeps_only_receive_buffers_and_input_gradients(manager):
    """``pp_return_outputs`` false (torchtitan since #1922 calls ``step(return_outputs=False)``): no stage keeps
    its outputs, so the last stage holds the same as under Megatron's p2p plus the receive buffers and input
    gradients; true keeps every micro-batch's logits and, at the step's end, their concatenation as well."""
    model = ModelConfig.from_dict(preset("llama3-8b"))
    s, h, V = model.seq_len, model.hidden, model.vocab
    base = dict(tp=1, pp=2, dp=1, micro_batch=1, global_batch=4, recompute="full", loss="eager")
    megatron = predict(config(gpus=2, **base), manager)["memory_gb"]
    dropped = predict(config(gpus=2, pp_runtime="torch", pp_return_outputs=False, **base), manager)["memory_gb"]
    buffers = (4 + 3 - 1) * 2 * s * h  # as in the test above, without the logits
    assert dropped["other"] - megatron["other"] == pytest.approx(buffers / 1e9)
    titan = Layout.from_dict({**base, "framework": "torchtitan"})
    assert titan.pp_return_outputs is False and Layout.from_dict(base).pp_return_outputs is True
    # 64 micro-batches: after the last backward the kept logits and step()'s concatenation of them outweigh the
    # steady state, so the total holds both copies; without returned outputs neither is there
    many = dict(base, global_batch=64)
    logits = 64 * 2 * s * V
    kept = predict(config(gpus=2, pp_runtime="torch", **many), manager)["memory_gb"]
    none = predict(config(gpus=2, pp_runtime="torch", pp_return_outputs=False, **many), manager)["memory_gb"]
    assert kept["total"] * 1e9 > 2 * logits > 2 * none["total"] * 1e9


def test_cp_allgather_holds_every_ranks_k_and_v(manager):
    s, b, h, t = 32768, 1, 16384, 8
    assert memory.cp_allgather_bytes(s, b, h, t, 1) == 0.0
    assert memory.cp_allgather_bytes(s, b, h, t, 8) == 8 * 2 * 2 * s * b * h / t  # 2.15 GB: 8 shards of K and V
    long = preset("llama3-8b", 65536)
    model = ModelConfig.from_dict(long)
    base = dict(tp=1, dp=1, cp=8, micro_batch=1, global_batch=1, recompute="full")
    ring = predict(config(long, **base), manager)["memory_gb"]
    gathered = predict(config(long, cp_rotate="allgather", **base), manager)["memory_gb"]
    local = model.seq_len // 8
    assert gathered["activations"] - ring["activations"] == pytest.approx(8 * 4 * local * model.hidden / 1e9)


def test_torch_pipelining_boundaries_walked_hand_computed():
    from dspark_lab.planner.model import liveness

    sched = liveness.schedule("1f1b", 2, 4, 1)  # rank 0: F0 F1 B0 F2 B1 F3 B2 B3; rank 1: F0 B0 F1 B1 ... B3
    layers = (16, 16)
    # without boundaries: rank 0 holds two micro-batches of 16 layers with its gradients (chunk 0 of each rank)
    assert liveness.rank_envelope(sched, 0, layers) == ((32, frozenset({0}), 0),)
    # the first stage keeps every forward output (output_chunks): 4 outputs by its last forward, 2 in flight
    assert liveness.rank_envelope(sched, 0, layers, True) == ((32, frozenset({0}), 4),)
    # the last stage at its 4th forward: 3 input gradients kept, less the in-flight receive buffer that is its
    # first layer's saved input; after the last backward 4 input gradients and no saved input
    assert liveness.rank_envelope(sched, 1, layers, True) == ((16, frozenset({0}), 2), (0, frozenset({0}), 4))
    # a stage of no layers saves no input: its receive buffer is not shared
    assert liveness.rank_envelope(sched, 1, (16, 0), True) == ((0, frozenset({0}), 4),)
    # when step() returns no outputs, fwd_cache holds each only to its backward: 2 in flight at the peak, and the
    # last stage, which sends nothing, is unchanged
    assert liveness.rank_envelope(sched, 0, layers, True, outputs=False) == ((32, frozenset({0}), 2),)
    assert liveness.rank_envelope(sched, 1, layers, True, outputs=False) == \
        liveness.rank_envelope(sched, 1, layers, True)


def test_fp8_allgather_keeps_the_gathered_blocks_in_one_byte(manager):
    assert memory.unsharded_weight_bytes("fp8", True) == 1
    assert memory.unsharded_weight_bytes("fp8", False) == memory.unsharded_weight_bytes("bf16", True) == 2
    assert memory.state_bytes(1000, 2, 8, 600) == (2 * 1000 - 600, 4 * 1000 / 8, 12 * 1000 / 8)
    assert memory.state_bytes(1000, 3, 8, 600) == (2 * 1000 / 8, 4 * 1000 / 8, 12 * 1000 / 8)  # shards unchanged
    assert memory.fsdp_buffers(3, 100.0, block_weight_bytes=1) == (2 * 100.0, 6 * 100.0)
    model = ModelConfig.from_dict(preset("llama3-8b"))
    blocks = model.layers * flops.layer_params(model, 0)
    base = dict(tp=1, dp=8, micro_batch=1, global_batch=8, recompute="full", zero=2, precision="fp8")
    bf16 = predict(config(**base), manager)["memory_gb"]
    fp8 = predict(config(fp8_allgather=True, **base), manager)["memory_gb"]
    assert bf16["params"] - fp8["params"] == pytest.approx(blocks / 1e9)  # 2 -> 1 byte per block parameter
    assert {k: v for k, v in fp8.items() if k not in ("params", "total")} == \
        {k: v for k, v in bf16.items() if k not in ("params", "total")}
    # torchtitan casts to fp8 only with float8 training: a bf16 run gathers bf16
    bf16_run = dict(base, precision="bf16")
    assert predict(config(fp8_allgather=True, **bf16_run), manager)["memory_gb"] == \
        predict(config(**bf16_run), manager)["memory_gb"]



def test_fsdp2_side_streams_keep_two_gathered_groups_and_the_gradient_shards_reserved(manager):
    assert memory.fsdp2_side_stream_bytes([5.0, 9.0, 7.0], 4.0) == 9.0 + 7.0 + 4.0
    model = ModelConfig.from_dict(preset("llama3-8b"))
    block = flops.layer_params(model, 0)
    root = flops.embedding_params(model) + flops.output_params(model)  # one FSDP unit: embedding and output
    total = model.layers * block + root
    base = dict(tp=1, dp=8, micro_batch=1, global_batch=8, recompute="full", precision="fp8", fp8_allgather=True)

    def extra(**layout):
        megatron = predict(config(**base, **layout), manager)["memory_gb"]
        torch = predict(config(fsdp_runtime="torch", **base, **layout), manager)["memory_gb"]
        assert {k: v for k, v in torch.items() if k not in ("other", "total")} == \
            {k: v for k, v in megatron.items() if k not in ("other", "total")}
        assert torch["total"] - megatron["total"] == pytest.approx(torch["other"] - megatron["other"])
        return (torch["other"] - megatron["other"]) * 1e9

    # ZeRO 2: the bf16 root unit and one fp8 block on the copy-in stream, and every fp32 gradient shard on the
    # reduce-scatter stream (the peak itself holds the unsharded gradients, not the shards)
    assert extra(zero=2) == pytest.approx(2 * root + 1 * block + 4 * total / 8)
    # ZeRO 3 counts the shards at the peak already: only the all-gather outputs are added
    assert extra(zero=3) == pytest.approx(2 * root + 1 * block)
    # without sharding there is no FSDP all-gather or reduce-scatter
    assert extra(zero=1) == 0.0
    assert predict(config(fsdp_runtime="torch", **dict(base, dp=1, tp=8, zero=3)), manager)["memory_gb"] == \
        predict(config(**dict(base, dp=1, tp=8, zero=3)), manager)["memory_gb"]

def test_pipeline_buffers_hand_computed():
    s, b, h, t, m = 8192, 4, 16384, 8, 8
    shard = 2 * s * b * h / t  # a stage-boundary tensor under SP
    assert memory.pipeline_buffer_bytes(s, b, h, t, True, m, 0, 1) == m * shard  # first stage: gradients only
    assert memory.pipeline_buffer_bytes(s, b, h, t, True, m, 1, 1) == 2 * m * shard  # a middle stage
    assert memory.pipeline_buffer_bytes(s, b, h, t, False, m, 2, 1) == 3 * m * 2 * s * b * h  # 2 chunks, no SP


def test_megatron_sp_gathers_each_column_parallel_input_again_in_backward(manager):
    from dspark_lab.planner.hardware import device
    from dspark_lab.planner.model import comm
    from dspark_lab.planner.model.config import Cluster

    model = ModelConfig.from_dict(preset("llama3-8b"))
    base = dict(tp=8, dp=1, micro_batch=1, global_batch=2, recompute="none")
    megatron = predict(config(**base), manager)
    titan = predict(config(sp_regather=False, **base), manager)
    links = device(Cluster.from_dict({"gpu": "nvidia-h100", "gpus": 8}), manager).links
    gather = comm.collective("all_gather", model.seq_len * model.hidden * 2, 8, 1, links)
    expected = 2 * model.layers * 2 * gather  # two all-gathers per layer, two micro-batches, exposed (no overlap)
    assert megatron["breakdown_s"]["tp_comm"] - titan["breakdown_s"]["tp_comm"] == pytest.approx(expected)
    assert megatron["step_time_s"] - titan["step_time_s"] == pytest.approx(expected)
    no_sp = dict(base, sequence_parallel=False)
    assert predict(config(**no_sp), manager)["step_time_s"] == predict(config(sp_regather=False, **no_sp),
                                                                        manager)["step_time_s"]


def test_fsdp_buffers_hand_computed():
    block, emb, out = 218e6, 525e6, 525e6
    assert memory.fsdp_buffers(2, block, emb + out, out) == (0.0, 0.0)  # weights already gathered under ZeRO 2
    # ZeRO 3, a block's backward: two blocks gathered, its bf16 gradient and the fp32 reduce-scatter input
    assert memory.fsdp_buffers(3, block) == (4 * block, 6 * block)
    # ZeRO 3 at the loss: the root unit (embedding + output) and a block gathered, the output weight's bf16 gradient
    assert memory.fsdp_buffers(3, block, emb + out, out) == (2 * (emb + out + block), 2 * out)
    assert memory.fsdp_buffers(1, block, emb + out, out) == (0.0, 0.0)


def test_fsdp_buffers_in_the_prediction(manager):
    model = ModelConfig.from_dict(preset("llama3-8b"))
    layer = flops.layer_params(model, 0)
    emb, out = flops.embedding_params(model), flops.output_params(model)
    local = flops.total_params(model) - model.hidden  # the final norm is not placed on a stage
    base = dict(tp=1, dp=8, micro_batch=1, global_batch=8, recompute="none")
    z3 = predict(config(zero=3, **base), manager)["memory_gb"]
    assert z3["params"] == pytest.approx((2 * local / 8 + 2 * (emb + out + layer)) / 1e9)
    assert z3["grads"] == pytest.approx((4 * local / 8 + 2 * out) / 1e9)
    z2 = predict(config(zero=2, **base), manager)["memory_gb"]
    assert z2["params"] == pytest.approx(2 * local / 1e9)
    assert z2["grads"] == pytest.approx(4 * local / 1e9)


def test_op_sac_recompute_time_hand_computed(manager):
    from dspark_lab.planner.hardware import device
    from dspark_lab.planner.model.config import Cluster
    from dspark_lab.planner.model.efficiency import MEMORY_EFFICIENCY, efficiency

    model = ModelConfig.from_dict(preset("llama3-8b"))
    s, h, f, L = model.seq_len, model.hidden, model.ffn_hidden, model.layers
    dev = device(Cluster.from_dict({"gpu": "nvidia-h100", "gpus": 8}), manager)
    eff, peak, hbm = efficiency("nvidia-h100"), dev.peak_flops("bf16"), dev.hbm_gb_s * 1e9 * MEMORY_EFFICIENCY

    def gemm(flop, d):
        return flop / (peak * eff.gemm(d))

    # one sequence per GPU (tp 1): wk (h x h/4), wo (h x h) and w3 (h x ffn) again, plus the forward element-wise
    # traffic (10 passes per h and 3 per ffn element, 2 bytes each); per layer, per micro-batch
    qkv = gemm(2 * s * h * 1.5 * h, min(s, 1.5 * h, h))
    wk_wo_w3 = qkv * 0.25 / 1.5 + gemm(2 * s * h * h, h) + gemm(3 * 2 * s * h * f, min(s, f, h)) / 3
    elementwise = (10 * s * h + 3 * s * f) * 2 / hbm
    pred = predict(config(tp=1, dp=8, micro_batch=1, global_batch=8, zero=3, recompute="selective-op"), manager)
    assert pred["breakdown_s"]["recompute"] == pytest.approx(L * (wk_wo_w3 + elementwise), rel=1e-9)


def test_the_plan_magic_takes_the_cli_arguments():
    from IPython.core.error import UsageError

    from dspark_lab.jupyter.magics import dispatch

    out = dispatch("plan search --model llama3-8b --gpu nvidia-h100 --gpus 8 --global-batch 8 --top 2 "
                   "--framework torchtitan --with precision=fp8 --json")
    assert out["kind"] == "plan.search" and out["framework"] == "torchtitan" and len(out["results"]) == 2
    assert all(r["layout"]["zero"] in (0, 2, 3) for r in out["results"])
    with pytest.raises(UsageError, match="--with tp: is searched"):
        dispatch("plan search --model llama3-8b --gpu nvidia-h100 --gpus 8 --global-batch 8 --with tp=2")


def test_each_1f1b_rank_holds_its_warm_up_micro_batches_layer_inputs(manager):
    """Per-rank counts (what benchmarks/pipeline_memory.py checks against a real run): under 1F1B rank r of p
    runs p - r forwards before its first backward, so at its peak it keeps p - r micro-batches of its layers'
    inputs (full recompute) plus the one layer being recomputed; the fullest rank is the prediction."""
    from dspark_lab.planner.predict import rank_memory_counts

    s, b, h, p = 1024, 2, 1024, 4
    cfg = config({"layers": 16, "hidden": h, "heads": 8, "vocab": 32000, "seq_len": s, "ffn_kind": "swiglu",
                  "dropout": False}, gpus=p, tp=1, pp=p, dp=1, micro_batch=b, global_batch=8 * b, zero=2,
                 recompute="full", framework="torchtitan")
    per_rank = rank_memory_counts(cfg)
    terms = memory.layer_activation_terms(s, b, h, 8, 1, 1.0, 4 * h, True, False)
    recomputed = memory.layer_activation_bytes(terms, 1, False, False)
    for r, gb in enumerate(per_rank):
        assert gb["activations"] * 1e9 == pytest.approx((p - r) * 4 * 2 * s * b * h + recomputed)
    assert max(gb["total"] for gb in per_rank) == predict(cfg, manager, allocator=False)["memory_gb"]["total"]


def test_fsdp_under_torch_pipelining_frees_a_chunks_gradients_after_its_last_backward():
    """Interleaved, 2 ranks, 2 chunks each, 2 micro-batches: rank 0 runs F0 F1 (chunk 0), F0 F1 (chunk 1), then
    chunk 1's two backwards, then chunk 0's. Kept to the step's end, chunk 1's gradients are still there when
    chunk 0's first backward makes its own; reduce-scattered at chunk 1's last backward (FSDP2's post-backward,
    ``reduce_after`` = 2 micro-batches), only chunk 0's are."""
    from dspark_lab.planner.model import liveness

    sched = liveness.schedule("interleaved-1f1b", 2, 2, 2, "torch")
    layers = (4, 4, 4, 4)
    # the peaks: all four forwards' 16 layers with chunk 1's first gradients; chunk 0's 8 layers at its first backward
    assert liveness.rank_envelope(sched, 0, layers) == ((16, frozenset({1}), 0), (8, frozenset({0, 1}), 0))
    assert liveness.rank_envelope(sched, 0, layers, reduce_after=2) == ((16, frozenset({1}), 0),
                                                                         (8, frozenset({0}), 0))
    # one chunk per rank (1F1B): its last backward ends the step, so nothing changes
    one = liveness.schedule("1f1b", 2, 4, 1, "torch")
    assert liveness.rank_envelope(one, 0, (16, 16), reduce_after=4) == liveness.rank_envelope(one, 0, (16, 16))
    # without reduce_after a split backward (Bi, then W) never drops gradients: zbv's rank 1, 2 ranks, 4
    # micro-batches, holds both chunks' gradients at every candidate peak once its first W ran
    zbv = liveness.schedule("zbv", 2, 4, 2)
    both = frozenset({0, 1})
    assert liveness.rank_envelope(zbv, 1, (4, 4, 4, 4), True) == ((16, both, 8), (12, both, 10), (8, both, 12),
                                                                   (4, both, 14), (0, both, 16))
