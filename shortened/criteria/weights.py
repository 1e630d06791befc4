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
    """Taylor+ of Kim et al. 2024, "Shortened LLaMA" (arXiv:2402.02834, §3.1): the first-order estimate of the loss
    change when a block's weights are zeroed, ``I_n = Σ_{W in block n} Σ_ij |W_ij · ∂L(D)/∂W_ij|``.

    ``calibration``: token ids ``(n_samples, seq_len)``, run in batches of ``ctx.batch_size``; ``L(D)`` is the sum over
    batches of each batch's mean next-token cross-entropy (nats), so ``∂L(D)/∂W = Σ_batches g`` and, ``W`` being fixed,
    ``|Σ_batches W ⊙ g| = |W ⊙ Σ_batches g|``: the sign of each element's contribution is summed over batches before
    the absolute value. Weight tensors only (names ending in ``weight``; biases, embeddings and head excluded).
    Returns one score per block, higher = more important.

    Memory: gradients accumulate in the parameters' ``.grad`` by ``backward()`` (one gradient per block weight,
    in the model's dtype — bf16 on GPUs, so the sum over batches is rounded like the gradients themselves; pin the
    scoring dtype to float32 to compare with CPU runs); ``|W ⊙ G|`` is taken once per block in fp32, one tensor at a
    time, and that block's gradients are freed at once. Only block weights require grad meanwhile (embeddings and
    head do not, so no gradient is kept for them). Afterwards every parameter's ``requires_grad``, ``.grad`` and
    the model's train/eval mode are as they were (``.grad`` None for a model that had none).
    """
    blocks = find_blocks(model).blocks
    weights = [[p for _, p in _weights(b)] for b in blocks]
    wanted = {id(p) for ps in weights for p in ps}
    before = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _, _ in before:
            p.grad = None
            p.requires_grad_(id(p) in wanted)
        with torch.enable_grad():
            for ids in tqdm(batches(calibration, ctx.batch_size), desc="taylor", disable=not ctx.progress,
                            unit="batch"):
                ids = ids.to(model.device)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        scores = []
        with torch.no_grad():
            for ps in weights:
                total = 0.0
                for p in ps:
                    if p.grad is not None:  # a weight the loss does not reach has none
                        total += (p.float() * p.grad.float()).abs_().sum().item()
                    p.grad = None
                scores.append(total)
    finally:
        for p, requires_grad, grad in before:
            p.grad = grad
            p.requires_grad_(requires_grad)
        model.train(was_training)
    return BlockScores("taylor", scores)
