"""Where everything of one experiment lives: one :class:`ExperimentLayout` owns every path under
``storage_path/name``, so the runner, the trials, retraining and the report never join paths of their own.

    runs/demo/
      sweep.json        the validated config (what --resume compares against)
      results.db        the results store (unless store_url names another database; with an object store: on
      driver.lock       the driver's disk, see ExperimentLayout.driver_dir), the driver that holds the experiment
      scores/CRITERION.json          block scores, once per criterion, shared by every trial
      trials/KEY/pruned/             the pruned HF folder (pruning.json inside)
      trials/KEY/model/              the retrained export (retraining.json inside)
      trials/KEY/eval.json           the evaluation of the trial's model
      trials/KEY/result.json         the finished trial (a TrialResult); a resumed sweep reuses it
      train/RUN/                     Ray Train storage: one run per trial (KEY, or KEY-cpt and KEY-lora)
      tune/                          Ray Tune's own storage
      speed/blocksN.json             the speed pass, once per block count
      selection.json, timings.json   the choice, and this invocation's phase times
      report/                        `shortened report`'s default output folder
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shortened import storage

SWEEP_JSON = "sweep.json"
RESULTS_DB = "results.db"
LOCK_NAME = "driver.lock"
RESULT_JSON = "result.json"
SELECTION_JSON = "selection.json"
TIMINGS_JSON = "timings.json"  # wall time of this invocation's phases (the sweep benchmark reads it)


class _Under:
    """A path of a fixed name right under the experiment folder (``layout.sweep_json``...)."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, layout: ExperimentLayout | None, owner: type):
        if layout is None:
            raise AttributeError(f"{self.name} is a path of an ExperimentLayout instance")
        return layout.root / self.name


@dataclass(frozen=True)
class ExperimentLayout:
    """The paths of one experiment, all under ``root`` (``storage_path/name``, absolute): ``pathlib.Path`` objects,
    or ``upath.UPath`` ones when the storage path is an object-store URL (:mod:`shortened.storage`), with the same
    API. Two things stay on the driver's own disk even then: the SQLite results store and the driver lock."""

    root: Any  # Path or UPath

    sweep_json = _Under(SWEEP_JSON)
    selection_json = _Under(SELECTION_JSON)
    timings_json = _Under(TIMINGS_JSON)
    report = _Under("report")  # `shortened report`'s default output folder
    trials = _Under("trials")  # one folder per trial key
    train = _Under("train")  # Ray Train's storage path: one run per trial, named after it (see retrain.phases_for)
    tune = _Under("tune")  # Ray Tune's storage path

    @classmethod
    def of(cls, storage_path: str | Path, name: str) -> ExperimentLayout:
        return cls(storage.path(storage.absolute(storage_path)) / name)

    @property
    def remote(self) -> bool:
        """The experiment lives in an object store."""
        return storage.is_url(self.root)

    @property
    def driver_dir(self) -> Path:
        """What must be a local file of the driver's (a SQLite database, a lock taken with ``O_EXCL``): the experiment
        folder itself, or for an object store a folder of this machine's named after the experiment's URL."""
        if not self.remote:
            return self.root
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return storage.cache_root().parent / "experiments" / f"{self.root.name}-{digest}"

    @property
    def results_db(self) -> Path:
        return self.driver_dir / RESULTS_DB

    @property
    def lock(self) -> Path:
        return self.driver_dir / LOCK_NAME

    @property
    def store_url(self) -> str:
        """The default results store: a SQLite file in the experiment folder (on the driver's disk when the
        experiment lives in an object store: SQLite needs a local file)."""
        return f"sqlite:///{self.results_db}"

    def scores(self, criterion: str) -> Path:
        """The block scores of ``criterion``, computed once and shared by every trial."""
        return self.root / "scores" / f"{criterion}.json"

    def speed(self, num_blocks: int) -> Path:
        """The speed pass's rows for every trial that kept ``num_blocks`` blocks."""
        return self.root / "speed" / f"blocks{num_blocks}.json"

    # -- one trial ----------------------------------------------------------------------------------------------

    def trial(self, key: str) -> Path:
        return self.trials / key

    def result_json(self, key: str) -> Path:
        return self.trial(key) / RESULT_JSON

    def pruned(self, key: str) -> Path:
        return self.trial(key) / "pruned"

    def trained(self, key: str) -> Path:
        """The retrained model the trial's Ray Train run exports."""
        return self.trial(key) / "model"

    def eval_json(self, key: str) -> Path:
        return self.trial(key) / "eval.json"

    def evaluated_model(self, key: str, retrained: bool) -> Path:
        """The model a pruned trial evaluates: its retrained export, or the pruned folder when it does not retrain."""
        return self.trained(key) if retrained else self.pruned(key)

    def finished_results(self) -> list[Path]:
        """Every ``result.json`` a finished trial left, by key."""
        return sorted(self.trials.glob(f"*/{RESULT_JSON}"))
