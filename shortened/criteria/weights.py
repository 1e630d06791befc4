"""Weight-based criteria of the paper: ``magnitude`` (Mag+) and ``taylor`` (Taylor+). Embeddings and head excluded."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from shortened.blocks import find_blocks
from shortened.criteria.base import BlockScores, ScoringContext, batches


def _weights(block: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in block.named_parameters() if n.endswith("weight")]


@torch.no_grad()
def score_magnitude(model: PreTrainedModel, calibration: torch.Tensor, ctx: ScoringContext) -> BlockScores:
    """Σ|W| over the block's weight tensors (no data needed)."""
    blocks = find_blocks(model).blocks
    scores = [sum(p.detach().float().abs().sum().item() for _, p in _weights(b)) for b in blocks]
    return BlockScores("magnitude", scores)


def score_taylor(model: PreTrainedModel, calibration: torch.Tensor, ctx: ScoringContext) -> BlockScores:
    """Σ over weight tensors of Σ_elements |Σ_batches W ⊙ ∂L/∂W| — signed sum over batches, then |.|."""
    blocks = find_blocks(model).blocks
    params = [[p for _, p in _weights(b)] for b in blocks]
    flat = [p for ps in params for p in ps]
    salience = [torch.zeros_like(p, dtype=torch.float32) for p in flat]
    was_training = model.training
    model.eval()
    try:
        for ids in tqdm(batches(calibration, ctx.batch_size), desc="taylor", disable=not ctx.progress, unit="batch"):
            ids = ids.to(model.device)
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
            for acc, p, g in zip(salience, flat, grads):
                if g is not None:
                    acc.add_(p.detach().float() * g.float())
    finally:
        model.train(was_training)
    scores, k = [], 0
    for ps in params:
        scores.append(sum(salience[k + j].abs().sum().item() for j in range(len(ps))))
        k += len(ps)
    return BlockScores("taylor", scores)
