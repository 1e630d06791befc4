"""The Ray layer of a sweep, read as a recipe: :func:`run_sweep` sets up (every check, the experiment lock, Ray, the
store), runs (shared block scores, one Tune trial per spec or a bisection, the speed pass) and finishes (the
selection and the records). Every check lives in :mod:`shortened.sweep.preflight`, every path in the experiment's
:class:`~shortened.sweep.layout.ExperimentLayout`. Trials run :func:`shortened.sweep.trial.run_trial`; everything
heavy is a Ray task or a nested Ray Train run with the resources the config gives it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from shortened import console, storage
from shortened.cluster import ClusterChecked, connect
from shortened.errors import Interrupted, ShortenedError
from shortened.host_memory import forwarded_env
from shortened.io import write_json_atomic
from shortened.sweep import preflight
from shortened.sweep.config import Selection, SweepConfig
from shortened.sweep.layout import SWEEP_JSON, TIMINGS_JSON  # noqa: F401 - their names, importable from here too
from shortened.sweep.lock import ExperimentLock
from shortened.sweep.preflight import Preflight
from shortened.sweep.selection import Choice, lower_is_better, metric_value, select, within
from shortened.sweep.store import SETTLED, ResultsStore, StoreUnavailable, check_store
from shortened.sweep.trial import (DENSE, TrialResult, TrialSpec, compute_scores, grid_specs, longest_first, run_trial,
                                   speed_stage)
from shortened.tracking import SweepTracking

log = logging.getLogger(__name__)
RESULT = "trial_result"  # the key of a trial's TrialResult in what it reports to Tune


class SweepInterrupted(Interrupted):
    """The sweep stopped before every trial finished (Ctrl-C, a stop signal): nothing was selected."""


def resume_hint(cfg: SweepConfig) -> str:
    saved = cfg.layout.sweep_json
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


# -- the recipe ------------------------------------------------------------------------------------------------------

def run_sweep(cfg: SweepConfig, *, resume: bool = False, address: str | None = None,
              worker_env: dict[str, str] | None = None) -> SweepOutcome:
    """Run (or resume) a sweep to the end: setup → scores → trials → speed → selection. Returns what the store holds."""
    start = time.perf_counter()
    cfg = preflight.resolve_paths(cfg)
    SweepTracking(cfg).check()  # an MLflow store that does not answer is named before the lock and Ray
    with hold_experiment(cfg, resume, address) as checked:
        store, before = setup(cfg, resume, checked)
        phases: dict[str, float] = {}
        with console.SweepConsole(cfg.name, cfg.layout, cfg):  # the live view: a line per trial, and totals
            with _timed(phases, "scores"):
                ensure_scores(cfg, checked.max_blocks)
            with _timed(phases, "trials"):
                run_trials(cfg, store, checked, before, worker_env)
                recover_finished(cfg, store)  # trials the callback could not store while the database was away
            with _timed(phases, "speed"):
                if cfg.eval.speed:
                    speed_pass(cfg, store)
        return finish(cfg, store, before, resume, checked, phases, start)


@contextmanager
def hold_experiment(cfg: SweepConfig, resume: bool, address: str | None) -> Iterator[Preflight]:
    """This driver's hold on the experiment, each check of :mod:`~shortened.sweep.preflight` in its place: the inputs
    before anything is written, the lock, the experiment again under it, Ray, the cluster. Yields what was checked.
    On the way out the lock is released, folders a refused run created are removed, a Ray started here is stopped,
    and Ctrl-C is a :class:`SweepInterrupted` that says how to resume."""
    n_remove_max = preflight.before_writing(cfg, resume)
    check_store(cfg.resolved_store_url(), cfg.name, resume)  # a server store: reachable, known schema, new name
    layout = cfg.layout
    created = [] if layout.remote else [p for p in (layout.root, *layout.root.parents) if not p.exists()]
    started_ray, lock = False, None
    try:
        preflight.before_lock(cfg)
        layout.driver_dir.mkdir(parents=True, exist_ok=True)  # the lock's folder (the driver's own disk)
        lock = ExperimentLock(layout.lock, f"experiment {cfg.name!r} ({layout.root})").acquire()
        preflight.under_lock(cfg, resume)
        started_ray = connect(address)
        yield preflight.on_cluster(cfg, n_remove_max)
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


@contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - t


# -- setup: the store ------------------------------------------------------------------------------------------------

def setup(cfg: SweepConfig, resume: bool, checked: Preflight) -> tuple[ResultsStore, set[str]]:
    """The store with the experiment registered and every finished trial in it; returns it with the keys of the
    trials completed before this invocation."""
    store = ResultsStore(cfg.resolved_store_url())
    register_experiment(cfg, store, resume)
    recover_finished(cfg, store)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials resolve relative paths like the driver does
    console.note(f"sweep {cfg.name}: {checked.concurrency} trial(s) at a time, experiment folder {cfg.layout.root}")
    return store, settled(store.trials(cfg.name))


def completed(trials: list[dict]) -> set[str]:
    return {t["key"] for t in trials if t["status"] == "completed"}


def settled(trials: list[dict]) -> set[str]:
    """Keys a resumed sweep does not run again: completed trials, and trials the scheduler stopped."""
    return {t["key"] for t in trials if t["status"] in SETTLED}


def register_experiment(cfg: SweepConfig, store: ResultsStore, resume: bool) -> None:
    """Write sweep.json and the experiments row (a new name must be new to the store too, e.g. a shared Postgres)."""
    if not resume and cfg.name in store.experiment_names():
        raise ShortenedError(f"experiment {cfg.name!r} already exists in {store.url}; use --resume, or choose "
                             "another name")
    layout = cfg.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    config = cfg.model_dump(mode="json")
    write_json_atomic(layout.sweep_json, config)
    store.ensure_experiment(cfg.name, config, str(layout.root))


def recover_finished(cfg: SweepConfig, store: ResultsStore) -> None:
    """Record trials that finished (result.json written) while no driver was there to store them."""
    recorded = completed(store.trials(cfg.name))
    for path in cfg.layout.finished_results():
        result = TrialResult.load(path)
        if result.key not in recorded:
            store.record_result(cfg.name, result)


# -- run: block scores, trials, speed ----------------------------------------------------------------------------

def ensure_scores(cfg: SweepConfig, n_remove_max: int) -> None:
    """Block scores once per (model, criterion), in parallel Ray tasks; a resumed sweep reuses the files."""
    layout = cfg.layout
    todo = [c for c in cfg.criteria if not layout.scores(c).is_file()]
    fn = _task(compute_scores, cfg.resources.task_cpu, cfg.resources.task_gpu)
    refs = [fn.remote(cfg, c, n_remove_max, str(layout.scores(c))) for c in todo]
    if refs:
        console.note(f"scoring blocks with {', '.join(todo)}")
        ray.get(refs)


def run_trials(cfg: SweepConfig, store: ResultsStore, checked: Preflight, before: set[str],
               worker_env: dict[str, str] | None) -> None:
    """Every trial not completed yet, through Tune: the grid, longest first; or the dense baseline, then a bisection
    of the block count."""
    # Train workers' rank 0 writes its progress where the live view reads it; the trials decide the workers' host
    # allocator settings from this driver's variables (host_memory)
    worker_env = {**console.progress_env(cfg.layout.root / "progress"), **forwarded_env(), **(worker_env or {})}
    trainable = tune.with_parameters(_trainable, sweep=cfg, cluster=checked.cluster, worker_env=worker_env)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if cfg.search == "grid":
        pending = longest_first([s for s in grid_specs(cfg) if s.key not in before])
        if (view := console.active()) is not None:
            view.add_trials(pending)
        _tune(cfg, store, trainable, f"grid-{stamp}", checked.concurrency, specs=pending)
        return
    if DENSE not in before:
        _tune(cfg, store, trainable, f"dense-{stamp}", 1, specs=[TrialSpec(method=DENSE)])
    trials = store.trials(cfg.name)
    metric = cfg.selection.metric
    baseline = metric_value(next(t for t in trials if t["key"] == DENSE), metric)
    known = {t["blocks_requested"]: metric_value(t, metric) for t in trials
             if t["status"] == "completed" and t["key"] != DENSE and t["blocks_requested"] is not None}
    searcher = BisectSearcher(cfg.selection, TrialSpec(method=cfg.methods[0], criterion=cfg.criteria[0]),
                              checked.max_blocks, baseline, known)
    _tune(cfg, store, trainable, f"bisect-{stamp}", 1, searcher=searcher, num_samples=checked.max_blocks + 1)


def speed_pass(cfg: SweepConfig, store: ResultsStore) -> None:
    """Speed once per distinct block count (retraining does not change it), one pruned model against the dense one,
    alternating, with nothing else running; the rows go to every trial of that block count."""
    from shortened.evaluation import metric_rows

    layout = cfg.layout
    trials = [t for t in store.trials(cfg.name) if t["status"] == "completed"]
    by_blocks: dict[int, list[dict]] = {}
    for t in trials:
        if t["key"] != DENSE:
            by_blocks.setdefault(t["num_blocks"], []).append(t)
    fn = _task(speed_stage, cfg.resources.task_cpu, cfg.resources.task_gpu)
    if by_blocks:
        console.note(f"measuring generation speed against the dense model: {len(by_blocks)} block count(s) "
                     f"({', '.join(str(n) for n in sorted(by_blocks))} blocks), one at a time")
    for n, group in sorted(by_blocks.items()):
        model = layout.evaluated_model(group[0]["key"], retrained=group[0]["method"] != "none")
        result = ray.get(fn.remote(cfg, str(model), str(layout.speed(n))))
        rows = metric_rows(result)
        base_rows = metric_rows({"speed": [{**s, "model": "model", "speedup_vs_baseline": 1.0}
                                           for s in result["speed"] if s["model"] == "baseline"]})
        for t in group:
            store.upsert_trial(cfg.name, t["key"], {"method": t["method"]}, rows)
        if any(t["key"] == DENSE for t in trials):
            store.upsert_trial(cfg.name, DENSE, {"method": DENSE}, base_rows)


# -- finish: the selection ---------------------------------------------------------------------------------------

def finish(cfg: SweepConfig, store: ResultsStore, before: set[str], resume: bool, checked: Preflight,
           phases: dict[str, float], start: float) -> SweepOutcome:
    """Select, and record the choice and this invocation's timings; returns the outcome as the store holds it."""
    layout = cfg.layout
    trials = store.trials(cfg.name)
    choice = select(trials, cfg.selection)
    write_json_atomic(layout.selection_json, choice.to_json())
    store.set_experiment(cfg.name, status="completed", selected_trial=choice.chosen and choice.chosen["key"])
    ran = sorted(completed(trials) - before)
    seconds = time.perf_counter() - start
    write_json_atomic(layout.timings_json, {"resumed": resume, "concurrency": checked.concurrency,
                                            "phases_s": phases, "sweep_s": seconds, "trials_run": ran})
    SweepTracking(cfg).finish(trials, choice.chosen and choice.chosen["key"])  # MLflow runs, TensorBoard files
    return SweepOutcome(cfg.name, layout.root, store.url, trials, choice, seconds, ran, checked.concurrency, phases)


# -- Ray pieces ------------------------------------------------------------------------------------------------------

class RayTasks:
    """``run_task`` for trials: each stage is a Ray task with the trial's task resources."""

    def __init__(self, cfg: SweepConfig):
        self.cpus, self.gpus = cfg.resources.task_cpu, cfg.resources.task_gpu

    def __call__(self, fn, *args):
        return ray.get(_task(fn, self.cpus, self.gpus).remote(*args))


def _task(fn, cpus: float, gpus: float):
    """``fn`` as a Ray task with its own resources, outside the calling trial's placement group (Tune captures
    child tasks into the trial's group, which holds only the driver's share)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return ray.remote(fn).options(num_cpus=cpus, num_gpus=gpus, max_retries=0,
                                  scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))


def _trainable(config: dict, sweep: SweepConfig, cluster: ClusterChecked | None = None,
               worker_env: dict[str, str] | None = None) -> None:
    """The Tune function trainable: one trial, one final report carrying its :class:`TrialResult` as it is; with a
    scheduler, its retraining's validation reports before it (:class:`ValidationToTune`)."""
    spec: TrialSpec = config["spec"]
    callbacks = None
    if sweep.scheduler.name != "none" and sweep.train.val_every_tokens and spec.method not in (DENSE, "none"):
        callbacks = [ValidationToTune(spec.key, sweep.train.train_tokens, token_budget(sweep, spec.method))]
    result = run_trial(sweep, spec, RayTasks(sweep), worker_env, cluster, train_callbacks=callbacks)
    scalars = {f"{m.name}/{m.dataset}": m.value for m in result.metrics if m.name in ("ppl", "zeroshot_mean")}
    tune.report({"key": spec.key, RESULT: result, **scalars})


class ValidationToTune(TuneReportCallback):
    """A Ray Train callback (it runs in the nested run's controller) that forwards every report carrying
    ``val_ppl`` to the Tune trial that started the run, as ``{"key", "tokens", "val_loss", "val_ppl", "phase"}``:
    Ray Tune's own Train integration (``TuneReportCallback``: a queue that the trial's session drains while
    ``trainer.fit()`` blocks), filtered to the validation reports, so the scheduler sees one result per validation.
    ``tokens`` counts every phase of the trial (``cpt+lora``'s LoRA phase starts after the CPT phase's
    ``cpt_tokens``), a monotone time attribute for ASHA. The validation after the last step (at ``budget`` tokens)
    is not forwarded: a trial that trained to the end is evaluated, never stopped."""

    def __init__(self, key: str, cpt_tokens: int, budget: int):
        super().__init__()
        self.key, self.cpt_tokens, self.budget = key, cpt_tokens, budget

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        m = metrics[0] if metrics else {}
        if "val_ppl" not in m:
            return
        offset = self.cpt_tokens if run_context.get_run_config().name == f"{self.key}-lora" else 0
        tokens = offset + int(m["tokens"])
        if tokens >= self.budget:
            return
        self._training_actor_item_queue.put({"key": self.key, "tokens": tokens,
                                             "val_loss": float(m["val_loss"]), "val_ppl": float(m["val_ppl"]),
                                             "phase": m.get("phase")})


def token_budget(cfg: SweepConfig, method: str) -> int:
    """The tokens a trial of ``method`` trains over all its phases (``cpt+lora``: CPT, then LoRA)."""
    train = cfg.train
    if method == "cpt+lora":
        return train.train_tokens + (train.lora.train_tokens or train.train_tokens)
    return train.train_tokens


def scheduler_for(cfg: SweepConfig) -> TrialScheduler:
    """The sweep's Tune scheduler: FIFO (every trial to the end), or ASHA on ``tokens`` up to the largest token
    budget of a trial (``cpt+lora`` trains both phases). ASHA does not stop a trial that reaches that budget
    (``stop_last_trials=False``: it still has to be evaluated; its validation there is not forwarded either) and
    passes over results without its metric (the dense and ``none`` trials' only one, and every trial's final
    result)."""
    s = cfg.scheduler
    if s.name == "none":
        return FIFOScheduler()
    max_t = max(token_budget(cfg, m) for m in cfg.methods)
    return ASHAScheduler(time_attr="tokens", metric=s.metric, mode=s.mode, grace_period=s.grace_tokens,
                         max_t=max_t, reduction_factor=s.reduction_factor, stop_last_trials=False)


class StoreCallback(tune.Callback):
    """Writes each trial to the store as its state changes, on the driver only. Tune pickles it into the
    experiment state (``tuner.pkl``) as the store's masked URL, without its engine or any password. A write the
    store could not take (:class:`StoreUnavailable`, after its retries) is a warning, not the end of the sweep: the
    trial's ``result.json`` is written to the store at the end of the sweep (or on ``--resume``)."""

    def __init__(self, store: ResultsStore | str, experiment: str, total: int | None = None):
        self._store = store if isinstance(store, ResultsStore) else None
        self.store_url = store.url if isinstance(store, ResultsStore) else store
        self.experiment, self.total = experiment, total
        self.stopped: set[str] = set()  # keys of the trials the scheduler stopped

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}

    def _write(self, key: str, what: str, fn) -> None:
        try:
            fn()
        except StoreUnavailable as exc:
            log.warning("%s; %s of %s is not stored now: it is written from trials/%s/result.json at the end of "
                        "the sweep or on --resume", exc, what, key, key)

    @property
    def store(self) -> ResultsStore:
        if self._store is None:
            self._store = ResultsStore(self.store_url)
        return self._store

    def _progress(self, trials, text: str, finishing=None) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") or t is finishing for t in trials)
        total = f"/{self.total}" if self.total else ""
        console.note(f"[sweep {self.experiment}] {time.strftime('%H:%M:%S')} {done}{total} done · {text}")

    def on_trial_start(self, iteration, trials, trial, **info):
        spec: TrialSpec = trial.config["spec"]
        if (view := console.active()) is not None:
            view.trial_started(spec)
        else:
            self._progress(trials, f"started {spec.key}")
        self._write(spec.key, "the start", lambda: self.store.upsert_trial(self.experiment, spec.key, {
            "method": spec.method, "criterion": spec.criterion, "ratio": spec.ratio, "blocks_requested": spec.blocks,
            "status": "running", "tune_trial_id": trial.trial_id, "error": None}))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        out: TrialResult | None = result.get(RESULT)
        if out is None and "val_ppl" in result:  # a validation report; done: the scheduler stopped the trial
            self._validation(trials, trial, result)
        if out is not None:
            self._write(out.key, "the result",
                        lambda: self.store.record_result(self.experiment, out, tune_trial_id=trial.trial_id))
            if (view := console.active()) is not None:
                view.trial_finished(out.spec, out)
            else:
                self._progress(trials, f"finished {out.key} in {out.timings.total_s / 60:.1f} min: {out.summary()}",
                               finishing=trial)

    def _validation(self, trials, trial, result: dict) -> None:
        spec: TrialSpec = trial.config["spec"]
        stopped = bool(result.get("done"))
        self._write(spec.key, "the validation", lambda: self.store.record_validation(
            self.experiment, spec.key, {"method": spec.method}, result, stopped=stopped))
        if stopped:
            self.stopped.add(spec.key)
            text = (f"stopped {spec.key} early (scheduler) at {result['tokens']} tokens: "
                    f"val_ppl {result['val_ppl']:.4g}")
            if (view := console.active()) is not None:
                view.trial_stopped(spec, int(result["tokens"]), f"val_ppl {result['val_ppl']:.4g}")
            else:
                self._progress(trials, text, finishing=trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        spec: TrialSpec = trial.config["spec"]
        err = ""
        if getattr(trial, "error_file", None) and Path(trial.error_file).is_file():
            err = Path(trial.error_file).read_text()[-4000:]
        self._write(spec.key, "the error", lambda: self.store.upsert_trial(
            self.experiment, spec.key, {"method": spec.method, "status": "error", "error": err}))
        if (view := console.active()) is not None:
            view.trial_failed(spec, err)
        else:
            self._progress(trials, f"FAILED {spec.key}: "
                           f"{err.strip().splitlines()[-1] if err.strip() else 'see Tune log'}", finishing=trial)


class BisectSearcher(Searcher):
    """A Tune searcher that bisects the block count of ``probe`` (a spec whose ``blocks`` it sets): the largest
    count whose metric stays within tolerance of the dense ``baseline``, in about log2(``max_blocks``) trials (the
    metric is taken as monotone in the count). Counts in ``known`` (completed in the store) are reused without a
    trial."""

    def __init__(self, selection: Selection, probe: TrialSpec, max_blocks: int, baseline: float,
                 known: dict[int, float]):
        super().__init__(metric=None, mode=None)
        self.selection, self.probe, self.baseline, self.known = selection, probe, baseline, known
        self.lower = lower_is_better(selection.metric)
        self.lo, self.hi = 0, max_blocks + 1  # lo meets the tolerance (0 blocks: dense); hi is assumed not to
        self.pending: dict[str, int] = {}
        self.path: list[tuple[int, float, bool]] = []

    def _absorb_known(self) -> None:
        while self.hi - self.lo > 1:
            mid = (self.lo + self.hi) // 2
            if mid not in self.known:
                return
            self._update(mid, self.known[mid])

    def _update(self, n: int, value: float) -> None:
        ok = within(value, self.baseline, self.selection.tolerance_pct, self.lower)
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
        return {"spec": self.probe.model_copy(update={"blocks": mid})}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        out: TrialResult | None = result.get(RESULT)
        if trial_id in self.pending and out is not None:
            value = metric_value({"metrics": out.metric_dicts()}, self.selection.metric)
            self._update(self.pending.pop(trial_id), value)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.pending:  # an errored probe: treat the count as failing the tolerance
            self.hi = min(self.hi, self.pending.pop(trial_id))


def _tune(cfg: SweepConfig, store: ResultsStore, trainable, run_name: str, n_concurrent: int, *,
          specs: list[TrialSpec] | None = None, searcher: Searcher | None = None, num_samples: int = 1) -> None:
    if specs is not None and not specs:
        return
    layout = cfg.layout
    stored = StoreCallback(store, cfg.name, len(specs) if specs else None)
    if cfg.scheduler.name != "none":
        # the scheduler's metric is in the validation reports only (not in the final result, nor in the dense and
        # method-none trials' one result): Tune's check that every result has it would fail those trials
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": cfg.resources.driver_cpus}),
        param_space={"spec": tune.grid_search(specs)} if specs is not None else {},
        tune_config=tune.TuneConfig(max_concurrent_trials=n_concurrent, search_alg=searcher,
                                    num_samples=num_samples, scheduler=scheduler_for(cfg),
                                    # a stopped trial's actor must end (its thread still blocks in the nested
                                    # trainer.fit()): reused, it would train on in the background
                                    reuse_actors=cfg.scheduler.name == "none"),
        run_config=tune.RunConfig(name=run_name, **_ray_storage(layout.tune),
                                  failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
                                  callbacks=[stored, SweepTracking(cfg).callback()],
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
                             f"shortened results {layout.root})")
    stopped = stored.stopped | {t["key"] for t in store.trials(cfg.name) if t["status"] == "stopped"}
    unfinished = [r for r in grid if RESULT not in (r.metrics or {}) and (r.metrics or {}).get("key") not in stopped]
    missing = [s.key for s in specs or [] if not layout.result_json(s.key).is_file() and s.key not in stopped]
    if unfinished or missing or hide.interrupted:
        n = max(len(unfinished), len(missing))
        raise SweepInterrupted(f"sweep {cfg.name!r} was interrupted with {n} trial(s) unfinished"
                               f"{' (' + ', '.join(missing) + ')' if missing else ''}; nothing was selected. "
                               f"{resume_hint(cfg)}")


def _ray_storage(where) -> dict:
    """Ray's ``storage_path`` (and, for an object store, the ``storage_filesystem`` that reads it as we do)."""
    if not storage.is_url(where):
        return {"storage_path": str(where)}
    fs, inner = storage.pyarrow_filesystem(str(where))
    return {"storage_filesystem": fs, "storage_path": inner}


class _HideTuneRestoreHint(logging.Filter):
    """Tune tells an interrupted run to resume with ``Tuner.restore(...)``; a sweep resumes with its own command."""

    interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "Tuner.restore" in msg or "has been interrupted" in msg:
            self.interrupted = True
            return False
        return True
