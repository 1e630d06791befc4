"""Calibration sets for the pruning criteria: ``n_samples × seq_len`` token windows drawn reproducibly."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from pydantic import BaseModel, Field
from transformers import PreTrainedTokenizerBase

from shortened.data.sources import SLIMPAJAMA_SAMPLE, iter_texts, resolve_alias
from shortened.errors import ShortenedError


class CalibrationConfig(BaseModel):
    """Paper default: 10 samples × 128 tokens (BookCorpus there; the SlimPajama sample here)."""

    source: str = SLIMPAJAMA_SAMPLE
    n_samples: int = Field(10, ge=1)
    seq_len: int = Field(128, ge=2)
    seed: int = 0
    # The windows are drawn from the first ``pool_factor × n_samples × seq_len`` tokens of the stream.
    pool_factor: int = Field(32, ge=1)


def calibration_windows(tokenizer: PreTrainedTokenizerBase, cfg: CalibrationConfig) -> torch.Tensor:
    """Tokenize documents (EOS between them) until the pool is full, then draw non-overlapping windows."""
    need = cfg.n_samples * cfg.seq_len
    pool_tokens = need * cfg.pool_factor
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in iter_texts(cfg.source):
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= pool_tokens:
            break
    n_windows = len(stream) // cfg.seq_len
    if n_windows < cfg.n_samples:
        raise ShortenedError(f"calibration source {cfg.source!r} has {len(stream)} tokens, fewer than "
                             f"n_samples × seq_len = {need}")
    rng = np.random.default_rng(cfg.seed)
    starts = np.sort(rng.choice(n_windows, size=cfg.n_samples, replace=False)) * cfg.seq_len
    tokens = torch.tensor(np.array([stream[s:s + cfg.seq_len] for s in starts]), dtype=torch.long)
    return tokens


def describe(cfg: CalibrationConfig, tokens: torch.Tensor) -> dict:
    """What to record next to scores so the calibration set can be reproduced and checked."""
    return {**cfg.model_dump(), "resolved_source": resolve_alias(cfg.source), "num_tokens": int(tokens.numel()),
            "sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()}
