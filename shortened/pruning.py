"""Depth pruning end to end: how many blocks a ratio means, which may go, scoring, removal and the saved output."""

from __future__ import annotations

import copy
import math
from fractions import Fraction
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shortened.blocks import block_param_counts, find_blocks, layout_fields, remove_blocks, text_config
from shortened.criteria import DATA_FREE, BlockScores, ScoringContext, get_criterion
from shortened.errors import ShortenedError
from shortened.io import save_model_dir
from shortened.models import count_params
from shortened.structure import check_config_describes, skeleton

if TYPE_CHECKING:
    from shortened.data.calibration import CalibrationConfig

PRUNING_JSON = "pruning.json"
# The paper's "+" rule: the first 4 and the last 2 blocks are never removed (defaults of the CLI, a sweep and the
# functions here).
KEEP_FIRST, KEEP_LAST = 4, 2


def allowed_blocks(n_blocks: int, keep_first: int = KEEP_FIRST, keep_last: int = KEEP_LAST) -> list[int]:
    """Blocks the paper's "+" rule lets go: never the first ``keep_first`` nor the last ``keep_last``."""
    if keep_first < 0 or keep_last < 0:
        raise ShortenedError(f"keep_first/keep_last must be >= 0, got {keep_first}/{keep_last}")
    if keep_first + keep_last >= n_blocks:
        raise ShortenedError(f"keep_first {keep_first} + keep_last {keep_last} protect all {n_blocks} blocks")
    return list(range(keep_first, n_blocks - keep_last))


def check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0 <= ratio < 1) or math.isnan(ratio):
        raise ShortenedError(f"ratio {ratio!r} must be in [0, 1)")


def param_budget(model: PreTrainedModel, ratio: float) -> int:
    """``ratio`` of the model's parameters as a whole number: the most that ``--ratio`` may remove."""
    check_ratio(ratio)
    return math.floor(Fraction(ratio) * count_params(model))  # exact: no float rounding past the ratio


def blocks_for_ratio(model: PreTrainedModel, ratio: float) -> int:
    """The most blocks that fit in ``ratio`` of the parameters: the smallest blocks first, each counted at its
    real size (MoE, hybrid and dense blocks differ), so at most ``ratio`` goes.

    Which blocks go is the criterion's choice under the same budget (:func:`prune`); this count bounds it.
    Paper: 20% of LLaMA-7B (6.74B params, 202M per block) → 6 of 32 blocks.
    """
    budget = param_budget(model, ratio)
    sizes = block_param_counts(model)
    n, used = 0, 0
    for size in sorted(sizes):
        if used + size > budget:
            break
        n, used = n + 1, used + size
    return n


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
    if n > len(allowed):  # only --blocks can ask for more than the allowed blocks
        raise ShortenedError(f"{asked} removes more than the {len(allowed)} blocks that keep_first {keep_first} / "
                             f"keep_last {keep_last} allow (blocks {allowed[0]}..{allowed[-1]})")
    return n


def score_blocks(model: PreTrainedModel, criterion: str, calibration: torch.Tensor | None, *,
                 keep_first: int = KEEP_FIRST, keep_last: int = KEEP_LAST, batch_size: int = 1, n_remove: int | None = None, progress: bool = True,
                 ratio: float | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 task=None) -> BlockScores:
    """Run one criterion. ``calibration`` may be ``None`` only for data-free criteria (``magnitude``).

    ``ratio`` (with ``n_remove``) keeps the ``iterative`` criterion's removal steps within that share of the
    parameters, each block counted at its real size. ``tokenizer`` and ``task`` (a
    :class:`shortened.criteria.TaskCriterionConfig`) are what the ``task`` criterion evaluates with."""
    crit = get_criterion(criterion)
    if calibration is None and criterion not in DATA_FREE:
        raise ShortenedError(f"criterion {criterion!r} needs calibration data")
    allowed = allowed_blocks(len(find_blocks(model)), keep_first, keep_last)
    check_prunable(model, allowed)
    ctx = ScoringContext(allowed=allowed, batch_size=batch_size, n_remove=n_remove, progress=progress,
                         sizes=block_param_counts(model) if ratio is not None else None,
                         max_params=param_budget(model, ratio) if ratio is not None else None,
                         tokenizer=tokenizer, task=task)
    scores = crit.score(model, calibration, ctx)
    scores.extra.setdefault("keep_first", keep_first)
    scores.extra.setdefault("keep_last", keep_last)
    return scores


def score_with_calibration(model: PreTrainedModel, criterion: str, *, tokenizer: PreTrainedTokenizerBase | None,
                           calibration: CalibrationConfig | None, keep_first: int = KEEP_FIRST,
                           keep_last: int = KEEP_LAST, batch_size: int = 1, n_remove: int | None = None,
                           ratio: float | None = None, progress: bool = True, model_name: str | None = None,
                           seq_len_option: str = "calibration.seq_len", task=None) -> BlockScores:
    """Score the blocks with one criterion, drawing its calibration windows first: the one scoring path of
    ``shortened score``/``prune`` and of a sweep's shared scores.

    Criteria that read text (all but the data-free ones, :data:`shortened.criteria.DATA_FREE`) draw
    ``calibration``'s windows with ``tokenizer``, after checking that its ``seq_len`` fits the model's positions
    (the error names ``seq_len_option``: ``--calib-seq-len``, ``calibration.seq_len``); data-free criteria need
    neither. The scores record the calibration set (:func:`shortened.data.calibration.describe`; empty for a
    data-free criterion) and, when given, ``model_name``. Other arguments are :func:`score_blocks`'s."""
    from shortened.data.calibration import calibration_windows, describe
    from shortened.models import check_positions

    get_criterion(criterion)  # an unknown name is named before anything is read
    windows, info = None, {}
    if criterion not in DATA_FREE:
        if calibration is None or tokenizer is None:
            raise ShortenedError(f"criterion {criterion!r} needs calibration data (a tokenizer and a calibration set)")
        check_positions(model, calibration.seq_len, seq_len_option)
        windows = calibration_windows(tokenizer, calibration)
        info = describe(calibration, windows)
    scores = score_blocks(model, criterion, windows, keep_first=keep_first, keep_last=keep_last,
                          batch_size=batch_size, n_remove=n_remove, progress=progress, ratio=ratio,
                          tokenizer=tokenizer, task=task)
    scores.calibration = info
    if model_name is not None:
        scores.model = model_name
    return scores


def check_scores_fit(scores: BlockScores, model: PreTrainedModel, criterion: str) -> None:
    n_blocks = len(find_blocks(model))
    if scores.criterion != criterion:
        raise ShortenedError(f"scores file is for criterion {scores.criterion!r}, not {criterion!r}")
    if len(scores.scores) != n_blocks:
        raise ShortenedError(f"scores file has {len(scores.scores)} block scores; the model has {n_blocks} blocks")


def check_prunable(model: PreTrainedModel, allowed: list[int]) -> None:
    """Refuse, before any scoring, a model whose config cannot describe it once a block is gone.

    Removes the first allowed block from a meta-device skeleton of the model (no weights) and checks that the
    rewritten config rebuilds what is left (:func:`shortened.structure.check_config_describes`).
    """
    if not allowed:
        return
    config = copy.deepcopy(model.config)
    shell = skeleton(type(model), config)
    block_path = find_blocks(shell).path
    remove_blocks(shell, [allowed[0]])
    kept = [i for i in range(len(find_blocks(model))) if i != allowed[0]]
    check_config_describes(shell, shell.config, block_path=block_path, kept=kept,
                           where=f"removing block {allowed[0]}: the rewritten config",
                           suspects=layout_fields(model.config))


def check_attention_kept(model: PreTrainedModel, removed: list[int]) -> None:
    """Refuse a removal that leaves no full-attention block in a hybrid model (``layer_types`` mixing full with
    linear/sliding/recurrent layers): transformers' caches for these architectures need one to generate."""
    types = getattr(text_config(model.config), "layer_types", None)
    if not isinstance(types, (list, tuple)) or "full_attention" not in types or len(set(types)) < 2:
        return
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if set(full) <= set(removed):
        raise ShortenedError(f"removing blocks {removed} removes every full-attention block ({full}; layer_types "
                             f"{sorted(set(types))}); the pruned model could not generate with a KV cache. Protect "
                             "one with --keep-first/--keep-last or remove fewer blocks")


def select_removed(model: PreTrainedModel, scores: BlockScores, n_remove: int, *, keep_first: int = KEEP_FIRST,
                   keep_last: int = KEEP_LAST, ratio_requested: float | None = None) -> list[int]:
    """The blocks (original indices) :func:`prune` would remove, without removing them."""
    check_scores_fit(scores, model, scores.criterion)
    allowed = allowed_blocks(len(find_blocks(model)), keep_first, keep_last)
    if n_remove > len(allowed):
        raise ShortenedError(f"cannot remove {n_remove} blocks: keep_first {keep_first} / keep_last {keep_last} "
                             f"leave {len(allowed)} removable")
    budget = param_budget(model, ratio_requested) if ratio_requested is not None else None
    return get_criterion(scores.criterion).select(scores, n_remove, allowed, sizes=block_param_counts(model),
                                                  max_params=budget)


@dataclass
class PruneResult:
    model: PreTrainedModel
    report: dict  # what pruning.json holds
    path: Path | None = None  # where it was saved (:func:`prune_and_save`)


def prune(model: PreTrainedModel, scores: BlockScores, n_remove: int, *, keep_first: int = KEEP_FIRST,
          keep_last: int = KEEP_LAST, ratio_requested: float | None = None, model_name: str = "",
          patch: str = "none", calibration: torch.Tensor | None = None, patch_ridge: float = 0.0,
          patch_fit: str = "relative", patch_calibration: dict | None = None, batch_size: int = 1) -> PruneResult:
    """Remove the blocks the criterion selects (in place) and describe what was done.

    With ``ratio_requested`` the criterion chooses under a parameter budget (``ratio_requested`` of the model's
    parameters, each block at its real size) and at most ``n_remove`` blocks; without it, exactly ``n_remove``.
    The model's config is rewritten to describe the kept blocks and checked against a meta-device rebuild;
    :class:`ShortenedError` if no config of the architecture can express them (the model is then left pruned
    in memory but must not be saved).

    ``patch="linear"``: the training-free seam patch (:mod:`shortened.seam_patch`), fitted on the dense model's
    activations on ``calibration`` (token ids ``(n_samples, seq_len)``, forwarded ``batch_size`` at a time; relative
    ridge ``patch_ridge``; token weighting ``patch_fit``, ``relative`` or ``lstsq``; ``patch_calibration``, what
    the report records of that set) before the blocks are removed, then fused into the kept block before each removed run;
    the report records it under ``patch``. :class:`ShortenedError` for an unknown ``patch``, missing calibration,
    or an architecture the patch cannot be fused into exactly (raised before the model is changed).
    """
    from shortened.seam_patch import check_patch, fit_seams, fuse, patch_report

    check_patch(patch)
    found = None
    if patch == "linear":
        if calibration is None:
            raise ShortenedError("patch 'linear' needs calibration windows (the dense model's activations)")
        found = fit_seams(model, select_removed(model, scores, n_remove, keep_first=keep_first, keep_last=keep_last,
                                                ratio_requested=ratio_requested),
                          calibration, ridge=patch_ridge, batch_size=batch_size, fit=patch_fit)
    block_list = find_blocks(model)
    n_blocks = len(block_list)
    check_scores_fit(scores, model, scores.criterion)
    allowed = allowed_blocks(n_blocks, keep_first, keep_last)
    if n_remove > len(allowed):
        raise ShortenedError(f"cannot remove {n_remove} blocks: keep_first {keep_first} / keep_last {keep_last} "
                             f"leave {len(allowed)} removable")
    sizes = block_param_counts(model)
    budget = param_budget(model, ratio_requested) if ratio_requested is not None else None
    removed = get_criterion(scores.criterion).select(scores, n_remove, allowed, sizes=sizes, max_params=budget)
    if found is not None and sorted(i for s in found for i in s.removed) != sorted(removed):
        raise ShortenedError(f"the criterion selected blocks {removed}, not the ones the seam patch was fitted for")
    check_attention_kept(model, removed)
    params_before = count_params(model)
    suspects = layout_fields(model.config)
    remove_blocks(model, removed)
    kept = [i for i in range(n_blocks) if i not in removed]
    check_config_describes(model, model.config, block_path=block_list.path, kept=kept, suspects=suspects)
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
        "param_budget": budget,
        "block_params": sizes,
        "ratio_actual": (params_before - params_after) / params_before,  # one rounding: never above the ratio
        "keep_first": keep_first,
        "keep_last": keep_last,
        "calibration": scores.calibration,
        # what the scores were computed in (near-tied blocks can rank differently in bf16 and fp32)
        "scoring": {"dtype": scores.dtype, "device": scores.device, "attn_implementation": scores.attn_implementation,
                    "torch_version": scores.torch_version},
    }
    if found is not None:
        for seam in found:
            fuse(seam)
        report["patch"] = patch_report(found, patch_ridge, patch_fit, patch_calibration)
    return PruneResult(model, report)


def save_pruned(result: PruneResult, out: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, *,
                overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write model, tokenizer and ``pruning.json`` to a staging folder, then move it into place in one step.

    ``dtype``: the dtype the weights are written in (None: as the model holds them; callers pass
    :func:`shortened.io.resolve_save_dtype`, by default the source model's, so a bf16 model pruned in fp32 on a
    CPU is saved in bf16). The model in memory — the one that was scored — is not changed. The dtype written is
    recorded in ``pruning.json`` (and ``result.report``) as ``saved_dtype``.

    Before the move, the saved ``config.json`` is read back and rebuilt on the meta device; any difference from
    the pruned model (module classes, parameter names/shapes, construction-time values) raises
    :class:`ShortenedError` naming the first differing block, and nothing is left at ``out``.
    """
    model = result.model
    result.report["saved_dtype"] = str(dtype or model.dtype).removeprefix("torch.")

    def verify(staging: Path) -> None:
        from transformers import AutoConfig

        saved = AutoConfig.from_pretrained(staging)
        check_config_describes(model, saved, block_path=find_blocks(model).path,
                               kept=result.report.get("kept_blocks"), where="the saved config.json",
                               suspects=layout_fields(saved))

    return save_model_dir(out, model, tokenizer, report_name=PRUNING_JSON, report=result.report,
                          overwrite=overwrite, verify=verify, dtype=dtype)


def prune_and_save(model: PreTrainedModel, scores: BlockScores, n_remove: int, out: str | Path,
                   tokenizer: PreTrainedTokenizerBase | None = None, *, keep_first: int = KEEP_FIRST,
                   keep_last: int = KEEP_LAST, ratio_requested: float | None = None, model_name: str = "",
                   overwrite: bool = False, save_dtype: str = "auto", source=None,
                   gguf_file: str | None = None, patch: str = "none", calibration: torch.Tensor | None = None,
                   patch_ridge: float = 0.0, patch_fit: str = "relative", patch_calibration: dict | None = None,
                   batch_size: int = 1) -> PruneResult:
    """:func:`prune` the model (in place) and :func:`save_pruned` it to ``out``, weights in
    :func:`shortened.io.resolve_save_dtype` of ``save_dtype`` (``auto``: the dtype of ``source``/``gguf_file``, the
    model that was loaded); the one pruning path of ``shortened prune`` and a sweep's prune stage. Returns the
    :class:`PruneResult`, its ``path`` the published folder.

    ``patch``, ``calibration``, ``patch_ridge``, ``patch_fit``, ``patch_calibration``, ``batch_size``: the seam
    patch, as in :func:`prune`."""
    from shortened.io import resolve_save_dtype

    result = prune(model, scores, n_remove, keep_first=keep_first, keep_last=keep_last,
                   ratio_requested=ratio_requested, model_name=model_name, patch=patch, calibration=calibration,
                   patch_ridge=patch_ridge, patch_fit=patch_fit, patch_calibration=patch_calibration,
                   batch_size=batch_size)
    result.path = save_pruned(result, out, tokenizer, overwrite=overwrite,
                              dtype=resolve_save_dtype(save_dtype, source, gguf_file))
    return result
