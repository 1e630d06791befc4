"""Tiny random decoder models of several architectures, for fast tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
LAYERS = 8

# model_type -> config overrides giving a tiny model with LAYERS blocks
TINY = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=LAYERS, max_position_embeddings=256),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=LAYERS, max_position_embeddings=256, sliding_window=16),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=LAYERS, max_position_embeddings=256),
    "qwen3": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  num_hidden_layers=LAYERS, max_position_embeddings=256),
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   num_hidden_layers=LAYERS, max_position_embeddings=256, sliding_window=8),
    "gemma3_text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=8, num_hidden_layers=LAYERS, max_position_embeddings=256, sliding_window=8),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=LAYERS, max_position_embeddings=256),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=LAYERS,
                     max_position_embeddings=256),
    "gpt2": dict(n_embd=32, n_head=4, n_layer=LAYERS, n_positions=256),
    "opt": dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=LAYERS,
                max_position_embeddings=256, word_embed_proj_dim=32),
    "falcon": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=LAYERS, new_decoder_architecture=False,
                   multi_query=True),
    "olmo2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=LAYERS, max_position_embeddings=256),
}


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny causal LM in eval mode (fp32)."""
    torch.manual_seed(seed)
    # The default init (0.02) gives near-uniform predictions; 0.2 makes blocks differ measurably.
    options = {"vocab_size": VOCAB, "initializer_range": 0.2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
               **TINY[model_type], **overrides}
    config = AutoConfig.for_model(model_type, **options)
    return AutoModelForCausalLM.from_config(config).eval()


def random_tokens(n: int = 4, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq_len), generator=g)
