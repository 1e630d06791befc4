"""Experiment tracking (issue 21 §2): a tiny sweep with ``tracking.mlflow`` set to a local SQLite MLflow store,
read back with the MLflow client (one run per trial, its parameters, evaluation, speed and loss curve, the selected
trial tagged; a resume adds nothing), and the TensorBoard event files of every training run read back with
TensorBoard's own reader; ``retrain``'s flags; an unreachable tracking server named before Ray starts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from shortened.cli import build_parser
from shortened.errors import ShortenedError
from shortened.sweep import SweepConfig
from shortened.sweep.store import ResultsStore
from shortened.tracking import (EXPERIMENT_TAG, LOGGED_TAG, SELECTED_TAG, TRIAL_TAG, log_retraining,
                                training_runs)
from shortened.training.export import RETRAINING_JSON

KEY = "magnitude-b2-cpt+lora"  # two training runs: KEY-cpt, then KEY-lora


def tracked_sweep(model_dir: Path, storage: Path, uri: str, **kw) -> SweepConfig:
    """The dense baseline and one two-phase trial of a tiny Llama: ~1.5 minutes on 2 cores."""
    cfg = dict(name="tracked", model=str(model_dir), criteria=["magnitude"], blocks=[2], methods=["cpt+lora"],
               keep_first=1, keep_last=1,
               train={"train_tokens": 256, "micro_batch_size": 2, "lr": 3e-3, "zero_stage": 0,
                      "report_every_steps": 1, "data": {"seq_len": 64}, "lora": {"zero_stage": 0}},
               eval={"ppl": ["wikitext2"], "ppl_max_windows": 4, "tasks": ["piqa"], "limit": 4, "speed": True,
                     "speed_new_tokens": [4], "speed_repeats": 1},
               resources={"workers_per_trial": 1, "cpus_per_worker": 0.95},
               selection={"tolerance_pct": 1000}, storage_path=str(storage),
               tracking={"mlflow": {"tracking_uri": uri, "experiment": "pruning-runs"}})
    cfg.update(kw)
    return SweepConfig.model_validate(cfg)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_llama_dir):
    """The sweep, run once (and resumed once) for every test here; then `shortened retrain` on its pruned model."""
    import ray

    from shortened.cli import main
    from shortened.sweep.runner import run_sweep

    tmp = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = tracked_sweep(tiny_llama_dir, tmp / "runs", uri)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        outcome = run_sweep(cfg)
        before = _snapshot(uri)
        run_sweep(cfg, resume=True)  # nothing to run: nothing logged twice
        after = _snapshot(uri)
        assert main(["retrain", "--model", str(cfg.layout.pruned(KEY)), "--out", str(tmp / "healed"), "--name", "heal",
                     "--train_tokens", "256", "--micro_batch_size", "2", "--zero_stage", "0", "--report_every_steps",
                     "1", "--data.seq_len", "64", "--num_workers", "1", "--cpus_per_worker", "1", "--storage_path",
                     str(tmp / "ray"), "--mlflow.tracking_uri", uri, "--mlflow.experiment", "healing"]) == 0
    finally:
        ray.shutdown()
    return SimpleNamespace(cfg=cfg, outcome=outcome, uri=uri, before=before, after=after, tmp=tmp)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str) -> dict:
    client = _client(uri)
    exp = client.get_experiment_by_name("pruning-runs")
    return {r.data.tags[TRIAL_TAG]: r for r in client.search_runs([exp.experiment_id])}


def _snapshot(uri: str) -> dict:
    """Every run's id and the length of every metric's history: what a second write would change."""
    client = _client(uri)
    return {key: (r.info.run_id, {m: len(client.get_metric_history(r.info.run_id, m)) for m in r.data.metrics})
            for key, r in _runs(uri).items()}


def _history(folder: Path) -> list[dict]:
    return json.loads((folder / RETRAINING_JSON).read_text())["history"]


def test_one_mlflow_run_per_trial_with_its_params_metrics_and_selection(swept):
    cfg, outcome, uri, before, after = swept.cfg, swept.outcome, swept.uri, swept.before, swept.after
    client = _client(uri)
    runs = _runs(uri)
    store = ResultsStore(outcome.store_url)
    trials = {t["key"]: t for t in store.trials(cfg.name)}
    assert sorted(runs) == sorted(trials) == ["dense", KEY]
    chosen = store.experiment(cfg.name)["selected_trial"]
    assert chosen in trials
    for key, run in runs.items():
        t = trials[key]
        assert run.info.run_name == key and run.info.status == "FINISHED"
        assert run.data.tags[EXPERIMENT_TAG] == cfg.name and run.data.tags[LOGGED_TAG] == "true"
        assert run.data.tags[SELECTED_TAG] == ("true" if key == chosen else "false")
        p = run.data.params
        assert (p["method"], p["criterion"]) == (t["method"], str(t["criterion"]).replace("None", "none"))
        assert float(p["ratio_actual"]) == pytest.approx(t["ratio_actual"])
        assert int(p["tokens_trained"]) == t["tokens_trained"] and int(p["params"]) == t["params"]
        # every metric the store holds (evaluation, and speed, measured after the trials) is the run's
        for m in t["metrics"]:
            name = m["name"] if m["name"] == "zeroshot_mean" else f"{m['name']}/{m['dataset']}"
            assert run.data.metrics[name] == pytest.approx(m["value"]), name
        assert {"ppl/wikitext2", "acc/piqa", "zeroshot_mean", "latency_s/gen-b1-n4",
                "speedup_vs_baseline/gen-b1-n4", "time/total_s"} <= set(run.data.metrics)
    pruned = runs[KEY].data.params
    assert (pruned["blocks_requested"], pruned["blocks_removed"]) == ("2", "2")
    assert pruned["removed_blocks"] == ",".join(map(str, trials[KEY]["removed_blocks"]))
    assert pruned["tokens_requested"] == "256" and pruned["train.lr"] == "0.003"
    assert client.get_experiment_by_name("pruning-runs").tags["shortened.selected_trial"] == chosen
    # the loss curve by step: the CPT phase's points, then the LoRA phase's counted on after them
    layout = cfg.layout
    cpt, lora = _history(layout.train / f"{KEY}-cpt" / "model"), _history(layout.trained(KEY))
    assert cpt and lora
    expected = [(h["step"], h["loss"]) for h in cpt] + [(cpt[-1]["step"] + h["step"], h["loss"]) for h in lora]
    curve = sorted((m.step, m.value) for m in client.get_metric_history(runs[KEY].info.run_id, "train/loss"))
    assert [s for s, _ in curve] == [s for s, _ in expected]
    assert [v for _, v in curve] == pytest.approx([v for _, v in expected])
    assert "train/loss" not in runs["dense"].data.metrics
    # the resume found every run again: no new run, no repeated point
    assert after == before


def test_tensorboard_event_files_of_every_training_run(swept):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = swept.cfg
    layout = cfg.layout
    phases = training_runs(layout.trained(KEY))
    assert [run for run, _ in phases] == [f"{KEY}-cpt", f"{KEY}-lora"]
    for run, history in phases:
        folder = layout.train / run / "tensorboard"
        assert list(folder.glob("events.out.tfevents.*")), folder
        events = EventAccumulator(str(folder))
        events.Reload()
        assert {"train/loss", "train/lr", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
        loss = events.Scalars("train/loss")  # float32 in the event file
        assert [e.step for e in loss] == [h["step"] for h in history]
        assert [e.value for e in loss] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert not (layout.train / "dense").exists()


def test_retraining_logs_one_run_with_its_settings(swept, tmp_path):
    """What `shortened retrain` does after training, on the sweep's two-phase retraining."""
    cfg, uri = swept.cfg, swept.uri
    train = cfg.train.model_copy(update={"method": "cpt+lora"})
    run_id = log_retraining(cfg.tracking.model_copy(update={"tensorboard": True}), model="pruned",
                            model_dir=str(cfg.layout.trained(KEY)), storage_path=str(tmp_path), name="heal",
                            train=train, num_workers=1)
    client = _client(uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "pruning-runs"
    assert run.data.params["method"] == "cpt+lora" and run.data.params["tokens_trained"] == "512"
    assert len(client.get_metric_history(run_id, "train/loss")) == sum(len(h) for _, h in
                                                                        training_runs(cfg.layout.trained(KEY)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{KEY}-cpt", f"{KEY}-lora"]  # events by run name


def test_shortened_retrain_logs_its_run_and_event_files(swept):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from shortened.tracking import RUN_TAG

    client = _client(swept.uri)
    exp = client.get_experiment_by_name("healing")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "heal" and run.data.tags[RUN_TAG] == "heal"
    assert (run.data.params["method"], run.data.params["tokens_trained"]) == ("cpt", "256")
    history = _history(swept.tmp / "healed")
    curve = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert [s for s, _ in curve] == [h["step"] for h in history] and len(history) >= 2
    assert [v for _, v in curve] == pytest.approx([h["loss"] for h in history])
    events = EventAccumulator(str(swept.tmp / "ray" / "heal" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [h["step"] for h in history]


def test_retrain_flags_and_an_unreachable_server_named_before_ray(tmp_path, tiny_llama_dir):
    from shortened.sweep.runner import run_sweep

    args = build_parser().parse_args(["retrain", "--model", "m", "--out", "o", "--train_tokens", "64",
                                      "--mlflow.tracking-uri", "sqlite:///mlflow.db", "--mlflow.experiment", "heal",
                                      "--tensorboard", "false"])
    assert (args.tracking.mlflow.tracking_uri, args.tracking.mlflow.experiment) == ("sqlite:///mlflow.db", "heal")
    assert args.tracking.tensorboard is False
    assert build_parser().parse_args(["retrain", "--model", "m", "--out", "o", "--train_tokens", "64"]) \
        .tracking.mlflow.tracking_uri is None
    # a tracking server that does not answer: a named error before the lock, Ray or any folder
    cfg = tracked_sweep(tiny_llama_dir, tmp_path / "runs", "http://127.0.0.1:9")
    with pytest.raises(ShortenedError, match=r"tracking\.mlflow\.tracking_uri 'http://127\.0\.0\.1:9': no MLflow "):
        run_sweep(cfg)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="tracking.mlflow.tracking_uri"):
        tracked_sweep(tiny_llama_dir, tmp_path, "http://")


def test_a_password_in_the_tracking_uri_is_never_saved_or_shown(tmp_path, tiny_llama_dir):
    import pickle

    from shortened.sweep.runner import run_sweep
    from shortened.tracking import SweepTracking

    cfg = tracked_sweep(tiny_llama_dir, tmp_path / "runs", "https://bob:s3cret@127.0.0.1:9/mlflow")
    assert cfg.tracking.mlflow.tracking_uri == "https://bob:s3cret@127.0.0.1:9/mlflow"  # what the client uses
    saved = json.dumps(cfg.model_dump(mode="json"))  # sweep.json and the store's experiments.config
    assert "s3cret" not in saved and "https://bob:***@127.0.0.1:9/mlflow" in saved
    assert b"s3cret" not in pickle.dumps(SweepTracking(cfg).callback())  # what Tune saves in tuner.pkl
    with pytest.raises(ShortenedError) as err:
        run_sweep(cfg)
    assert "s3cret" not in str(err.value) and "bob:***@127.0.0.1:9" in str(err.value)
