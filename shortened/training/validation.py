"""Held-out validation while a phase retrains: the loss and perplexity of a few fixed windows of the data source's
validation split, every ``val_every_tokens`` tokens (:class:`~shortened.training.config.TrainConfig`). A sweep's
ASHA scheduler (Li et al., 2020, "A System for Massively Parallel Hyperparameter Tuning") stops hopeless trials on
``val_ppl`` at ``tokens``.

The windows are drawn once per worker with :func:`~shortened.data.calibration.calibration_windows` (seed 0, the
same on every rank). Every rank runs the same number of forwards (ZeRO-3 gathers each layer's parameters with a
collective, so all ranks must take part), each on its share of the windows, and the sums of token losses are
all-reduced.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from shortened.data.config import SLIMPAJAMA_SAMPLE, DataConfig
from shortened.errors import ShortenedError

VALIDATION_SPLIT = "validation"


def validation_source_error(data: DataConfig) -> str | None:
    """Why ``data`` has no validation split validation can read (None when it has one): the ``slimpajama-sample``
    alias (its ``validation`` folder, the holdout shards) and ``hf:`` datasets (their ``validation`` split) have
    one; a file, folder or glob of shards has no split to read."""
    if data.source == SLIMPAJAMA_SAMPLE or data.source.startswith("hf:"):
        from shortened.data.config import alias_split_error

        return alias_split_error(data.source, VALIDATION_SPLIT)
    return (f"data.source {data.source!r} has no validation split (validation reads the {VALIDATION_SPLIT!r} split "
            f"of {SLIMPAJAMA_SAMPLE} or of an hf: dataset); set val_every_tokens: null")


def validation_windows(data: DataConfig, tokenizer, n_windows: int) -> torch.Tensor:
    """``n_windows`` windows of ``data.seq_len`` tokens (LongTensor ``[n_windows, seq_len]``) from the validation
    split of ``data``'s source, drawn with seed 0. Raises :class:`ShortenedError` when the source has no
    validation split or too few tokens."""
    from shortened.data.calibration import CalibrationConfig, calibration_windows

    error = validation_source_error(data)
    if error:
        raise ShortenedError(f"validation: {error}")
    cfg = CalibrationConfig(source=data.source, split=VALIDATION_SPLIT, format=data.format, n_samples=n_windows,
                            seq_len=data.seq_len, seed=0)
    return calibration_windows(tokenizer, cfg)


@torch.no_grad()
def validation_metrics(engine: Any, windows: torch.Tensor, rank: int, world_size: int,
                       device: torch.device) -> dict[str, float]:
    """``{"val_loss": mean next-token NLL (nats/token), "val_ppl": exp(val_loss)}`` of ``engine`` (a DeepSpeed
    engine or any module taking ``input_ids``/``labels``) over ``windows`` (``[n, seq_len]``), every rank taking
    windows ``rank, rank + world_size, …`` and all ranks the same number of forwards (a rank with no window left
    runs its last one again, weighted 0). Puts the model in eval mode and back in train mode; must be called on
    every rank (it all-reduces)."""
    n = windows.shape[0]
    per_rank = -(-n // world_size)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token NLL, tokens]
    engine.eval()
    try:
        for i in range(per_rank):
            index = rank + i * world_size
            ids = windows[min(index, n - 1)].unsqueeze(0).to(device)
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
            if index < n:
                tokens = ids.shape[1] - 1  # the model shifts labels by one
                totals[0] += loss.detach().double() * tokens
                totals[1] += tokens
    finally:
        engine.train()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    nll = (totals[0] / totals[1]).item()
    return {"val_loss": nll, "val_ppl": math.exp(min(nll, 700.0))}
