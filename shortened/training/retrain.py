"""The Ray layer of retraining: one ``TorchTrainer`` run per phase (``cpt+lora`` is two), resumable by name.

Everything that can be checked before workers start is checked here, once, at entry: local paths (model, teacher,
data, output, storage) are made absolute, the model folder must hold a config, weights and a tokenizer, the teacher
must be readable, the data source must list, the output folder must be free, the run name must not belong to another
retraining (see :mod:`~shortened.training.identity`; another worker count, or an elastic ``workers`` range, must split
the run's global batch evenly), the cluster must answer, every
node must share the storage path, and the cluster must be able to place the workers (these last three once per
driver: a caller that checked them, such as a sweep, says so with ``checked``). The worker scale is
:class:`shortened.cluster.ScaleConfig`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from shortened import storage
from shortened.cluster import ClusterChecked, ScaleConfig, check_job_paths, check_shared_storage, connect
from shortened.errors import ShortenedError
from shortened.host_memory import allocator_env, mmap_threshold
from shortened.io import check_output
from shortened.pruning import PRUNING_JSON
from shortened.training import identity
from shortened.training.config import TrainConfig
from shortened.training.deepspeed_config import phase_mmap_threshold
from shortened.training.loop import Phase, train_worker

log = logging.getLogger(__name__)


@dataclass
class RetrainResult:
    model_dir: str
    metrics: dict
    phases: list[dict] = field(default_factory=list)


def phases_for(model: str, out: str, cfg: TrainConfig, storage_path: str, name: str,
               teacher: str | None = None) -> list[Phase]:
    """``cpt+lora`` is CPT exported to ``{storage}/{name}-cpt/model``, then LoRA on it; others one phase."""
    if cfg.method == "cpt+lora":
        mid = str(cpt_export(storage_path, name))
        return [Phase(method="cpt", model=model, out=mid, tokens=cfg.train_tokens, train=cfg, run=f"{name}-cpt"),
                Phase(method="lora", model=mid, out=out, tokens=cfg.lora.train_tokens or cfg.train_tokens,
                      train=cfg, run=f"{name}-lora", earlier=[mid])]
    if cfg.method == "distill":
        return [Phase(method="distill", model=model, out=out, tokens=cfg.train_tokens, train=cfg, run=name,
                      teacher=teacher or find_teacher(model, cfg))]
    return [Phase(method=cfg.method, model=model, out=out, tokens=cfg.train_tokens, train=cfg, run=name)]


def cpt_export(storage_path: str | Path, name: str):
    """Where ``cpt+lora``'s CPT phase exports the model its LoRA phase starts from: beside the runs (a Path, or a
    UPath when the storage is an object store)."""
    return storage.path(storage_path) / f"{name}-cpt" / "model"


def find_teacher(model: str, cfg: TrainConfig) -> str:
    """The unpruned model: ``distill.teacher``, else the ``model`` recorded in the pruned folder's pruning.json."""
    if cfg.distill.teacher:
        return cfg.distill.teacher
    plan = Path(model) / PRUNING_JSON
    if plan.is_file():
        teacher = json.loads(plan.read_text()).get("model")
        if teacher:
            return teacher
    raise ShortenedError(f"distill needs a teacher: set distill.teacher, or prune {model} with shortened so its "
                         f"{PRUNING_JSON} names the original model")


# -- checks and path resolution at entry ----------------------------------------------------------------------------

def is_local_source(source: str) -> bool:
    """A data source that is a local path (not the alias, a hub dataset or an fsspec URL)."""
    from shortened.data.config import SLIMPAJAMA_SAMPLE

    return source != SLIMPAJAMA_SAMPLE and not source.startswith("hf:") and "://" not in source


def absolute_data(cfg: TrainConfig) -> TrainConfig:
    """The config with a local data source (file, folder or glob) made absolute, as the workers must see it."""
    src = cfg.data.source
    if not is_local_source(src):
        return cfg
    resolved = os.path.abspath(os.path.expanduser(src))
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": resolved})})


def check_model_folder(model: str, what: str = "--model") -> None:
    """A HF model folder the workers can load: config.json, weight files and a tokenizer (one at an object-store URL
    is checked in this node's cache copy: it must be a complete published folder)."""
    if storage.is_url(model):
        try:
            model = str(storage.local_copy(model))
        except ShortenedError as exc:
            raise ShortenedError(f"{what} {exc}") from exc
    p = Path(model)
    if not (p / "config.json").is_file():
        raise ShortenedError(f"{what} {model!r}: not a Hugging Face model folder (no config.json); prune or "
                             "materialize the model first")
    if not any(f.is_file() and f.name.endswith(identity.WEIGHT_SUFFIXES) for f in p.iterdir()):
        raise ShortenedError(f"{what} {model!r}: the folder has config.json but no weight files (*.safetensors, "
                             "*.bin); save the model with save_pretrained")
    from shortened.models import load_tokenizer

    try:
        load_tokenizer(model)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise ShortenedError(f"{what} {model!r}: no usable tokenizer in the folder (training tokenizes the data "
                             f"with the model's tokenizer): {exc}") from exc


def resolve_teacher(spec: str, where: str) -> str:
    """A distillation teacher as the workers will load it: a local folder or .gguf made absolute (and checked), the
    ``smollm2`` alias as is, or a hub id whose config is readable from here."""
    from shortened.models import SMOLLM2_ALIAS, resolve_source

    if spec == SMOLLM2_ALIAS:
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        absolute = str(path.resolve())
        src = resolve_source(absolute)
        if not src.gguf_file:
            check_model_folder(absolute, f"distill teacher ({where})")
        return absolute
    try:
        src = resolve_source(spec)
    except ShortenedError as exc:
        raise ShortenedError(f"distill teacher {spec!r} ({where}): {exc} (relative paths are taken from "
                             f"{os.getcwd()})") from exc
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(src.path)
    except Exception as exc:  # noqa: BLE001
        raise ShortenedError(f"distill teacher {spec!r} ({where}) is no local path (relative to {os.getcwd()}) and "
                             f"not a readable hub model: {exc}") from exc
    return spec


def check_inputs(model: str, out: str, cfg: TrainConfig, overwrite: bool) -> None:
    from shortened.data import DocumentStream
    mmap_threshold()  # a bad $SHORTENED_MALLOC_MMAP_THRESHOLD fails here, not in every worker
    check_model_folder(model)
    if cfg.method == "partial":  # partial_blocks within the model's blocks, before any worker starts
        from shortened.training.partial import check_partial_model

        check_partial_model(str(storage.local_copy(model)) if storage.is_url(model) else model, cfg.partial_blocks)
    DocumentStream(cfg.data)  # resolves the source: a missing path or an empty glob fails here
    if storage.is_url(out):
        check_output(out, kind="dir", overwrite=overwrite, flag="output folder", create=False)
        return
    o = Path(out)
    if o.exists() and any(o.iterdir()) and not overwrite:
        raise ShortenedError(f"output folder {out!r} is not empty (use --overwrite to replace it)")


def run_records(phases: list[Phase], scale: ScaleConfig) -> list[dict]:
    """The identity record of each phase's Ray Train run (a later phase's model is the earlier phase's output, so
    its fingerprint is the earlier run's identity)."""
    records: list[dict] = []
    for phase in phases:
        if records and phase.model == phases[len(records) - 1].out:
            fp = f"output of run {records[-1]['run']} ({identity.digest(records[-1])})"
        else:
            fp = identity.model_fingerprint(phase.model)
        teacher_fp = None
        if phase.teacher and Path(phase.teacher).exists():
            teacher_fp = identity.model_fingerprint(phase.teacher)
        records.append({"run": phase.run, "model": phase.model, "model_fingerprint": fp, "method": phase.method,
                        "teacher": phase.teacher, "teacher_fingerprint": teacher_fp, "tokens": phase.tokens,
                        "train": phase.train.model_dump(mode="json"), "num_workers": scale.num_workers,
                        "workers": list(scale.workers) if scale.workers else None})
    return records


def retrain(model: str, out: str, cfg: TrainConfig, *, scale: ScaleConfig | None = None, storage_path: str,
            name: str, max_failures: int = 0, overwrite: bool = False, teacher: str | None = None,
            worker_env: dict[str, str] | None = None, address: str | None = None,
            workers_hint: str = "--workers", checked: ClusterChecked | None = None,
            callbacks: list | None = None) -> RetrainResult:
    """Run every phase with Ray Train; re-running with the same ``name`` and ``storage_path`` resumes (only the same
    retraining: anything else is refused before workers start; another worker count continues the run exactly, if
    it splits the global batch evenly). ``checked``: what the caller already verified about the cluster (a sweep's
    driver, once for every trial); when it covers this storage path and scale, the connection, placement and
    shared-storage checks are not run again. ``callbacks``: Ray Train ``UserCallback``s of every phase's run (a
    sweep trial's forwards validation reports to Tune)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scale = scale or ScaleConfig()
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise ShortenedError(f"bad retrain setting max_failures (--max-failures): needs an integer >= 0 "
                             f"(got {max_failures!r})")
    if not name or "/" in name or name in (".", ".."):
        raise ShortenedError(f"bad run name {name!r}: it names a folder under the storage path")
    check_job_paths(out=out, storage_path=storage_path)
    model, out, storage_path = (storage.absolute(p) for p in (model, out, storage_path))  # URLs stay URLs
    cfg = absolute_data(cfg)
    checked_here = checked is not None and checked.covers(storage_path, scale)
    if storage.is_url(storage_path) and not checked_here:  # the store answers, before anything in it is read
        storage.check_writable(storage_path)  # (every node reaches an object store as the driver does)
    check_inputs(model, out, cfg, overwrite)
    if cfg.method == "distill":
        where = "--teacher" if teacher else ("distill.teacher" if cfg.distill.teacher else f"{model}/{PRUNING_JSON}")
        teacher = resolve_teacher(teacher or find_teacher(model, cfg), where)
    phases = phases_for(model, out, cfg, storage_path, name, teacher)
    # the global batch is fixed per run (a resume with another worker count keeps its checkpoint's): each worker
    # count of the run must split it evenly, which is checked here, before any worker starts
    phases = [p.model_copy(update={"train": p.train.model_copy(update={"global_batch_size": identity.run_global_batch(
        storage.path(storage_path) / p.run, p.train, scale.max_workers)})}) for p in phases]
    records = run_records(phases, scale)
    for phase, record in zip(phases, records):
        identity.check_run(storage.path(storage_path) / phase.run, record, workers_hint)
        identity.check_worker_split(phase.run, phase.train, range(scale.min_workers, scale.max_workers + 1),
                                    workers_hint)
    if not checked_here:
        connect(address)
        scale.check_placement()
        if not storage.is_url(storage_path):
            check_shared_storage(storage_path)
    ray_storage = ({"storage_path": storage_path} if not storage.is_url(storage_path) else
                   dict(zip(("storage_filesystem", "storage_path"), storage.pyarrow_filesystem(storage_path))))
    worker_env = {**storage.worker_env(), **(worker_env or {})}
    decide_in = {**os.environ, **worker_env}  # a sweep's trial: the sweep driver's host-memory variables
    results = []
    for phase, record in zip(phases, records):
        identity.write_record(storage.path(storage_path) / phase.run, record)
        # a ZeRO-3 or offloading phase's workers return freed host memory to the OS (set as each process starts)
        env = {**worker_env, **allocator_env(phase_mmap_threshold(phase.train, phase.method, decide_in), decide_in)}
        trainer = TorchTrainer(
            train_worker, train_loop_config=phase.model_dump(),
            scaling_config=ScalingConfig(
                num_workers=scale.ray_num_workers, use_gpu=scale.use_gpu,
                resources_per_worker=scale.worker_bundle(),
                placement_strategy=scale.placement_strategy),
            run_config=RunConfig(name=phase.run, **ray_storage,
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 callbacks=callbacks or None,
                                 worker_runtime_env={"env_vars": env} if env else None))
        result = trainer.fit()
        if result.error:
            raise result.error
        results.append({"phase": phase.method, "run": phase.run, "metrics": result.metrics,
                        "checkpoint": result.checkpoint.path if result.checkpoint else None})
    return RetrainResult(model_dir=out, metrics=results[-1]["metrics"], phases=results)
