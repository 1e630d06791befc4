"""Depth pruning end to end: how many blocks a ratio means, which may go, scoring, removal and the saved output."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shortened.blocks import block_param_counts, find_blocks, remove_blocks
from shortened.criteria import DATA_FREE, BlockScores, ScoringContext, get_criterion
from shortened.errors import ShortenedError
from shortened.io import save_model_dir
from shortened.models import count_params

PRUNING_JSON = "pruning.json"


def allowed_blocks(n_blocks: int, keep_first: int = 4, keep_last: int = 2) -> list[int]:
    """Blocks the paper's "+" rule lets go: never the first ``keep_first`` nor the last ``keep_last``."""
    if keep_first < 0 or keep_last < 0:
        raise ShortenedError(f"keep_first/keep_last must be >= 0, got {keep_first}/{keep_last}")
    if keep_first + keep_last >= n_blocks:
        raise ShortenedError(f"keep_first {keep_first} + keep_last {keep_last} protect all {n_blocks} blocks")
    return list(range(keep_first, n_blocks - keep_last))


def check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0 <= ratio < 1) or math.isnan(ratio):
        raise ShortenedError(f"ratio {ratio!r} must be in [0, 1)")


def blocks_for_ratio(model: PreTrainedModel, ratio: float) -> int:
    """Blocks to remove so that at most ``ratio`` of the parameters go, rounded down to whole blocks.

    Paper: 20% of LLaMA-7B (6.74B params, 202M per block) → 6 of 32 blocks.
    """
    check_ratio(ratio)
    per_block = block_param_counts(model)
    mean_block = sum(per_block) / len(per_block)
    return int(math.floor(ratio * count_params(model) / mean_block + 1e-9))


def resolve_block_count(model: PreTrainedModel, *, ratio: float | None, blocks: int | None,
                        keep_first: int, keep_last: int) -> int:
    """Blocks to remove from ``--ratio`` or ``--blocks`` (exactly one), checked against the keep rule."""
    if (ratio is None) == (blocks is None):
        raise ShortenedError("give exactly one of ratio (--ratio) or block count (--blocks)")
    n_blocks = len(find_blocks(model))
    allowed = allowed_blocks(n_blocks, keep_first, keep_last)
    if blocks is not None:
        if blocks < 0:
            raise ShortenedError(f"blocks {blocks} must be >= 0")
        n = blocks
        asked = f"blocks {blocks}"
    else:
        n = blocks_for_ratio(model, ratio)
        asked = f"ratio {ratio} ({n} of {n_blocks} blocks)"
    if n > len(allowed):
        raise ShortenedError(f"{asked} removes more than the {len(allowed)} blocks that keep_first {keep_first} / "
                             f"keep_last {keep_last} allow (blocks {allowed[0]}..{allowed[-1]})")
    return n


def score_blocks(model: PreTrainedModel, criterion: str, calibration: torch.Tensor | None, *, keep_first: int = 4,
                 keep_last: int = 2, batch_size: int = 1, n_remove: int | None = None, progress: bool = True,
                 ) -> BlockScores:
    """Run one criterion. ``calibration`` may be ``None`` only for data-free criteria (``magnitude``)."""
    crit = get_criterion(criterion)
    if calibration is None and criterion not in DATA_FREE:
        raise ShortenedError(f"criterion {criterion!r} needs calibration data")
    allowed = allowed_blocks(len(find_blocks(model)), keep_first, keep_last)
    ctx = ScoringContext(allowed=allowed, batch_size=batch_size, n_remove=n_remove, progress=progress)
    scores = crit.score(model, calibration, ctx)
    scores.extra.setdefault("keep_first", keep_first)
    scores.extra.setdefault("keep_last", keep_last)
    return scores


def check_scores_fit(scores: BlockScores, model: PreTrainedModel, criterion: str) -> None:
    n_blocks = len(find_blocks(model))
    if scores.criterion != criterion:
        raise ShortenedError(f"scores file is for criterion {scores.criterion!r}, not {criterion!r}")
    if len(scores.scores) != n_blocks:
        raise ShortenedError(f"scores file has {len(scores.scores)} block scores; the model has {n_blocks} blocks")


@dataclass
class PruneResult:
    model: PreTrainedModel
    report: dict


def prune(model: PreTrainedModel, scores: BlockScores, n_remove: int, *, keep_first: int = 4, keep_last: int = 2,
          ratio_requested: float | None = None, model_name: str = "") -> PruneResult:
    """Remove the ``n_remove`` blocks the criterion selects (in place) and describe what was done."""
    n_blocks = len(find_blocks(model))
    check_scores_fit(scores, model, scores.criterion)
    allowed = allowed_blocks(n_blocks, keep_first, keep_last)
    if n_remove > len(allowed):
        raise ShortenedError(f"cannot remove {n_remove} blocks: keep_first {keep_first} / keep_last {keep_last} "
                             f"leave {len(allowed)} removable")
    removed = get_criterion(scores.criterion).select(scores, n_remove, allowed)
    params_before = count_params(model)
    remove_blocks(model, removed)
    params_after = count_params(model)
    report = {
        "model": model_name or scores.model,
        "criterion": scores.criterion,
        "scores": BlockScores.to_json(scores)["scores"],
        "removed_blocks": removed,
        "kept_blocks": [i for i in range(n_blocks) if i not in removed],
        "num_blocks_before": n_blocks,
        "num_blocks_after": n_blocks - len(removed),
        "params_before": params_before,
        "params_after": params_after,
        "ratio_requested": ratio_requested,
        "blocks_requested": n_remove,
        "ratio_actual": 1 - params_after / params_before,
        "keep_first": keep_first,
        "keep_last": keep_last,
        "calibration": scores.calibration,
    }
    return PruneResult(model, report)


def save_pruned(result: PruneResult, out: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, *,
                overwrite: bool = False) -> Path:
    """Write model, tokenizer and ``pruning.json`` to a staging folder, then move it into place in one step."""
    return save_model_dir(out, result.model, tokenizer, report_name=PRUNING_JSON, report=result.report,
                          overwrite=overwrite)
