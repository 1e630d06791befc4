"""``iterative`` (SLEB-style): remove one block at a time, each time the one whose removal raises calibration NLL
least, re-scoring the shortened model after each removal. Score = the step at which a block was removed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from shortened.blocks import find_blocks, without_blocks
from shortened.criteria.base import BlockScores, ScoringContext, fits
from shortened.criteria.ppl import removal_nll
from shortened.errors import ShortenedError


def score_iterative(model: PreTrainedModel, calibration: torch.Tensor, ctx: ScoringContext) -> BlockScores:
    n_blocks = len(find_blocks(model))
    steps = len(ctx.allowed) if ctx.n_remove is None else ctx.n_remove
    order: list[int] = []
    nll_after: list[float] = []
    for _ in tqdm(range(steps), desc="iterative", disable=not ctx.progress, unit="step"):
        with without_blocks(model, order):
            kept = [i for i in range(n_blocks) if i not in order]
            candidates = [kept.index(i) for i in ctx.allowed
                          if i not in order and fits(ctx.sizes, ctx.max_params, order + [i])]
            if not candidates:  # nothing left fits the parameter budget
                break
            nll = removal_nll(model, calibration, candidates, ctx.batch_size)
        best = min(candidates, key=lambda c: (nll[c], c))
        order.append(kept[best])
        nll_after.append(nll[best])
    # Unremoved blocks rank after every removed one, so "lowest scores" reproduces the removal order.
    scores = [float(order.index(i)) if i in order else float(len(order)) for i in range(n_blocks)]
    return BlockScores("iterative", scores, extra={"removal_order": order, "nll_after_step": nll_after})


def select_iterative(scores: BlockScores, n: int, allowed: Sequence[int], *, sizes: Sequence[int] | None = None,
                     max_params: int | None = None) -> list[int]:
    """The first ``n`` blocks of the removal order; under a parameter budget, the longest prefix of at most ``n``
    that fits (each step was chosen given the ones before it, so later steps cannot stand in for earlier ones)."""
    order = scores.extra.get("removal_order", [])
    if max_params is not None and sizes is not None:
        k = 0
        while k < min(n, len(order)) and fits(sizes, max_params, order[:k + 1]):
            k += 1
        n = k
    if n > len(order):
        raise ShortenedError(f"iterative scores cover {len(order)} removal steps, {n} requested; re-score with "
                             f"--blocks {n} (or more)")
    chosen = order[:n]
    outside = sorted(set(chosen) - set(allowed))
    if outside:
        raise ShortenedError(f"iterative scores remove blocks {outside}, which keep-first/keep-last protect; "
                             "re-score with the same --keep-first/--keep-last")
    return sorted(chosen)
