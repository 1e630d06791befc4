"""One sweep trial as plain Python: prune with shared block scores → retrain → evaluate → a :class:`TrialResult`.

Nothing here needs Tune. Each heavy stage is handed to ``run_task`` (inline, or a Ray task with the trial's
resources), retraining goes through :func:`shortened.training.retrain.retrain` (Ray Train), and every stage is
resumable: its output folder is published atomically and reused when it exists, and a finished trial leaves
``result.json`` that a resumed sweep reads instead of running the trial again. Stages take the validated
:class:`SweepConfig` and :class:`TrialSpec` objects as they are (Ray pickles them); every path comes from the
experiment's :class:`~shortened.sweep.layout.ExperimentLayout`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from shortened import storage
from shortened.io import write_json_atomic
from shortened.sweep.config import SweepConfig, SweepMethod

if TYPE_CHECKING:
    from shortened.cluster import ClusterChecked

DENSE = "dense"
RunTask = Callable[..., Any]  # run_task(fn, *args) -> fn(*args), wherever it runs


def inline(fn: Callable, *args):
    return fn(*args)


class TrialSpec(BaseModel):
    """What one trial does. The dense baseline is ``method="dense"`` with no criterion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    criterion: str | None = None
    ratio: float | None = None
    blocks: int | None = None
    patch: Literal["none", "linear"] = "none"  # the seam patch of the pruned model (shortened.seam_patch)

    @property
    def key(self) -> str:
        """``ppl-r0.2-cpt``; a patched model's amount carries the patch, ``ppl-r0.2+linear-cpt`` (unpatched keys are
        unchanged, so experiments from before the patch axis resume)."""
        if self.method == DENSE:
            return DENSE
        amount = f"r{self.ratio:g}" if self.ratio is not None else f"b{self.blocks}"
        if self.patch != "none":
            amount += f"+{self.patch}"
        return f"{self.criterion}-{amount}-{self.method}"

    def __str__(self) -> str:  # how Tune's logs (params.json) show a trial's spec
        return self.key


def patch_of_key(key: str) -> str:
    """The seam patch a trial key names (``ppl-r0.2+linear-cpt`` → ``linear``; ``none`` for unpatched keys)."""
    from shortened.seam_patch import PATCHES

    return next((p for p in PATCHES if p != "none" and f"+{p}-" in key), "none")


def grid_specs(cfg: SweepConfig) -> list[TrialSpec]:
    """The dense baseline, then criteria × amounts × patches × methods in a stable order."""
    specs = [TrialSpec(method=DENSE)]
    amounts = [{"ratio": r} for r in cfg.ratios] if cfg.ratios else [{"blocks": b} for b in cfg.blocks or []]
    for criterion in cfg.criteria:
        for amount in amounts:
            for patch in cfg.patch:
                specs += [TrialSpec(method=m, criterion=criterion, patch=patch, **amount) for m in cfg.methods]
    return specs


# relative cost of a method's retraining, for ordering trials longest first: every sweep method (SweepMethod) and
# the dense baseline
METHOD_COST: dict[SweepMethod | Literal["dense"], int] = {"cpt+lora": 5, "distill": 4, "cpt": 3, "lora": 2,
                                                          "partial": 2,
                                                          "none": 1, DENSE: 0}


def longest_first(specs: list[TrialSpec]) -> list[TrialSpec]:
    """Launch order for a pool of trial slots: longest expected first (heavier method, then fewer blocks removed),
    so short trials such as the dense evaluation fill the gaps at the end instead of leaving one slot idle."""
    return sorted(specs, key=lambda s: (-METHOD_COST.get(s.method, 0), s.ratio or 0.0, s.blocks or 0))


class MetricRow(BaseModel):
    """One measured value (the rows of :func:`shortened.evaluation.metric_rows`, as the store keeps them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dataset: str
    value: float
    protocol: str


class TrialTimings(BaseModel):
    """Wall seconds of each stage of a trial, and of the whole trial (a stage it skipped: 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prune_s: float = 0.0
    train_s: float = 0.0
    eval_s: float = 0.0
    total_s: float = 0.0


class TrialResult(BaseModel):
    """What a finished trial returns: to Tune as it is (the store callback and the bisection read it), to the store
    (:meth:`row` and ``metrics``), and as ``result.json`` in the trial's folder, which a resumed sweep reads
    instead of running the trial again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    spec: TrialSpec
    status: Literal["completed"] = "completed"
    model_path: str  # the model evaluated: the source (dense), the pruned folder, or the retrained export
    # what pruning did (the dense baseline: nothing)
    num_blocks: int
    removed_blocks: list[int]
    blocks_requested: int | None  # blocks removed as the spec asked them (its ratio resolved to a count)
    params: int
    params_before: int
    ratio_actual: float
    tokens_trained: int = 0
    timings: TrialTimings
    metrics: list[MetricRow]

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, data):
        """``{"row": {...}, "metrics": [...]}``: a result.json written before this model (an older sweep resumed)."""
        if isinstance(data, dict) and "row" in data:
            row = {k: v for k, v in data["row"].items() if k not in ("method", "criterion", "ratio")}
            ratio, requested = data["row"].get("ratio"), row.get("blocks_requested")
            spec = {"method": data["row"]["method"], "criterion": data["row"].get("criterion"), "ratio": ratio,
                    "blocks": requested if ratio is None else None}
            timings = {k: row.pop(k) for k in TrialTimings.model_fields if k in row}
            return {**row, "spec": spec, "timings": timings, "metrics": data["metrics"]}
        return data

    @model_validator(mode="after")
    def _key_is_the_specs(self) -> TrialResult:
        if self.key != self.spec.key:
            raise ValueError(f"key {self.key!r} is not its spec's ({self.spec.key!r})")
        return self

    def row(self) -> dict:
        """The store's trial columns."""
        fields = self.model_dump(exclude={"spec", "timings", "metrics"})
        return {**fields, **self.timings.model_dump(), "method": self.spec.method, "criterion": self.spec.criterion,
                "ratio": self.spec.ratio}

    def metric_dicts(self) -> list[dict]:
        return [m.model_dump() for m in self.metrics]

    def summary(self) -> str:
        """The headline metrics, for progress lines: ``ppl wikitext2 12.3, zeroshot_mean piqa 0.61``."""
        return ", ".join(f"{m.name} {m.dataset} {m.value:.4g}" for m in self.metrics
                         if m.name in ("ppl", "zeroshot_mean"))

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: str | Path) -> TrialResult:
        return cls.model_validate_json(storage.path(path).read_text())

    def __str__(self) -> str:  # Tune logs a reported object by str(): its result.json then holds this JSON
        return self.model_dump_json()


# -- stages (plain functions of the config and the spec, so each can run as a Ray task) --------------------------

def _threads_for_task() -> None:
    """Inside a Ray task, use as many torch threads as whole CPUs the task was given (at least one)."""
    import ray
    import torch

    if ray.is_initialized() and ray.get_runtime_context().get_task_id():
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))


def scoring_dtype(cfg: SweepConfig) -> str:
    """The dtype option block scores are computed in: ``score_dtype`` when pinned, else ``dtype``."""
    return cfg.score_dtype or cfg.dtype


def compute_scores(cfg: SweepConfig, criterion: str, n_remove: int, out: str) -> str:
    """Score every block of the original model once per criterion, in :func:`scoring_dtype` with the config's
    ``attn_implementation``; trials prune from this file (which records the dtype and device used)."""
    from shortened.criteria import DATA_FREE
    from shortened.models import load_model, load_tokenizer
    from shortened.pruning import score_with_calibration

    _threads_for_task()
    cfg = SweepConfig.model_validate(cfg)  # an instance passes as it is; a dict (JSON) is validated
    model = load_model(cfg.model, gguf_file=cfg.gguf_file, device=cfg.device, dtype=scoring_dtype(cfg),
                       attn_implementation=cfg.attn_implementation)
    tokenizer = None if criterion in DATA_FREE else load_tokenizer(cfg.model, gguf_file=cfg.gguf_file)
    # ratios only (no block counts or bisection): iterative steps stay within the largest ratio's budget
    ratio = max(cfg.ratios) if cfg.ratios and not cfg.blocks and cfg.search != "bisect" else None
    scores = score_with_calibration(model, criterion, tokenizer=tokenizer, calibration=cfg.calibration,
                                    keep_first=cfg.keep_first, keep_last=cfg.keep_last, n_remove=n_remove,
                                    ratio=ratio, progress=False, model_name=cfg.model, task=cfg.task_criterion)
    scores.save(out)  # atomically: a file at ``out`` is always a complete one
    return out


def prune_stage(cfg: SweepConfig, spec: TrialSpec, scores_file: str, out: str) -> dict:
    """Prune the original model with the saved scores and publish the HF folder; returns ``pruning.json``."""
    from shortened.criteria import BlockScores
    from shortened.models import load_model, load_tokenizer
    from shortened.pruning import PRUNING_JSON, prune_and_save, resolve_block_count

    cfg, spec = SweepConfig.model_validate(cfg), TrialSpec.model_validate(spec)  # instances pass as they are
    if (storage.path(out) / PRUNING_JSON).is_file():
        return json.loads((storage.path(out) / PRUNING_JSON).read_text())
    model = load_model(cfg.model, gguf_file=cfg.gguf_file, device="cpu", dtype=cfg.dtype)
    n = resolve_block_count(model, ratio=spec.ratio, blocks=spec.blocks, keep_first=cfg.keep_first,
                            keep_last=cfg.keep_last)
    scores = BlockScores.load(scores_file)
    _warn_scores_dtype(cfg, scores, scores_file)
    tokenizer = load_tokenizer(cfg.model, gguf_file=cfg.gguf_file)
    windows = patch_info = None
    if spec.patch != "none":  # the seam patch is fitted on the dense model's activations on the calibration set
        from shortened.seam_patch import patch_calibration

        windows, patch_info = patch_calibration(model, tokenizer, cfg.calibration, cfg.patch_samples)
    result = prune_and_save(model, scores, n, out, tokenizer,
                            keep_first=cfg.keep_first, keep_last=cfg.keep_last, ratio_requested=spec.ratio,
                            model_name=cfg.model, overwrite=True, save_dtype=cfg.save_dtype, source=cfg.model,
                            gguf_file=cfg.gguf_file,  # saved in the source's dtype by default
                            patch=spec.patch, calibration=windows, patch_ridge=cfg.patch_ridge,
                            patch_fit=cfg.patch_fit, patch_calibration=patch_info)
    return result.report


def _warn_scores_dtype(cfg: SweepConfig, scores, where: str) -> None:
    """Log a warning when shared scores (a resumed sweep reuses them) were computed in another dtype than the one
    this config scores in here (``score_dtype`` changed, or scores from other hardware under ``auto``)."""
    from shortened.device import resolve_device, resolve_dtype
    from shortened.errors import ShortenedError

    try:
        now = resolve_dtype(scoring_dtype(cfg), resolve_device(cfg.device))
    except ShortenedError:  # this task cannot use the scoring device: nothing to compare with
        return
    scores.dtype_mismatch(now, where)


def evaluate_stage(cfg: SweepConfig, model: str, gguf_file: str | None, out: str | Path) -> dict:
    """Perplexity and zero-shot of one model (speed is measured separately, without contention)."""
    from shortened.evaluation import evaluate
    from shortened.models import load_model, load_tokenizer

    _threads_for_task()
    if storage.path(out).is_file():
        return json.loads(storage.path(out).read_text())
    m = load_model(model, gguf_file=gguf_file, device=cfg.device, dtype=cfg.dtype,
                   attn_implementation=cfg.attn_implementation)
    result = evaluate(m, load_tokenizer(model, gguf_file=gguf_file), cfg.eval.model_copy(update={"speed": False,
                                                                                                 "progress": False}))
    write_json_atomic(out, result)
    return result


def speed_stage(cfg: SweepConfig, model: str, out: str | Path) -> dict:
    """Generation speed of one pruned model against the dense one, alternating runs in one process. Both sit on
    one device, so the rows' memory is each model's own (weights + its generation's working memory, see
    :mod:`shortened.evaluation.speed`), never the device's total."""
    from shortened.evaluation.speed import compare_speed
    from shortened.models import load_model, load_tokenizer

    _threads_for_task()
    if storage.path(out).is_file():
        return json.loads(storage.path(out).read_text())
    e = cfg.eval
    opts = {"device": cfg.device, "dtype": cfg.dtype, "attn_implementation": cfg.attn_implementation}
    models = {"baseline": (load_model(cfg.model, gguf_file=cfg.gguf_file, **opts),
                           load_tokenizer(cfg.model, gguf_file=cfg.gguf_file)),
              "model": (load_model(model, **opts), load_tokenizer(model))}
    rows = compare_speed(models, batch_sizes=e.speed_batch_sizes, new_tokens=e.speed_new_tokens,
                         repeats=e.speed_repeats, warmup=e.speed_warmup, progress=False)
    result = {"speed": rows}
    write_json_atomic(out, result)
    return result


# -- the trial ------------------------------------------------------------------------------------------------------

def run_trial(cfg: SweepConfig, spec: TrialSpec, run_task: RunTask = inline, worker_env: dict[str, str] | None = None,
              checked: ClusterChecked | None = None, train_callbacks: list | None = None) -> TrialResult:
    """Prune → retrain → evaluate one spec; returns (and saves as ``result.json``) the trial's result. ``checked``:
    what the sweep's driver verified about the cluster, so the trial's retraining does not check it again;
    ``train_callbacks``: Ray Train callbacks of its retraining (intermediate results for Tune's scheduler)."""
    from shortened.evaluation import metric_rows
    from shortened.pruning import PRUNING_JSON

    layout = cfg.layout
    done = layout.result_json(spec.key)
    if done.is_file():
        return TrialResult.load(done)
    start = time.perf_counter()
    timings = {"prune_s": 0.0, "train_s": 0.0}
    tokens = 0
    if spec.method == DENSE:
        model_path, gguf, pruning = cfg.model, cfg.gguf_file, None
    else:
        t = time.perf_counter()
        pruned = layout.pruned(spec.key)
        plan = pruned / PRUNING_JSON  # a retried trial does not wait for a task slot to find it done
        pruning = json.loads(plan.read_text()) if plan.is_file() else run_task(
            prune_stage, cfg, spec, str(layout.scores(spec.criterion)), str(pruned))
        timings["prune_s"] = time.perf_counter() - t
        retrains = spec.method != "none"
        if retrains:
            t = time.perf_counter()
            tokens = _retrain(cfg, spec, worker_env, checked, train_callbacks)
            timings["train_s"] = time.perf_counter() - t
        model_path, gguf = str(layout.evaluated_model(spec.key, retrains)), None
    t = time.perf_counter()
    evaluation = run_task(evaluate_stage, cfg, model_path, gguf, str(layout.eval_json(spec.key)))
    timings["eval_s"] = time.perf_counter() - t
    if pruning is None:  # the dense baseline: nothing removed
        info = evaluation["model_info"]
        shape = {"num_blocks": info["blocks"], "removed_blocks": [], "blocks_requested": None,
                 "params": info["params"], "params_before": info["params"], "ratio_actual": 0.0}
    else:
        shape = {"num_blocks": pruning["num_blocks_after"], "removed_blocks": pruning["removed_blocks"],
                 "blocks_requested": pruning["blocks_requested"], "params": pruning["params_after"],
                 "params_before": pruning["params_before"], "ratio_actual": pruning["ratio_actual"]}
    result = TrialResult(key=spec.key, spec=spec, model_path=model_path, tokens_trained=tokens, **shape,
                         timings=TrialTimings(**timings, total_s=time.perf_counter() - start),
                         metrics=metric_rows(evaluation))
    result.save(done)
    return result


def _retrain(cfg: SweepConfig, spec: TrialSpec, worker_env: dict[str, str] | None,
             checked: ClusterChecked | None, train_callbacks: list | None = None) -> int:
    """Heal the pruned model with a nested Ray Train run named after the trial (re-running it resumes from its
    checkpoints); returns the tokens trained over every phase. ``train_callbacks``: Ray Train callbacks of the run
    (the sweep's forwards validation reports to Tune's scheduler)."""
    from shortened.training.export import RETRAINING_JSON
    from shortened.training.retrain import cpt_export, retrain

    layout = cfg.layout
    out = layout.trained(spec.key)
    final = out / RETRAINING_JSON
    if not final.is_file():
        retrain(str(layout.pruned(spec.key)), str(out),
                cfg.train.model_copy(update={"method": spec.method, "save_dtype": cfg.save_dtype,
                                             "attn_implementation": cfg.attn_implementation}),
                scale=cfg.resources.worker_scale(), storage_path=str(layout.train), name=spec.key,
                max_failures=cfg.resources.max_failures, overwrite=True, worker_env=worker_env,
                workers_hint=cfg.resources.workers_field, checked=checked, callbacks=train_callbacks)
    record = json.loads(final.read_text())
    if "tokens_trained_total" in record:  # every phase (cpt+lora: CPT and LoRA)
        return int(record["tokens_trained_total"])
    phases = [final]
    if spec.method == "cpt+lora":  # a record from before the total: add the CPT phase's own
        phases.append(cpt_export(layout.train, spec.key) / RETRAINING_JSON)
    return sum(int((json.loads(p.read_text()).get("history") or [{}])[-1].get("tokens", 0)) for p in phases)
