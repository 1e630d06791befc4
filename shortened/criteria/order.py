"""``reverse`` (Lu et al. 2024, "Reassessing Layer Pruning in LLMs: New Insights and Methods", arXiv:2411.15558,
ICLR 2026): remove the last removable blocks, the run just before the kept tail. Data-free: the scores are the
block order alone."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel

from shortened.blocks import find_blocks
from shortened.criteria.base import BlockScores, ScoringContext, fits


def score_reverse(model: PreTrainedModel, calibration, ctx: ScoringContext) -> BlockScores:
    """Block ``i`` of ``L`` scores ``L - i``: later blocks are less important (higher = more important, as for every
    criterion). ``calibration`` is not read (None is fine)."""
    n = len(find_blocks(model))
    return BlockScores("reverse", [float(n - i) for i in range(n)])


def select_tail(scores: BlockScores, n: int, allowed: Sequence[int], *, sizes: Sequence[int] | None = None,
                max_params: int | None = None) -> list[int]:
    """The lowest-scored allowed blocks, in score order, up to ``n``, stopping (not passing over) at the first that
    no longer fits the parameter budget: with ``reverse``'s scores, the longest contiguous run of at most ``n``
    blocks that ends at the last allowed block (the one before the ``keep_last`` tail) and fits."""
    chosen: list[int] = []
    for i in sorted(allowed, key=lambda i: (scores.scores[i], -i)):
        if len(chosen) == n or not fits(sizes, max_params, chosen + [i]):
            break
        chosen.append(i)
    return sorted(chosen)
