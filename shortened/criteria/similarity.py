"""Representation-similarity criteria: ``block_influence`` (ShortGPT) and ``angular`` (Gromov et al. 2024)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from shortened.criteria.base import BlockScores, ScoringContext, batches, fits
from shortened.criteria.trace import trace_blocks
from shortened.errors import ShortenedError


@torch.no_grad()
def score_block_influence(model: PreTrainedModel, calibration: torch.Tensor, ctx: ScoringContext) -> BlockScores:
    """1 − cos(block input, block output), averaged over every token of the calibration set."""
    total, count = None, 0
    for ids in tqdm(batches(calibration, ctx.batch_size), desc="block_influence", disable=not ctx.progress):
        trace = trace_blocks(model, ids.to(model.device))
        n = len(trace.inputs)
        bi = torch.stack([(1 - F.cosine_similarity(trace.hidden(i).float(), trace.hidden(i + 1).float(), dim=-1)).sum()
                          for i in range(n)])
        total = bi if total is None else total + bi
        count += ids.numel()
    return BlockScores("block_influence", (total / count).tolist())


@torch.no_grad()
def span_distances(model: PreTrainedModel, calibration: torch.Tensor, ctx: ScoringContext) -> list[list[float]]:
    """``d[n-1][l]``: mean angular distance arccos(cos)/π between the last-token state entering block ``l`` and
    the one leaving block ``l+n-1`` (``nan`` where the span runs past the last block)."""
    sums, count = None, 0
    for ids in tqdm(batches(calibration, ctx.batch_size), desc="angular", disable=not ctx.progress):
        trace = trace_blocks(model, ids.to(model.device))
        n_blocks = len(trace.inputs)
        states = [trace.hidden(i)[:, -1].float() for i in range(n_blocks + 1)]
        d = torch.full((n_blocks, n_blocks), math.nan, dtype=torch.float64)
        for span in range(1, n_blocks + 1):
            for start in range(n_blocks - span + 1):
                cos = F.cosine_similarity(states[start], states[start + span], dim=-1).clamp(-1, 1)
                d[span - 1, start] = (torch.arccos(cos) / math.pi).double().sum()
        sums = d if sums is None else sums + d
        count += ids.shape[0]
    return (sums / count).tolist()


def score_angular(model: PreTrainedModel, calibration: torch.Tensor, ctx: ScoringContext) -> BlockScores:
    """Per-block score: the span-1 angular distance; selection uses the best contiguous span (``select_span``)."""
    d = span_distances(model, calibration, ctx)
    return BlockScores("angular", list(d[0]), extra={"span_distance": d})


def select_span(scores: BlockScores, n: int, allowed: Sequence[int], *, sizes: Sequence[int] | None = None,
                max_params: int | None = None) -> list[int]:
    """The contiguous span of ``n`` allowed blocks whose entry and exit states are closest.

    Under a parameter budget: the longest span (at most ``n``) that fits, the closest among those of that length.
    """
    if n == 0:
        return []
    d = scores.extra.get("span_distance")
    if d is None:
        raise ShortenedError("angular scores lack 'span_distance'; re-run `shortened score --criterion angular`")
    allowed_set = set(allowed)
    for length in range(n, 0, -1):
        starts = [s for s in range(len(d) - length + 1) if all(s + k in allowed_set for k in range(length))
                  and fits(sizes, max_params, range(s, s + length))]
        if starts:
            best = min(starts, key=lambda s: (d[length - 1][s], s))
            return list(range(best, best + length))
        if max_params is None:
            break
    raise ShortenedError(f"angular: no contiguous span of {n} removable blocks within blocks {sorted(allowed_set)}")
