"""Every check a sweep makes, run once by its driver before Ray Tune starts, so that what would fail inside a trial
(minutes or hours in) fails in seconds, with a named error, and nothing written:

    before anything is written   :func:`before_writing`: the model, teacher, data and eval sets; the block counts
                                 against the keep rule; a new name is new, a resumed experiment the same config
    before the lock              :func:`before_lock`: the driver can write the storage path
    under the experiment lock    :func:`under_lock`: the experiment again; a resumed trial's checkpoints and the
                                 worker count that wrote them
    on the Ray cluster           :func:`on_cluster`: every node shares the storage path, a trial's workers and
                                 task can be placed, how many trials run at once

:func:`on_cluster` returns a :class:`Preflight`, which travels to every trial: its retraining is told what the driver
checked (``retrain(checked=...)``) and does not probe the cluster again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from shortened.cluster import (ClusterChecked, check_driver_writable, check_job_paths, check_placement,
                               check_shared_storage, cluster_capacity)
from shortened import storage
from shortened.errors import ShortenedError
from shortened.sweep.config import SweepConfig, resolve_local_paths

# the parts of a config a resumed sweep may change (where and how fast it runs, how it selects, where it reports)
RESUMABLE_CHANGES = {"resources", "selection", "store_url", "tracking"}


@dataclass(frozen=True)
class Preflight:
    """What the driver established before any trial started."""

    max_blocks: int  # blocks the sweep removes at most (the shared scores go that deep)
    concurrency: int  # trials at a time
    cluster: ClusterChecked  # what a trial's retraining need not check again


def retrains(cfg: SweepConfig) -> bool:
    return any(m != "none" for m in cfg.methods)


def resolve_paths(cfg: SweepConfig) -> SweepConfig:
    """The config as the driver runs it: every local path absolute (``storage_path`` only after the check that it
    is not relative inside a Ray job, where it would vanish with the job's temporary working dir)."""
    check_job_paths(storage_path=cfg.storage_path)
    return resolve_local_paths(cfg.model_copy(update={"storage_path": storage.absolute(cfg.storage_path)}))


# -- before anything is written --------------------------------------------------------------------------------------

def before_writing(cfg: SweepConfig, resume: bool) -> int:
    """The inputs, the block counts and the experiment folder; returns the most blocks any trial removes."""
    if storage.is_url(cfg.storage_path):  # the store answers, before the experiment folder in it is read
        storage.check_writable(cfg.storage_path, "storage_path")
    check_inputs(cfg)
    n_remove_max = max_blocks(cfg)
    check_experiment(cfg, resume)
    return n_remove_max



def check_inputs(cfg: SweepConfig) -> None:
    """Fail in seconds on what would otherwise fail inside a trial: the model, data, eval sets."""
    from shortened.data import DocumentStream
    from shortened.evaluation.perplexity import PPL_DATASETS
    from shortened.evaluation.zeroshot import TASKS
    from shortened.models import resolve_source
    from shortened.paths import shared_data_dir

    check_devices(cfg)
    src = resolve_source(cfg.model, cfg.gguf_file)
    if not src.gguf_file and Path(src.path).is_dir():
        from shortened.training.identity import WEIGHT_SUFFIXES

        if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in Path(src.path).iterdir()):
            raise ShortenedError(f"model {cfg.model!r}: the folder has config.json but no weight files "
                                 "(*.safetensors, *.bin)")
    if "distill" in cfg.methods and cfg.train.distill.teacher:
        from shortened.training.retrain import resolve_teacher

        resolve_teacher(cfg.train.distill.teacher, "train.distill.teacher")
    if retrains(cfg):
        from shortened.host_memory import mmap_threshold
        from shortened.training.identity import split_problem

        try:
            DocumentStream(cfg.train.data)
        except ShortenedError as exc:
            raise ShortenedError(f"train.data: {exc}") from exc
        mmap_threshold()  # a bad $SHORTENED_MALLOC_MMAP_THRESHOLD, named before scoring, not in every trial
        r = cfg.resources  # every worker count a trial may run on splits a new trial's global batch
        batch = cfg.train.global_batch(r.max_workers)
        problem = split_problem(batch, range(r.min_workers, r.max_workers + 1))
        if problem:
            raise ShortenedError(f"{r.workers_setting}: {problem}; choose worker counts that divide {batch}, or set "
                                 "train.global_batch_size to a multiple of each")
    if any(c != "magnitude" for c in cfg.criteria):
        try:
            DocumentStream(cfg.calibration.data_config())
        except ShortenedError as exc:
            raise ShortenedError(f"calibration: {exc}") from exc
    data = shared_data_dir()
    local = [(f"eval.ppl {d}", PPL_DATASETS[d].local) for d in cfg.eval.ppl if cfg.eval.ppl_source == "local"]
    local += [(f"eval.tasks {t}", TASKS[t].local) for t in cfg.eval.tasks if cfg.eval.tasks_source == "local"]
    for what, rel in local:
        if data is None or not (data / rel).exists():
            raise ShortenedError(f"{what}: local file {rel} not found under {data or '../shared/data'} "
                                 "(set SHORTENED_DATA_DIR, or use the hub source)")


def check_devices(cfg: SweepConfig) -> None:
    """The device and attention kernel the trials' tasks will use, checked where the driver can tell: tasks get
    GPUs only with ``resources.use_gpu``, so ``device: cuda`` or a flash-attention kernel without it would fail in
    every task; without GPUs they run where the driver could (this machine's packages and CUDA are checked)."""
    from shortened.device import ATTN_AUTO, resolve_attn_implementation, resolve_device, resolve_dtype

    gpus = cfg.resources.use_gpu
    if cfg.device.startswith("cuda") and not gpus:
        raise ShortenedError(f"device {cfg.device!r}: the trials' tasks get no GPU unless resources.use_gpu is true")
    if not gpus:
        try:
            resolve_device(cfg.device)
        except ShortenedError as exc:
            raise ShortenedError(f"device: {exc}") from exc
    if cfg.attn_implementation == ATTN_AUTO:
        return
    if cfg.attn_implementation.startswith("flash") and not gpus:
        raise ShortenedError(f"attn_implementation {cfg.attn_implementation!r} needs GPUs, but resources.use_gpu is "
                             "false (the trials run on CPUs): use auto or sdpa")
    if not gpus:  # the tasks run on CPUs like this one: the same check they would make
        device = resolve_device(cfg.device)
        for option in {cfg.dtype, cfg.score_dtype or cfg.dtype}:
            resolve_attn_implementation(cfg.attn_implementation, device, resolve_dtype(option, device))
    elif cfg.attn_implementation.startswith("flash") and "float32" in {cfg.dtype, cfg.score_dtype}:
        raise ShortenedError(f"attn_implementation {cfg.attn_implementation!r} runs in float16/bfloat16 only, but "
                             f"dtype/score_dtype is float32")


def max_blocks(cfg: SweepConfig) -> int:
    """Blocks the sweep removes at most (bisect: all the keep rule allows), from the model's config on the meta device:
    no weights are read, and a ratio or count the keep rule forbids fails here, before anything starts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from shortened.blocks import find_blocks
    from shortened.models import resolve_source
    from shortened.pruning import allowed_blocks, resolve_block_count

    src = resolve_source(cfg.model, cfg.gguf_file)
    try:
        config = AutoConfig.from_pretrained(src.path, **src.from_pretrained_kwargs())
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as exc:
        raise ShortenedError(f"model {cfg.model!r}: cannot read its config: {exc}") from exc
    n_blocks = len(find_blocks(skeleton))
    allowed = len(allowed_blocks(n_blocks, cfg.keep_first, cfg.keep_last))
    if cfg.search == "bisect":
        most = allowed
    else:
        counts = [resolve_block_count(skeleton, ratio=r, blocks=None, keep_first=cfg.keep_first,
                                      keep_last=cfg.keep_last) for r in cfg.ratios or []]
        counts += [resolve_block_count(skeleton, ratio=None, blocks=b, keep_first=cfg.keep_first,
                                       keep_last=cfg.keep_last) for b in cfg.blocks or []]
        most = max(counts)
    if "partial" in cfg.methods:  # the most pruned model must still have the blocks partial trains
        from shortened.training.partial import check_partial_blocks

        try:
            check_partial_blocks(cfg.train.partial_blocks, n_blocks - most,
                                 f"the most pruned model ({most} of {n_blocks} removed)")
        except ShortenedError as exc:
            raise ShortenedError(f"train.{exc}") from None
    return most


def _config_diff(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))


def check_experiment(cfg: SweepConfig, resume: bool) -> None:
    """From the experiment folder alone, before Ray starts: a new sweep must not reuse a name; a resumed one must
    exist and keep everything its results depend on."""
    layout = cfg.layout
    saved = layout.sweep_json
    if not resume and saved.exists():
        raise ShortenedError(f"experiment {cfg.name!r} already exists ({saved}); use --resume to continue it, or "
                             "choose another name")
    if resume:
        if not saved.exists():
            raise ShortenedError(f"--resume: no experiment {cfg.name!r} at {layout.root} (no {saved.name})")
        old = json.loads(saved.read_text())
        try:  # a config saved before paths were made absolute: resolve it the way that run did, from here
            old = resolve_local_paths(SweepConfig.model_validate(old)).model_dump(mode="json")
        except ValueError:
            pass
        diff = _config_diff(old, cfg.model_dump(mode="json"))
        if diff:
            raise ShortenedError(f"--resume: the config of {cfg.name!r} changed in {', '.join(diff)}; only "
                                 f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume")


# -- before the lock, and under it -----------------------------------------------------------------------------------

def before_lock(cfg: SweepConfig) -> None:
    """The driver can create and write the storage path (a path below a file is named, not a mkdir traceback; an
    object store was checked before anything was read from it, in :func:`before_writing`)."""
    if not storage.is_url(cfg.storage_path):
        check_driver_writable(cfg.storage_path)


def under_lock(cfg: SweepConfig, resume: bool) -> None:
    """Now that no other driver can change the experiment: check it again, and a resumed trial's checkpoints."""
    check_experiment(cfg, resume)
    if resume and retrains(cfg):
        check_train_runs(cfg)


def check_train_runs(cfg: SweepConfig) -> None:
    """An unfinished trial's Ray Train run resumes with any worker count that splits its global batch evenly
    (the data order is global and the optimizer state is resharded on load), so a resumed config with another
    ``resources.workers_per_trial`` (or ``workers`` range) continues it; a count that cannot split some run's
    global batch is refused here, naming the runs and their global batches."""
    from shortened.training.identity import has_checkpoints, read_record, run_global_batch, split_problem

    layout = cfg.layout
    if not layout.train.exists():
        return
    r = cfg.resources
    workers = range(r.min_workers, r.max_workers + 1)
    bad = []
    for run_dir in sorted(d for d in layout.train.iterdir() if d.is_dir()):
        keys = {run_dir.name, run_dir.name.rsplit("-", 1)[0]}  # cpt+lora trials run KEY-cpt and KEY-lora
        if any(layout.result_json(k).is_file() for k in keys) or not has_checkpoints(run_dir):
            continue
        try:
            read_record(run_dir)
            problem = split_problem(run_global_batch(run_dir, cfg.train, r.max_workers), workers)
        except ShortenedError:
            continue  # judged (and refused) by the trial's own retrain check
        if problem:
            bad.append(f"{run_dir.name}: {problem}")
    if bad:
        raise ShortenedError(
            f"experiment {cfg.name!r}: unfinished trials cannot resume with {r.workers_setting}: {'; '.join(bad)}; "
            f"choose a worker count that divides their global batch, or delete those runs under {layout.train} to "
            "restart their training")


# -- on the Ray cluster ----------------------------------------------------------------------------------------------

def on_cluster(cfg: SweepConfig, n_remove_max: int) -> Preflight:
    """Once Ray is up: shared storage on every node (an object store was checked from the driver: nodes reach it the
    same way), placement per node, and the concurrency."""
    if not storage.is_url(cfg.storage_path):
        check_shared_storage(cfg.storage_path)
    check_trial_fits(cfg)
    return Preflight(max_blocks=n_remove_max, concurrency=concurrency(cfg, cluster_capacity()),
                     cluster=ClusterChecked(cfg.storage_path, cfg.resources.worker_scale()))


def check_trial_fits(cfg: SweepConfig) -> None:
    """Per node, not just in total: a trial's training workers (with their placement strategy) and its prune/evaluate
    task must each be placeable, or Ray would wait for them forever."""
    r = cfg.resources
    if retrains(cfg):
        r.check_placement()
    check_placement(1, {"CPU": r.task_cpu, "GPU": r.task_gpu})


def concurrency(cfg: SweepConfig, cluster: dict) -> int:
    """How many trials run at once: the config's, else as many trial peaks as the cluster's CPUs/GPUs fit."""
    cpu, gpu = cfg.resources.trial_peak()
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if cpu > have_cpu + 1e-9 or gpu > have_gpu + 1e-9:
        raise ShortenedError(f"one trial needs {cpu:g} CPUs and {gpu:g} GPUs at its peak (resources: driver + "
                             f"workers_per_trial × per-worker); the Ray cluster has {have_cpu:g} CPUs and "
                             f"{have_gpu:g} GPUs")
    fit = math.floor(have_cpu / cpu + 1e-9)
    if gpu > 0:
        fit = min(fit, math.floor(have_gpu / gpu + 1e-9))
    if cfg.resources.max_concurrent_trials:
        return cfg.resources.max_concurrent_trials
    return max(1, fit)
