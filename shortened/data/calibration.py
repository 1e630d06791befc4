"""Calibration sets for the pruning criteria: ``n_samples × seq_len`` token windows drawn reproducibly."""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

from shortened.data.config import SLIMPAJAMA_SAMPLE, DataConfig, alias_split_error  # noqa: F401 (re-export)
from shortened.data.formats import encode
from shortened.data.sources import resolve_alias
from shortened.data.stream import DocumentStream
from shortened.errors import ShortenedError


class CalibrationConfig(BaseModel):
    """Paper default: 10 samples × 128 tokens (BookCorpus there; the SlimPajama sample here). Unknown fields are
    refused (``n_sample: 5`` is a typo, not a setting to drop silently)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    source: str = SLIMPAJAMA_SAMPLE
    """The calibration corpus: any source the data layer reads (file, folder, glob, s3://…, hf:NAME, or
    slimpajama-sample)."""
    split: str = "train"
    """Split of slimpajama-sample or of an hf: dataset."""
    format: Literal["text", "alpaca"] = "text"
    """text: a JSON line's text field (or a whole .txt file); alpaca: instruction/input/output records."""
    mixture: dict[str, float] | None = None
    """Set name -> weight, as for training data (None: every set once)."""
    n_samples: int = Field(10, ge=1, le=1_000_000)
    """Calibration samples (paper: 10)."""
    seq_len: int = Field(128, ge=2, le=1_048_576)
    """Tokens per calibration sample (paper: 128)."""
    seed: int = Field(0, ge=0)
    """Seed for drawing the calibration windows."""
    pool_factor: int = Field(32, ge=1, le=10_000)
    """The windows are drawn from the first pool_factor × n_samples × seq_len tokens of the stream."""

    @field_validator("mixture")
    @classmethod
    def _weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        bad = {k: w for k, w in (v or {}).items() if not (w >= 0 and w != float("inf"))}
        if bad:
            raise ValueError(f"mixture weights must be finite and >= 0, got {bad}")
        return v

    @model_validator(mode="after")
    def _split_exists(self) -> CalibrationConfig:
        error = alias_split_error(self.source, self.split)
        if error:
            raise ValueError(error)
        return self

    def data_config(self) -> DataConfig:
        return DataConfig(source=self.source, split=self.split, format=self.format, mixture=self.mixture,
                          seq_len=self.seq_len, epochs=1)


def calibration_windows(tokenizer: PreTrainedTokenizerBase, cfg: CalibrationConfig, *,
                        what: str | None = None) -> torch.Tensor:
    """Tokenize documents (EOS after each) until the pool is full, then draw non-overlapping seeded windows.
    ``what``: the option that set the number of windows, named in the error when the source is too short
    (default: n_samples)."""
    need = cfg.n_samples * cfg.seq_len
    pool_tokens = need * cfg.pool_factor
    data = cfg.data_config()
    stream: list[int] = []
    for doc in DocumentStream(data):
        stream.extend(encode(doc.record, data, tokenizer)[0])
        if len(stream) >= pool_tokens:
            break
    n_windows = len(stream) // cfg.seq_len
    if n_windows < cfg.n_samples:
        raise ShortenedError(f"calibration source {cfg.source!r} has {len(stream)} tokens, fewer than "
                             f"{what or 'n_samples'} × seq_len = {need}")
    rng = np.random.default_rng(cfg.seed)
    starts = np.sort(rng.choice(n_windows, size=cfg.n_samples, replace=False)) * cfg.seq_len
    return torch.tensor(np.array([stream[s:s + cfg.seq_len] for s in starts]), dtype=torch.long)


def describe(cfg: CalibrationConfig, tokens: torch.Tensor) -> dict:
    """What to record next to scores so the calibration set can be reproduced and checked."""
    return {**cfg.model_dump(), "resolved_source": resolve_alias(cfg.source, cfg.split),
            "num_tokens": int(tokens.numel()), "sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()}
