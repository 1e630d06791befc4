"""What training data to read and how: one pydantic model for the training workers, the sweep and the CLI."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shortened.paths import shared_data_dir

SLIMPAJAMA_SAMPLE = "slimpajama-sample"
SLIMPAJAMA_HUB = "hf:cerebras/SlimPajama-627B"


def alias_split_error(source: str, split: str) -> str | None:
    """Why ``split`` of the ``slimpajama-sample`` alias is wrong, when the offline sample is here and lacks it
    (the alias would otherwise switch to streaming the hub dataset without a word); None when it is fine."""
    if source != SLIMPAJAMA_SAMPLE:
        return None
    data = shared_data_dir()
    sample = data / SLIMPAJAMA_SAMPLE if data is not None else None
    if sample is None or not sample.is_dir() or (sample / split).is_dir():
        return None
    have = sorted(p.name for p in sample.iterdir() if p.is_dir())
    return (f"split {split!r}: the offline {SLIMPAJAMA_SAMPLE} has {', '.join(have) or 'no splits'} (for the hub "
            f"dataset, name it: hf:cerebras/SlimPajama-627B)")


class DataConfig(BaseModel):
    """A stream of documents, tokenized and packed into ``seq_len`` blocks."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    source: str = SLIMPAJAMA_SAMPLE
    """File, folder or glob of shards; an fsspec URL (s3://, gs://, memory://…); hf:NAME for a hub dataset; or
    slimpajama-sample (the offline sample when present, else SlimPajama-627B on the hub)."""
    split: str = "train"
    """Split of slimpajama-sample or of an hf: dataset."""
    format: Literal["text", "alpaca"] = "text"
    """text: a JSON line's text_field (or a whole .txt file); alpaca: instruction/input/output records with the
    prompt masked out of the loss."""
    text_field: str = "text"
    """The JSON field that holds a document's text (format text)."""
    seq_len: int = Field(2048, ge=2)
    """Tokens per packed training sequence."""
    mixture: dict[str, float] | None = None
    """Keep or weight subsets, as set name -> weight: weight 0 drops a set, 0.5 keeps half its documents, 2 reads
    each twice. Sets not named get weight 0. None reads everything once."""
    mixture_field: str = "meta.redpajama_set_name"
    """The (dotted) JSON field that names a document's set, for mixture."""
    split_by: Literal["auto", "shard", "document"] = "auto"
    """How ranks share the stream: whole shards when their count is a multiple of the world size (auto), else
    documents."""
    epochs: int | None = Field(None, ge=1)
    """Passes over the data (None: cycle forever; training is budgeted in tokens)."""
    shuffle_shards: bool = False
    """A seeded shard order per epoch."""
    seed: int = 0
    """Seed of the shard order and of fractional mixture weights."""
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    """Bad lines are skipped and counted: not UTF-8, not JSON, invalid Unicode (a lone surrogate escape), no text;
    a corrupt or truncated compressed frame, an empty shard or an undecodable .txt/.json file counts as one bad
    line (what decoded before the damage is kept). Above this share of the lines read, stop with an error."""
    document_positions: bool = False
    """Per-document position ids: each block also carries ``position_ids`` (LongTensor ``[seq_len]``) that restart
    at 0 where a document starts (the token after an EOS) and at the block's first token, and training passes them
    to the model. The token stream (``input_ids``, ``labels``) and the data cursor are the same either way. What
    the model does with them depends on its attention (transformers 5.x): with ``sdpa``, ``eager`` and
    ``flex_attention`` the mask is built from the position ids, so a token attends only to its own document; with
    ``flash_attention_2/3`` only a batch of one row is split into documents (varlen kernels), so training flattens
    each micro-batch into one row for them. Rotary positions restart per document in every case. Architectures
    whose attention mask is not built by transformers' masking utilities (older remote-code models) only get the
    restarted positions and still attend across documents. Default off: the paper packs without it, and an
    explicit mask is slower than the causal kernel under sdpa."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Passed to fsspec (credentials, endpoint)."""
    hub_options: dict[str, Any] = Field(default_factory=dict)
    """Passed to datasets.load_dataset."""

    @field_validator("mixture")
    @classmethod
    def _check_mixture(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        bad = {k: w for k, w in v.items() if not w >= 0}
        if bad:
            raise ValueError(f"mixture weights must be >= 0, got {bad}")
        if not any(w > 0 for w in v.values()):
            raise ValueError(f"mixture {v} keeps no set: give at least one weight > 0")
        return v

    @model_validator(mode="after")
    def _check_split(self) -> DataConfig:
        error = alias_split_error(self.source, self.split)
        if error:  # the alias would silently switch to streaming the hub dataset
            raise ValueError(error)
        return self
