"""The results store: experiments, trials and metrics in any SQLAlchemy database — a SQLite file by default, or a
shared PostgreSQL server (``postgresql+psycopg://user@host/db``, ``psycopg[binary]``). Only a sweep's driver writes,
one transaction per event; writes are upserts keyed by (experiment, trial key), so replaying a result — a resumed
sweep — adds no rows, and several sweeps (different experiment names) may write one database at once.

    sqlite3 runs/demo/results.db "select key, status, ratio_actual from trials"

**Tables** (the users' query surface, documented in the README): ``schema_version``, ``experiments``, ``trials``,
``metrics``. **Migrations**: the schema has a version, :data:`SCHEMA_VERSION`, kept in ``schema_version`` (one row
per version applied). Opening a store creates the tables it lacks and stamps the version (under a PostgreSQL
advisory lock, so drivers that start together do not race); a store of an older version is brought up by the
steps in :data:`MIGRATIONS`, one per version; a store of a newer version than this code knows is refused before
anything is written (:class:`SchemaVersionError`).

**Credentials.** A URL is shown and saved with its password masked (:func:`mask_url`: ``user:***@host``). Give the
secret outside the URL — ``PGPASSWORD`` or ``~/.pgpass`` (read by libpq itself), or a reference to an environment
variable inside it, ``postgresql+psycopg://user:${SHORTENED_PGPASSWORD}@host/db``, expanded only when connecting
(:func:`connect_url`), so the URL saved in ``sweep.json`` still works for ``results``/``report`` where the
variable is set. A saved URL whose password was masked connects without one (libpq falls back to the environment).

**The database going away.** Every read and write is retried while the server is unreachable (backoff 0.5 s
doubling to 8 s, for at most ``retry_s`` seconds, default ``$SHORTENED_STORE_RETRY_S`` or 60), then raises
:class:`StoreUnavailable`; a sweep's driver keeps going and writes what it missed from the trials'
``result.json`` at the end of the sweep or on ``--resume``.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import (JSON, BigInteger, Connection, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint, create_engine, func, inspect, select, text)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from shortened.errors import ShortenedError

if TYPE_CHECKING:
    from shortened.sweep.trial import TrialResult

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 1  # bump with a step in MIGRATIONS whenever a table or column changes
# version N -> N + 1, run inside the opening transaction (e.g. conn.execute(text("ALTER TABLE trials ADD ..."))).
# Version 1 is the first versioned schema; a store written before versioning has its tables and is stamped 1.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}
RETRY_ENV = "SHORTENED_STORE_RETRY_S"
MASK = "***"  # how SQLAlchemy renders a hidden password
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_LOCK_KEY = 0x5407_7E4E  # the advisory lock that serialises schema creation/migration on PostgreSQL


class SchemaVersionError(ShortenedError):
    """The database holds a results schema this code does not know (written by a newer shortened)."""


class StoreUnavailable(ShortenedError):
    """The database stayed unreachable for the whole retry budget."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


# -- URLs: masking and secrets ---------------------------------------------------------------------------------------

def mask_url(url: str | None) -> str | None:
    """``url`` safe to show or save: a literal password (in the user part or a ``password=`` query parameter)
    becomes ``***`` (SQLAlchemy's ``render_as_string(hide_password=True)``); a URL without one, or whose password is
    an environment reference ``${NAME}``, is returned as written. Text that is not a URL has anything between
    ``user:`` and ``@`` masked."""
    if not url:
        return url
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return re.sub(r"(^|://)([^:/@\s]*):[^@\s]*@", rf"\g<1>\g<2>:{MASK}@", url)
    literal = parsed.password not in (None, MASK) and not ENV_REF.fullmatch(parsed.password)
    query_pw = parsed.query.get("password")
    secret_query = isinstance(query_pw, str) and query_pw != MASK and not ENV_REF.fullmatch(query_pw)
    if not literal and not secret_query:
        return url
    if secret_query:
        parsed = parsed.update_query_dict({"password": MASK})
    return parsed.render_as_string(hide_password=literal).replace("password=%2A%2A%2A", f"password={MASK}")


def connect_url(url: str) -> URL:
    """The URL to connect with: ``${NAME}`` references in the user, password, host or database replaced by the
    environment's values, a masked password (``***``, as :func:`mask_url` saves it) dropped so libpq's
    ``PGPASSWORD``/``~/.pgpass`` apply. Raises ShortenedError naming the (masked) URL and the variable when one is
    unset, or when ``url`` is not a URL."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ShortenedError(f"results store {mask_url(url)!r}: not a database URL ({exc}); expected e.g. "
                             "sqlite:///runs/x/results.db or postgresql+psycopg://user@host/db") from exc

    def expand(value: str | None) -> str | None:
        if value is None:
            return None

        def env(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                raise ShortenedError(f"results store {mask_url(url)!r}: environment variable {m.group(1)} "
                                     f"(written ${{{m.group(1)}}} in the URL) is not set")
            return os.environ[m.group(1)]

        return ENV_REF.sub(env, value)

    password = None if parsed.password == MASK else expand(parsed.password)
    query = {k: expand(v) if isinstance(v, str) else v for k, v in parsed.query.items()}
    if query.get("password") == MASK:
        del query["password"]
    # URL.create, not URL.set: set() takes password=None as "unchanged"
    return URL.create(parsed.drivername, username=expand(parsed.username), password=password,
                      host=expand(parsed.host), port=parsed.port, database=expand(parsed.database), query=query)


def _retried(what: str):
    """A :class:`ResultsStore` method run through its :meth:`~ResultsStore._retrying` (each call is one
    transaction, so a retry repeats all of it or nothing)."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            return self._retrying(what, lambda: method(self, *args, **kwargs))
        return run
    return wrap


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    return "; ".join(lines[:2]) or type(orig).__name__


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    """One row per schema version applied to this database; the highest is the store's version."""

    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    applied_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


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
    params: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # 64-bit: 8B params
    params_before: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # 64-bit: 8B params
    ratio_actual: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # TRIAL_STATUSES
    model_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    tokens_trained: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # 64-bit: 8B params
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


# a trial's status: pending, running, completed, error, or stopped (early, by the sweep's scheduler: ASHA)
TRIAL_STATUSES = ("pending", "running", "completed", "error", "stopped")
SETTLED = ("completed", "stopped")  # statuses a resumed sweep does not run again
TRIAL_FIELDS = [c.name for c in Trial.__table__.columns if c.name not in ("id", "experiment_id", "updated_at")]


class ResultsStore:
    """Read and write one results database.

    ``url`` is any SQLAlchemy URL (see :func:`connect_url` for secrets); ``self.url`` is the masked form, safe to
    print or save. Opening creates the missing tables and checks the schema version. ``retry_s`` bounds the retries
    of each read and write while the server is unreachable (default ``$SHORTENED_STORE_RETRY_S`` or 60 s);
    ``connect_timeout_s`` bounds each connection attempt to a server. Raises ShortenedError naming the masked URL
    for a URL that is not one, an unknown dialect or a missing driver; :class:`StoreUnavailable` for a server that
    cannot be reached (or refuses the login) within ``retry_s``; :class:`SchemaVersionError` for a newer schema."""

    def __init__(self, url: str, retry_s: float | None = None, connect_timeout_s: float = 10.0):
        self.url = mask_url(url)
        self.retry_s = float(os.environ.get(RETRY_ENV, 60)) if retry_s is None else retry_s
        target = connect_url(url)
        try:
            kwargs: dict = {"pool_pre_ping": True}
            if target.get_backend_name() == "sqlite":
                if target.database not in (None, "", ":memory:"):
                    Path(target.database).parent.mkdir(parents=True, exist_ok=True)
            elif target.get_backend_name() == "postgresql":
                kwargs["connect_args"] = {"connect_timeout": max(1, round(connect_timeout_s))}
            self.engine = create_engine(target, **kwargs)
        except (SQLAlchemyError, ImportError, ValueError, OSError) as exc:
            raise ShortenedError(f"results store {self.url!r}: {_first_line(exc)}") from exc
        self._retrying("open", self._open_schema)

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried with backoff while the database is unreachable, for at most ``retry_s`` seconds."""
        deadline, delay = time.monotonic() + self.retry_s, 0.5
        while True:
            try:
                return fn()
            except (OperationalError, InterfaceError) as exc:
                if not self._transient(exc):
                    raise ShortenedError(f"results store {self.url!r}: cannot {what}: {_first_line(exc)}") from exc
                if time.monotonic() + delay > deadline:
                    tried = f"; gave up after {self.retry_s:g} s of retries" if self.retry_s > 0 else ""
                    raise StoreUnavailable(f"results store {self.url!r}: cannot {what} ({_first_line(exc)})"
                                           f"{tried}") from exc
                log.warning("results store %s: %s failed (%s); retrying in %.1f s", self.url, what,
                            _first_line(exc), delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
            except SQLAlchemyError as exc:
                raise ShortenedError(f"results store {self.url!r}: cannot {what}: {_first_line(exc)}") from exc

    def _transient(self, exc: OperationalError | InterfaceError) -> bool:
        """Worth retrying: a connection lost or refused (on a server, every OperationalError/InterfaceError: the
        server away or shutting down, a deadlock or serialization failure), or SQLite's locked/busy file — not
        SQLite's other operational errors (a missing table, a read-only file), which a retry cannot mend."""
        if exc.connection_invalidated or self.engine.dialect.name != "sqlite":
            return True
        return any(word in str(exc.orig).lower() for word in ("locked", "busy"))

    def _open_schema(self) -> None:
        """Check the schema version, create what is missing, apply migrations and stamp the version: one
        transaction, serialised across drivers by an advisory lock on PostgreSQL."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            found = None
            if inspect(conn).has_table(SchemaVersion.__tablename__):
                found = conn.execute(select(func.max(SchemaVersion.version))).scalar()
            if found is not None and found > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"results store {self.url!r} has schema version {found}, newer than this shortened's "
                    f"{SCHEMA_VERSION}: it was written by a newer shortened; upgrade this one (pip install -U "
                    "shortened) or use another database")
            Base.metadata.create_all(conn)
            version = SCHEMA_VERSION if found is None else found  # unversioned: tables made by version 1's code
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](conn)
                version += 1
                conn.execute(SchemaVersion.__table__.insert().values(version=version, applied_at=_now()))
            if found is None:
                conn.execute(SchemaVersion.__table__.insert().values(version=SCHEMA_VERSION, applied_at=_now()))

    def schema_version(self) -> int:
        """The schema version the database holds."""
        def read() -> int:
            with Session(self.engine) as s:
                return s.scalar(select(func.max(SchemaVersion.version)))
        return self._retrying("read the schema version", read)

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    # -- writes (the driver only) --------------------------------------------------------------------------------

    @_retried("register the experiment")
    def ensure_experiment(self, name: str, config: dict, experiment_dir: str) -> None:
        with Session(self.engine) as s, s.begin():
            exp = s.scalar(select(Experiment).where(Experiment.name == name))
            if exp is None:
                s.add(Experiment(name=name, config=config, experiment_dir=experiment_dir, status="running"))
            else:
                exp.config, exp.experiment_dir, exp.status = config, experiment_dir, "running"

    @_retried("update the experiment")
    def set_experiment(self, name: str, **fields) -> None:
        with Session(self.engine) as s, s.begin():
            exp = self._experiment(s, name)
            for k, v in fields.items():
                setattr(exp, k, v)

    @_retried("write a trial")
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

    def record_validation(self, experiment: str, key: str, fields: dict, report: dict, *,
                          stopped: bool = False) -> None:
        """A retraining trial's validation report (``{"tokens", "val_loss", "val_ppl"}``, from
        :mod:`shortened.training.validation`): its ``tokens_trained`` and the metric rows ``val_loss`` and
        ``val_ppl`` (dataset ``validation``) replaced by these; ``stopped``: the scheduler stopped the trial on this
        report, so its status becomes ``stopped`` (a resumed sweep does not run it again)."""
        fields = {**fields, "tokens_trained": int(report["tokens"])}
        if stopped:
            fields["status"] = "stopped"
        self.upsert_trial(experiment, key, fields, [  # the latest value (at tokens_trained) replaces the last one
            {"name": name, "dataset": "validation", "value": float(report[name]), "protocol": "held-out windows"}
            for name in ("val_loss", "val_ppl")])

    # -- reads ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _experiment(s: Session, name: str) -> Experiment:
        exp = s.scalar(select(Experiment).where(Experiment.name == name))
        if exp is None:
            raise ShortenedError(f"no experiment {name!r} in the results store")
        return exp

    @_retried("list experiments")
    def experiment_names(self) -> list[str]:
        with Session(self.engine) as s:
            return list(s.scalars(select(Experiment.name).order_by(Experiment.created_at)))

    @_retried("read the experiment")
    def experiment(self, name: str) -> dict:
        with Session(self.engine) as s:
            exp = self._experiment(s, name)
            return {"name": exp.name, "config": exp.config, "experiment_dir": exp.experiment_dir,
                    "status": exp.status, "selected_trial": exp.selected_trial, "created_at": exp.created_at}

    @_retried("read the trials")
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


def check_store(url: str, experiment: str, resume: bool, connect_timeout_s: float = 10.0) -> None:
    """A sweep's store, checked before anything starts (no retries: a wrong host, port, password or database name
    fails in seconds): the URL parses and its driver is installed; a database server is reachable with these
    credentials, its schema is one this code knows, and a new experiment's name is not taken there. A SQLite file
    is created with the experiment folder, so for SQLite only the URL is checked. Raises ShortenedError (with the
    URL masked)."""
    target = connect_url(url)
    masked = mask_url(url)
    try:
        dialect = target.get_dialect()
        if target.get_backend_name() != "sqlite":
            dialect.import_dbapi()
    except (SQLAlchemyError, ImportError) as exc:
        hint = " (psycopg 3 is postgresql+psycopg://; pip install 'psycopg[binary]')" \
            if target.get_backend_name() in ("postgres", "postgresql") else ""
        raise ShortenedError(f"store_url {masked!r}: {_first_line(exc)}{hint}") from exc
    if target.get_backend_name() == "sqlite":
        return
    try:
        store = ResultsStore(url, retry_s=0, connect_timeout_s=connect_timeout_s)
    except StoreUnavailable as exc:
        raise StoreUnavailable(f"store_url: {exc} (is the server up, and are host, port, user, password and "
                               "database right? the password may come from PGPASSWORD, ~/.pgpass or ${VAR} in the "
                               "URL)") from exc
    try:
        if not resume and experiment in store.experiment_names():
            raise ShortenedError(f"experiment {experiment!r} already exists in {store.url}; use --resume, or choose "
                                 "another name")
    finally:
        store.close()
