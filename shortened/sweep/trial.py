"""One sweep trial as plain Python: prune with shared block scores → retrain → evaluate → a result dict.

Nothing here needs Tune. Each heavy stage is handed to ``run_task`` (inline, or a Ray task with the trial's
resources), retraining goes through :func:`shortened.training.retrain.retrain` (Ray Train), and every stage is
resumable: its output folder is published atomically and reused when it exists, and a finished trial leaves
``result.json`` that a resumed sweep reads instead of running the trial again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from shortened.io import write_json_atomic
from shortened.sweep.config import SweepConfig, SweepMethod

if TYPE_CHECKING:
    from shortened.cluster import ScaleConfig

DENSE = "dense"
RESULT_JSON = "result.json"
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

    @property
    def key(self) -> str:
        if self.method == DENSE:
            return DENSE
        amount = f"r{self.ratio:g}" if self.ratio is not None else f"b{self.blocks}"
        return f"{self.criterion}-{amount}-{self.method}"


def grid_specs(cfg: SweepConfig) -> list[TrialSpec]:
    """The dense baseline, then criteria × amounts × methods in a stable order."""
    specs = [TrialSpec(method=DENSE)]
    amounts = [{"ratio": r} for r in cfg.ratios] if cfg.ratios else [{"blocks": b} for b in cfg.blocks or []]
    for criterion in cfg.criteria:
        for amount in amounts:
            specs += [TrialSpec(method=m, criterion=criterion, **amount) for m in cfg.methods]
    return specs


# relative cost of a method's retraining, for ordering trials longest first: every sweep method (SweepMethod) and
# the dense baseline
METHOD_COST: dict[SweepMethod | Literal["dense"], int] = {"cpt+lora": 5, "distill": 4, "cpt": 3, "lora": 2,
                                                          "none": 1, DENSE: 0}


def longest_first(specs: list[TrialSpec]) -> list[TrialSpec]:
    """Launch order for a pool of trial slots: longest expected first (heavier method, then fewer blocks removed),
    so short trials such as the dense evaluation fill the gaps at the end instead of leaving one slot idle."""
    return sorted(specs, key=lambda s: (-METHOD_COST.get(s.method, 0), s.ratio or 0.0, s.blocks or 0))


def scores_path(exp_dir: Path, criterion: str) -> Path:
    return exp_dir / "scores" / f"{criterion}.json"


def trial_dir(exp_dir: Path, key: str) -> Path:
    return exp_dir / "trials" / key


# -- stages (each a plain function of JSON-able arguments, so it can run as a Ray task) ---------------------------

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


def compute_scores(cfg_json: dict, criterion: str, n_remove: int, out: str) -> str:
    """Score every block of the original model once per criterion, in :func:`scoring_dtype` with the config's
    ``attn_implementation``; trials prune from this file (which records the dtype and device used)."""
    from shortened.criteria import DATA_FREE
    from shortened.models import load_model, load_tokenizer
    from shortened.pruning import score_with_calibration

    _threads_for_task()
    cfg = SweepConfig.model_validate(cfg_json)
    model = load_model(cfg.model, gguf_file=cfg.gguf_file, device=cfg.device, dtype=scoring_dtype(cfg),
                       attn_implementation=cfg.attn_implementation)
    tokenizer = None if criterion in DATA_FREE else load_tokenizer(cfg.model, gguf_file=cfg.gguf_file)
    # ratios only (no block counts or bisection): iterative steps stay within the largest ratio's budget
    ratio = max(cfg.ratios) if cfg.ratios and not cfg.blocks and cfg.search != "bisect" else None
    scores = score_with_calibration(model, criterion, tokenizer=tokenizer, calibration=cfg.calibration,
                                    keep_first=cfg.keep_first, keep_last=cfg.keep_last, n_remove=n_remove,
                                    ratio=ratio, progress=False, model_name=cfg.model)
    scores.save(out)  # atomically: a file at ``out`` is always a complete one
    return out


def prune_stage(cfg_json: dict, spec_json: dict, scores_file: str, out: str) -> dict:
    """Prune the original model with the saved scores and publish the HF folder; returns ``pruning.json``."""
    from shortened.criteria import BlockScores
    from shortened.models import load_model, load_tokenizer
    from shortened.pruning import PRUNING_JSON, prune_and_save, resolve_block_count

    cfg, spec = SweepConfig.model_validate(cfg_json), TrialSpec.model_validate(spec_json)
    if (Path(out) / PRUNING_JSON).is_file():
        return json.loads((Path(out) / PRUNING_JSON).read_text())
    model = load_model(cfg.model, gguf_file=cfg.gguf_file, device="cpu", dtype=cfg.dtype)
    n = resolve_block_count(model, ratio=spec.ratio, blocks=spec.blocks, keep_first=cfg.keep_first,
                            keep_last=cfg.keep_last)
    scores = BlockScores.load(scores_file)
    _warn_scores_dtype(cfg, scores, scores_file)
    result = prune_and_save(model, scores, n, out, load_tokenizer(cfg.model, gguf_file=cfg.gguf_file),
                            keep_first=cfg.keep_first, keep_last=cfg.keep_last, ratio_requested=spec.ratio,
                            model_name=cfg.model, overwrite=True, save_dtype=cfg.save_dtype, source=cfg.model,
                            gguf_file=cfg.gguf_file)  # saved in the source's dtype by default
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


def evaluate_stage(cfg_json: dict, model: str, gguf_file: str | None, out: str) -> dict:
    """Perplexity and zero-shot of one model (speed is measured separately, without contention)."""
    from shortened.evaluation import evaluate
    from shortened.models import load_model, load_tokenizer

    _threads_for_task()
    cfg = SweepConfig.model_validate(cfg_json)
    if Path(out).is_file():
        return json.loads(Path(out).read_text())
    m = load_model(model, gguf_file=gguf_file, device=cfg.device, dtype=cfg.dtype,
                   attn_implementation=cfg.attn_implementation)
    result = evaluate(m, load_tokenizer(model, gguf_file=gguf_file), cfg.eval.model_copy(update={"speed": False,
                                                                                                 "progress": False}))
    write_json_atomic(out, result)
    return result


def speed_stage(cfg_json: dict, model: str, out: str) -> dict:
    """Generation speed of one pruned model against the dense one, alternating runs in one process. Both sit on
    one device, so the rows' memory is each model's own (weights + its generation's working memory, see
    :mod:`shortened.evaluation.speed`), never the device's total."""
    from shortened.evaluation.speed import compare_speed
    from shortened.models import load_model, load_tokenizer

    _threads_for_task()
    cfg = SweepConfig.model_validate(cfg_json)
    if Path(out).is_file():
        return json.loads(Path(out).read_text())
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

def run_trial(cfg: SweepConfig, spec: TrialSpec, run_task: RunTask = inline,
              worker_env: dict[str, str] | None = None) -> dict:
    """Prune → retrain → evaluate one spec; returns (and saves as ``result.json``) the trial's row and metrics."""
    from shortened.evaluation import metric_rows
    from shortened.pruning import PRUNING_JSON

    exp_dir = cfg.experiment_dir()
    tdir = trial_dir(exp_dir, spec.key)
    done = tdir / RESULT_JSON
    if done.is_file():
        return json.loads(done.read_text())
    cfg_json = cfg.model_dump(mode="json")
    start = time.perf_counter()
    row: dict = {"key": spec.key, "method": spec.method, "criterion": spec.criterion, "ratio": spec.ratio,
                 "blocks_requested": spec.blocks, "tokens_trained": 0, "prune_s": 0.0, "train_s": 0.0}
    if spec.method == DENSE:
        model_path, gguf = cfg.model, cfg.gguf_file
        row["ratio_actual"] = 0.0
    else:
        t = time.perf_counter()
        pruned = str(tdir / "pruned")
        plan = Path(pruned) / PRUNING_JSON  # a retried trial does not wait for a task slot to find it done
        report = json.loads(plan.read_text()) if plan.is_file() else run_task(
            prune_stage, cfg_json, spec.model_dump(), str(scores_path(exp_dir, spec.criterion)), pruned)
        row.update(prune_s=time.perf_counter() - t, removed_blocks=report["removed_blocks"],
                   num_blocks=report["num_blocks_after"], params=report["params_after"],
                   params_before=report["params_before"], ratio_actual=report["ratio_actual"],
                   blocks_requested=report["blocks_requested"])
        model_path, gguf = pruned, None
        if spec.method != "none":
            t = time.perf_counter()
            row["tokens_trained"] = _retrain(cfg, spec, pruned, str(tdir / "model"), worker_env)
            row["train_s"] = time.perf_counter() - t
            model_path = str(tdir / "model")
    t = time.perf_counter()
    result = run_task(evaluate_stage, cfg_json, model_path, gguf, str(tdir / "eval.json"))
    if spec.method == DENSE:
        row.update(params=result["model_info"]["params"], params_before=result["model_info"]["params"],
                   num_blocks=result["model_info"]["blocks"], removed_blocks=[])
    row.update(eval_s=time.perf_counter() - t, total_s=time.perf_counter() - start, model_path=model_path,
               status="completed")
    out = {"row": row, "metrics": metric_rows(result)}
    write_json_atomic(done, out)
    return out


def trial_scale(cfg: SweepConfig) -> ScaleConfig:
    """The Ray Train scale of a trial's retraining: the config's resources (a ScaleConfig) without their rest."""
    return cfg.resources.worker_scale()


def _retrain(cfg: SweepConfig, spec: TrialSpec, pruned: str, out: str, worker_env: dict[str, str] | None) -> int:
    """Heal with a nested Ray Train run named after the trial (re-running it resumes from its checkpoints)."""
    from shortened.training.retrain import retrain

    final = Path(out) / "retraining.json"
    if not final.is_file():
        r = cfg.resources
        retrain(pruned, out, cfg.train.model_copy(update={"method": spec.method, "save_dtype": cfg.save_dtype,
                                                     "attn_implementation": cfg.attn_implementation}),
                scale=trial_scale(cfg),
                storage_path=str(cfg.experiment_dir() / "train"), name=spec.key, max_failures=r.max_failures,
                overwrite=True, worker_env=worker_env, workers_hint="resources.workers_per_trial:")
    record = json.loads(final.read_text())
    if "tokens_trained_total" in record:  # every phase (cpt+lora: CPT and LoRA)
        return int(record["tokens_trained_total"])
    phases = [final]
    if spec.method == "cpt+lora":  # the CPT phase exported beside the runs (see training.retrain.phases_for)
        phases.append(cfg.experiment_dir() / "train" / f"{spec.key}-cpt" / "model" / "retraining.json")
    return sum(int((json.loads(p.read_text()).get("history") or [{}])[-1].get("tokens", 0)) for p in phases)
