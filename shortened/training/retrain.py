"""The Ray layer of retraining: one ``TorchTrainer`` run per phase (``cpt+lora`` is two), resumable by name.

Everything that can be checked before workers start is checked here: the model folder, the data source (a
missing path or empty glob), the output folder, the cluster address, whether every node shares the storage path, and
whether the cluster can ever place the workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shortened.cluster import check_job_paths, check_placement, check_shared_storage, connect
from shortened.errors import ShortenedError
from shortened.training.config import TrainConfig
from shortened.training.loop import Phase, train_worker

log = logging.getLogger(__name__)


@dataclass
class ScaleConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1
    gpus_per_worker: float = 1
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


@dataclass
class RetrainResult:
    model_dir: str
    metrics: dict
    phases: list[dict] = field(default_factory=list)


def phases_for(model: str, out: str, cfg: TrainConfig, storage_path: str, name: str,
               teacher: str | None = None) -> list[Phase]:
    """``cpt+lora`` is CPT exported to ``{storage}/{name}-cpt/model``, then LoRA on it; others one phase."""
    if cfg.method == "cpt+lora":
        mid = str(Path(storage_path) / f"{name}-cpt" / "model")
        return [Phase(method="cpt", model=model, out=mid, tokens=cfg.train_tokens, train=cfg),
                Phase(method="lora", model=mid, out=out, tokens=cfg.lora.train_tokens or cfg.train_tokens,
                      train=cfg)]
    if cfg.method == "distill":
        return [Phase(method="distill", model=model, out=out, tokens=cfg.train_tokens, train=cfg,
                      teacher=teacher or find_teacher(model, cfg))]
    return [Phase(method=cfg.method, model=model, out=out, tokens=cfg.train_tokens, train=cfg)]


def find_teacher(model: str, cfg: TrainConfig) -> str:
    """The unpruned model: ``distill.teacher``, else the ``model`` recorded in the pruned folder's pruning.json."""
    import json

    if cfg.distill.teacher:
        return cfg.distill.teacher
    plan = Path(model) / "pruning.json"
    if plan.is_file():
        teacher = json.loads(plan.read_text()).get("model")
        if teacher:
            return teacher
    raise ShortenedError(f"distill needs a teacher: set distill.teacher, or prune {model} with shortened so its "
                         "pruning.json names the original model")


def check_inputs(model: str, out: str, cfg: TrainConfig, overwrite: bool) -> None:
    from shortened.data import DocumentStream

    if not (Path(model) / "config.json").is_file():
        raise ShortenedError(f"--model {model!r}: not a Hugging Face model folder (no config.json); prune or "
                             "materialize the model first")
    DocumentStream(cfg.data)  # resolves the source: a missing path or an empty glob fails here
    o = Path(out)
    if o.exists() and any(o.iterdir()) and not overwrite:
        raise ShortenedError(f"output folder {out!r} is not empty (use --overwrite to replace it)")


def worker_bundle(scale: ScaleConfig) -> dict[str, float]:
    return {"CPU": scale.cpus_per_worker, **({"GPU": scale.gpus_per_worker} if scale.use_gpu else {})}


def retrain(model: str, out: str, cfg: TrainConfig, *, scale: ScaleConfig | None = None, storage_path: str,
            name: str, max_failures: int = 0, overwrite: bool = False, teacher: str | None = None,
            worker_env: dict[str, str] | None = None, address: str | None = None) -> RetrainResult:
    """Run every phase with Ray Train; re-running with the same ``name`` and ``storage_path`` resumes."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scale = scale or ScaleConfig()
    check_job_paths(out=out, storage_path=storage_path)
    model, out, storage_path = (str(Path(p).expanduser().resolve()) for p in (model, out, storage_path))
    check_inputs(model, out, cfg, overwrite)
    connect(address)
    check_placement(scale.num_workers, worker_bundle(scale), scale.placement_strategy)
    check_shared_storage(storage_path)
    phases = phases_for(model, out, cfg, storage_path, name, teacher)
    results = []
    for phase in phases:
        run_name = name if len(phases) == 1 else f"{name}-{phase.method}"
        trainer = TorchTrainer(
            train_worker, train_loop_config=phase.model_dump(),
            scaling_config=ScalingConfig(
                num_workers=scale.num_workers, use_gpu=scale.use_gpu,
                resources_per_worker=worker_bundle(scale),
                placement_strategy=scale.placement_strategy),
            run_config=RunConfig(name=run_name, storage_path=storage_path,
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 worker_runtime_env={"env_vars": worker_env} if worker_env else None))
        result = trainer.fit()
        if result.error:
            raise result.error
        results.append({"phase": phase.method, "run": run_name, "metrics": result.metrics,
                        "checkpoint": result.checkpoint.path if result.checkpoint else None})
    return RetrainResult(model_dir=out, metrics=results[-1]["metrics"], phases=results)
