"""The results store on a real PostgreSQL server (tests/pg_server.py): URLs and secrets, the schema version, retries
while the server is away, bad URLs refused before Ray starts, and tiny sweeps — two writing one database at once
while the server is stopped and started again, checked row by row against the same sweep on SQLite, resumed
without duplicates, with the password nowhere in the experiment folder, the console or the report."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from pg_server import free_port, postgres  # noqa: F401 - postgres: the session's server
from test_sweep import tiny_sweep

from shortened.cli import main
from shortened.errors import ShortenedError
from shortened.sweep.store import (SCHEMA_VERSION, ResultsStore, SchemaVersionError, StoreUnavailable, connect_url,
                                   mask_url)
from shortened.sweep.trial import TrialResult

REPO = Path(__file__).resolve().parent.parent
ROWS = [{"name": "ppl", "dataset": "wikitext2", "value": 12.5, "protocol": "paper-128"},
        {"name": "acc", "dataset": "piqa", "value": 0.625, "protocol": "lm-eval"}]


# -- URLs and secrets (no server) ------------------------------------------------------------------------------------

def test_urls_are_masked_and_secrets_come_from_the_environment(monkeypatch):
    assert mask_url("postgresql+psycopg://ann:s3cr%40t@db:5432/runs") == "postgresql+psycopg://ann:***@db:5432/runs"
    assert mask_url("postgresql+psycopg://ann@db/runs?password=s3cret&sslmode=require") == \
        "postgresql+psycopg://ann@db/runs?password=***&sslmode=require"
    for kept in ("postgresql+psycopg://ann@db/runs", "postgresql+psycopg://ann:${PG_SECRET}@db/runs",
                 "sqlite:////tmp/x/results.db", None):
        assert mask_url(kept) == kept  # no secret in it: shown as written
    assert mask_url("not a url://ann:s3cret@db") == "not a url://ann:***@db"
    # ${VAR} is expanded only to connect, and the value may hold URL syntax
    monkeypatch.setenv("PG_SECRET", "p@ss:w/rd")
    url = connect_url("postgresql+psycopg://ann:${PG_SECRET}@db/runs")
    assert url.password == "p@ss:w/rd" and url.host == "db" and url.database == "runs"
    # a saved (masked) password is dropped, so libpq reads PGPASSWORD / ~/.pgpass
    assert connect_url("postgresql+psycopg://ann:***@db/runs").password is None
    monkeypatch.delenv("PG_SECRET")
    with pytest.raises(ShortenedError, match=r"environment variable PG_SECRET \(written \$\{PG_SECRET\}"):
        connect_url("postgresql+psycopg://ann:${PG_SECRET}@db/runs")
    with pytest.raises(ShortenedError, match="not a database URL") as err:
        ResultsStore("ann:s3cret@db")
    assert "s3cret" not in str(err.value)


def test_sqlite_errors_a_retry_cannot_mend_fail_at_once(tmp_path):
    from sqlalchemy import text

    store = ResultsStore(f"sqlite:///{tmp_path / 'r.db'}", retry_s=30)
    store.ensure_experiment("e", {}, str(tmp_path))
    with store.engine.begin() as conn:
        conn.execute(text("drop table trials"))
    t0 = time.monotonic()
    with pytest.raises(ShortenedError, match="cannot read the trials: no such table: trials"):
        store.trials("e")
    assert time.monotonic() - t0 < 5  # not retried for 30 s


# -- the store on PostgreSQL (no Ray) --------------------------------------------------------------------------------

def test_postgres_store_writes_versions_and_rides_out_a_restart(postgres):
    url = postgres.create_database("unit")
    store = ResultsStore(url, retry_s=30)
    assert store.url == mask_url(url) and postgres.password not in store.url
    assert store.schema_version() == SCHEMA_VERSION
    assert postgres.query("select version from schema_version", "unit") == [(SCHEMA_VERSION,)]
    store.ensure_experiment("e", {"store_url": store.url}, "/runs/e")
    for _ in range(3):  # upserts: replaying adds no rows
        store.upsert_trial("e", "ppl-b2-cpt", {"method": "cpt", "status": "completed", "params": 8_030_261_248,
                                               "tokens_trained": 5_000_000_000}, ROWS, replace_metrics=True)
    assert store.counts("e") == {"trials": 1, "metrics": 2}
    t = store.trials("e")[0]  # 64-bit columns: an 8B model's parameter count, billions of tokens
    assert (t["params"], t["tokens_trained"]) == (8_030_261_248, 5_000_000_000)
    assert [m["value"] for m in t["metrics"]] == [12.5, 0.625]

    # the server goes away and comes back while a write waits: the write lands once, after the restart
    postgres.stop()
    restart = threading.Timer(2.0, postgres.start)
    restart.start()
    t0 = time.monotonic()
    store.upsert_trial("e", "dense", {"method": "dense", "status": "completed"}, ROWS[:1])
    restart.join()
    assert time.monotonic() - t0 >= 1.5 and store.counts("e") == {"trials": 2, "metrics": 3}
    assert postgres.query("select count(*) from trials", "unit") == [(2,)]
    # away for longer than the retry budget: a named error, with the URL masked
    postgres.stop()
    store.retry_s = 1.0
    try:
        with pytest.raises(StoreUnavailable, match=r"cannot write a trial \(connection failed.*gave up after 1 s"):
            store.upsert_trial("e", "x", {"method": "none"})
    finally:
        postgres.start()
    store.retry_s = 30
    assert store.counts("e") == {"trials": 2, "metrics": 3}

    # a store written by a newer shortened is refused before anything is written; an unversioned one is stamped
    with store.engine.begin() as conn:
        from sqlalchemy import text

        conn.execute(text("insert into schema_version (version, applied_at) values (:v, now())"),
                     {"v": SCHEMA_VERSION + 1})
        conn.execute(text("create table trials_v2_only (id int)"))
    with pytest.raises(SchemaVersionError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this "
                                                 rf"shortened's {SCHEMA_VERSION}"):
        ResultsStore(url)
    with store.engine.begin() as conn:
        conn.execute(text("drop table schema_version"))
    assert ResultsStore(url).schema_version() == SCHEMA_VERSION
    store.close()


def test_bad_store_urls_fail_before_ray_starts(postgres, tmp_path, tiny_llama_dir, monkeypatch):
    import ray

    from shortened.sweep import SweepConfig
    from shortened.sweep.runner import run_sweep

    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv("NO_SUCH_PG_VAR", raising=False)
    good = postgres.url()
    cases = [(postgres.url(password="wrong-pw-123"), 'password authentication failed for user "shortened"'),
             (good.replace(f":{postgres.port}/", f":{free_port()}/"), "Connection refused"),
             (postgres.url(database="no_such_db"), 'database "no_such_db" does not exist'),
             (good.replace("postgresql+psycopg://", "postgres://"), "Can't load plugin: sqlalchemy.dialects:postgres"),
             (good.replace("postgresql+psycopg://", "postgresql+psycopg2://"), "No module named 'psycopg2'"),
             (postgres.url(password="${NO_SUCH_PG_VAR}"), "environment variable NO_SUCH_PG_VAR"),
             (postgres.url(password=""), "no password supplied")]
    for url, message in cases:
        cfg = SweepConfig.model_validate(tiny_sweep(tiny_llama_dir, tmp_path / "runs", store_url=url))
        t0 = time.monotonic()
        with pytest.raises(ShortenedError, match=message) as err:
            run_sweep(cfg)
        assert time.monotonic() - t0 < 30
        assert "store_url" in str(err.value) or "results store" in str(err.value)
        assert postgres.password not in str(err.value) and "wrong-pw-123" not in str(err.value)
        assert not ray.is_initialized() and not (tmp_path / "runs").exists()


# -- sweeps ----------------------------------------------------------------------------------------------------------

def _launch(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "shortened.cli", *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", **env})


def _wait(what: str, cond, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not cond():
        for p, log in zip(procs, logs):
            assert p.poll() is None, f"{log.name} exited ({p.returncode}) while waiting for {what}:\n" \
                                     f"{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _cli(args: list[str], env: dict) -> str:
    r = subprocess.run([sys.executable, "-m", "shortened.cli", *args], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", **env}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


KEYS = {"dense", "magnitude-b2-none"}
MISSED = re.compile(r"the result of (\S+) is not stored now")
TIMES = {"prune_s", "train_s", "eval_s", "total_s", "tune_trial_id", "model_path"}


def _rows(store: ResultsStore, name: str, root: Path) -> dict:
    """A store's trials of one experiment, comparable across stores: timings aside, model paths relative."""
    out = {}
    for t in store.trials(name):
        row = {k: v for k, v in t.items() if k not in TIMES | {"metrics"}}
        path = Path(t["model_path"])  # the dense trial's is the original model, the others' in the experiment
        row["model_path"] = str(path.relative_to(root) if path.is_relative_to(root) else path)
        row["metrics"] = sorted((m["name"], m["dataset"], m["protocol"], m["value"]) for m in t["metrics"])
        out[t["key"]] = row
    return out


@pytest.fixture(scope="module")
def three_sweeps(postgres, tmp_path_factory, tiny_llama_dir):
    """Three tiny sweeps at once (prune 2 blocks and evaluate, no training; the dense trial and one pruned):
    ``pg-a`` and ``pg-b`` write one PostgreSQL database — a with its password written into the config, b with
    ``${VAR}`` — and ``lite`` the default SQLite file. Once a and b have trials running, the server is stopped until a
    finished trial of a could not be stored, then started again. Then a is resumed and reported on (about 2 min on
    2 cores)."""
    tmp = tmp_path_factory.mktemp("pg-sweeps")
    url = postgres.create_database("sweeps")
    var = "SHORTENED_TEST_PG_SECRET"
    common = dict(criteria=["magnitude"], methods=["none"], blocks=[2],
                  eval={"ppl": ["wikitext2"], "ppl_max_windows": 4})
    configs = {"pg-a": tiny_sweep(tiny_llama_dir, tmp / "runs", **common, name="pg-a", store_url=url),
               "pg-b": tiny_sweep(tiny_llama_dir, tmp / "runs", **common, name="pg-b",
                                  store_url=url.replace(postgres.password, "${" + var + "}")),
               "lite": tiny_sweep(tiny_llama_dir, tmp / "runs", **common, name="lite")}
    paths, logs, procs = {}, {}, {}
    for name, cfg in configs.items():
        paths[name] = tmp / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
        logs[name] = tmp / f"{name}.log"
    # pg-a gives a write up after 4 s (its trials' results are then written at the end); pg-b retries through
    env = {"SHORTENED_STORE_RETRY_S": "4", var: postgres.password}
    for name in configs:
        procs[name] = _launch(["sweep", str(paths[name])], logs[name],
                              {**env, "SHORTENED_STORE_RETRY_S": "120"} if name == "pg-b" else env)
    # the outage is timed by pg-a and pg-b; lite may finish at any point (its exit status is checked below)
    watched, watched_logs = [procs["pg-a"], procs["pg-b"]], [logs["pg-a"], logs["pg-b"]]

    def running(name: str) -> bool:
        import psycopg

        try:
            return bool(postgres.query(f"select t.key from trials t join experiments e on t.experiment_id = e.id "
                                       f"where e.name = '{name}' and t.status = 'running'", "sweeps"))
        except psycopg.errors.UndefinedTable:  # no sweep has opened the store yet
            return False

    try:
        _wait("trials of pg-a and pg-b to start", lambda: running("pg-a") and running("pg-b"), watched, watched_logs)
        stored = {k for (k,) in postgres.query("select t.key from trials t join experiments e on t.experiment_id = "
                                               "e.id where e.name = 'pg-a' and t.status = 'completed'", "sweeps")}
        postgres.stop()
        # down until a trial of pg-a finished and its result could not be written (the retry budget is 4 s)
        _wait("a result of pg-a missing the store", lambda: MISSED.search(logs["pg-a"].read_text()),
              watched, watched_logs)
    finally:
        postgres.start()
    outs = {}
    for name, p in procs.items():
        assert p.wait(timeout=300) == 0, logs[name].read_text()[-6000:]
        outs[name] = logs[name].read_text()
    exp = {name: tmp / "runs" / name for name in configs}
    stores = {"pg": ResultsStore(url), "lite": ResultsStore(f"sqlite:///{exp['lite'] / 'results.db'}")}
    counts = stores["pg"].counts("pg-a")
    resumed = _cli(["sweep", str(paths["pg-a"]), "--resume"], env)
    reports = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(reports), redirect_stderr(reports):
        mp.setenv("PGPASSWORD", postgres.password)  # sweep.json keeps the URL masked: the reading verbs need it
        assert main(["report", str(exp["pg-a"]), "--format", "html"]) == 0
        mp.delenv("PGPASSWORD")
        mp.setenv(var, postgres.password)  # pg-b's saved URL names the variable
        assert main(["results", str(exp["pg-b"])]) == 0
    yield dict(postgres=postgres, url=url, exp=exp, stores=stores, outs=outs, stored_before_outage=stored,
               counts_before_resume=counts, resumed=resumed, reports=reports.getvalue(), tmp=tmp)
    for s in stores.values():
        s.close()


def test_two_sweeps_share_postgres_through_an_outage(three_sweeps):
    s = three_sweeps
    pg, postgres, exp = s["stores"]["pg"], s["postgres"], s["exp"]
    assert set(pg.experiment_names()) == {"pg-a", "pg-b"}
    for name in ("pg-a", "pg-b"):  # both complete, each with exactly its own rows
        trials = pg.trials(name)
        assert {t["key"] for t in trials} == KEYS and all(t["status"] == "completed" for t in trials), trials
        assert all(Path(t["model_path"]).is_relative_to(exp[name]) for t in trials if t["key"] != "dense")
        assert all(t["metrics"] for t in trials)
        assert pg.experiment(name)["status"] == "completed" and pg.experiment(name)["selected_trial"]
        assert "2 trial(s) run now" in s["outs"][name]
    assert postgres.query("select count(*) from trials", "sweeps") == [(4,)]
    assert postgres.query("select count(*) from metrics", "sweeps") == \
        [(sum(pg.counts(n)["metrics"] for n in ("pg-a", "pg-b")),)]
    # the outage: a finished trial of pg-a could not be written, and was written from its result.json at the end
    missed = set(MISSED.findall(s["outs"]["pg-a"]))
    assert missed and missed <= KEYS - s["stored_before_outage"] and "retrying" in s["outs"]["pg-a"]
    assert "retrying" in s["outs"]["pg-b"] and not MISSED.search(s["outs"]["pg-b"])  # b waited the outage out
    for key in KEYS:
        rec = TrialResult.load(exp["pg-a"] / "trials" / key / "result.json")
        row = next(t for t in pg.trials("pg-a") if t["key"] == key)
        assert {k: row[k] for k in rec.row()} == rec.row()
        assert row["metrics"] == rec.metric_dicts()


def test_postgres_rows_equal_sqlite_rows_of_the_same_sweep(three_sweeps):
    s = three_sweeps
    pg = _rows(s["stores"]["pg"], "pg-a", s["exp"]["pg-a"])
    lite = _rows(s["stores"]["lite"], "lite", s["exp"]["lite"])
    assert set(pg) == KEYS and pg == lite
    assert s["stores"]["lite"].experiment("lite")["selected_trial"] == \
        s["stores"]["pg"].experiment("pg-a")["selected_trial"]


def test_resumed_sweep_adds_no_rows(three_sweeps):
    s = three_sweeps
    assert "0 trial(s) run now" in s["resumed"]
    assert s["stores"]["pg"].counts("pg-a") == s["counts_before_resume"]
    assert s["postgres"].query("select count(*) from trials", "sweeps") == [(4,)]


def test_the_password_is_nowhere_in_files_console_or_report(three_sweeps):
    s = three_sweeps
    secret = s["postgres"].password.encode()
    exp = s["exp"]
    files = [f for name in ("pg-a", "pg-b") for f in exp[name].rglob("*") if f.is_file()]
    assert len(files) > 20 and {f.name for f in files} >= {"sweep.json", "report.html", "tuner.pkl", "result.json"}
    leaked = [str(f) for f in files if secret in f.read_bytes()]
    assert not leaked, f"the password is in {leaked}"
    for text in (*s["outs"].values(), s["resumed"], s["reports"]):
        assert s["postgres"].password not in text
    # shown masked where it is shown: the end of the sweep and the report; sweep.json and the store keep it masked
    masked = mask_url(s["url"])
    assert f"store {masked}" in s["outs"]["pg-a"] and masked in (exp["pg-a"] / "report" / "report.html").read_text()
    assert json.loads((exp["pg-a"] / "sweep.json").read_text())["store_url"] == masked
    assert json.loads((exp["pg-b"] / "sweep.json").read_text())["store_url"].endswith(
        ":${SHORTENED_TEST_PG_SECRET}@127.0.0.1:%d/sweeps" % s["postgres"].port)  # a reference, kept as written
    assert not s["postgres"].query("select name from experiments where config::text like "
                                   f"'%{s['postgres'].password}%'", "sweeps")
