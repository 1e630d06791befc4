"""The ``shortened`` command line: one verb per job (``score``, ``prune``, ``prune-width``, ``retrain``, ``eval``,
``data``, ``sweep``, ``results``, ``select``, ``report``).

Each verb's flags are the fields of its models (:mod:`shortened.cli_parser` builds them with jsonargparse): the
config models where the verb has one (retrain: TrainConfig and ScaleConfig, eval: EvalConfig, data: DataConfig,
select: Selection, the calibration set of score, prune and prune-width: CalibrationConfig), and for the rest the
option models below. So ``--lora.zero_stage`` is ``lora: {zero_stage: …}`` in YAML and ``cfg.lora.zero_stage`` in
Python, and ``--help`` shows each field's docstring, default and whether it is required.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shortened import console, io, storage
from shortened.cli_parser import Parser, Part, Verb, explain
from shortened.cluster import ScaleConfig
from shortened.criteria.task import TaskCriterionConfig
from shortened.data.calibration import CalibrationConfig
from shortened.data.config import DataConfig
from shortened.errors import Interrupted, ShortenedError
from shortened.evaluation import EvalConfig
from shortened.pruning import KEEP_FIRST, KEEP_LAST
from shortened.sweep.config import Selection, SweepConfig, TrackingConfig
from shortened.training.config import TrainConfig

log = logging.getLogger("shortened")

Count = Annotated[int, Field(ge=1)]  # a count of things
NonNegative = Annotated[int, Field(ge=0)]
SaveDtype = Literal[io.SAVE_DTYPES]


# -- the options of verbs that no config model holds ------------------------------------------------------------------

class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ModelOptions(_Options):
    """The model, and how it is loaded"""

    model: str
    """Hub id, local HF folder, .gguf file, folder with one .gguf, or smollm2."""
    gguf_file: str | None = None
    """GGUF file name inside the --model folder."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda, cuda:1, ..."""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 on CUDA in bf16/fp16 when flash-attn is installed, else sdpa; eager for models
    without sdpa), sdpa, eager, flash_attention_2, ..."""
    tokenizer: str | None = None
    """Where the tokenizer is when the --model folder has none (trainer outputs often lack one): a folder, hub id or
    .gguf. Criteria that read calibration text (all but magnitude), activation width scores and evaluation need
    one."""


class JsonOutput(_Options):
    """Output"""

    out: str
    """The JSON file to write (scores for score, results for eval): a path, or s3://bucket/key.json, gs://…"""
    overwrite: bool = False
    """Replace an existing file."""


class FolderOutput(_Options):
    """Output"""

    out: str
    """The output folder for the HF checkpoint (must not exist or be empty): a path, or s3://bucket/prefix, gs://…
    (a prefix inside the bucket, published with a .complete marker)."""
    overwrite: bool = False
    """Replace a non-empty output folder."""
    save_dtype: SaveDtype = "auto"
    """dtype of the saved weights: auto (the source model's: its config.json dtype; a GGUF file: the dtype its
    weights are stored in, float32 when quantized), float32, bfloat16, float16."""


def _ratio_in_range(cls, v):
    """``--ratio`` in [0, 1) (1 would remove everything), named as typed."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not (math.isfinite(v) and 0 <= v < 1):
        raise ValueError(f"ratio {v} must be in [0, 1) (a number, the fraction of parameters removed)")
    return v


class ScoringOptions(ModelOptions):
    """The model and how its blocks are scored"""

    criterion: str
    """The block-importance criterion: ppl, taylor, magnitude, block_influence, angular, iterative, reverse or task
    (shortened.criteria.CRITERIA)."""
    ratio: float | None = None
    """Fraction of the parameters to remove, in [0, 1), rounded down to whole blocks."""
    blocks: NonNegative | None = None
    """Number of blocks to remove (score: only the iterative criterion uses --ratio or --blocks, as its number of
    removal steps)."""
    keep_first: NonNegative = KEEP_FIRST
    """Never remove the first N blocks (the paper's "+" rule)."""
    keep_last: NonNegative = KEEP_LAST
    """Never remove the last N blocks."""
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    """The calibration set of criteria that read text."""
    task_criterion: TaskCriterionConfig = Field(default_factory=TaskCriterionConfig)
    """The zero-shot sample of the task criterion (Minitron)."""
    batch_size: Count = 1
    """Calibration samples per forward."""
    quiet: bool = False
    """No progress bars."""

    _ratio = field_validator("ratio", mode="before")(_ratio_in_range)

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str) -> str:
        from shortened.criteria import get_criterion

        get_criterion(v)
        return v

    @model_validator(mode="after")
    def _one_amount(self) -> ScoringOptions:
        if self.ratio is not None and self.blocks is not None:
            raise ValueError("give --ratio or --blocks, not both")
        return self


class ScoreOptions(JsonOutput, ScoringOptions):
    """What to score, and where the scores go"""


class PruneOptions(FolderOutput, ScoringOptions):
    """What to prune, and where the pruned model goes"""

    scores: str | None = None
    """Reuse a scores JSON from `shortened score` (skips scoring)."""
    patch: Literal["none", "linear"] = "none"
    """linear: the training-free seam patch (ReplaceMe): a least-squares map, fitted on the calibration set, fused
    into the MLP down projection of the kept block before each removed run (shortened.seam_patch)."""
    patch_ridge: float = Field(0.0, ge=0, allow_inf_nan=False)
    """Ridge term of the seam patch's fit, relative to the mean diagonal of MᵀM (0: plain least squares)."""
    patch_fit: Literal["relative", "lstsq"] = "relative"
    """Token weighting of the seam patch's fit: relative (each token's error relative to its target's norm, so the
    few massive-activation tokens do not dominate; ReplaceMe's cosine objective in closed form) or lstsq (plain
    least squares)."""
    patch_samples: int | None = Field(None, ge=1, le=1_000_000)
    """Calibration windows (of calibration.seq_len tokens, from calibration.source) the seam patch is fitted on;
    None: enough for 16 tokens per hidden dimension, at least calibration.n_samples."""

    @model_validator(mode="after")
    def _amount_given(self) -> PruneOptions:
        if self.ratio is None and self.blocks is None:
            raise ValueError("give --ratio or --blocks: how much to remove")
        return self


class WidthBudget(ModelOptions):
    """The model and its width-pruning budget (one of ratio, params, like)"""

    ratio: float | None = None
    """Fraction of the parameters to remove, in [0, 1)."""
    params: Count | None = None
    """Parameter count to end at (or just under)."""
    like: str | None = None
    """A depth-pruned folder: match its parameter count (its pruning.json)."""
    score: Literal["activation", "magnitude"] = "activation"
    """activation: Wanda-style |input| x weight norm on calibration text; magnitude: weight norms, data-free."""
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    """The calibration set of activation scores."""

    _ratio = field_validator("ratio", mode="before")(_ratio_in_range)

    @model_validator(mode="after")
    def _one_budget(self) -> WidthBudget:
        given = [flag for flag, v in (("--ratio", self.ratio), ("--params", self.params), ("--like", self.like))
                 if v is not None]
        if len(given) != 1:
            raise ValueError("give one of --ratio, --params or --like" + (f", not {' and '.join(given)}" if given
                                                                          else ""))
        return self


class PruneWidthOptions(FolderOutput, WidthBudget):
    """What to prune, and where the pruned model goes"""


class RetrainOptions(_Options):
    """The run"""

    model: str
    """The (pruned) HF model folder."""
    out: str
    """Folder for the retrained HF checkpoint: a path, or s3://bucket/prefix, gs://…"""
    config: str | None = None
    """YAML file of TrainConfig fields (e.g. jobs/configs/retrain-cpt.yaml); the flags override its values."""
    name: str | None = None
    """Run name (default: the output folder's name); the same name resumes."""
    storage_path: str = str(Path.home() / "ray_results")
    """Ray Train storage: checkpoints and run records (on a multi-node cluster a shared path, or
    s3://bucket/prefix, gs://…)."""
    address: str | None = None
    """Ray cluster address (default: RAY_ADDRESS, else a local Ray)."""
    max_failures: NonNegative = 0
    """Restart failed workers from the last checkpoint, up to this many times."""
    overwrite: bool = False
    """Replace a non-empty output folder."""


class EvalOptions(JsonOutput, ModelOptions):
    """The model and its output"""

    baseline: str | None = None
    """A second model for --speed, run alternately; rows get speedups over it."""
    quiet: bool = False
    """No progress bars."""


class DataOptions(_Options):
    """Checking"""

    world_size: Count = 1
    """Show how this many ranks would share the data."""
    tokenizer: str | None = None
    """A model whose tokenizer counts the tokens (slower: tokenizes everything)."""
    gguf_file: str | None = None
    """GGUF file name inside the --tokenizer folder."""


class SweepOptions(_Options):
    """The sweep"""

    config: str
    """The sweep YAML (SweepConfig; see jobs/configs/demo.yaml)."""
    resume: bool = False
    """Continue an interrupted sweep; finished trials are kept."""
    name: str | None = None
    """Override the config's name."""
    storage_path: str | None = None
    """Override the config's storage_path (on a multi-node cluster a shared path, or s3://bucket/prefix, gs://…)."""
    store_url: str | None = None
    """Override the config's store_url (e.g. postgresql://user@host/db)."""
    address: str | None = None
    """Ray cluster address (default: RAY_ADDRESS, else a local Ray)."""


class ExperimentOptions(_Options):
    """The experiment"""

    experiment: str
    """Experiment folder (STORAGE/NAME), or a name with --store_url or --storage_path."""
    store_url: str | None = None
    """Results store URL (default: the experiment folder's SQLite file)."""
    storage_path: str = "runs"
    """Where experiment folders live."""


class ResultsOptions(ExperimentOptions):
    format: Literal["table", "json", "csv"] = "table"
    """table (Markdown), json (every field) or csv (one row per metric)."""


class ReportOptions(ExperimentOptions):
    out: str | None = None
    """Folder for the report and plots (default: EXPERIMENT/report)."""
    format: Literal["md", "html"] = "md"
    """Markdown or HTML."""


# -- the commands -----------------------------------------------------------------------------------------------------

def _model_options(args: argparse.Namespace) -> dict:
    """load_model's device, dtype and attention options (ModelOptions)."""
    return {"device": args.device, "dtype": args.dtype, "attn_implementation": args.attn_implementation}


def _check_common(args: argparse.Namespace) -> None:
    """Checks that need no model, so bad input fails in a second and writes nothing (each flag's own range, the
    criterion and the amount were checked when the flags were read)."""
    from shortened.criteria import DATA_FREE

    if args.criterion not in DATA_FREE and not getattr(args, "scores", None):  # --scores: nothing is scored
        _calibration_config(args)


def _source(args: argparse.Namespace):
    """``--model`` (and ``--gguf-file``) resolved once, before any work: a missing local path is named here."""
    from shortened.models import resolve_source

    if getattr(args, "source", None) is None:
        args.source = resolve_source(args.model, args.gguf_file, what="--model")
    return args.source


def _tokenizer(args: argparse.Namespace, needed_for: str | None):
    """The tokenizer from ``--tokenizer``, else the ``--model`` folder's. A model without one (common for trainer
    outputs) is fine when nothing needs text (``needed_for`` None: a warning, and the output has no tokenizer);
    otherwise the error says what needs it and points at ``--tokenizer``."""
    from shortened.models import load_tokenizer

    from shortened.models import resolve_source

    if getattr(args, "tokenizer", None):
        return load_tokenizer(resolve_source(args.tokenizer, what="--tokenizer"))
    source = _source(args)
    try:
        return load_tokenizer(source)
    except ShortenedError as exc:
        if needed_for is None:
            log.warning("model %s has no usable tokenizer (%s); continuing without one: the output will have no "
                        "tokenizer files (add them, or pass --tokenizer PATH)", args.model, exc)
            return None
        raise ShortenedError(f"{needed_for} needs the model's tokenizer, and none could be loaded from "
                             f"{args.model!r}; pass --tokenizer PATH (a folder, hub id or .gguf holding the "
                             f"tokenizer this model was trained with) ({exc})") from exc


def _recorded_model(spec: str) -> str:
    """What records name: a local model as an absolute path (a distillation teacher is read back from
    ``pruning.json`` by workers that run elsewhere), a hub id or alias as given."""
    from pathlib import Path

    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _calibration_config(args: argparse.Namespace) -> CalibrationConfig:
    """``--calibration.*``, with a local corpus that is missing or empty refused before the model loads."""
    cfg = args.calibration
    _check_local_source(cfg.source, cfg.split, args.typed.flag("calibration.source"))
    return cfg


def _check_local_source(source: str, split: str, flag: str) -> None:
    """A local corpus that is missing or empty fails here, before the model loads (remote and hub sources are
    listed when read)."""
    from shortened.data.sources import is_hub, resolve_alias, resolve_shards

    resolved = resolve_alias(source, split)
    if is_hub(resolved) or "://" in resolved:
        return
    try:
        resolve_shards(resolved)
    except ShortenedError as exc:
        raise ShortenedError(f"{flag}: {exc}") from exc


def _scores_for(args: argparse.Namespace, model, n_remove: int | None, tokenizer=None):
    """:func:`shortened.pruning.score_with_calibration` with the scoring flags (calibration windows from
    ``tokenizer`` unless the criterion is data-free)."""
    from shortened.criteria import DATA_FREE
    from shortened.pruning import score_with_calibration

    cfg = None
    if args.criterion not in DATA_FREE:
        cfg = _calibration_config(args)
        if tokenizer is None:
            tokenizer = _tokenizer(args, f"criterion {args.criterion!r} (calibration text)")
    return score_with_calibration(model, args.criterion, tokenizer=tokenizer, calibration=cfg,
                                  keep_first=args.keep_first, keep_last=args.keep_last, batch_size=args.batch_size,
                                  n_remove=n_remove, ratio=getattr(args, "ratio", None), progress=not args.quiet,
                                  model_name=_recorded_model(args.model),
                                  seq_len_option=args.typed.flag("calibration.seq_len"), task=args.task_criterion)


def cmd_score(args: argparse.Namespace) -> int:
    """Score every block with one criterion and save the scores as JSON."""
    from shortened.criteria import DATA_FREE
    from shortened.io import check_output
    from shortened.models import load_model
    from shortened.pruning import resolve_block_count

    _check_common(args)
    out = check_output(args.out, kind="file", overwrite=args.overwrite, flag="--out", create=False)
    _source(args)
    tokenizer = None
    if args.criterion not in DATA_FREE:  # before the model loads: a missing tokenizer fails in a second
        tokenizer = _tokenizer(args, f"criterion {args.criterion!r} (calibration text)")
    check_output(out, kind="file", overwrite=args.overwrite, flag="--out")  # every check passed: create folders
    model = load_model(_source(args), **_model_options(args))
    n_remove = None
    if args.ratio is not None or args.blocks is not None:
        n_remove = resolve_block_count(model, ratio=args.ratio, blocks=args.blocks,
                                       keep_first=args.keep_first, keep_last=args.keep_last)
    scores = _scores_for(args, model, n_remove, tokenizer)
    scores.save(out)
    console.result(json.dumps({"criterion": scores.criterion, "scores": [round(s, 4) for s in scores.scores],
                      "out": str(out)}))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Remove blocks and save a standard HF checkpoint with pruning.json."""
    from shortened.criteria import BlockScores
    from shortened.criteria import DATA_FREE
    from shortened.io import check_output
    from shortened.models import load_model
    from shortened.pruning import check_scores_fit, prune_and_save, resolve_block_count

    _check_common(args)
    check_output(args.out, kind="dir", overwrite=args.overwrite, flag="--out", create=False)
    unused = [args.typed.flag(d) for d in ("patch_fit", "patch_samples", "patch_ridge") if args.typed.given(d)]
    if args.patch == "none" and unused:
        raise ShortenedError(f"{', '.join(unused)} set the seam patch's fit, but --patch is none: add --patch linear "
                             "or drop them")
    _source(args)
    saved = BlockScores.load(args.scores) if args.scores else None
    needs_text = saved is None and args.criterion not in DATA_FREE
    patch_cfg = _calibration_config(args) if args.patch != "none" else None
    tokenizer = _tokenizer(args, f"criterion {args.criterion!r} (calibration text)" if needs_text else
                           f"--patch {args.patch} (calibration text)" if patch_cfg else None)
    check_output(args.out, kind="dir", overwrite=args.overwrite, flag="--out")
    model = load_model(_source(args), **_model_options(args))
    n_remove = resolve_block_count(model, ratio=args.ratio, blocks=args.blocks,
                                   keep_first=args.keep_first, keep_last=args.keep_last)
    if saved is not None:
        check_scores_fit(saved, model, args.criterion)
        saved.dtype_mismatch(model.dtype, where=f"--scores {args.scores}")
        scores = saved
    else:
        scores = _scores_for(args, model, n_remove, tokenizer)
    windows = patch_info = None
    if patch_cfg is not None:  # the seam patch reads the dense model's activations on the calibration set
        from shortened.models import check_positions
        from shortened.seam_patch import patch_calibration

        check_positions(model, patch_cfg.seq_len, args.typed.flag("calibration.seq_len"))
        windows, patch_info = patch_calibration(model, tokenizer, patch_cfg, args.patch_samples,
                                                option="--patch_samples")
    result = prune_and_save(model, scores, n_remove, args.out, tokenizer, keep_first=args.keep_first,
                            keep_last=args.keep_last, ratio_requested=args.ratio,
                            model_name=_recorded_model(args.model), overwrite=args.overwrite,
                            save_dtype=args.save_dtype, source=_source(args), patch=args.patch,
                            calibration=windows, patch_ridge=args.patch_ridge, patch_fit=args.patch_fit,
                            patch_calibration=patch_info,
                            batch_size=args.batch_size)
    r = result.report
    console.result(json.dumps({"out": str(result.path), "removed_blocks": r["removed_blocks"], "num_blocks_after": r["num_blocks_after"],
                      "params_before": r["params_before"], "params_after": r["params_after"],
                      "ratio_actual": round(r["ratio_actual"], 4),
                      **({"patch": r["patch"]["seams"]} if "patch" in r else {})}))
    return 0


def _width_target(args: argparse.Namespace) -> int | None:
    """The parameter count --params or --like asks for (None for --ratio, which needs the model); bad input fails
    here, before the model loads."""
    from shortened.pruning import PRUNING_JSON

    if args.ratio is not None:
        return None
    if args.params is not None:
        return args.params
    if not Path(args.like).is_dir():
        raise ShortenedError(f"--like {args.like}: no such folder")
    report = Path(args.like) / PRUNING_JSON
    if not report.is_file():
        raise ShortenedError(f"--like {args.like}: no {PRUNING_JSON} there (a folder written by `shortened prune`)")
    try:
        return int(json.loads(report.read_text())["params_after"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ShortenedError(f"{report}: cannot read params_after ({exc})") from exc


def cmd_prune_width(args: argparse.Namespace) -> int:
    """The width baseline: remove head groups and MLP channels from every block to a parameter budget;
    saves an HF checkpoint."""
    from shortened.data.calibration import calibration_windows
    from shortened.io import check_output
    from shortened.models import count_params, load_model
    from shortened.width import plan_for_params, prune_width, save_width_pruned, width_scores

    check_output(args.out, kind="dir", overwrite=args.overwrite, flag="--out", create=False)
    target = _width_target(args)
    _source(args)
    calib_cfg = _calibration_config(args) if args.score == "activation" else None
    tokenizer = _tokenizer(args, "--score activation (calibration text)" if calib_cfg else None)
    check_output(args.out, kind="dir", overwrite=args.overwrite, flag="--out")
    model = load_model(_source(args), **_model_options(args))
    before = count_params(model)
    plan = plan_for_params(model, int(before * (1 - args.ratio)) if target is None else target, args.score)
    calibration = None
    if calib_cfg is not None:
        from shortened.models import check_positions

        check_positions(model, calib_cfg.seq_len, args.typed.flag("calibration.seq_len"))
        calibration = calibration_windows(tokenizer, calib_cfg)
    prune_width(model, plan, width_scores(model, args.score, calibration))
    out = save_width_pruned(model, plan, args.out, tokenizer, source=args.model, params_before=before,
                            overwrite=args.overwrite, dtype=io.resolve_save_dtype(args.save_dtype, _source(args)))
    after = count_params(model)
    console.result(json.dumps({"out": str(out), "groups_removed": plan.groups, "channels_removed": plan.channels,
                      "params_before": before, "params_after": after, "ratio_actual": round(1 - after / before, 4)}))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    """Heal a pruned model: CPT, LoRA, CPT+LoRA or distillation on Ray Train with DeepSpeed ZeRO;
    re-running the same --name resumes."""
    from shortened import storage, tracking
    from shortened.io import check_output
    from shortened.training.retrain import retrain

    check_output(args.out, kind="dir", overwrite=args.overwrite, flag="--out")  # before 30 s of Ray start-up
    name = args.name or Path(args.out).name
    tracking.check_mlflow(args.tracking.mlflow, name, args.typed.flag("mlflow.tracking_uri"))
    import ray

    ray_was_up = ray.is_initialized()
    try:
        result = retrain(args.model, args.out, args.train, scale=args.scale, storage_path=args.storage_path,
                         name=name, max_failures=args.max_failures,
                         overwrite=args.overwrite, address=args.address,
                         workers_hint=args.typed.flag("num_workers"))
    finally:  # a Ray this command started is its own, as a sweep's is (run in-process, it would outlive it)
        if not ray_was_up:
            ray.shutdown()
    tracking.log_retraining(args.tracking, model=args.model, model_dir=result.model_dir, name=name,
                            storage_path=storage.absolute(args.storage_path), train=args.train,
                            num_workers=args.scale.num_workers)
    console.result(json.dumps({"out": result.model_dir, "metrics": result.metrics,
                      "phases": [{"phase": p["phase"], "run": p["run"], "checkpoint": p["checkpoint"]}
                                 for p in result.phases]}, indent=2, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity, zero-shot accuracy (lm-eval) and generation speed of a model."""
    from shortened.evaluation import evaluate, metric_rows
    from shortened.io import check_output, write_json_atomic
    from shortened.models import load_model, load_tokenizer, resolve_source

    typed, cfg = args.typed, args.eval
    tasks = cfg.tasks
    if typed.given("tasks") and not tasks:
        raise ShortenedError(f"{typed.flag('tasks')} {typed.raw('tasks')!r} names no task; give task names or 'all', "
                             "or leave it out")
    ppl = cfg.ppl if typed.given("ppl") or not (tasks or cfg.speed) else []  # the default only when nothing is asked
    if not ppl and not tasks and not cfg.speed:
        raise ShortenedError(f"nothing to evaluate: {typed.flag('ppl')} is empty and neither --tasks nor --speed is "
                             "given")
    cfg = cfg.model_copy(update={"ppl": ppl, "progress": not args.quiet})
    if args.baseline and not cfg.speed:
        raise ShortenedError("--baseline is compared by --speed; add --speed")
    for dest, applies, to in (("limit", tasks, "zero-shot tasks (--tasks)"),
                              ("zeroshot_cache", tasks, "zero-shot tasks (--tasks)"),
                              ("zeroshot_batch_size", tasks, "zero-shot tasks (--tasks)"),
                              ("ppl_max_windows", ppl, "perplexity (--ppl)"),
                              ("ppl_seq_len", ppl, "perplexity (--ppl)")):
        if getattr(cfg, dest) is not None and not applies:
            raise ShortenedError(f"{typed.flag(dest)} would be ignored: it applies to {to}, and none is asked for")
    out = check_output(args.out, kind="file", overwrite=args.overwrite, flag="--out", create=False)
    if cfg.zeroshot_cache and cfg.tasks:
        check_output(cfg.zeroshot_cache, kind="folder", flag=typed.flag("zeroshot_cache"), create=False)
    _source(args)
    baseline_source = resolve_source(args.baseline, what="--baseline") if args.baseline else None
    tokenizer = _tokenizer(args, "evaluation (perplexity, zero-shot and speed read text)")
    baseline_tokenizer = None
    if baseline_source is not None:
        try:
            baseline_tokenizer = load_tokenizer(baseline_source)
        except ShortenedError as exc:
            if not args.tokenizer:
                raise ShortenedError(f"--baseline {args.baseline}: {exc}; pass --tokenizer PATH if the two models "
                                     "share it") from exc
            baseline_tokenizer = tokenizer
    check_output(out, kind="file", overwrite=args.overwrite, flag="--out")  # every check passed: create folders
    if cfg.zeroshot_cache and cfg.tasks:
        check_output(cfg.zeroshot_cache, kind="folder", flag=typed.flag("zeroshot_cache"))
    model = load_model(_source(args), **_model_options(args))
    baseline = None
    if baseline_source is not None:
        baseline = (load_model(baseline_source, **_model_options(args)), baseline_tokenizer)
    result = {"model": args.model, "baseline": args.baseline, **evaluate(model, tokenizer, cfg, baseline)}
    write_json_atomic(out, result)
    console.result(json.dumps(result, default=str))  # the result, for programs; the tables below go to stderr
    print("| metric | dataset/task | value | protocol |\n|---|---|---|---|", file=sys.stderr)
    for r in metric_rows(result):
        print(f"| {r['name']} | {r['dataset']} | {r['value']:.4f} | {r['protocol']} |", file=sys.stderr)
    weak = [t for t in result.get("zeroshot", {}).get("tasks", []) if not t["above_chance"]]
    if weak:
        print("\nnot above chance (within 2 standard errors of guessing, or below): " + ", ".join(
            f"{t['task']} {t['value']:.4f} (chance {t['chance']:.2f}, {t['items']} items)" for t in weak),
              file=sys.stderr)
    if "speed" in result:
        from shortened.evaluation.speed import speed_table

        print("\n" + speed_table(result["speed"]), file=sys.stderr)
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Check a training corpus: shards, rank split, documents per set, bad lines, tokens."""
    import time
    from collections import Counter

    from shortened.data import DocumentStream
    from shortened.data.config import SLIMPAJAMA_SAMPLE
    from shortened.data.formats import encode
    from shortened.data.sources import is_hub
    from shortened.data.stream import set_name

    typed = args.typed
    if args.gguf_file and not args.tokenizer:
        raise ShortenedError(f"{typed.flag('gguf_file')} {args.gguf_file!r} names a file in the --tokenizer folder; "
                             "add --tokenizer")
    cfg = args.data.model_copy(update={"epochs": 1})  # (a mistyped split of the sample was refused when read)
    if typed.given("split") and not is_hub(cfg.source) and cfg.source != SLIMPAJAMA_SAMPLE:
        raise ShortenedError(f"{typed.flag('split')} {cfg.split!r}: {cfg.source!r} is a path, which has no splits "
                             f"({typed.flag('split')} applies to {SLIMPAJAMA_SAMPLE} and hf:NAME); name the split's "
                             "own folder or file")
    tokenizer = None
    if args.tokenizer:
        from shortened.models import load_tokenizer

        from shortened.models import resolve_source

        tokenizer = load_tokenizer(resolve_source(args.tokenizer, args.gguf_file, what="--tokenizer"))
    start = time.perf_counter()
    streams = [DocumentStream(cfg, r, args.world_size) for r in range(args.world_size)]
    per_rank, sets, tokens = [], Counter(), 0
    for stream in streams:
        n = 0
        for doc in stream:
            n += 1
            sets[str(set_name(doc.record, cfg.mixture_field))] += 1
            if tokenizer is not None:
                tokens += len(encode(doc.record, cfg, tokenizer)[0])
        per_rank.append(n)
    first = streams[0]
    # every rank reads every line under a document split; each reads its own shards otherwise
    counted = [first] if first.split_mode == "document" else streams
    report = {"source": cfg.source, "resolved": first.source, "split_mode": first.split_mode,
              "shards": len(first.shards.paths) if first.shards else None, "documents": sum(per_rank),
              "documents_per_rank": per_rank, "sets": dict(sets.most_common()),
              "lines": sum(s.bad.lines for s in counted), "bad_lines": sum(s.bad.bad for s in counted),
              "bad_examples": [e for s in counted for e in s.bad.examples][:3],
              "tokens": tokens if tokenizer is not None else None,
              "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(report, indent=2))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """The main job: Ray Tune trials over criteria × ratios × methods (prune → retrain → evaluate), a
    results store, and the selected ratio."""
    from shortened.sweep import load_sweep_config
    from shortened.sweep.report import markdown_table, trial_table
    from shortened.sweep.runner import run_sweep

    cfg = load_sweep_config(args.config, {"name": args.name, "storage_path": args.storage_path,
                                          "store_url": args.store_url})
    outcome = run_sweep(cfg, resume=args.resume, address=args.address)
    console.result(markdown_table(*trial_table(outcome.trials)))
    _print_choice(outcome.choice)
    console.result(f"\nexperiment {outcome.experiment_dir} ({len(outcome.ran)} trial(s) run now, "
          f"{outcome.seconds / 60:.1f} min); store {outcome.store_url}")
    return 0


def _print_choice(choice) -> None:
    if choice.chosen:
        console.result(f"\nselected: {choice.chosen['key']} (policy {choice.policy}, metric {choice.metric})\n  why: "
              f"{choice.reason}\n  model: {choice.chosen['model_path']}")
    else:
        console.result(f"\nselected: nothing (policy {choice.policy}, metric {choice.metric})\n  why: {choice.reason}")


def cmd_results(args: argparse.Namespace) -> int:
    """Print an experiment's trials and metrics."""
    import csv

    from shortened.sweep.report import markdown_table, trial_table

    store, name, _ = open_experiment_args(args)
    trials = store.trials(name)
    if args.format == "json":
        print(json.dumps(trials, indent=2, default=str))
    elif args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["trial", "status", "criterion", "method", "ratio", "ratio_actual", "num_blocks", "params",
                    "tokens_trained", "metric", "dataset", "protocol", "value"])
        for t in trials:
            for m in t["metrics"] or [{"name": "", "dataset": "", "protocol": "", "value": ""}]:
                w.writerow([t["key"], t["status"], t["criterion"], t["method"], t["ratio"], t["ratio_actual"],
                            t["num_blocks"], t["params"], t["tokens_trained"], m["name"], m["dataset"],
                            m["protocol"], m["value"]])
    else:
        print(markdown_table(*trial_table(trials)))
    return 0


def _selection(args: argparse.Namespace, store, name: str) -> Selection:
    """The experiment's selection settings with the flags given on top (select's ``--policy``, ``--metric``, …)."""
    from pydantic import ValidationError

    fields = {**store.experiment(name)["config"].get("selection", {}), **getattr(args, "selection", {})}
    try:
        return Selection.model_validate(fields)
    except ValidationError as exc:
        raise ShortenedError(explain(exc, Selection, args.typed)) from exc


def cmd_select(args: argparse.Namespace) -> int:
    """Choose the trial to ship by a policy, and say why."""
    from shortened.sweep.selection import select

    store, name, _ = open_experiment_args(args)
    choice = select(store.trials(name), _selection(args, store, name), strict=True)
    print("| trial | ratio | value | meets policy |\n|---|---|---|---|")
    for c in choice.candidates:
        print(f"| {c['key']} | {c['ratio']:.3f} | {c['value']:.4g} | {'yes' if c.get('ok') else 'no'} |")
    if choice.baseline is not None:
        print(f"| dense | 0.000 | {choice.baseline:.4g} | baseline |")
    _print_choice(choice)
    return 0 if choice.chosen else 1


def open_experiment_args(args: argparse.Namespace):
    from shortened.sweep.report import open_experiment

    return open_experiment(args.experiment, args.store_url, args.storage_path)


def cmd_report(args: argparse.Namespace) -> int:
    """Write a Markdown/HTML report with plots."""
    from shortened.sweep.report import write_report
    from shortened.sweep.selection import select

    from shortened.io import check_output

    store, name, exp_dir = open_experiment_args(args)
    if args.out is None and exp_dir is None:
        raise ShortenedError(f"experiment {name!r} has no folder on record; pass --out FOLDER")
    out_dir = args.out or (exp_dir / "report")
    check_output(out_dir, kind="folder", overwrite=True, flag="--out" if args.out else "report folder", create=False)
    choice = select(store.trials(name), _selection(args, store, name), strict=True)
    check_output(out_dir, kind="folder", overwrite=True, flag="--out" if args.out else "report folder")
    if storage.is_url(out_dir):  # an experiment in an object store: written here, uploaded whole
        with storage.staged_upload(str(out_dir), replace=False) as local:  # into the prefix, as into a folder
            out = storage.join(out_dir, Path(write_report(store, name, local, choice, args.format)).name)
    else:
        out = write_report(store, name, out_dir, choice, args.format)
    print(f"wrote {out}")
    return 0


# -- the verbs: each one's help is its command's docstring, its flags the fields of its models ----------------------

CALIBRATION_FLAGS = {"--calib-source": "--calibration.source", "--calib-samples": "--calibration.n_samples",
                     "--calib-seq-len": "--calibration.seq_len", "--seed": "--calibration.seed"}
STORE_FLAG = {"--store": "--store_url"}

VERBS = (
    Verb("score", cmd_score.__doc__, (Part(ScoreOptions),), CALIBRATION_FLAGS),
    Verb("prune", cmd_prune.__doc__, (Part(PruneOptions),), CALIBRATION_FLAGS),
    Verb("prune-width", cmd_prune_width.__doc__, (Part(PruneWidthOptions),), CALIBRATION_FLAGS),
    Verb("retrain", cmd_retrain.__doc__,
         (Part(RetrainOptions, default_text={"storage_path": "~/ray_results"}),
          Part(TrainConfig, attr="train", config=True),
          Part(ScaleConfig, attr="scale", skip=frozenset({"workers"})),  # --workers: --num_workers's old spelling
          Part(TrackingConfig, attr="tracking")),
         {"--data": "--data.source", "--seq-len": "--data.seq_len", "--lora-zero-stage": "--lora.zero_stage",
          "--teacher": "--distill.teacher", "--workers": "--num_workers", "--placement": "--placement_strategy"}),
    Verb("eval", cmd_eval.__doc__,
         (Part(EvalOptions), Part(EvalConfig, attr="eval", skip=frozenset({"progress"}), default_text={
             "ppl": "wikitext2,ptb when neither --tasks nor --speed is given, else none"})),
         {"--ppl-windows": "--ppl_max_windows"}),
    Verb("sweep", cmd_sweep.__doc__, (Part(SweepOptions, positionals=("config",), checked_as=SweepConfig,
                                           default_text=dict.fromkeys(("name", "storage_path", "store_url"),
                                                                      "the config's")),), STORE_FLAG),
    Verb("results", cmd_results.__doc__, (Part(ResultsOptions, positionals=("experiment",)),), STORE_FLAG),
    Verb("select", cmd_select.__doc__,
         (Part(ExperimentOptions, positionals=("experiment",)),
          Part(Selection, attr="selection", deferred=True, default_text=dict.fromkeys(
              Selection.model_fields, "the experiment's (its sweep config's selection)"))),
         {**STORE_FLAG, "--tolerance": "--tolerance_pct", "--max-latency": "--max_latency_s"}),
    Verb("report", cmd_report.__doc__, (Part(ReportOptions, positionals=("experiment",)),), STORE_FLAG),
    Verb("data", cmd_data.__doc__,
         (Part(DataConfig, attr="data", positionals=("source",),
               skip=frozenset({"seq_len", "epochs", "document_positions"})), Part(DataOptions))),
)


def build_parser() -> Parser:
    return Parser(VERBS, "Depth pruning of decoder LLMs.")


def _quiet_stdout() -> None:
    """After a closed pipe (``shortened results | head``): point stdout at /dev/null so the interpreter's final
    flush does not print a second BrokenPipeError."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


# verbs whose work runs libraries that print on stdout (DeepSpeed's logger, Ray's copy of workers' stdout): their
# result goes to stdout through console.result, everything else to stderr
RESULT_VERBS = frozenset({"score", "prune", "prune-width", "retrain", "eval", "sweep"})


def command_of(verb: str):
    """The function that runs a verb: ``cmd_score`` for ``score``, ``cmd_prune_width`` for ``prune-width``."""
    return globals()[f"cmd_{verb.replace('-', '_')}"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb. Exit codes: 0 done, 1 nothing chosen (``select``), 2 bad input (one line: ``shortened VERB:
    error: MESSAGE``, also for a bad flag), 130 interrupted (Ctrl-C: one line, no traceback; the
    atomic writes leave nothing half-written), 141 output pipe closed (quietly)."""
    command = "shortened"
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help (0) or a bad flag (2, its message already printed)
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        command = f"shortened {args.command}"
        console.configure(verbose=args.verbose, quiet=getattr(args, "quiet", False))
        try:
            for dest, value in vars(args).items():  # file:///x is the local path /x, for every path flag
                if isinstance(value, str) and value.startswith("file:"):
                    setattr(args, dest, storage.local_path(value))
            if args.command in RESULT_VERBS:  # libraries print on stdout: only the result goes there
                with console.results_on_stdout():
                    code = command_of(args.command)(args)
            else:
                code = command_of(args.command)(args)
            sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not in the interpreter's exit
            if code == 0:
                io.CREATED.clear()
            return code
        except ShortenedError as exc:
            if isinstance(exc, Interrupted):  # Ctrl-C or a stop: the message says how to resume
                print(f"{command}: interrupted: {exc}", file=sys.stderr)
                return 130
            print(f"{command}: error: {exc}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    finally:
        io.remove_created_if_empty()  # after a success the list is empty: nothing to remove


if __name__ == "__main__":
    sys.exit(main())
