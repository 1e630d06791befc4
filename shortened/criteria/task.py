"""``task`` (Minitron: Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation",
arXiv:2407.14679, §depth pruning): choose which contiguous blocks to drop by the downstream accuracy lost, not by
perplexity. Every contiguous span of allowed blocks is dropped in turn and the zero-shot metric (lm-eval on the
project's local task definitions, as :func:`shortened.evaluation.zeroshot.evaluate_zeroshot`, on the model in
memory) is measured on a fixed sample of the task; the span whose removal costs least is removed.

Cost: one dense evaluation (done once, every drop is measured against it) plus one evaluation per span: spans of
every length 1..n (n: the blocks to remove; shorter ones are what a parameter budget falls back to, and what a
sweep's smaller ratios remove), ``Σ_{l=1..n} (A − l + 1)`` evaluations for ``A`` allowed blocks, each of ``limit``
items. SmolLM2 (24 allowed blocks) at 20% (n = 7): 147 evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from shortened.blocks import find_blocks, without_blocks
from shortened.criteria.base import BlockScores, ScoringContext
from shortened.errors import ShortenedError


class TaskCriterionConfig(BaseModel):
    """The zero-shot sample the ``task`` criterion (Minitron) measures each span's removal on."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    task: str = "piqa"
    """Zero-shot task(s), comma-separated (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge,
    openbookqa); the metric is the paper's for each (acc or acc_norm), averaged over the tasks."""
    limit: int = Field(32, ge=1, le=1_000_000)
    """Items of each task evaluated (the first ones, as lm-eval's limit)."""
    batch_size: int = Field(8, ge=1, le=4096)
    """Sequences per forward of the evaluation."""

    @field_validator("task")
    @classmethod
    def _known(cls, v: str) -> str:
        from shortened.evaluation.zeroshot import parse_tasks

        try:
            return ",".join(parse_tasks(v))
        except ShortenedError as exc:
            raise ValueError(str(exc)) from None


class TaskSample:
    """``cfg``'s tasks loaded into lm-eval once (the project's local task definitions,
    :func:`shortened.evaluation.zeroshot.task_config`, in a task manager without lm-eval's default index, which takes
    most of a call's time); :meth:`metric` evaluates a model on them (in memory, as it is now)."""

    def __init__(self, cfg: TaskCriterionConfig, tokenizer):
        from lm_eval.tasks import TaskManager

        from shortened.evaluation.zeroshot import parse_tasks, task_config

        self.cfg, self.tokenizer, self.names = cfg, tokenizer, parse_tasks(cfg.task)
        self.tasks = TaskManager(include_defaults=False).load([task_config(t) for t in self.names])

    def metric(self, model: PreTrainedModel) -> float:
        """The mean over the tasks of each one's paper metric (acc or acc_norm) on its first ``limit`` items."""
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        from shortened.console import skip_git_probe
        from shortened.evaluation.zeroshot import PREFIX, TASKS
        from shortened.models import eval_mode

        skip_git_probe(load=True)
        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.cfg.batch_size)
        with eval_mode(model):
            out = evaluate(lm=lm, task_dict=self.tasks, limit=self.cfg.limit, bootstrap_iters=0, log_samples=False,
                           verbosity="ERROR")
        return sum(float(out["results"][PREFIX + t][f"{TASKS[t].metric},none"]) for t in self.names) / len(self.names)


def score_task(model: PreTrainedModel, calibration, ctx: ScoringContext) -> BlockScores:
    """``extra["span_drop"][l-1][s]``: the metric of the dense model minus the metric with blocks ``s..s+l-1``
    dropped (accuracy points as a fraction; ``nan`` for spans not wholly in ``ctx.allowed``), for every length ``l``
    up to ``ctx.n_remove``; per-block scores are the span-1 drops (higher = more important; ``nan`` outside
    ``allowed``). Reads ``ctx.tokenizer`` and ``ctx.task`` (a :class:`TaskCriterionConfig`; default: piqa, 32
    items), not ``calibration``. :class:`ShortenedError` without a tokenizer or a span length."""
    cfg = ctx.task or TaskCriterionConfig()
    if ctx.tokenizer is None:
        raise ShortenedError("criterion 'task' needs the model's tokenizer (it runs zero-shot tasks)")
    if not ctx.n_remove:
        raise ShortenedError("criterion 'task' scores spans of the length to remove: give --blocks or --ratio")
    n_blocks = len(find_blocks(model))
    allowed = set(ctx.allowed)
    spans = [(length, s) for length in range(1, ctx.n_remove + 1) for s in range(n_blocks - length + 1)
             if all(s + k in allowed for k in range(length))]
    if not any(length == ctx.n_remove for length, _ in spans):
        raise ShortenedError(f"criterion 'task': no contiguous span of {ctx.n_remove} removable blocks within "
                             f"blocks {sorted(allowed)}")
    sample = TaskSample(cfg, ctx.tokenizer)  # the tasks are built once for every span
    dense = sample.metric(model)  # once: every drop is measured against it
    drop = [[math.nan] * n_blocks for _ in range(n_blocks)]
    for length, s in tqdm(spans, desc="task", disable=not ctx.progress, unit="span"):
        with without_blocks(model, list(range(s, s + length))):
            drop[length - 1][s] = dense - sample.metric(model)
    return BlockScores("task", list(drop[0]), extra={
        "span_drop": drop, "dense_metric": dense, "task": cfg.task, "limit": cfg.limit,
        "max_span": ctx.n_remove, "note": "scored on the zero-shot task sample; calibration windows are not read"})


def select_task_span(scores: BlockScores, n: int, allowed: Sequence[int], *, sizes: Sequence[int] | None = None,
                     max_params: int | None = None) -> list[int]:
    """The contiguous span of ``n`` allowed blocks whose removal lowered the task metric least (ties: the earliest);
    under a parameter budget the longest span (at most ``n``) that fits. Same rule as ``angular``'s
    :func:`~shortened.criteria.similarity.select_span`, over ``extra["span_drop"]``."""
    from shortened.criteria.similarity import select_span

    drop = scores.extra.get("span_drop")
    if drop is None:
        raise ShortenedError("task scores lack 'span_drop'; re-run `shortened score --criterion task`")
    longest = scores.extra.get("max_span", 0)
    if n > longest:
        raise ShortenedError(f"task scores cover spans of at most {longest} blocks, {n} are to be removed; score "
                             f"again with --blocks {n} (or the ratio that removes them)")
    as_distance = BlockScores(scores.criterion, scores.scores, extra={"span_distance": drop})
    return select_span(as_distance, n, allowed, sizes=sizes, max_params=max_params)
