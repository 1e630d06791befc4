"""``ppl`` (Shortened LLaMA): perplexity on the calibration set with one block removed; higher = more important.

Cached: the hidden state entering each block comes from one traced forward, so removing block ``i`` costs blocks
``i+1..L-1`` plus the head — L(L-1)/2 block forwards in all instead of the naive L(L-1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from shortened.blocks import find_blocks, without_blocks
from shortened.criteria.base import BlockScores, ScoringContext, batches
from shortened.criteria.trace import head_logits, token_nll, trace_blocks


@torch.no_grad()
def removal_nll(model: PreTrainedModel, calibration: torch.Tensor, candidates: Sequence[int], batch_size: int,
                progress: bool = False, desc: str = "ppl") -> dict[int, float]:
    """Summed calibration NLL of the model without block ``i``, for each candidate ``i`` (cached method)."""
    blocks = find_blocks(model).blocks
    nll = dict.fromkeys(candidates, 0.0)
    chunks = batches(calibration, batch_size)
    with tqdm(total=len(chunks) * len(candidates), desc=desc, disable=not progress, unit="block") as bar:
        for ids in chunks:
            ids = ids.to(model.device)
            trace = trace_blocks(model, ids)
            for i in candidates:
                hidden = trace.inputs[i]
                for j in range(i + 1, len(blocks)):
                    hidden = trace.calls[j].run(blocks[j], hidden)
                nll[i] += token_nll(head_logits(model, ids, hidden, trace.returns_tuple), ids).item()
                bar.update()
    return nll


@torch.no_grad()
def removal_nll_naive(model: PreTrainedModel, calibration: torch.Tensor, candidates: Sequence[int],
                      batch_size: int, progress: bool = False) -> dict[int, float]:
    """The same numbers by a full forward of the model without block ``i`` (for reference and benchmarks)."""
    nll = dict.fromkeys(candidates, 0.0)
    for i in tqdm(candidates, desc="ppl (naive)", disable=not progress, unit="block"):
        with without_blocks(model, [i]):
            for ids in batches(calibration, batch_size):
                ids = ids.to(model.device)
                nll[i] += token_nll(model(input_ids=ids, use_cache=False).logits, ids).item()
    return nll


def n_predicted_tokens(calibration: torch.Tensor) -> int:
    return calibration.shape[0] * (calibration.shape[1] - 1)


@torch.no_grad()
def perplexity(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int = 1, progress: bool = False,
               desc: str = "ppl") -> float:
    """Perplexity of the model as it is over ``tokens`` windows: exp of the mean next-token NLL over every
    predicted token of every window (no KV cache, fp32 loss)."""
    nll = 0.0
    for ids in tqdm(batches(tokens, batch_size), desc=desc, disable=not progress, unit="batch"):
        ids = ids.to(model.device)
        nll += token_nll(model(input_ids=ids, use_cache=False).logits, ids).item()
    return math.exp(nll / n_predicted_tokens(tokens))


def score_ppl(model: PreTrainedModel, calibration: torch.Tensor, ctx: ScoringContext, *,
              cached: bool = True) -> BlockScores:
    n_blocks = len(find_blocks(model))
    fn = removal_nll if cached else removal_nll_naive
    nll = fn(model, calibration, list(range(n_blocks)), ctx.batch_size, ctx.progress)
    n_tokens = n_predicted_tokens(calibration)
    return BlockScores("ppl", [math.exp(nll[i] / n_tokens) for i in range(n_blocks)],
                       extra={"method": "cached" if cached else "naive"})
