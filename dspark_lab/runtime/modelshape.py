"""The planner's description of a live model (``status`` -> ``job.model``), so ``dspark-lab plan whatif RUN`` plans
a running job without ``--model``.

Read from objects the job already has, never guessed from names alone: a configuration object on the model or
one level down (a Lightning module's ``model``) with the usual attribute names: Hugging Face's ``PretrainedConfig``
(``num_hidden_layers`` / ``n_layer``, ``hidden_size`` / ``n_embd``, ``num_attention_heads`` / ``n_head``,
``num_key_value_heads``, ``intermediate_size`` / ``n_inner``, ``vocab_size``, ``max_position_embeddings`` /
``n_positions``), nanoGPT's ``GPTConfig`` (``n_layer``, ``n_head``, ``n_embd``, ``vocab_size``, ``block_size``) and
torchtitan's ``model_args`` (``n_layers``, ``dim``, ``n_heads``, ``n_kv_heads``, ``vocab_size``, ``max_seq_len``).
Dropout is on where the configuration gives a positive rate (``resid_pdrop``, ``dropout``, ...). The feed-forward
width and kind come from the first repeated block's linear layers (two with the wide width, gate
and up: SwiGLU; one: GeLU) where the configuration does not give them. A model with no such object, held whole on
the rank, is read from its modules: the repeated blocks' count, the widest ``nn.Embedding`` (vocabulary and width)
and the first block's ``nn.MultiheadAttention`` heads. ``seq_len`` is the longest sequence the model
takes, an upper bound on what it trains on (``plan whatif --seq`` overrides it). The parameter count is the
model's own (DTensor parameters count their global size, FSDP1's flattened ones their unsharded size), on a rank
that holds the whole model (no pipeline). A field that cannot be read is left out; the planner then asks for
``--model``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dspark_lab.runtime.discover import param_count

ALIASES = {
    "layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "dim", "d_model"),
    "heads": ("num_attention_heads", "n_head", "n_heads"),
    "kv_heads": ("num_key_value_heads", "n_kv_heads"),
    "vocab": ("vocab_size",),
    "seq_len": ("max_position_embeddings", "n_positions", "block_size", "max_seq_len"),
    "ffn_hidden": ("intermediate_size", "n_inner", "ffn_hidden_size"),
}
DROPOUT = ("resid_pdrop", "attn_pdrop", "embd_pdrop", "hidden_dropout", "hidden_dropout_prob", "attention_dropout",
           "dropout")
CONFIG_ATTRS = ("config", "model_args", "args")
MAX_VALUE = 1 << 24  # a sane bound for any dimension read from a foreign object


def _attr(obj: Any, name: str) -> Any:
    """``getattr`` that never raises: a foreign object's property may (Lightning's raise outside a Trainer), and
    ``status`` must answer whatever the model is."""
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - any error of someone else's property means "not readable"
        return None


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_VALUE:
        return None
    return value


def _read(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        found = _positive_int(_attr(config, name))
        if found is not None:
            return found
    return None


def find_config(model: nn.Module) -> Any:
    """The first object on the model (or one module down) that names both a layer count and a width."""
    for owner in (model, *model.children()):
        for attr in CONFIG_ATTRS:
            config = _attr(owner, attr)
            if config is not None and not isinstance(config, nn.Module) and \
                    _read(config, ALIASES["layers"]) and _read(config, ALIASES["hidden"]):
                return config
    return None


def feed_forward(block: nn.Module, hidden: int) -> dict[str, Any]:
    """The block's FFN width and kind from its linear layers: the widest output of a ``hidden``-wide input, and
    SwiGLU when two such layers share that width (gate and up projections), else GeLU. Empty if none is found."""
    widths = [m.out_features for m in block.modules()
              if isinstance(m, nn.Linear) and m.in_features == hidden and m.out_features > hidden]
    if not widths:
        return {}
    widest = max(widths)
    return {"ffn_hidden": widest, "ffn_kind": "swiglu" if widths.count(widest) >= 2 else "gelu"}


def from_modules(model: nn.Module, blocks: list[nn.Module]) -> dict[str, Any]:
    """Layers, vocabulary, width and heads from the modules themselves (a model without a configuration object)."""
    out: dict[str, Any] = {}
    if len(blocks) >= 2:
        out["layers"] = len(blocks)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if embeddings:
        table = max(embeddings, key=lambda m: m.num_embeddings)
        out["vocab"], out["hidden"] = table.num_embeddings, table.embedding_dim
    if blocks:
        attention = next((m for m in blocks[0].modules() if isinstance(m, nn.MultiheadAttention)), None)
        if attention is not None:
            out["heads"] = attention.num_heads
    return out


def describe(model: nn.Module, blocks: list[nn.Module], whole: bool) -> dict[str, Any]:
    """The planner fields readable from ``model`` and its repeated ``blocks``; ``whole``: this rank holds every layer
    (no pipeline), so the block count and the parameter count are the model's."""
    first_block = blocks[0] if blocks else None
    out: dict[str, Any] = {}
    config = find_config(model)
    if config is not None:
        for field, names in ALIASES.items():
            value = _read(config, names)
            if value is not None:
                out[field] = value
        # dropout masks are stored activations: a config with no positive dropout rate (torchtitan's, Llama's) has none
        rates = [_attr(config, name) for name in DROPOUT]
        out["dropout"] = any(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in rates)
        act = str(_attr(config, "hidden_act") or "").lower()
        if act in ("silu", "swish"):
            out["ffn_kind"] = "swiglu"  # Llama-family configs: a gated FFN with SiLU
    elif whole:
        out.update(from_modules(model, blocks))
    if first_block is not None and "hidden" in out and ("ffn_hidden" not in out or "ffn_kind" not in out):
        for key, value in feed_forward(first_block, out["hidden"]).items():
            out.setdefault(key, value)
    if whole:
        out["params"] = param_count(model)
    return out
