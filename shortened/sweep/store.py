"""The results store: experiments, trials and metrics in any SQLAlchemy database (SQLite file by default,
``postgresql://`` the same). Only the sweep driver writes, one transaction per event; writes are upserts keyed by
(experiment, trial key), so replaying a result — a resumed sweep — adds no rows.

    sqlite3 runs/demo/results.db "select key, status, ratio_actual from trials"
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from shortened.errors import ShortenedError

if TYPE_CHECKING:
    from shortened.sweep.trial import TrialResult


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Experiment(Base):
    __tablename__ = "experiments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    config: Mapped[dict] = mapped_column(JSON)
    experiment_dir: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="created")
    selected_trial: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now, onupdate=_now)
    trials: Mapped[list[Trial]] = relationship(back_populates="experiment", cascade="all, delete-orphan")


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("experiment_id", "key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"))
    key: Mapped[str] = mapped_column(String(200))  # e.g. ppl-r0.2-cpt; the dense baseline is "dense"
    criterion: Mapped[str | None] = mapped_column(String(50), nullable=True)
    ratio: Mapped[float | None] = mapped_column(Float, nullable=True)  # requested
    blocks_requested: Mapped[int | None] = mapped_column(Integer, nullable=True)
    method: Mapped[str] = mapped_column(String(20))
    removed_blocks: Mapped[list | None] = mapped_column(JSON, nullable=True)
    num_blocks: Mapped[int | None] = mapped_column(Integer, nullable=True)
    params: Mapped[int | None] = mapped_column(Integer, nullable=True)
    params_before: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ratio_actual: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # running, completed, error
    model_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    tokens_trained: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prune_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    total_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    tune_trial_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now, onupdate=_now)
    experiment: Mapped[Experiment] = relationship(back_populates="trials")
    metrics: Mapped[list[Metric]] = relationship(back_populates="trial", cascade="all, delete-orphan")


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("trial_id", "name", "dataset", "protocol"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id"))
    name: Mapped[str] = mapped_column(String(50))  # ppl, acc, acc_norm, zeroshot_mean, latency_s, ...
    dataset: Mapped[str] = mapped_column(String(200))  # wikitext2, piqa, gen-b1-n128, ...
    value: Mapped[float] = mapped_column(Float)
    protocol: Mapped[str] = mapped_column(String(100))  # paper-128, lm-eval-0.4.13-limit50, ...
    trial: Mapped[Trial] = relationship(back_populates="metrics")


TRIAL_FIELDS = [c.name for c in Trial.__table__.columns if c.name not in ("id", "experiment_id", "updated_at")]


class ResultsStore:
    """Read and write one results database. ``url`` is any SQLAlchemy URL."""

    def __init__(self, url: str):
        self.url = url
        try:
            from sqlalchemy.engine import make_url

            parsed = make_url(url)
            if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url)
            Base.metadata.create_all(self.engine)
        except (SQLAlchemyError, ImportError, ValueError, OSError) as exc:
            raise ShortenedError(f"results store {url!r}: {exc}") from exc

    # -- writes (the driver only) --------------------------------------------------------------------------------

    def ensure_experiment(self, name: str, config: dict, experiment_dir: str) -> None:
        with Session(self.engine) as s, s.begin():
            exp = s.scalar(select(Experiment).where(Experiment.name == name))
            if exp is None:
                s.add(Experiment(name=name, config=config, experiment_dir=experiment_dir, status="running"))
            else:
                exp.config, exp.experiment_dir, exp.status = config, experiment_dir, "running"

    def set_experiment(self, name: str, **fields) -> None:
        with Session(self.engine) as s, s.begin():
            exp = self._experiment(s, name)
            for k, v in fields.items():
                setattr(exp, k, v)

    def upsert_trial(self, experiment: str, key: str, fields: dict, metrics: Iterable[dict] | None = None,
                     replace_metrics: bool = False) -> None:
        """Create or update one trial and (optionally) its metrics, in one transaction."""
        unknown = set(fields) - set(TRIAL_FIELDS)
        if unknown:
            raise ValueError(f"unknown trial fields {sorted(unknown)}")
        with Session(self.engine) as s, s.begin():
            exp = self._experiment(s, experiment)
            trial = s.scalar(select(Trial).where(Trial.experiment_id == exp.id, Trial.key == key))
            if trial is None:
                trial = Trial(experiment=exp, key=key, method=fields.get("method", "none"))
                s.add(trial)
            for k, v in fields.items():
                setattr(trial, k, v)
            if replace_metrics:
                trial.metrics.clear()
                s.flush()
            existing = {(m.name, m.dataset, m.protocol): m for m in trial.metrics}
            for row in metrics or []:
                ident = (row["name"], row["dataset"], row["protocol"])
                if ident in existing:
                    existing[ident].value = float(row["value"])
                else:
                    existing[ident] = Metric(trial=trial, name=row["name"], dataset=row["dataset"],
                                             value=float(row["value"]), protocol=row["protocol"])
                    s.add(existing[ident])

    def record_result(self, experiment: str, result: TrialResult, **fields) -> None:
        """A finished trial: its columns (plus ``fields``, e.g. Tune's trial id) and exactly its metrics."""
        self.upsert_trial(experiment, result.key, {**result.row(), **fields}, result.metric_dicts(),
                          replace_metrics=True)

    # -- reads ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _experiment(s: Session, name: str) -> Experiment:
        exp = s.scalar(select(Experiment).where(Experiment.name == name))
        if exp is None:
            raise ShortenedError(f"no experiment {name!r} in the results store")
        return exp

    def experiment_names(self) -> list[str]:
        with Session(self.engine) as s:
            return list(s.scalars(select(Experiment.name).order_by(Experiment.created_at)))

    def experiment(self, name: str) -> dict:
        with Session(self.engine) as s:
            exp = self._experiment(s, name)
            return {"name": exp.name, "config": exp.config, "experiment_dir": exp.experiment_dir,
                    "status": exp.status, "selected_trial": exp.selected_trial, "created_at": exp.created_at}

    def trials(self, experiment: str) -> list[dict]:
        """Every trial as a dict of its columns plus ``metrics``: a list of metric rows."""
        with Session(self.engine) as s:
            exp = self._experiment(s, experiment)
            rows = s.scalars(select(Trial).where(Trial.experiment_id == exp.id).order_by(Trial.id)).all()
            return [{**{f: getattr(t, f) for f in TRIAL_FIELDS},
                     "metrics": [{"name": m.name, "dataset": m.dataset, "value": m.value, "protocol": m.protocol}
                                 for m in sorted(t.metrics, key=lambda m: m.id)]} for t in rows]

    def counts(self, experiment: str) -> dict[str, int]:
        """Row counts (for tests and the resume check): trials and metrics of one experiment."""
        trials = self.trials(experiment)
        return {"trials": len(trials), "metrics": sum(len(t["metrics"]) for t in trials)}
