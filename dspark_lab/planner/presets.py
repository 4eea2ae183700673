"""Public model configurations, by name. Sources: GPT-3 (Brown et al. 2020, Table 2.1: 96 layers, d_model 12288,
96 heads, 2048 context; GPT-2 BPE vocabulary 50257, tied embeddings); Llama 3 (Llama Team 2024, "The Llama 3 Herd of
Models", Table 3, and the released config.json files: vocabulary 128256, 8 KV heads, SwiGLU); DeepSeek-V3
(DeepSeek-AI 2024, technical report section 4.2 and config.json: 61 layers, 3 dense, 256 routed experts of width
2048, top-8, 1 shared expert; MLA attention is planned as grouped attention of the same width)."""

from __future__ import annotations

from dspark_lab.errors import DSparkError

PRESETS: dict[str, dict] = {
    "gpt3-175b": dict(layers=96, hidden=12288, heads=96, vocab=50257, seq_len=2048, tied_embeddings=True),
    "llama3-8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, vocab=128256, seq_len=8192,
                      ffn_hidden=14336, ffn_kind="swiglu", dropout=False),
    "llama3-70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, vocab=128256, seq_len=8192,
                       ffn_hidden=28672, ffn_kind="swiglu", dropout=False),
    "llama3-405b": dict(layers=126, hidden=16384, heads=128, kv_heads=8, vocab=128256, seq_len=8192,
                        ffn_hidden=53248, ffn_kind="swiglu", dropout=False),
    "deepseek-v3": dict(layers=61, hidden=7168, heads=128, vocab=129280, seq_len=4096, ffn_hidden=18432,
                        ffn_kind="swiglu", experts=256, top_k=8, moe_ffn_hidden=2048, shared_experts=1,
                        dense_layers=3, dropout=False),
}
# Published total parameter counts (billions) the presets are tested against.
PUBLISHED_B = {"gpt3-175b": 175.0, "llama3-8b": 8.03, "llama3-70b": 70.6, "llama3-405b": 405.0,
               "deepseek-v3": 671.0}


def preset(name: str, seq_len: int | None = None) -> dict:
    if name not in PRESETS:
        raise DSparkError(f"model: unknown preset {name!r}; choose from {', '.join(PRESETS)} or give an object")
    out = dict(PRESETS[name], name=name)
    if seq_len is not None:
        out["seq_len"] = seq_len
    return out
