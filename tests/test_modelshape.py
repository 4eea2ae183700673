"""The planner's description of a live model (``job.model``) read from the frameworks' own model objects, and the
parallel degrees (``job.parallelism``) read from the job's sharding."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dspark_lab.runtime import jobinfo, modelshape
from dspark_lab.runtime.discover import find_blocks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dspark_lab" / "examples"))
from demo_train import TinyGPT  # noqa: E402  (the demo's model: no configuration object)


def shape(model: nn.Module, whole: bool = True) -> dict:
    return modelshape.describe(model, find_blocks(model).modules, whole)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_a_hugging_face_gpt2_is_read_from_its_config():
    transformers = pytest.importorskip("transformers", reason="the frameworks extra is not installed")
    config = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=128, n_positions=96)
    model = transformers.GPT2LMHeadModel(config)
    assert shape(model) == {"layers": 3, "hidden": 64, "heads": 4, "vocab": 128, "seq_len": 96, "dropout": True,
                            "params": params(model)}  # GPT-2's Conv1D MLP: the planner's 4h GeLU default


def test_a_hugging_face_llama_gives_its_gated_ffn_and_kv_heads():
    transformers = pytest.importorskip("transformers", reason="the frameworks extra is not installed")
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=176, vocab_size=256,
                                      max_position_embeddings=512)
    got = shape(transformers.LlamaForCausalLM(config))
    keys = ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "ffn_kind", "seq_len", "dropout")
    assert {k: got[k] for k in keys} == {"layers": 2, "hidden": 64, "heads": 8, "kv_heads": 2, "ffn_hidden": 176,
                                         "ffn_kind": "swiglu", "seq_len": 512, "dropout": False}


def test_torchtitans_model_args_and_its_swiglu_block():
    llama3 = pytest.importorskip("torchtitan.models.llama3", reason="the frameworks extra is not installed")
    args = llama3.TransformerModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=256)
    with torch.device("meta"):
        model = llama3.Transformer(args)
    got = shape(model)
    ffn = model.layers["0"].feed_forward.w1.out_features  # torchtitan's rounding of 8/3 x dim
    assert got == {"layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 128, "seq_len": 256,
                   "dropout": False, "ffn_hidden": ffn, "ffn_kind": "swiglu", "params": params(model)}
    # a pipeline stage holds some layers: the configuration still describes the model, the count is not published
    assert "params" not in shape(model, whole=False) and shape(model, whole=False)["layers"] == 4


@dataclasses.dataclass
class GPTConfig:  # nanoGPT's names (its dropout defaults to 0.0)
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 32
    vocab_size: int = 100
    block_size: int = 64
    dropout: float = 0.0


class NanoBlock(nn.Module):  # nanoGPT's Block: layer norms, attention with a fused QKV, a GeLU MLP
    def __init__(self, h: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(h, 3 * h), "c_proj": nn.Linear(h, h)})
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(h, 4 * h), "c_proj": nn.Linear(4 * h, h)})


class NanoGPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(NanoBlock(config.n_embd) for _ in range(config.n_layer))


def test_a_nanogpt_config_and_a_fused_qkv_block():
    model = NanoGPT(GPTConfig())
    assert shape(model) == {"layers": 3, "hidden": 32, "heads": 4, "vocab": 100, "seq_len": 64, "dropout": False,
                            "ffn_hidden": 128, "ffn_kind": "gelu", "params": params(model)}


def test_a_model_without_a_config_is_read_from_its_modules():
    model = TinyGPT(vocab=64, dim=32, heads=4, layers=3, seq=16)
    assert shape(model) == {"layers": 3, "vocab": 64, "hidden": 32, "heads": 4, "ffn_hidden": 128,
                            "ffn_kind": "gelu", "params": params(model)}
    assert shape(model, whole=False) == {}  # a stage's modules say nothing about the whole model


def test_foreign_values_that_are_not_dimensions_are_ignored():
    class Config:
        n_layer, n_embd, n_head, vocab_size, block_size = 2, 32, True, -5, 1 << 40

    model = NanoGPT(GPTConfig(n_layer=2))
    model.config = Config()
    assert shape(model) == {"layers": 2, "hidden": 32, "dropout": False, "ffn_hidden": 128, "ffn_kind": "gelu",
                            "params": params(model)}


def test_a_property_that_raises_is_not_readable_and_status_still_answers():
    class Angry:  # a config whose heads property raises
        n_layer, n_embd = 2, 32

        @property
        def n_head(self):
            raise RuntimeError("only inside a Trainer")

    class Model(nn.Module):  # a module whose config property raises (Lightning's do outside a Trainer)
        def __init__(self):
            super().__init__()
            self.model_args = Angry()
            self.h = nn.ModuleList(NanoBlock(32) for _ in range(2))

        @property
        def config(self):
            raise RuntimeError("not attached")

    got = shape(Model())
    assert got["layers"] == 2 and got["hidden"] == 32 and "heads" not in got


def test_parallel_degrees_come_from_the_meshes():
    mesh = {"shape": [2, 4], "dim_names": ["dp_replicate", "dp_shard"], "device_type": "cuda"}
    fsdp = {"kind": "fsdp2", "mesh": mesh, "reshard_after_forward": False}
    tp = {"mesh": {"shape": [8], "dim_names": ["tp"], "device_type": "cuda"}}
    pipe = {"kind": "torch.distributed.pipelining", "ranks": 4, "microbatches": 8}
    assert jobinfo.parallelism(256, fsdp, tp, pipe) == {"tp": 8, "pp": 4, "dp": 8, "zero": 2, "microbatches": 8}
    assert jobinfo.parallelism(8, {**fsdp, "reshard_after_forward": True}, None, None)["zero"] == 3
    assert jobinfo.parallelism(4, {"kind": "ddp", "world": 4}, None, None) == {"tp": 1, "pp": 1, "dp": 4, "zero": 0}
    assert jobinfo.parallelism(6, None, None, None) == {"tp": 1, "pp": 1, "dp": 6}


@pytest.mark.slow
def test_plan_whatif_plans_a_live_job_from_what_it_publishes(tmp_path, monkeypatch):
    """No --model: the demo job (2 ranks, DDP) publishes its shape and degrees; whatif plans it on 16 H100s."""
    from conftest import wait_for_step
    from dspark_lab.planner.commands import whatif_report
    from dspark_lab.runtime import commands

    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    demo = Path(__file__).resolve().parents[1] / "dspark_lab" / "examples" / "demo_train.py"
    job = commands.launch(demo, ["--steps", "400", "--layers", "3", "--dim", "32", "--heads", "4", "--seq", "16",
                                 "--vocab", "64", "--step-sleep", "0.02"], nproc=2, name="whatif-demo")
    try:
        wait_for_step(job, 3)
        report = whatif_report(job.id, gpu="nvidia-h100", gpus=16, seq=16, top=2)
    finally:
        job.stop()
    out = report.data
    assert out["model_from"] == "job.model" and out["model"] == "TinyGPT"
    assert (out["current"]["tp"], out["current"]["pp"], out["current"]["dp"]) == (1, 1, 2)
    assert out["framework"] == "megatron" and len(out["target"]["results"]) == 2
    best = out["target"]["results"][0]
    assert best["layout"]["tp"] * best["layout"]["pp"] * best["layout"]["dp"] * best["layout"]["cp"] == 16


def test_whatif_takes_the_live_jobs_checkpointing_and_compile():
    from dspark_lab.planner.whatif import live_settings

    status = {"policies": {"memory.activation_checkpointing": "full"}}
    assert live_settings(status, {"compile": {"compiled": True}}) == {"recompute": "full", "kernels": "fused"}
    # "none" is only what DSpark applied (a script may checkpoint by itself); every-k is no planner layout
    for value in ("none", "every-2"):
        assert live_settings({"policies": {"memory.activation_checkpointing": value}}, {}) == {}
    assert live_settings({}, {"compile": {"compiled": False}}) == {}
