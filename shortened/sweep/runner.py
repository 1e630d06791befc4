"""The Ray layer of a sweep: shared block scores, one Tune trial per spec (or a bisection), the store callback,
the speed pass and the selection. Trials run :func:`shortened.sweep.trial.run_trial`; everything heavy is a Ray
task or a nested Ray Train run with the resources the config gives it."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray import tune

from shortened.cluster import (check_driver_writable, check_job_paths, check_placement, check_shared_storage,
                               cluster_capacity, connect)
from shortened.errors import Interrupted, ShortenedError
from shortened.io import write_json_atomic
from shortened.sweep.config import SweepConfig, resolve_local_paths
from shortened.sweep.lock import ExperimentLock
from shortened.sweep.selection import Choice, lower_is_better, metric_value, select, within
from shortened.sweep.store import ResultsStore
from shortened.sweep.trial import (DENSE, RESULT_JSON, TrialSpec, compute_scores, grid_specs, longest_first, run_trial,
                                   scores_path, speed_stage, trial_dir)

log = logging.getLogger(__name__)
SWEEP_JSON = "sweep.json"
SELECTION_JSON = "selection.json"
TIMINGS_JSON = "timings.json"  # wall time of this invocation's phases (the sweep benchmark reads it)
# the parts of a config a resumed sweep may change (where and how fast it runs, how it selects)
RESUMABLE_CHANGES = {"resources", "selection", "store_url"}


class SweepInterrupted(Interrupted):
    """The sweep stopped before every trial finished (Ctrl-C, a stop signal): nothing was selected."""


def resume_hint(cfg: SweepConfig) -> str:
    saved = cfg.experiment_dir() / SWEEP_JSON
    return (f"resume it with `shortened sweep CONFIG --resume` (the same config; it is saved as {saved}, so "
            f"`shortened sweep {saved} --resume` works too); finished trials are kept")


@dataclass
class SweepOutcome:
    name: str
    experiment_dir: Path
    store_url: str
    trials: list[dict]
    choice: Choice
    seconds: float
    ran: list[str]  # keys of the trials this invocation ran (not reused)
    concurrency: int = 1
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds: scores, trials, speed


# -- checks before anything starts ---------------------------------------------------------------------------------

def preflight(cfg: SweepConfig) -> None:
    """Fail in seconds on what would otherwise fail inside a trial: the model, data, eval sets, resources."""
    from shortened.data import DocumentStream
    from shortened.evaluation.perplexity import PPL_DATASETS
    from shortened.evaluation.zeroshot import TASKS
    from shortened.models import resolve_source
    from shortened.paths import shared_data_dir

    src = resolve_source(cfg.model, cfg.gguf_file)
    if not src.gguf_file and Path(src.path).is_dir():
        from shortened.training.identity import WEIGHT_SUFFIXES

        if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in Path(src.path).iterdir()):
            raise ShortenedError(f"model {cfg.model!r}: the folder has config.json but no weight files "
                                 "(*.safetensors, *.bin)")
    if "distill" in cfg.methods and cfg.train.distill.teacher:
        from shortened.training.retrain import resolve_teacher

        resolve_teacher(cfg.train.distill.teacher, "train.distill.teacher")
    if any(m != "none" for m in cfg.methods):
        try:
            DocumentStream(cfg.train.data)
        except ShortenedError as exc:
            raise ShortenedError(f"train.data: {exc}") from exc
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


def check_trial_fits(cfg: SweepConfig) -> None:
    """Per node, not just in total: a trial's training workers (with their placement strategy) and its prune/evaluate
    task must each be placeable, or Ray would wait for them forever."""
    r = cfg.resources
    if any(m != "none" for m in cfg.methods):
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


def _config_diff(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))


def check_experiment(cfg: SweepConfig, resume: bool) -> None:
    """From the experiment folder alone, before Ray starts: a new sweep must not reuse a name; a resumed one must
    exist and keep everything its results depend on."""
    saved = cfg.experiment_dir() / SWEEP_JSON
    if not resume and saved.exists():
        raise ShortenedError(f"experiment {cfg.name!r} already exists ({saved}); use --resume to continue it, or "
                             "choose another name")
    if resume:
        if not saved.exists():
            raise ShortenedError(f"--resume: no experiment {cfg.name!r} at {cfg.experiment_dir()} (no {SWEEP_JSON})")
        old = json.loads(saved.read_text())
        try:  # a config saved before paths were made absolute: resolve it the way that run did, from here
            old = resolve_local_paths(SweepConfig.model_validate(old)).model_dump(mode="json")
        except ValueError:
            pass
        diff = _config_diff(old, cfg.model_dump(mode="json"))
        if diff:
            raise ShortenedError(f"--resume: the config of {cfg.name!r} changed in {', '.join(diff)}; only "
                                 f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume")


def check_train_runs(cfg: SweepConfig) -> None:
    """Before any trial starts: an unfinished trial's Ray Train checkpoint resumes only with the worker count that
    wrote it (its ZeRO partitions and data cursors are per rank), so a resumed config with another
    ``resources.workers_per_trial`` is refused here, naming the count each checkpoint needs."""
    from shortened.training.identity import checkpoint_world_size, read_record

    train = cfg.experiment_dir() / "train"
    if not train.is_dir():
        return
    want = cfg.resources.num_workers
    bad = []
    for run_dir in sorted(d for d in train.iterdir() if d.is_dir()):
        keys = {run_dir.name, run_dir.name.rsplit("-", 1)[0]}  # cpt+lora trials run KEY-cpt and KEY-lora
        if any((trial_dir(cfg.experiment_dir(), k) / RESULT_JSON).is_file() for k in keys):
            continue
        try:
            need = checkpoint_world_size(run_dir, read_record(run_dir))
        except ShortenedError:
            continue  # judged (and refused) by the trial's own retrain check
        if need is not None and need != want:
            bad.append(f"{run_dir.name} needs {need}")
    if bad:
        raise ShortenedError(
            f"experiment {cfg.name!r}: unfinished trials have Ray Train checkpoints written by another worker count "
            f"than resources.workers_per_trial {want} ({'; '.join(bad)} worker(s)); a checkpoint resumes only with "
            "the worker count that wrote it: set resources.workers_per_trial back, or delete those runs under "
            f"{train} to restart their training")


def register_experiment(cfg: SweepConfig, store: ResultsStore, resume: bool) -> None:
    """Write sweep.json and the experiments row (a new name must be new to the store too, e.g. a shared Postgres)."""
    if not resume and cfg.name in store.experiment_names():
        raise ShortenedError(f"experiment {cfg.name!r} already exists in {store.url}; use --resume, or choose "
                             "another name")
    cfg.experiment_dir().mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg.experiment_dir() / SWEEP_JSON, cfg.model_dump(mode="json"))
    store.ensure_experiment(cfg.name, cfg.model_dump(mode="json"), str(cfg.experiment_dir()))


def recover_finished(cfg: SweepConfig, store: ResultsStore) -> None:
    """Record trials that finished (result.json written) while no driver was there to store them."""
    recorded = {t["key"] for t in store.trials(cfg.name) if t["status"] == "completed"}
    for path in sorted((cfg.experiment_dir() / "trials").glob(f"*/{RESULT_JSON}")):
        out = json.loads(path.read_text())
        if out["row"]["key"] not in recorded:
            store.upsert_trial(cfg.name, out["row"]["key"], out["row"], out["metrics"], replace_metrics=True)


# -- Ray pieces ------------------------------------------------------------------------------------------------------

class RayTasks:
    """``run_task`` for trials: each stage is a Ray task with the trial's task resources."""

    def __init__(self, cfg: SweepConfig):
        self.cpus, self.gpus = cfg.resources.task_cpu, cfg.resources.task_gpu

    def __call__(self, fn, *args):
        import ray

        return ray.get(_task(fn, self.cpus, self.gpus).remote(*args))


def _task(fn, cpus: float, gpus: float):
    """``fn`` as a Ray task with its own resources, outside the calling trial's placement group (Tune captures
    child tasks into the trial's group, which holds only the driver's share)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return ray.remote(fn).options(num_cpus=cpus, num_gpus=gpus, max_retries=0,
                                  scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))


def _trainable(config: dict, sweep: dict, worker_env: dict | None = None) -> None:
    """The Tune function trainable: one trial, one final report carrying the whole result."""
    cfg, spec = SweepConfig.model_validate(sweep), TrialSpec.model_validate(config["spec"])
    out = run_trial(cfg, spec, RayTasks(cfg), worker_env)
    scalars = {f"{m['name']}/{m['dataset']}": m["value"] for m in out["metrics"]
               if m["name"] in ("ppl", "zeroshot_mean")}
    tune.report({"key": spec.key, "result_json": json.dumps(out), **scalars})


class StoreCallback(tune.Callback):
    """Writes each trial to the store as its state changes, on the driver only. Holds the store's URL, not its
    engine, so Tune can pickle it into the experiment state."""

    def __init__(self, store_url: str, experiment: str, total: int | None = None):
        self.store_url, self.experiment, self.total = store_url, experiment, total
        self._store: ResultsStore | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}

    @property
    def store(self) -> ResultsStore:
        if self._store is None:
            self._store = ResultsStore(self.store_url)
        return self._store

    def _progress(self, trials, text: str, finishing=None) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") or t is finishing for t in trials)
        total = f"/{self.total}" if self.total else ""
        print(f"[sweep {self.experiment}] {time.strftime('%H:%M:%S')} {done}{total} done · {text}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        spec = TrialSpec.model_validate(trial.config["spec"])
        self._progress(trials, f"started {spec.key}")
        self.store.upsert_trial(self.experiment, spec.key, {
            "method": spec.method, "criterion": spec.criterion, "ratio": spec.ratio, "blocks_requested": spec.blocks,
            "status": "running", "tune_trial_id": trial.trial_id, "error": None})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "result_json" in result:
            out = json.loads(result["result_json"])
            self.store.upsert_trial(self.experiment, out["row"]["key"],
                                    {**out["row"], "tune_trial_id": trial.trial_id}, out["metrics"],
                                    replace_metrics=True)
            shown = ", ".join(f"{m['name']} {m['dataset']} {m['value']:.4g}" for m in out["metrics"]
                              if m["name"] in ("ppl", "zeroshot_mean"))
            self._progress(trials, f"finished {out['row']['key']} in {out['row']['total_s'] / 60:.1f} min: {shown}",
                           finishing=trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        spec = TrialSpec.model_validate(trial.config["spec"])
        err = ""
        if getattr(trial, "error_file", None) and Path(trial.error_file).is_file():
            err = Path(trial.error_file).read_text()[-4000:]
        self.store.upsert_trial(self.experiment, spec.key, {"method": spec.method, "status": "error", "error": err})
        self._progress(trials, f"FAILED {spec.key}: {err.strip().splitlines()[-1] if err.strip() else 'see Tune log'}",
                       finishing=trial)


class BisectSearcher:
    """Factory for a Tune searcher that bisects the block count: the largest count whose metric stays within
    tolerance of the dense baseline, in about log2(removable blocks) trials (the metric is taken as monotone in
    the count). Counts already completed in the store are reused without a trial."""

    @staticmethod
    def create(cfg: SweepConfig, max_blocks: int, baseline: float, known: dict[int, float]):
        from ray.tune.search import Searcher

        sel = cfg.selection
        lower = lower_is_better(sel.metric)

        class _Bisect(Searcher):
            def __init__(self):
                super().__init__(metric=None, mode=None)
                self.lo, self.hi = 0, max_blocks + 1  # lo meets the tolerance (0 blocks: dense); hi is assumed not to
                self.pending: dict[str, int] = {}
                self.path: list[tuple[int, float, bool]] = []

            def _absorb_known(self) -> None:
                while self.hi - self.lo > 1:
                    mid = (self.lo + self.hi) // 2
                    if mid not in known:
                        return
                    self._update(mid, known[mid])

            def _update(self, n: int, value: float) -> None:
                ok = within(value, baseline, sel.tolerance_pct, lower)
                self.path.append((n, value, ok))
                if ok:
                    self.lo = max(self.lo, n)
                else:
                    self.hi = min(self.hi, n)

            def suggest(self, trial_id: str):
                self._absorb_known()
                if self.hi - self.lo <= 1:
                    return Searcher.FINISHED
                if self.pending:
                    return None  # one probe at a time
                mid = (self.lo + self.hi) // 2
                self.pending[trial_id] = mid
                spec = TrialSpec(method=cfg.methods[0], criterion=cfg.criteria[0], blocks=mid)
                return {"spec": spec.model_dump()}

            def on_trial_result(self, trial_id: str, result: dict) -> None:
                if trial_id in self.pending and "result_json" in result:
                    out = json.loads(result["result_json"])
                    value = metric_value({"metrics": out["metrics"]}, sel.metric)
                    self._update(self.pending.pop(trial_id), value)

            def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
                if trial_id in self.pending:  # an errored probe: treat the count as failing the tolerance
                    self.hi = min(self.hi, self.pending.pop(trial_id))

        return _Bisect()


def _tune(cfg: SweepConfig, store: ResultsStore, trainable, run_name: str, n_concurrent: int, *,
          specs: list[TrialSpec] | None = None, searcher=None, num_samples: int = 1) -> None:
    if specs is not None and not specs:
        return
    param_space = {"spec": tune.grid_search([s.model_dump() for s in specs])} if specs is not None else {}
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": cfg.resources.driver_cpus}),
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=n_concurrent, search_alg=searcher,
                                    num_samples=num_samples, reuse_actors=True),
        run_config=tune.RunConfig(name=run_name, storage_path=str(cfg.experiment_dir() / "tune"),
                                  failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
                                  callbacks=[StoreCallback(store.url, cfg.name, len(specs) if specs else None)],
                                  verbose=0),
    )
    hide = _HideTuneRestoreHint()
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(hide)
    try:
        grid = tuner.fit()
    finally:
        tune_log.removeFilter(hide)
    errors = [r for r in grid if r.error]
    if errors:
        raise ShortenedError(f"{len(errors)} trial(s) failed; first: {errors[0].error!r} (details in the store: "
                             f"shortened results {cfg.experiment_dir()})")
    unfinished = [r for r in grid if "result_json" not in (r.metrics or {})]
    missing = [s.key for s in specs or [] if not (trial_dir(cfg.experiment_dir(), s.key) / RESULT_JSON).is_file()]
    if unfinished or missing or hide.interrupted:
        n = max(len(unfinished), len(missing))
        raise SweepInterrupted(f"sweep {cfg.name!r} was interrupted with {n} trial(s) unfinished"
                               f"{' (' + ', '.join(missing) + ')' if missing else ''}; nothing was selected. "
                               f"{resume_hint(cfg)}")


class _HideTuneRestoreHint(logging.Filter):
    """Tune tells an interrupted run to resume with ``Tuner.restore(...)``; a sweep resumes with its own command."""

    interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "Tuner.restore" in msg or "has been interrupted" in msg:
            self.interrupted = True
            return False
        return True


def _ensure_scores(cfg: SweepConfig, n_remove_max: int) -> None:
    """Block scores once per (model, criterion), in parallel Ray tasks; a resumed sweep reuses the files."""
    import ray

    todo = [c for c in cfg.criteria if not scores_path(cfg.experiment_dir(), c).is_file()]
    r = cfg.resources
    fn = _task(compute_scores, r.task_cpu, r.task_gpu)
    refs = [fn.remote(cfg.model_dump(mode="json"), c, n_remove_max, str(scores_path(cfg.experiment_dir(), c)))
            for c in todo]
    if refs:
        log.warning("scoring blocks with %s", ", ".join(todo))
        ray.get(refs)


def _max_blocks(cfg: SweepConfig) -> int:
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
    allowed = len(allowed_blocks(len(find_blocks(skeleton)), cfg.keep_first, cfg.keep_last))
    if cfg.search == "bisect":
        return allowed
    counts = [resolve_block_count(skeleton, ratio=r, blocks=None, keep_first=cfg.keep_first,
                                  keep_last=cfg.keep_last) for r in cfg.ratios or []]
    counts += [resolve_block_count(skeleton, ratio=None, blocks=b, keep_first=cfg.keep_first,
                                   keep_last=cfg.keep_last) for b in cfg.blocks or []]
    return max(counts)


def _speed_pass(cfg: SweepConfig, store: ResultsStore) -> None:
    """Speed once per distinct block count (retraining does not change it), one pruned model against the dense one,
    alternating, with nothing else running; the rows go to every trial of that block count."""
    import ray

    from shortened.evaluation import metric_rows

    trials = [t for t in store.trials(cfg.name) if t["status"] == "completed"]
    by_blocks: dict[int, list[dict]] = {}
    for t in trials:
        if t["key"] != DENSE:
            by_blocks.setdefault(t["num_blocks"], []).append(t)
    r = cfg.resources
    fn = _task(speed_stage, r.task_cpu, r.task_gpu)
    for n, group in sorted(by_blocks.items()):
        out = cfg.experiment_dir() / "speed" / f"blocks{n}.json"
        result = ray.get(fn.remote(cfg.model_dump(mode="json"), group[0]["model_path"], str(out)))
        rows = metric_rows(result)
        base_rows = metric_rows({"speed": [{**s, "model": "model", "speedup_vs_baseline": 1.0}
                                           for s in result["speed"] if s["model"] == "baseline"]})
        for t in group:
            store.upsert_trial(cfg.name, t["key"], {"method": t["method"]}, rows)
        if any(t["key"] == DENSE for t in trials):
            store.upsert_trial(cfg.name, DENSE, {"method": DENSE}, base_rows)


# -- the sweep -------------------------------------------------------------------------------------------------------

def run_sweep(cfg: SweepConfig, *, resume: bool = False, address: str | None = None,
              worker_env: dict[str, str] | None = None) -> SweepOutcome:
    """Run (or resume) a sweep to the end: scores, trials, speed, selection. Returns what the store holds."""
    import ray

    start = time.perf_counter()
    check_job_paths(storage_path=cfg.storage_path)
    cfg = resolve_local_paths(cfg.model_copy(update={
        "storage_path": str(Path(cfg.storage_path).expanduser().resolve())}))
    preflight(cfg)
    n_remove_max = _max_blocks(cfg)
    check_experiment(cfg, resume)
    created = [p for p in (cfg.experiment_dir(), *cfg.experiment_dir().parents) if not p.exists()]
    started_ray, lock = False, None
    try:
        check_driver_writable(cfg.storage_path)  # before the lock: a bad path is named, not a mkdir traceback
        lock = ExperimentLock(cfg.experiment_dir(), f"experiment {cfg.name!r} ({cfg.experiment_dir()})").acquire()
        check_experiment(cfg, resume)  # again, now that no other driver can change it
        if resume and any(m != "none" for m in cfg.methods):
            check_train_runs(cfg)
        started_ray = connect(address)
        return _run_locked(cfg, resume, worker_env, start, n_remove_max)
    except KeyboardInterrupt as exc:
        raise SweepInterrupted(f"sweep {cfg.name!r} was interrupted; nothing was selected. {resume_hint(cfg)}") \
            from exc
    finally:
        if lock is not None:
            lock.release()
        for folder in created:  # refused before anything was written: leave no folder this run made
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if started_ray:
            ray.shutdown()


def _run_locked(cfg: SweepConfig, resume: bool, worker_env: dict[str, str] | None, start: float,
                n_remove_max: int) -> SweepOutcome:
    check_shared_storage(cfg.storage_path)
    check_trial_fits(cfg)
    n_concurrent = concurrency(cfg, cluster_capacity())
    store = ResultsStore(cfg.resolved_store_url())
    register_experiment(cfg, store, resume)
    recover_finished(cfg, store)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials resolve relative paths like the driver does
    before = {t["key"] for t in store.trials(cfg.name) if t["status"] == "completed"}
    log.warning("sweep %s: %d trial(s) at a time, experiment folder %s", cfg.name, n_concurrent,
                cfg.experiment_dir())
    phases = {}
    t = time.perf_counter()
    _ensure_scores(cfg, n_remove_max)
    phases["scores"] = time.perf_counter() - t
    t = time.perf_counter()
    trainable = tune.with_parameters(_trainable, sweep=cfg.model_dump(mode="json"), worker_env=worker_env)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if cfg.search == "grid":
        pending = longest_first([s for s in grid_specs(cfg) if s.key not in before])
        _tune(cfg, store, trainable, f"grid-{stamp}", n_concurrent, specs=pending)
    else:
        if DENSE not in before:
            _tune(cfg, store, trainable, f"dense-{stamp}", 1, specs=[TrialSpec(method=DENSE)])
        trials = store.trials(cfg.name)
        baseline = metric_value(next(t for t in trials if t["key"] == DENSE), cfg.selection.metric)
        known = {t["blocks_requested"]: metric_value(t, cfg.selection.metric) for t in trials
                 if t["status"] == "completed" and t["key"] != DENSE and t["blocks_requested"] is not None}
        searcher = BisectSearcher.create(cfg, n_remove_max, baseline, known)
        _tune(cfg, store, trainable, f"bisect-{stamp}", 1, searcher=searcher, num_samples=n_remove_max + 1)
    phases["trials"] = time.perf_counter() - t
    t = time.perf_counter()
    if cfg.eval.speed:
        _speed_pass(cfg, store)
    phases["speed"] = time.perf_counter() - t
    trials = store.trials(cfg.name)
    choice = select(trials, cfg.selection)
    write_json_atomic(cfg.experiment_dir() / SELECTION_JSON, choice.to_json())
    store.set_experiment(cfg.name, status="completed", selected_trial=choice.chosen and choice.chosen["key"])
    ran = sorted({t["key"] for t in trials if t["status"] == "completed"} - before)
    write_json_atomic(cfg.experiment_dir() / TIMINGS_JSON, {
        "resumed": resume, "concurrency": n_concurrent, "phases_s": phases, "sweep_s": time.perf_counter() - start,
        "trials_run": ran})
    return SweepOutcome(cfg.name, cfg.experiment_dir(), store.url, trials, choice, time.perf_counter() - start,
                        ran, n_concurrent, phases)
