"""What every block-importance criterion shares: its signature, its result and how blocks are selected."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel

from shortened.device import dtype_name
from shortened.errors import ShortenedError
from shortened.io import write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class ScoringContext:
    """Options every criterion receives. ``allowed`` are the blocks that may be removed (the "+" rule)."""

    allowed: list[int]
    batch_size: int = 1
    n_remove: int | None = None  # only the iterative criterion needs it: how many removal steps to run
    sizes: list[int] | None = None  # parameters per block, with max_params: iterative steps stay in the budget
    max_params: int | None = None
    progress: bool = True
    tokenizer: object | None = None  # the task criterion runs zero-shot tasks with it
    task: object | None = None  # the task criterion's sample (criteria.task.TaskCriterionConfig; None: its default)


@dataclass
class BlockScores:
    """One score per original block; **higher means more important** for every criterion.

    ``extra`` holds what a criterion needs beyond per-block scores to select blocks (``removal_order`` for
    ``iterative``, ``span_distance`` for ``angular``). ``dtype``, ``device``, ``attn_implementation`` and
    ``torch_version`` say how the scores were computed (``"bfloat16"``, ``"cuda:0"``, ``"sdpa"``, ``"2.13.0"``):
    near-tied blocks can rank differently in bf16 and fp32. They are None in files written before they were
    recorded, and for scores that were not computed by :meth:`Criterion.score`.
    """

    criterion: str
    scores: list[float]
    extra: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    model: str = ""
    dtype: str | None = None
    device: str | None = None
    attn_implementation: str | None = None
    torch_version: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["scores"] = [None if (s is None or math.isnan(s)) else float(s) for s in self.scores]
        return d

    @classmethod
    def from_json(cls, data: dict) -> BlockScores:
        data = dict(data)
        data["scores"] = [math.nan if s is None else float(s) for s in data["scores"]]
        return cls(**{k: data[k] for k in ("criterion", "scores", "extra", "calibration", "model", "dtype",
                                           "device", "attn_implementation", "torch_version") if k in data})

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> BlockScores:
        try:
            from shortened import storage

            data = json.loads(storage.path(path).read_text())  # a local file, or one in an object store
            return cls.from_json(data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ShortenedError(f"scores file {str(path)!r} is not a readable scores JSON: {exc}") from exc

    def record_environment(self, model: torch.nn.Module) -> BlockScores:
        """Note the model's dtype, device and attention implementation and the torch version; returns self."""
        param = next(model.parameters(), None)
        if param is not None:
            self.dtype = dtype_name(param.dtype)
            self.device = str(param.device)
        self.attn_implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
        self.torch_version = torch.__version__
        return self

    def dtype_mismatch(self, dtype: torch.dtype | str, where: str = "scores") -> str | None:
        """A warning, logged and returned, when these scores were computed in another dtype than ``dtype`` (the one
        in use now); None when they agree or the scores do not say (older files). ``where`` names the file."""
        now = dtype if isinstance(dtype, str) else dtype_name(dtype)
        if self.dtype is None or self.dtype == now:
            return None
        message = (f"{where}: the {self.criterion} scores were computed in {self.dtype}"
                   f"{f' on {self.device}' if self.device else ''}, but {now} is in use now; near-tied blocks can "
                   f"rank differently between the two (score again in {now}, or pin the scoring dtype)")
        log.warning(message)
        return message


class ScoreFn(Protocol):
    def __call__(self, model: PreTrainedModel, calibration: torch.Tensor, ctx: ScoringContext) -> BlockScores: ...


SelectFn = Callable[..., list[int]]
"""``select(scores, n, allowed, *, sizes=None, max_params=None) -> removed``: at most ``n`` blocks from
``allowed``; with ``max_params``, their summed ``sizes`` (parameters per original block) stay within it."""


def fits(sizes: Sequence[int] | None, max_params: int | None, blocks: Sequence[int]) -> bool:
    """Whether removing ``blocks`` stays within the parameter budget (always, without one)."""
    return max_params is None or sizes is None or sum(sizes[i] for i in blocks) <= max_params


def select_lowest(scores: BlockScores, n: int, allowed: Sequence[int], *, sizes: Sequence[int] | None = None,
                  max_params: int | None = None) -> list[int]:
    """Up to ``n`` allowed blocks, lowest scores first (ties broken by index); under a parameter budget a block
    that does not fit what is left of it is passed over for the next one that does."""
    ranked = sorted(allowed, key=lambda i: (scores.scores[i], i))
    chosen: list[int] = []
    for i in ranked:
        if len(chosen) == n:
            break
        if fits(sizes, max_params, chosen + [i]):
            chosen.append(i)
    return sorted(chosen)


@dataclass(frozen=True)
class Criterion:
    """A criterion: ``compute`` scores the blocks, ``select`` picks the ones to remove."""

    name: str
    compute: ScoreFn
    select: SelectFn = select_lowest
    description: str = ""

    def score(self, model: PreTrainedModel, calibration: torch.Tensor | None, ctx: ScoringContext) -> BlockScores:
        """``compute``'s scores, with the dtype, device, attention implementation and torch version they were
        computed in (:meth:`BlockScores.record_environment`)."""
        return self.compute(model, calibration, ctx).record_environment(model)


def batches(calibration: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if batch_size < 1:
        raise ShortenedError(f"batch_size must be >= 1, got {batch_size}")
    return list(calibration.split(batch_size))
