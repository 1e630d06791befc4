"""Object storage end to end against a real S3 API server (moto in server mode, started here on 127.0.0.1): the
storage layer's publish/fetch round trip and its errors, a retraining whose Ray Train checkpoints and exported model
live in a bucket, and a sweep whose whole experiment folder does. The multi-node run, where nodes share no disk, is
in tests/test_cluster.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from s3_server import S3Server
from shortened import storage
from shortened.errors import ShortenedError


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto")).start()
    saved = {k: os.environ.get(k) for k in (*server.env(), storage.CACHE_ENV)}
    os.environ.update(server.env())
    os.environ[storage.CACHE_ENV] = str(tmp_path_factory.mktemp("node-cache"))
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def test_a_published_folder_is_there_only_when_complete_and_reads_back_through_the_node_cache(s3, tmp_path):
    bucket = s3.bucket()
    url = f"s3://{bucket}/models/m"
    src = tmp_path / "m"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(os.urandom(1000))
    (src / "sub" / "x.txt").write_text("x")
    (src / "pruning.json").write_text('{"a": 1}')
    assert not storage.is_complete(url)
    with pytest.raises(ShortenedError, match="no complete folder there"):
        storage.local_copy(url)
    storage.publish_dir(src, url)
    keys = s3.keys(bucket)
    assert keys == ["models/m/.complete", "models/m/model.safetensors", "models/m/pruning.json", "models/m/sub/x.txt"]
    local = storage.local_copy(url)
    assert (local / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert json.loads((local / "pruning.json").read_text()) == {"a": 1}
    assert storage.local_copy(url) == local  # cached: one download per node and publication
    (src / "pruning.json").write_text('{"a": 2}')
    storage.publish_dir(src, url)  # republished: a new marker, fetched again
    assert json.loads((storage.local_copy(url) / "pruning.json").read_text()) == {"a": 2}
    # a URL is never a local path: nothing named "s3:" appears here
    assert storage.path(url).as_uri().startswith("s3://") and not Path("s3:").exists()


def test_bad_buckets_are_named_errors(s3, monkeypatch, tmp_path):
    with pytest.raises(ShortenedError, match=r"bucket 'no-such-bucket-x' does not exist"):
        storage.check_writable("s3://no-such-bucket-x/runs")
    # a server that checks credentials (moto enforces IAM after its first request): these are not its users
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "1")
    strict = S3Server(tmp_path).start()
    monkeypatch.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
    try:
        bucket = strict.bucket()
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict.endpoint)
        with pytest.raises(ShortenedError, match=rf"access denied writing to bucket '{bucket}'"):
            storage.check_writable(f"s3://{bucket}/runs")
    finally:
        strict.stop()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    with pytest.raises(ShortenedError, match=r"'Bad_Bucket!' is not a valid bucket name"):
        storage.check_writable("s3://Bad_Bucket!/runs")
    with pytest.raises(ShortenedError, match=r"'Bad_Bucket!' is not a valid bucket name"):
        storage.local_copy("s3://Bad_Bucket!/model")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(ShortenedError, match=r"cannot reach the object store at http://127.0.0.1:9"):
        storage.check_writable(f"s3://{s3.bucket()}/runs")
    for read in (storage.local_copy, storage.is_complete):  # a model read from the store: named as well
        with pytest.raises(ShortenedError, match=r"folder 's3://b/model': cannot reach the object store at "
                                                 r"http://127.0.0.1:9"):
            read("s3://b/model")
    monkeypatch.setenv(storage.OPTIONS_ENV, "[1")
    with pytest.raises(ShortenedError, match=storage.OPTIONS_ENV):
        storage.check_writable("s3://x/runs")


def test_an_output_in_a_bucket_replaces_only_what_it_may(s3, tiny_llama_dir, tmp_path):
    """Publishing a model folder replaces its prefix, so a bucket's root is refused and a prefix that holds other
    objects is refused without --overwrite, as a non-empty local folder is; nothing in the bucket is touched."""
    from shortened.cli import main
    from shortened.io import check_output

    bucket = s3.bucket()
    s3.client().put_object(Bucket=bucket, Key="keep.txt", Body=b"keep")
    s3.client().put_object(Bucket=bucket, Key="data/important.txt", Body=b"data")
    with pytest.raises(ShortenedError, match=r"a bucket's root cannot take a folder of outputs"):
        check_output(f"s3://{bucket}", kind="dir", overwrite=True, flag="--out")
    with pytest.raises(ShortenedError, match=r"a bucket's root cannot take a folder of outputs"):
        storage.publish_dir(tmp_path, f"s3://{bucket}/")
    with pytest.raises(ShortenedError, match=r"--out s3://\S+/data: the prefix holds 1 object\(s\) \(use --overwrite"):
        check_output(f"s3://{bucket}/data", kind="dir", flag="--out")
    with pytest.raises(ShortenedError, match=r"is a folder \(1 object\(s\) below it\), expected a file path"):
        check_output(f"s3://{bucket}/data", kind="file", flag="--out", overwrite=True)
    with pytest.raises(ShortenedError, match=r"exists and is not a folder"):
        check_output(f"s3://{bucket}/keep.txt", kind="dir", flag="--out", overwrite=True)
    prune = ["prune", "--model", str(tiny_llama_dir), "--criterion", "magnitude", "--blocks", "2", "--quiet"]
    assert main([*prune, "--out", f"s3://{bucket}"]) == 2
    assert main([*prune, "--out", f"s3://{bucket}/data"]) == 2
    assert s3.keys(bucket) == ["data/important.txt", "keep.txt"]
    assert main([*prune, "--out", f"s3://{bucket}/data", "--overwrite"]) == 0  # replacing it is asked for
    keys = s3.keys(bucket)
    assert "keep.txt" in keys and "data/.complete" in keys and "data/important.txt" not in keys


def test_retrain_and_sweep_name_a_bad_store_before_reading_it(s3, tiny_llama_dir, tmp_path, monkeypatch):
    """retrain reads its runs' records and a sweep its sweep.json from the store: a missing bucket or a dead endpoint
    is the named error (refused credentials: test_bad_buckets_are_named_errors) before that, and before Ray, not a
    client's traceback."""
    import ray
    from test_sweep import tiny_sweep

    from shortened.data import DataConfig
    from shortened.sweep import SweepConfig
    from shortened.sweep.runner import run_sweep
    from shortened.training.config import TrainConfig
    from shortened.training.retrain import ScaleConfig, retrain

    assert not ray.is_initialized()
    cfg = TrainConfig(train_tokens=256, micro_batch_size=2, data=DataConfig(seq_len=64), zero_stage=0)

    def both(storage_path: str, message: str) -> None:
        with pytest.raises(ShortenedError, match=message):
            retrain(str(tiny_llama_dir), str(tmp_path / "out"), cfg, storage_path=storage_path, name="r",
                    scale=ScaleConfig(num_workers=1, cpus_per_worker=1))
        sweep = SweepConfig.model_validate(tiny_sweep(tiny_llama_dir, Path("unused"), storage_path=storage_path))
        with pytest.raises(ShortenedError, match=message):
            run_sweep(sweep)
        assert not ray.is_initialized() and not (tmp_path / "out").exists()

    both("s3://no-such-bucket-y/runs", r"storage.path 's3://no-such-bucket-y/runs': bucket 'no-such-bucket-y' "
                                       r"does not exist")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    both(f"s3://{s3.bucket()}/runs", r"cannot reach the object store at http://127.0.0.1:9")


def test_file_urls_are_local_paths(tiny_llama_dir, tmp_path, monkeypatch):
    """file:///x names the local path /x everywhere a path is taken; it never becomes a folder named 'file:'."""
    from test_sweep import tiny_sweep

    from shortened.cli import main
    from shortened.io import check_output
    from shortened.sweep import SweepConfig

    monkeypatch.chdir(tmp_path)
    assert storage.path(f"file://{tmp_path}/a") == tmp_path / "a" and not storage.is_url(f"file://{tmp_path}")
    assert storage.absolute(f"file://localhost{tmp_path}/a%20b") == str(tmp_path / "a b")
    assert storage.local_path("file:/data/x") == "/data/x" == storage.local_path("file:///data/x")
    assert check_output(f"file://{tmp_path}/o", kind="dir", create=False) == tmp_path / "o"
    with pytest.raises(ShortenedError, match="names a path on this machine"):
        storage.local_path("file://otherhost/data")
    sweep = SweepConfig.model_validate(tiny_sweep(f"file://{tiny_llama_dir}", Path("unused"),
                                                  storage_path=f"file://{tmp_path}/runs"))
    assert (sweep.model, sweep.storage_path) == (str(tiny_llama_dir), str(tmp_path / "runs"))
    assert main(["prune", "--model", f"file://{tiny_llama_dir}", "--criterion", "magnitude", "--blocks", "2",
                 "--quiet", "--out", f"file://{tmp_path}/pruned"]) == 0
    assert (tmp_path / "pruned" / "pruning.json").is_file() and not (tmp_path / "file:").exists()


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_retrain_keeps_checkpoints_and_the_model_in_the_bucket(s3, local_ray, tiny_llama_dir, tmp_path,
                                                               monkeypatch):
    from transformers import AutoModelForCausalLM

    from shortened.data import DataConfig
    from shortened.training.config import TrainConfig
    from shortened.training.retrain import ScaleConfig, retrain

    monkeypatch.chdir(tmp_path)
    bucket = s3.bucket()
    cfg = TrainConfig(train_tokens=64 * 2 * 8, micro_batch_size=2, data=DataConfig(seq_len=64), lr=3e-3,
                      warmup_ratio=0.0, report_every_steps=2, checkpoint_every_tokens=64 * 2 * 4, zero_stage=0)
    out = f"s3://{bucket}/models/cpt"
    res = retrain(str(tiny_llama_dir), out, cfg, storage_path=f"s3://{bucket}/runs", name="s3run",
                  scale=ScaleConfig(num_workers=1, cpus_per_worker=1))
    keys = s3.keys(bucket)
    assert "models/cpt/.complete" in keys and "models/cpt/retraining.json" in keys
    assert any(k.startswith("runs/s3run/checkpoint_") for k in keys), keys
    assert "runs/s3run/shortened-run.json" in keys
    assert res.model_dir == out and str(res.phases[0]["checkpoint"]).startswith(bucket)
    record = json.loads(storage.path(out + "/retraining.json").read_text())
    assert record["history"][-1]["tokens"] == 64 * 2 * 8
    model = AutoModelForCausalLM.from_pretrained(storage.local_copy(out))
    assert model.config.num_hidden_layers == 8
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())  # no local folder named after the URL
    # the same name again resumes (finished: no new step) and a second retraining cannot overwrite the model
    with pytest.raises(ShortenedError, match="a model folder is there already"):
        retrain(str(tiny_llama_dir), out, cfg, storage_path=f"s3://{bucket}/runs", name="other")


def test_a_sweep_lives_in_the_bucket(s3, local_ray, tiny_llama_dir, tmp_path, monkeypatch):
    from test_sweep import tiny_sweep

    from shortened.sweep import load_sweep_config
    from shortened.sweep.runner import run_sweep
    from shortened.sweep.report import open_experiment

    monkeypatch.chdir(tmp_path)
    bucket = s3.bucket()
    raw = tiny_sweep(tiny_llama_dir, Path("unused"), blocks=[2], methods=["cpt"], name="s3sweep",
                     storage_path=f"s3://{bucket}/runs")
    raw["eval"]["tasks"] = []
    raw["train"]["train_tokens"] = 256
    (tmp_path / "s.yaml").write_text(json.dumps(raw))
    outcome = run_sweep(load_sweep_config(tmp_path / "s.yaml"))
    keys = s3.keys(bucket)
    root = "runs/s3sweep/"
    for key in ("sweep.json", "selection.json", "scores/ppl.json", "trials/dense/result.json",
                "trials/ppl-b2-cpt/result.json", "trials/ppl-b2-cpt/pruned/.complete",
                "trials/ppl-b2-cpt/model/.complete", "trials/ppl-b2-cpt/eval.json", "speed/blocks6.json"):
        assert root + key in keys, (key, keys)
    assert any(k.startswith(root + "train/ppl-b2-cpt/checkpoint_") for k in keys)
    assert any(k.startswith(root + "tune/") for k in keys)
    assert str(outcome.experiment_dir) == f"s3://{bucket}/runs/s3sweep"
    store, name, folder = open_experiment(f"s3://{bucket}/runs/s3sweep")
    trials = {t["key"]: t for t in store.trials(name)}
    assert sorted(trials) == ["dense", "ppl-b2-cpt"] and trials["ppl-b2-cpt"]["tokens_trained"] == 256
    assert trials["ppl-b2-cpt"]["model_path"] == f"s3://{bucket}/runs/s3sweep/trials/ppl-b2-cpt/model"
    # the report of an experiment in the bucket is written into it, whole
    from shortened.cli import main

    s3.client().put_object(Bucket=bucket, Key=root + "report/notes.txt", Body=b"mine")
    assert main(["report", f"s3://{bucket}/runs/s3sweep"]) == 0
    keys = s3.keys(bucket)
    assert root + "report/.complete" in keys and root + "report/report.md" in keys, keys
    assert root + "report/notes.txt" in keys  # written into the prefix, as into a local folder: nothing else goes
    assert main(["report", f"s3://{bucket}/runs/s3sweep", "--out", f"s3://{bucket}"]) == 2
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())


def test_prune_score_and_eval_write_to_the_bucket_and_read_a_model_from_it(s3, tiny_llama_dir, tmp_path):
    import subprocess
    import sys

    bucket = s3.bucket()
    env = {**os.environ, storage.CACHE_ENV: str(tmp_path / "cache")}

    def cli(*args: str) -> dict:
        res = subprocess.run([sys.executable, "-m", "shortened.cli", *args], env=env, capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    pruned = json.loads(cli("prune", "--model", str(tiny_llama_dir), "--criterion", "magnitude", "--blocks", "2",
                            "--out", f"s3://{bucket}/pruned").stdout)
    assert pruned["out"] == f"s3://{bucket}/pruned" and pruned["num_blocks_after"] == 6
    scores = json.loads(cli("score", "--model", str(tiny_llama_dir), "--criterion", "magnitude",
                            "--out", f"s3://{bucket}/scores.json").stdout)
    saved = json.loads(storage.path(f"s3://{bucket}/scores.json").read_text())["scores"]
    assert saved == pytest.approx(scores["scores"], abs=1e-4)  # (the printed ones are rounded)
    cli("eval", "--model", f"s3://{bucket}/pruned", "--ppl", "wikitext2", "--ppl-max-windows", "2",
        "--tasks", "piqa", "--limit", "4", "--out", f"s3://{bucket}/eval.json")
    evaluation = json.loads(storage.path(f"s3://{bucket}/eval.json").read_text())
    assert evaluation["model_info"]["blocks"] == 6
    keys = s3.keys(bucket)
    assert {"pruned/.complete", "pruned/pruning.json", "pruned/model.safetensors"} <= set(keys)
    assert not (tmp_path / "s3:").exists()
    # a second prune to the same folder is refused (a complete folder is there), before any work
    res = subprocess.run([sys.executable, "-m", "shortened.cli", "prune", "--model", str(tiny_llama_dir),
                          "--criterion", "magnitude", "--blocks", "2", "--out", f"s3://{bucket}/pruned"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2 and "a model folder is there already" in res.stderr, res.stderr[-2000:]
