"""Tiny random configs of every causal-LM architecture transformers ships, for the pruning matrix.

``tiny_config(model_type)`` starts from the config class's defaults and shrinks every size it knows by name
(width, heads, MLP, experts, state sizes, vocabulary, positions) so that the model builds in well under a second.
"""

from __future__ import annotations

import importlib.util

from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

LAYERS = 6
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 128, 256

# name → tiny value, applied wherever the (text) config has that attribute as an int
SIZES = {
    **dict.fromkeys(["hidden_size", "n_embd", "d_model", "dim", "embed_dim", "model_dim", "word_embed_proj_dim",
                     "embedding_size", "d_embed"], HIDDEN),
    **dict.fromkeys(["num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "num_attention_heads_per_layer"], HEADS),
    **dict.fromkeys(["num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
                     "num_key_value_groups", "kv_n_heads", "n_head_kv"], KV_HEADS),
    **dict.fromkeys(["head_dim", "attention_head_dim", "kv_channels", "v_head_dim", "qk_head_dim",
                     "swa_head_dim", "global_head_dim"], HEAD_DIM),
    **dict.fromkeys(["intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "decoder_ffn_dim",
                     "encoder_ffn_dim", "ffn_config_hidden", "mlp_hidden_size", "dense_intermediate_size"], FFN),
    **dict.fromkeys(["moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                     "moe_ffn_hidden_size", "intermediate_size_mlp", "moe_shared_expert_intermediate_size"], 32),
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_total",
                     "n_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "num_experts_per_token", "top_k", "moe_k",
                     "num_selected_experts"], 2),
    **dict.fromkeys(["n_shared_experts", "num_shared_experts", "moe_num_shared_experts"], 1),
    **dict.fromkeys(["n_group", "topk_group"], 1),
    **dict.fromkeys(["num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"], LAYERS),
    **dict.fromkeys(["vocab_size"], VOCAB),
    **dict.fromkeys(["max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_seq_len",
                     "original_max_position_embeddings"], 256),
    **dict.fromkeys(["kv_lora_rank"], 16), **dict.fromkeys(["q_lora_rank"], 32),
    **dict.fromkeys(["qk_rope_head_dim", "qk_nope_head_dim"], 8),
    **dict.fromkeys(["mamba_d_state", "ssm_state_size", "state_size", "d_state", "mamba_d_conv"], 4),
    **dict.fromkeys(["mamba_n_heads", "mamba_num_heads"], 8),
    **dict.fromkeys(["linear_num_value_heads", "linear_num_key_heads"], 4),
    **dict.fromkeys(["rotary_dim", "partial_rotary_dim"], 8),
    **dict.fromkeys(["mamba_d_ssm"], 2 * HIDDEN),
    **dict.fromkeys(["attention_hidden_size"], HIDDEN),
    **dict.fromkeys(["mamba_d_head", "mamba_head_dim", "linear_key_head_dim", "linear_value_head_dim"], 16),
    **dict.fromkeys(["mamba_n_groups", "n_groups"], 1),
    **dict.fromkeys(["mamba_chunk_size", "chunk_size"], 16),
    **dict.fromkeys(["time_step_rank"], 8),
    **dict.fromkeys(["sliding_window", "attention_window_size", "window_size"], 16),
    **dict.fromkeys(["hidden_size_per_layer_input"], 8),
    **dict.fromkeys(["vocab_size_per_layer_input"], VOCAB),
    **dict.fromkeys(["num_kv_shared_layers"], 2),
    **dict.fromkeys(["rnn_hidden_size", "lru_width"], HIDDEN),
}

# Packages that some architectures import at construction and that the project does not install.
NEEDS_PACKAGE: dict[str, str] = {}


def model_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def missing_package(model_type: str) -> str | None:
    pkg = NEEDS_PACKAGE.get(model_type)
    return pkg if pkg and importlib.util.find_spec(pkg) is None else None


# Per model type: what the generic shrink cannot know (head counts that must match a state size, …).
OVERRIDES = {
    "mamba2": {"num_heads": 8},
    # hybrids whose default layout has no attention block at all (their cache then cannot generate)
    "bamba": {"attn_layer_indices": [1, 3]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"] * (LAYERS // 2)},
    "gpt_neo": {"attention_types": [[["global", "local"], LAYERS // 2]]},
}


def _set(cfg, key, value) -> None:
    try:
        setattr(cfg, key, value)
    except AttributeError:  # a read-only property derived from other fields
        pass


def _shrink(cfg) -> None:
    for key, value in SIZES.items():
        if not hasattr(cfg, key):
            continue
        current = getattr(cfg, key, None)
        if isinstance(current, int) and not isinstance(current, bool):
            _set(cfg, key, value)
        elif isinstance(current, list) and current and all(isinstance(v, int) for v in current):
            _set(cfg, key, [value] * LAYERS)
        elif current is None and key in ("head_dim", "num_experts_per_tok", "n_group", "topk_group"):
            _set(cfg, key, value)
    if isinstance(getattr(cfg, "qk_rope_head_dim", None), int):  # multi-head latent attention: rope on part of it
        _set(cfg, "head_dim", cfg.qk_rope_head_dim)
    _set(cfg, "is_decoder", True)  # BERT-style models run causally (and cache) only as decoders
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) >= VOCAB:
            setattr(cfg, key, {"bos_token_id": 1, "eos_token_id": 2}.get(key, 0))
    if hasattr(cfg, "initializer_range"):
        cfg.initializer_range = 0.2


def tiny_config(model_type: str, **overrides):
    """The default config of ``model_type``, shrunk, rebuilt so that derived fields (``layer_types`` …) follow."""
    cfg = AutoConfig.for_model(model_type)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    _shrink(text)
    overrides = {**OVERRIDES.get(model_type, {}), **overrides}
    for sub in ("vision_config", "audio_config", "encoder_config"):
        if getattr(cfg, sub, None) is not None:
            _shrink(getattr(cfg, sub))
    if text is cfg:
        d = {k: v for k, v in cfg.to_dict().items() if not _derived(k, v)}
        d.update(overrides)
        d.pop("model_type", None)
        return AutoConfig.for_model(model_type, **d)
    d = _strip(cfg.to_dict())
    d.pop("model_type", None)
    cfg = AutoConfig.for_model(model_type, **d)
    text = cfg.get_text_config()
    for k, v in overrides.items():
        setattr(text, k, v)
    return cfg


def _strip(d: dict) -> dict:
    return {k: _strip(v) if isinstance(v, dict) else v for k, v in d.items() if not _derived(k, v)}


def _derived(key: str, value) -> bool:
    """Per-layer lists that a config derives from its layer count: dropped so they are derived anew."""
    return isinstance(value, (list, tuple)) and key in ("layer_types", "mlp_layer_types", "no_rope_layers",
                                                         "layers_block_type", "full_attn_idxs", "moe_layers",
                                                         "attention_layers", "layer_rope_theta",
                                                         "num_attention_heads_per_layer", "activation_sparsity_pattern",
                                                         "hybrid_layer_ids")
