"""What a sweep runs: one YAML validated into :class:`SweepConfig` before anything starts.

A sweep is the grid criteria × amounts (ratios or block counts) × methods, plus the dense baseline evaluated once,
or a bisection over the block count (``search: bisect``). Each trial prunes, retrains, evaluates and is written to
the results store; a selection policy then picks the trial to ship.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, get_args

from pydantic import (BaseModel, ConfigDict, Field, field_serializer, field_validator, model_serializer,
                      model_validator)

from shortened.cluster import ScaleConfig, WorkerCount
from shortened.criteria import CRITERIA, TaskCriterionConfig
from shortened.data.calibration import CalibrationConfig
from shortened.evaluation import EvalConfig
from shortened.pruning import KEEP_FIRST, KEEP_LAST
from shortened.sweep.layout import ExperimentLayout
from shortened.training.config import Method, TrainConfig

# the retraining methods (training.config.Method), or none: prune and evaluate without retraining
SweepMethod = Literal["none", Method]
SWEEP_METHODS: tuple[str, ...] = get_args(SweepMethod)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class Resources(ScaleConfig):
    """Per-trial resources: the worker scale of the trial's retraining (:class:`~shortened.cluster.ScaleConfig`,
    whose ``num_workers`` is spelled ``workers_per_trial`` here), plus what the rest of a trial holds. A trial's
    driver holds ``driver_cpus`` for its whole life; its Ray Train workers, and its prune/evaluate task, take the
    rest, one at a time. Concurrency defaults to what the cluster fits."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True)
    __init__ = BaseModel.__init__  # a bad value is located in the sweep config (resources.FIELD), not re-raised

    num_workers: WorkerCount = Field(1, alias="workers_per_trial")
    """Ray Train workers of each trial's retraining."""
    task_cpus: float | None = Field(None, gt=0)
    """CPUs of a trial's prune/evaluate task (default: a worker's CPUs)."""
    task_gpus: float | None = Field(None, ge=0)
    """GPUs of a trial's prune/evaluate task (default: one worker's GPUs when use_gpu)."""
    driver_cpus: float = Field(0.05, gt=0, le=1)
    """CPUs the Tune trial itself holds (it only waits on its tasks)."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials at once (default: as many as the cluster fits)."""
    max_failures: int = Field(0, ge=0)
    """Restarts of a trial's Ray Train workers (from the last checkpoint), and retries of a trial whose driver died
    with its node (finished stages are kept; training resumes from its checkpoint)."""

    @model_serializer(mode="wrap")
    def _yaml_names(self, handler) -> dict:
        """Dumped (sweep.json, the store) with the names the YAML uses."""
        return {("workers_per_trial" if k == "num_workers" else k): v for k, v in handler(self).items()}

    @property
    def workers_field(self) -> str:
        """The setting that gives a trial's worker count, as the YAML names it (for messages)."""
        return "resources.workers" if self.workers else "resources.workers_per_trial"

    @property
    def workers_setting(self) -> str:
        """That setting and its value, e.g. ``resources.workers [1, 4]`` (for messages)."""
        return f"{self.workers_field} {list(self.workers) if self.workers else self.num_workers}"

    @property
    def task_cpu(self) -> float:
        return self.task_cpus if self.task_cpus is not None else self.cpus_per_worker

    @property
    def task_gpu(self) -> float:
        if self.task_gpus is not None:
            return self.task_gpus
        return self.gpus_per_worker if self.use_gpu else 0.0

    def trial_peak(self) -> tuple[float, float]:
        """(CPUs, GPUs) one trial holds at its busiest: its driver plus its workers or its task."""
        cpu = self.driver_cpus + max(self.num_workers * self.cpus_per_worker, self.task_cpu)
        gpu = max(self.num_workers * self.gpus_per_worker if self.use_gpu else 0.0, self.task_gpu)
        return cpu, gpu


class Selection(BaseModel):
    """How the ratio to ship is chosen. ``metric`` is ``NAME:DATASET`` (``ppl:wikitext2``, ``acc:piqa``) or
    ``zeroshot_mean``; perplexity and latency are lower-better, accuracies higher-better."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    policy: Literal["max_ratio_within", "best_under_budget", "pareto"] = "max_ratio_within"
    """max_ratio_within: the largest ratio whose metric stays within tolerance_pct of the dense model's;
    best_under_budget: the best metric under max_params and/or max_latency_s; pareto: the knee of the frontier
    of ratio vs metric."""
    metric: str = "ppl:wikitext2"
    """NAME:DATASET (ppl:wikitext2, acc:piqa) or zeroshot_mean."""
    tolerance_pct: float = Field(50.0, ge=0)
    """max_ratio_within: the metric within this % of the dense baseline."""
    max_params: int | None = Field(None, ge=1)
    """best_under_budget: parameter budget."""
    max_latency_s: float | None = Field(None, gt=0)
    """best_under_budget: batch-1 latency budget in seconds (needs eval.speed)."""

    @model_validator(mode="after")
    def _budget(self) -> Selection:
        if self.policy == "best_under_budget" and self.max_params is None and self.max_latency_s is None:
            raise ValueError("best_under_budget needs max_params or max_latency_s")
        return self


# what a retraining trial reports while it trains (train.val_every_tokens), for a scheduler to act on
SCHEDULER_METRICS = ("val_ppl", "val_loss")


class Scheduler(BaseModel):
    """Early stopping of hopeless trials: Ray Tune's ASHAScheduler (asynchronous successive halving; Li et al.,
    2020, "A System for Massively Parallel Hyperparameter Tuning") on the held-out validation metric that
    retraining trials report every train.val_every_tokens tokens (``tokens`` is its time attribute). At each rung
    (grace_tokens × reduction_factor^k tokens) a trial whose metric is not in the best 1/reduction_factor of the
    trials that reached the rung is stopped: its row is ``stopped`` with its last validation metrics, and
    ``--resume`` does not run it again. Trials that do not retrain (dense, method none) report no validation metric
    and are never stopped."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: Literal["none", "asha"] = "none"
    """none: every trial runs to the end; asha: Ray Tune's ASHAScheduler."""
    metric: str = "val_ppl"
    """The reported metric ASHA compares: val_ppl or val_loss."""
    mode: Literal["min", "max"] = "min"
    """Whether lower (min) or higher (max) values of metric are better."""
    grace_tokens: int = Field(1, ge=1)
    """Tokens every trial trains before it can be stopped (ASHA's grace_period; less than train.train_tokens)."""
    reduction_factor: float = Field(3.0, gt=1)
    """Rungs are grace_tokens × reduction_factor^k tokens; a trial continues past a rung if its metric is in the
    best 1/reduction_factor of the trials seen there."""

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in SCHEDULER_METRICS:
            raise ValueError(f"{v!r} is not reported by trials while they train; use one of "
                             f"{', '.join(SCHEDULER_METRICS)}")
        return v


class MlflowSettings(BaseModel):
    """MLflow tracking: one run per trial (per retraining on ``retrain``); off unless ``tracking_uri`` is set."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    tracking_uri: str | None = None
    """MLflow tracking URI: a tracking server (http://HOST:5000), a database (sqlite:///mlflow.db, relative to the
    working directory; postgresql://…) or databricks; none: no MLflow runs."""
    experiment: str | None = Field(None, min_length=1, max_length=500)
    """MLflow experiment of the runs (created if missing; default: the sweep's name, or retrain's run name)."""

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from urllib.parse import urlparse

        v = v.strip()
        url = urlparse(v)
        if not v or (url.scheme in ("http", "https") and not url.hostname):
            raise ValueError(f"{v!r} is not a tracking URI (http://HOST:PORT, sqlite:///FILE.db, …)")
        return v

    @model_serializer(mode="wrap")
    def _masked(self, handler) -> dict:
        """Dumped (sweep.json, the store) with a password in the URI as ``***`` (:attr:`shown_uri`)."""
        return {**handler(self), "tracking_uri": self.shown_uri}

    @property
    def enabled(self) -> bool:
        return self.tracking_uri is not None

    @property
    def shown_uri(self) -> str | None:
        """The URI safe to show or save: a password in it (``https://user:secret@host``) as ``***``. MLflow reads a
        server's credentials from ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` instead."""
        from urllib.parse import urlsplit, urlunsplit

        url = urlsplit(self.tracking_uri or "")
        if not url.password:
            return self.tracking_uri
        return urlunsplit(url._replace(netloc=f"{url.username}:***@{url.netloc.rsplit('@', 1)[1]}"))


class TrackingConfig(BaseModel):
    """Experiment tracking: MLflow runs and TensorBoard event files (written by :mod:`shortened.tracking`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    """MLflow: one run per trial with its parameters and metrics, the selected trial tagged."""
    tensorboard: bool = True
    """TensorBoard event files of each training run (loss, LR, throughput by step) in its Ray Train run folder,
    RUN/tensorboard (a sweep: EXPERIMENT/train/KEY/tensorboard)."""


class SweepConfig(BaseModel):
    """A sweep: criteria × amounts × methods, each trial pruned, retrained, evaluated and stored."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str
    """The experiment's name (its folder is storage_path/name)."""
    model: str
    """The model to prune: hub id, HF folder, .gguf, or smollm2."""
    gguf_file: str | None = None
    """GGUF file name inside the model folder."""
    criteria: list[str] = Field(default_factory=lambda: ["ppl"])
    """Block-importance criteria to compare."""
    ratios: list[float] | None = None
    """Fractions of parameters to remove (rounded down to whole blocks)."""
    blocks: list[int] | None = None
    """Or block counts to remove."""
    methods: list[SweepMethod] = Field(default_factory=lambda: ["cpt"])
    """Retraining methods (none: prune and evaluate only)."""
    patch: list[Literal["none", "linear"]] = Field(default_factory=lambda: ["none"])
    """Seam patches to compare (a grid axis): none, or linear (the training-free least-squares map of ReplaceMe,
    fitted on the calibration set and fused into the kept block before each removed run; shortened.seam_patch)."""
    patch_ridge: float = Field(0.0, ge=0, allow_inf_nan=False)
    """Ridge term of the linear seam patch's fit, relative to the mean diagonal of MᵀM (0: plain least squares)."""
    patch_fit: Literal["relative", "lstsq"] = "relative"
    """Token weighting of the linear seam patch's fit: relative (each token's error relative to its target's norm,
    so the few massive-activation tokens do not dominate) or lstsq (plain least squares)."""
    patch_samples: int | None = Field(None, ge=1, le=1_000_000)
    """Calibration windows (of calibration.seq_len tokens) the seam patch is fitted on; None: enough for 16 tokens
    per hidden dimension, at least calibration.n_samples."""
    search: Literal["grid", "bisect"] = "grid"
    """grid: every criterion × amount × method; bisect: the largest block count that meets the selection."""
    keep_first: int = Field(KEEP_FIRST, ge=0)
    """The "+" rule: the first blocks, never removed (pruning.KEEP_FIRST)."""
    keep_last: int = Field(KEEP_LAST, ge=0)
    """The last blocks, never removed (pruning.KEEP_LAST)."""
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    """The calibration set of the criteria."""
    task_criterion: TaskCriterionConfig = Field(default_factory=TaskCriterionConfig)
    """The zero-shot sample of the task criterion (Minitron): task(s), items, batch size."""
    train: TrainConfig
    """Retraining (``method`` is set per trial)."""
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(ppl=["wikitext2"]))
    """What each trial evaluates."""
    resources: Resources = Field(default_factory=Resources)
    """Per-trial resources."""
    selection: Selection = Field(default_factory=Selection)
    """How the trial to ship is chosen."""
    scheduler: Scheduler = Field(default_factory=Scheduler)
    """Early stopping of hopeless trials (name: asha), or none."""
    storage_path: str = "runs"
    """Where experiment folders live: storage_path/name (on a cluster a shared path, or s3://bucket/prefix, gs://…)."""
    store_url: str | None = None
    """Results store (default: sqlite:///<experiment folder>/results.db), or postgresql+psycopg://user@host/db; give
    the password by PGPASSWORD, ~/.pgpass or ${VAR} in the URL: a literal one is saved masked."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment tracking: MLflow runs (one per trial) and TensorBoard event files of the training runs."""
    device: str = "auto"
    """Device of the prune/evaluate tasks."""
    dtype: str = "auto"
    """dtype of the prune/evaluate tasks (auto: bf16 on GPUs, fp32 on CPU)."""
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the pruned and the retrained checkpoints; auto: the source model's (its config.json dtype)."""
    score_dtype: str | None = None
    """The dtype block scores are computed in (None: dtype); float32 makes GPU and CPU sweeps score alike."""
    attn_implementation: str = "auto"
    """Attention kernel of scoring, evaluation and speed; auto: flash_attention_2 on CUDA when installed, else sdpa
    (eager if unsupported)."""

    @field_serializer("store_url")
    def _masked_store_url(self, url: str | None) -> str | None:
        """Dumped (sweep.json, the store's experiments.config) with a literal password masked."""
        from shortened.sweep.store import mask_url

        return mask_url(url)

    def __getstate__(self) -> dict:
        """Pickled (Ray tasks and actors, Tune's ``tuner.pkl`` through callbacks that hold the config) with a literal
        store password masked too: the secret stays in the driver's memory, where the only store writer runs."""
        from shortened.sweep.store import mask_url

        state = super().__getstate__()
        if self.store_url:
            state = {**state, "__dict__": {**state["__dict__"], "store_url": mask_url(self.store_url)}}
        return state

    @field_validator("storage_path", "model")
    @classmethod
    def _file_url(cls, v: str) -> str:
        """``file:///x`` is the local path ``/x``."""
        from shortened import storage

        return storage.local_path(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} must be letters, digits, '_', '-', '.' (it names a folder)")
        return v

    @field_validator("criteria")
    @classmethod
    def _criteria(cls, v: list[str]) -> list[str]:
        unknown = [c for c in v if c not in CRITERIA]
        if unknown or not v:
            raise ValueError(f"unknown criteria {unknown}; choose from {', '.join(CRITERIA)}")
        return list(dict.fromkeys(v))

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            bad = [r for r in v if not 0 < r < 1]
            if bad or not v:
                raise ValueError(f"ratios must be in (0, 1), got {bad or v}")
            return sorted(set(v))
        return v

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v or min(v) < 1:
                raise ValueError(f"block counts must be >= 1, got {v}")
            return sorted(set(v))
        return v

    @field_validator("dtype", "score_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        from shortened.device import check_dtype_name

        return v if v is None else check_dtype_name(v, "")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"at least one method ({', '.join(SWEEP_METHODS)})")
        return list(dict.fromkeys(v))

    @field_validator("patch")
    @classmethod
    def _patch(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one patch (none, linear)")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _shape(self) -> SweepConfig:
        if self.search == "grid" and (self.ratios is None) == (self.blocks is None):
            raise ValueError("a grid sweep needs exactly one of ratios or blocks")
        if self.search == "bisect":
            if len(self.criteria) != 1 or len(self.methods) != 1:
                raise ValueError("search: bisect searches one criterion and one method; got "
                                 f"criteria {self.criteria}, methods {self.methods}")
            if self.patch != ["none"]:
                raise ValueError(f"search: bisect searches unpatched models; patch {self.patch} needs search: grid")
            if self.selection.policy != "max_ratio_within":
                raise ValueError("search: bisect finds the largest block count for selection.policy "
                                 "max_ratio_within")
        metric_name = self.selection.metric.split(":")[0]
        if metric_name == "ppl":
            dataset = self.selection.metric.partition(":")[2]
            if dataset not in self.eval.ppl:
                raise ValueError(f"selection.metric {self.selection.metric!r} needs {dataset!r} in eval.ppl "
                                 f"(has {self.eval.ppl})")
        elif metric_name in ("zeroshot_mean", "acc", "acc_norm") and not self.eval.tasks:
            raise ValueError(f"selection.metric {self.selection.metric!r} needs eval.tasks")
        if self.selection.max_latency_s is not None and not self.eval.speed:
            raise ValueError("selection.max_latency_s needs eval.speed: true")
        if self.train.save_dtype != "auto":
            raise ValueError(f"train.save_dtype {self.train.save_dtype!r}: in a sweep, set save_dtype at the top "
                             "level (it applies to the pruned and the retrained checkpoints)")
        if self.train.attn_implementation != "auto":
            raise ValueError(f"train.attn_implementation {self.train.attn_implementation!r}: in a sweep, set "
                             "attn_implementation at the top level (it applies to scoring, training and evaluation)")
        self._check_scheduler()
        return self

    def _check_scheduler(self) -> None:
        """scheduler: asha needs a grid, validation reports (train.val_every_tokens, from a source with a
        validation split) and a grace period shorter than the token budget."""
        from shortened.training.validation import validation_source_error

        if self.scheduler.name == "none":
            return
        if self.search != "grid":
            raise ValueError(f"scheduler.name {self.scheduler.name!r} stops trials of a grid; search: "
                             f"{self.search} runs one trial at a time (use scheduler: {{name: none}})")
        if not self.train.val_every_tokens:
            raise ValueError(f"scheduler.name {self.scheduler.name!r} acts on {self.scheduler.metric}, which trials "
                             "report only with train.val_every_tokens set (e.g. val_every_tokens: 1024)")
        if self.scheduler.grace_tokens >= self.train.train_tokens:
            raise ValueError(f"scheduler.grace_tokens {self.scheduler.grace_tokens} must be less than "
                             f"train.train_tokens {self.train.train_tokens} (no trial could be stopped)")
        error = validation_source_error(self.train.data)
        if error:
            raise ValueError(f"scheduler.name {self.scheduler.name!r}: train.{error}")

    @property
    def layout(self) -> ExperimentLayout:
        """Every path of this experiment (its folder is ``storage_path/name``)."""
        return ExperimentLayout.of(self.storage_path, self.name)

    def resolved_store_url(self) -> str:
        return self.store_url or self.layout.store_url


def _absolute_if_local(spec: str | None) -> str | None:
    """A path that exists here (relative to the working directory) made absolute; anything else (an alias, a hub
    id, a URL) as it is. Trials and their Ray workers run elsewhere and must not resolve it again."""
    if not spec or "://" in spec or spec.startswith("hf:"):
        return spec
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def _absolute_source(source: str) -> str:
    """A data source: local paths (including globs, which need not exist as such) made absolute."""
    import os

    from shortened.data.config import SLIMPAJAMA_SAMPLE

    if source == SLIMPAJAMA_SAMPLE or source.startswith("hf:") or "://" in source:
        return source
    return os.path.abspath(os.path.expanduser(source))


def resolve_local_paths(cfg: SweepConfig) -> SweepConfig:
    """Every local path of the config made absolute once, where the sweep is started: the model, the training data,
    the distillation teacher and the calibration source (``storage_path`` is resolved by the runner, after the Ray
    job check). Idempotent."""
    train = cfg.train
    data = train.data.model_copy(update={"source": _absolute_source(train.data.source)})
    distill = train.distill.model_copy(update={"teacher": _absolute_if_local(train.distill.teacher)})
    calibration = cfg.calibration.model_copy(update={"source": _absolute_source(cfg.calibration.source)})
    return cfg.model_copy(update={"model": _absolute_if_local(cfg.model), "calibration": calibration,
                                  "train": train.model_copy(update={"data": data, "distill": distill})})


def load_sweep_config(path: str | Path, overrides: dict | None = None) -> SweepConfig:
    """Read and validate a sweep YAML; any problem is a ShortenedError naming the file and the field."""
    from shortened.errors import ShortenedError, validated
    from shortened.io import read_yaml

    path = Path(path)
    try:
        fields = read_yaml(path)
    except ShortenedError as exc:
        raise ShortenedError(f"sweep config {exc}") from exc
    if not isinstance(fields, dict):
        raise ShortenedError(f"sweep config {path}: expected a mapping of sweep fields, got {type(fields).__name__}")
    fields.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return resolve_local_paths(validated(SweepConfig, fields, f"sweep config {path}: field"))
