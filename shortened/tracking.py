"""Experiment tracking: what a sweep and a retraining ran, in the tools ML teams already read — one MLflow run per
trial (or per ``shortened retrain``), and TensorBoard event files of every training run.

**MLflow** (``tracking: {mlflow: {tracking_uri: …, experiment: …}}`` in a sweep, ``--mlflow.tracking_uri`` on
``retrain``). Each trial of a sweep is one run, named after its key and tagged ``shortened.experiment`` (the sweep's
name) and ``shortened.trial`` (the key), in the MLflow experiment ``experiment`` (default: the sweep's name):

- parameters: ``criterion``, ``method``, ``ratio_requested``, ``ratio_actual``, ``blocks_requested``,
  ``blocks_removed`` (a count) and ``removed_blocks`` (their indices), ``num_blocks``, ``params``, ``params_before``,
  ``tokens_requested``, ``tokens_trained``, the model, and the retraining settings as ``train.FIELD``;
- metrics: the training loss curve by optimizer step (``train/loss``, ``train/lr``, ``train/tokens_per_s``,
  ``train/tokens``, from ``retraining.json``; a two-phase ``cpt+lora`` counts its LoRA steps on after the CPT
  ones), the held-out evaluation as ``NAME/DATASET`` (``ppl/wikitext2``, ``acc/piqa``, ``acc_norm/piqa``;
  ``zeroshot_mean``), generation speed (``latency_s/gen-b1-n32``, ``tokens_per_s/…``, ``speedup_vs_baseline/…``,
  memory in MiB) and the stage times in seconds (``time/prune_s``, ``time/train_s``, ``time/eval_s``,
  ``time/total_s``);
- the trial the selection policy chose is tagged ``shortened.selected = true`` (every other ``false``), and the
  MLflow experiment gets ``shortened.selected_trial``.

Runs are written by the sweep's driver with :class:`mlflow.MlflowClient`: as each trial finishes (a Tune callback),
then at the end of the sweep, which adds the speed rows (measured after the trials), the selection tags, and any
trial not logged yet (one that finished while no driver was there, or while the tracking server was down: a
failed write is a warning, never a failed sweep, and the next pass or ``--resume`` writes it). Writing is
idempotent: a trial's run is found again by its tags, so a resumed sweep adds no second run and no repeated
points. Ray Tune's own ``MLflowLoggerCallback`` (``ray.air.integrations.mlflow``) is not used: it logs what a trial
reports to Tune, once per Tune trial, so it would miss the loss curve (reported to the nested Ray Train run),
the speed pass and the selection (after Tune), and trials a resumed sweep reuses, and would log a retried trial
twice.

**TensorBoard**: the per-step metrics of each training run (each phase of ``cpt+lora``) as event files in its Ray
Train run folder, ``STORAGE/RUN/tensorboard`` — for a sweep ``EXPERIMENT/train/KEY/tensorboard`` (``KEY-cpt`` and
``KEY-lora`` for ``cpt+lora``), so ``tensorboard --logdir runs/demo/train`` shows every trial. They are converted
on the driver from ``retraining.json``'s history (the same numbers rank 0 logs and checkpoints), once a run has
exported its model; on by default (``tracking.tensorboard: false`` / ``--tensorboard false`` turns it off).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ray import tune

from shortened import storage
from shortened.errors import ShortenedError
from shortened.sweep.config import MlflowSettings, SweepConfig, TrackingConfig
from shortened.training.export import RETRAINING_JSON

if TYPE_CHECKING:
    from shortened.sweep.trial import TrialResult
    from shortened.training.config import TrainConfig

log = logging.getLogger(__name__)

EXPERIMENT_TAG = "shortened.experiment"  # the sweep's name (an MLflow experiment may hold several sweeps)
TRIAL_TAG = "shortened.trial"  # the trial's key
SELECTED_TAG = "shortened.selected"  # "true" on the trial the selection chose, "false" on the others
LOGGED_TAG = "shortened.logged"  # "true" once a run's parameters, evaluation and loss curve are all written
RUN_TAG = "shortened.run"  # a retrain's run name
TENSORBOARD_DIR = "tensorboard"  # the event files' folder inside a Ray Train run folder
TRAIN_KEYS = ("loss", "lr", "tokens_per_s", "tokens")  # the per-step metrics of retraining.json's history


# -- MLflow ------------------------------------------------------------------------------------------------------------

def _quiet_mlflow() -> None:
    """MLflow's database set-up logs each migration at INFO; keep the sweep's console to what it means."""
    for name in ("mlflow.store.db.utils", "mlflow.store.sqlalchemy_store", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_mlflow(settings: MlflowSettings, experiment: str, field: str) -> None:
    """Before any work: the tracking store answers and the experiment exists or can be created. ``field`` names
    the setting in the error (``sweep config FILE: tracking.mlflow.tracking_uri``, ``--mlflow.tracking_uri``).

    Raises:
        ShortenedError: mlflow is not installed, the server does not answer, or the store refuses the experiment.
    """
    if not settings.enabled:
        return
    uri, url = settings.shown_uri, urlparse(settings.tracking_uri)
    if url.scheme in ("http", "https"):  # MLflow retries an unreachable server for minutes: ask the socket first
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=5).close()
        except OSError as exc:
            raise ShortenedError(f"{field} {uri!r}: no MLflow tracking server answers at {url.hostname}:{port} "
                                 f"({exc})") from exc
    try:
        MlflowRuns(settings, experiment).experiment_id
    except ImportError as exc:
        raise ShortenedError(f"{field} {uri!r} needs mlflow: pip install mlflow-skinny alembic ({exc})") from exc
    except Exception as exc:  # MlflowException and the store's own errors (a bad scheme, a database refused)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first.replace(settings.tracking_uri, uri)
        raise ShortenedError(f"{field} {uri!r}: the MLflow tracking store refused experiment {experiment!r}: "
                             f"{first}") from exc


def metric_key(name: str, dataset: str | None = None) -> str:
    """``NAME/DATASET`` as an MLflow metric key (characters MLflow refuses, such as ``+``, become ``_``);
    ``zeroshot_mean`` alone (its dataset is the list of tasks)."""
    key = name if not dataset or name == "zeroshot_mean" else f"{name}/{dataset}"
    return re.sub(r"[^\w/.\- :]", "_", key)


class MlflowRuns:
    """The MLflow runs of one experiment, found again by their tags (so writing them twice changes nothing).
    Holds the settings only, so it pickles; the client is made on first use."""

    def __init__(self, settings: MlflowSettings, experiment: str):
        self.settings, self.experiment = settings, settings.experiment or experiment
        self._client = self._experiment_id = None

    def __getstate__(self) -> dict:  # (Tune saves its callbacks in tuner.pkl: no password lands there)
        return {**self.__dict__, "settings": _masked(self.settings), "_client": None, "_experiment_id": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            _quiet_mlflow()
            self._client = MlflowClient(tracking_uri=self.settings.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None and found.lifecycle_stage != "active":
                raise ShortenedError(f"MLflow experiment {self.experiment!r} is deleted; restore it "
                                     "(mlflow experiments restore) or choose another name")
            self._experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        return self._experiment_id

    def find(self, tags: dict[str, str]):
        """The newest active run carrying every tag of ``tags``, or None."""
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=where, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def log(self, name: str, tags: dict[str, str], params: dict[str, Any], metrics: dict[str, float],
            curve: list[tuple[int, dict[str, float]]] = ()) -> str:
        """The run tagged ``tags``, written once: ``params``, ``metrics`` (at step 0) and ``curve`` (``(step,
        {key: value})``). A run found complete only gets the metrics it lacks (speed rows measured later); one
        left half-written (a driver killed while writing) is deleted and written again. Returns the run id."""
        from mlflow.entities import Metric, Param

        run = self.find(tags)
        if run is not None and run.data.tags.get(LOGGED_TAG) == "true":
            missing = {k: v for k, v in metrics.items() if k not in run.data.metrics}
            self._batch(run.info.run_id, [Metric(k, float(v), _now(), 0) for k, v in missing.items()])
            return run.info.run_id
        if run is not None:
            self.client.delete_run(run.info.run_id)
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        entries: list = [Param(k, _param(v)) for k, v in params.items()]
        entries += [Metric(k, float(v), _now(), 0) for k, v in metrics.items()]
        entries += [Metric(k, float(v), _now(), step) for step, point in curve for k, v in point.items()]
        self._batch(run_id, entries)
        self.client.set_tag(run_id, LOGGED_TAG, "true")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def _batch(self, run_id: str, entries: list) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

        params = [e for e in entries if isinstance(e, Param)]
        metrics = [e for e in entries if not isinstance(e, Param)]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])


def _masked(settings: MlflowSettings) -> MlflowSettings:
    return settings.model_copy(update={"tracking_uri": settings.shown_uri})


def _now() -> int:
    return int(time.time() * 1000)


def _param(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def flat(settings: dict, prefix: str) -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` → ``{"PREFIX.lora.r": 8}`` (MLflow parameters are flat)."""
    out: dict[str, Any] = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


# -- the training runs of one retraining: retraining.json's histories -----------------------------------------------

def training_runs(model_dir) -> list[tuple[str, list[dict]]]:
    """``(run name, history)`` of each phase of the retraining exported to ``model_dir``, first phase first: the
    last phase's history is in ``model_dir/retraining.json``, an earlier phase's in the ``retraining.json`` of the
    folder the next phase started from (its ``base_model``). A path or a ``upath.UPath``."""
    record = json.loads((storage.path(model_dir) / RETRAINING_JSON).read_text())
    phases = record.get("phases") or [{"run": None}]
    runs = [(phases[-1].get("run"), record.get("history") or [])]
    for i in range(len(phases) - 2, -1, -1):
        earlier = storage.path(phases[i + 1]["base_model"]) / RETRAINING_JSON
        history = json.loads(earlier.read_text()).get("history") or [] if earlier.is_file() else []
        runs.insert(0, (phases[i].get("run"), history))
    return runs


def loss_curve(runs: list[tuple[str, list[dict]]]) -> list[tuple[int, dict[str, float]]]:
    """One curve over every phase: ``(step, {"train/loss": …, "train/lr": …, …})``, a later phase's steps counted
    on after the earlier phase's last."""
    curve, offset = [], 0
    for _, history in runs:
        for point in history:
            curve.append((offset + int(point["step"]),
                          {f"train/{k}": float(point[k]) for k in TRAIN_KEYS if point.get(k) is not None}))
        offset += int(history[-1]["step"]) if history else 0
    return curve


def write_tensorboard(storage_path, runs: list[tuple[str, list[dict]]]) -> list:
    """Event files of each training run in ``storage_path/RUN/tensorboard``: ``train/loss``, ``train/lr``,
    ``train/tokens_per_s`` and ``train/tokens`` by optimizer step. A folder that exists is kept (it is written
    whole, through a staging folder, so it is complete). Returns the folders."""
    from torch.utils.tensorboard import SummaryWriter

    from shortened.io import staged_dir

    written = []
    for run, history in runs:
        if not run or not history:
            continue
        folder = storage.path(storage_path) / run / TENSORBOARD_DIR
        done = storage.is_complete(folder) if storage.is_url(folder) else folder.is_dir()
        if not done:
            with staged_dir(folder) as staging:
                writer = SummaryWriter(log_dir=str(staging))
                for point in history:
                    for k in TRAIN_KEYS:
                        if point.get(k) is not None:
                            writer.add_scalar(f"train/{k}", float(point[k]), int(point["step"]))
                writer.close()
        written.append(folder)
    return written


# -- a sweep ------------------------------------------------------------------------------------------------------------

class SweepTracking:
    """Tracking of one sweep, on its driver: :meth:`check` before any work, :meth:`trial` as each trial finishes,
    :meth:`finish` after the selection. Pickles (Tune keeps its callbacks in the experiment state)."""

    def __init__(self, cfg: SweepConfig):
        self.cfg = cfg
        self.mlflow = MlflowRuns(cfg.tracking.mlflow, cfg.name) if cfg.tracking.mlflow.enabled else None

    def __getstate__(self) -> dict:  # (Tune saves its callbacks in tuner.pkl: no password lands there)
        tracking = self.cfg.tracking.model_copy(update={"mlflow": _masked(self.cfg.tracking.mlflow)})
        return {**self.__dict__, "cfg": self.cfg.model_copy(update={"tracking": tracking})}

    def check(self) -> None:
        if self.mlflow is not None:
            check_mlflow(self.cfg.tracking.mlflow, self.mlflow.experiment, "tracking.mlflow.tracking_uri")

    def trial(self, result: TrialResult, extra: Iterable[dict] = (), selected: bool | None = None) -> None:
        """Event files of the trial's training runs, and its MLflow run: parameters, metrics of ``result`` and
        ``extra`` (store rows: ``{name, dataset, value}``), the loss curve; tagged selected or not when given."""
        layout, spec = self.cfg.layout, result.spec
        runs = []
        if spec.method not in ("none", "dense"):
            runs = training_runs(layout.trained(result.key))
            if self.cfg.tracking.tensorboard:
                write_tensorboard(layout.train, runs)
        if self.mlflow is None:
            return
        retrains = bool(runs)
        params = {"key": result.key, "criterion": spec.criterion, "method": spec.method,
                  "ratio_requested": spec.ratio, "ratio_actual": result.ratio_actual,
                  "blocks_requested": result.blocks_requested, "blocks_removed": len(result.removed_blocks),
                  "removed_blocks": result.removed_blocks, "num_blocks": result.num_blocks, "params": result.params,
                  "params_before": result.params_before, "model": self.cfg.model, "model_path": result.model_path,
                  "tokens_requested": self.cfg.train.train_tokens if retrains else 0,
                  "tokens_trained": result.tokens_trained}
        if retrains:
            params.update(flat(self.cfg.train.model_dump(mode="json", exclude={"method"}), "train"))
        rows = [*result.metric_dicts(), *extra]
        metrics = {metric_key(m["name"], m["dataset"]): m["value"] for m in rows}
        metrics.update({f"time/{k}": v for k, v in result.timings.model_dump().items()})
        zeroshot = next((m["dataset"] for m in rows if m["name"] == "zeroshot_mean"), None)
        if zeroshot:
            params["zeroshot_tasks"] = zeroshot.replace("+", ",")
        tags = {EXPERIMENT_TAG: self.cfg.name, TRIAL_TAG: result.key}
        run_id = self.mlflow.log(result.key, tags, params, metrics, loss_curve(runs))
        if selected is not None:
            self.mlflow.client.set_tag(run_id, SELECTED_TAG, str(selected).lower())

    def finish(self, trials: list[dict], chosen: str | None) -> None:
        """After the selection: every completed trial (``store.trials`` rows) logged, with the rows the store holds
        beyond its result (speed), and tagged selected or not. A failure is a warning (see the module doc)."""
        from shortened.sweep.trial import TrialResult

        try:
            for t in trials:
                path = self.cfg.layout.result_json(t["key"])
                if t["status"] == "completed" and path.is_file():
                    result = TrialResult.load(path)
                    self.trial(result, t["metrics"] or [], selected=t["key"] == chosen)
            if self.mlflow is not None:
                self.mlflow.client.set_experiment_tag(self.mlflow.experiment_id, "shortened.selected_trial",
                                                      chosen or "none")
        except Exception as exc:  # the sweep's results are in the store; tracking catches up on --resume
            log.warning("experiment tracking failed (the sweep's results are in its store; `--resume` writes what "
                        "is missing): %s", self.safe(exc))

    def safe(self, exc: Exception) -> str:
        """An error's text with the tracking URI's password masked."""
        settings = self.cfg.tracking.mlflow
        return str(exc).replace(settings.tracking_uri, settings.shown_uri) if settings.enabled else str(exc)

    def callback(self):
        """A Tune callback that logs each trial as it finishes (on the driver)."""
        return TrackingCallback(self)


class TrackingCallback(tune.Callback):
    """Logs a trial to :class:`SweepTracking` when it reports its result; a failure is a warning."""

    def __init__(self, tracking: SweepTracking):
        self.tracking = tracking

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from shortened.sweep.runner import RESULT

        out = result.get(RESULT)
        if out is None:
            return
        try:
            self.tracking.trial(out)
        except Exception as exc:
            log.warning("experiment tracking of trial %s failed (written again at the end of the sweep): %s",
                        out.key, self.tracking.safe(exc))


def for_sweep(cfg: SweepConfig) -> SweepTracking:
    """The sweep's tracking, checked (the MLflow store answers) before any work."""
    tracking = SweepTracking(cfg)
    tracking.check()
    return tracking


# -- one retraining (`shortened retrain`) ---------------------------------------------------------------------------

def log_retraining(tracking: TrackingConfig, *, model: str, model_dir: str, storage_path: str, name: str,
                   train: TrainConfig, num_workers: int) -> str | None:
    """After ``retrain``: the event files of its training runs, and one MLflow run named ``name`` (tagged
    ``shortened.run``) with the retraining's settings as parameters and the loss curve. Returns the run id (None
    without MLflow)."""
    runs = training_runs(model_dir)
    if tracking.tensorboard:
        write_tensorboard(storage_path, runs)
    if not tracking.mlflow.enabled:
        return None
    record = json.loads((storage.path(model_dir) / RETRAINING_JSON).read_text())
    params = {"model": model, "out": model_dir, "method": train.method, "num_workers": num_workers,
              "tokens_requested": record.get("tokens"), "tokens_trained": record.get("tokens_trained_total"),
              **flat(train.model_dump(mode="json"), "train")}
    return MlflowRuns(tracking.mlflow, name).log(name, {RUN_TAG: name}, params, {}, loss_curve(runs))
