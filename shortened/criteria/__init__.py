"""Block-importance criteria: one registry, one signature ``score(model, calibration, ctx) -> BlockScores``.

Every score is "higher = more important"; a criterion's ``select`` picks the blocks to remove.
"""

from __future__ import annotations

from shortened.criteria.base import BlockScores, Criterion, ScoringContext, select_lowest
from shortened.criteria.iterative import score_iterative, select_iterative
from shortened.criteria.order import score_reverse, select_tail
from shortened.criteria.ppl import score_ppl
from shortened.criteria.similarity import score_angular, score_block_influence, select_span
from shortened.criteria.task import TaskCriterionConfig, score_task, select_task_span
from shortened.criteria.weights import score_magnitude, score_taylor
from shortened.errors import ShortenedError

CRITERIA: dict[str, Criterion] = {c.name: c for c in [
    Criterion("ppl", score_ppl, description="calibration perplexity without the block (paper's PPL)"),
    Criterion("taylor", score_taylor, description="|Σ W·∂L/∂W| over the block's weights (paper's Taylor+)"),
    Criterion("magnitude", score_magnitude, description="Σ|W| over the block's weights (paper's Mag+)"),
    Criterion("block_influence", score_block_influence, description="1 − cos(input, output) (ShortGPT)"),
    Criterion("angular", score_angular, select_span, "angular distance across a span of blocks (Gromov et al.)"),
    Criterion("iterative", score_iterative, select_iterative, "greedy one-at-a-time removal by NLL (SLEB-style)"),
    Criterion("reverse", score_reverse, select_tail, "the last removable blocks, before the kept tail (Lu et al.)"),
    Criterion("task", score_task, select_task_span, "the span whose removal costs least zero-shot accuracy (Minitron)"),
]}

# Criteria that only look at weights or at the block order need no calibration data.
DATA_FREE = {"magnitude", "reverse"}


def get_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise ShortenedError(f"criterion {name!r} is unknown; choose one of {', '.join(CRITERIA)}") from None


__all__ = ["CRITERIA", "DATA_FREE", "BlockScores", "Criterion", "ScoringContext", "TaskCriterionConfig",
           "get_criterion", "select_lowest"]
