"""A multi-node Ray cluster whose nodes share NO disk (cluster/local.sh --private: every node, and the driver, has
its own empty tmpfs over one folder and its node cache inside it), with an S3 API server (moto, a subprocess) as the
only shared place: the model comes from the bucket, a retraining spreads its workers over two nodes, and a sweep
submitted with `ray job submit` runs with everything in the bucket. A local storage path under the private folder
fails fast, named, before any trial starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from s3_server import S3Server
from shortened import storage
from shortened.paths import REPO_ROOT
from test_cluster import SEQ, TEST_ENV, Cluster, sweep_config

PORT = 6393
pytestmark = pytest.mark.skipif(subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0,
                                reason="needs mount namespaces (unshare -m) to give each node its own disk")
TRAIN = {"train_tokens": SEQ * 2 * 2 * 6, "micro_batch_size": 2, "lr": 3e-3, "warmup_ratio": 0.0, "zero_stage": 2,
         "report_every_steps": 2, "checkpoint_every_tokens": SEQ * 2 * 2 * 3, "data": {"seq_len": SEQ}}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nodisk(s3):
    """The cluster, and the folder that each of its nodes (and each driver started by :func:`private_driver`) has
    to itself."""
    private = Path(f"/tmp/snd-{os.getpid()}-p")
    c = Cluster(Path(f"/tmp/snd-{os.getpid()}"))
    c.env.update({"SHORTENED_CLUSTER_PORT": str(PORT), **s3.env()})
    c.dashboard = f"http://127.0.0.1:{PORT + 1875}"
    out = c.sh("up", "--workers", "2", "--head-cpus", "1", "--worker-cpus", "2", "--port", str(PORT),
               "--private", str(private))
    assert "head + 2 worker node(s)" in out
    try:
        yield c, private
    finally:
        c.sh("down")
        time.sleep(1)
        shutil.rmtree(c.state, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def private_driver(private: Path, args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """A driver process with its own empty ``private`` folder too (a laptop or a CI runner: no disk in common)."""
    cmd = (f"mount -t tmpfs none {private} && mkdir -p {private}/cache && exec {sys.executable} -m shortened.cli "
           + " ".join(args))
    return subprocess.run(["unshare", "-m", "sh", "-c", cmd], env={**env, storage.CACHE_ENV: f"{private}/cache"},
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def model_url(s3, tiny_llama_dir):
    bucket = s3.bucket("models")
    os.environ.update(s3.env())  # this process uploads the model like a user would
    try:
        storage.publish_dir(Path(tiny_llama_dir), f"s3://{bucket}/tiny")
    finally:
        for k in s3.env():
            os.environ.pop(k, None)
    return f"s3://{bucket}/tiny"


@pytest.mark.slow
def test_retrain_over_two_nodes_with_no_shared_disk(nodisk, s3, model_url, tmp_path):
    cluster, private = nodisk
    bucket = s3.bucket()
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    out = private_driver(private, ["retrain", "--model", model_url, "--config", str(tmp_path / "train.yaml"),
                                   "--workers", "2", "--cpus-per-worker", "1.5", "--placement", "STRICT_SPREAD",
                                   "--storage-path", f"s3://{bucket}/runs", "--name", "spread",
                                   "--out", f"s3://{bucket}/models/healed"],
                         cluster.client_env(**s3.env()), timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    printed = json.loads(out.stdout[out.stdout.index("{"):])
    assert printed["out"] == f"s3://{bucket}/models/healed"
    keys = s3.keys(bucket)
    assert "models/healed/.complete" in keys and "runs/spread/shortened-run.json" in keys
    assert any(k.startswith("runs/spread/checkpoint_") for k in keys)
    record = json.loads(s3.client().get_object(Bucket=bucket, Key="models/healed/retraining.json")["Body"].read())
    assert record["world_size"] == 2 and record["history"][-1]["tokens"] == TRAIN["train_tokens"]
    assert not list(private.glob("*"))  # this process's view of the private folder: nothing was written to it


@pytest.mark.slow
def test_sweep_job_with_s3_storage_and_local_storage_refused(nodisk, s3, model_url, tmp_path):
    cluster, private = nodisk
    bucket = s3.bucket()
    cfg = sweep_config(tmp_path / "s.yaml", model_url, f"s3://{bucket}/runs", name="nodisk", train=TRAIN)
    log = tmp_path / "job.log"
    runtime_env = {"env_vars": {**TEST_ENV}}
    job = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard,
                          "--working-dir", str(REPO_ROOT), "--submission-id", "nodisk", "--runtime-env-json",
                          json.dumps(runtime_env), "--", "python", "jobs/sweep.py", str(cfg)],
                         env=cluster.client_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                         timeout=600)
    text = log.read_text()
    assert job.returncode == 0, text[-4000:]
    assert "selected: " in text
    keys = s3.keys(bucket)
    for key in ("sweep.json", "selection.json", "trials/ppl-b2-cpt/result.json", "trials/ppl-b2-cpt/model/.complete"):
        assert f"runs/nodisk/{key}" in keys, (key, keys)
    result = json.loads(s3.client().get_object(Bucket=bucket, Key="runs/nodisk/trials/ppl-b2-cpt/result.json")
                        ["Body"].read())
    assert result["tokens_trained"] == TRAIN["train_tokens"]
    # the same sweep with a local storage path that only the driver sees: refused before any trial, every node named
    cfg = sweep_config(tmp_path / "l.yaml", model_url, private / "runs", name="local")
    res = private_driver(private, ["sweep", str(cfg)], cluster.client_env(**s3.env()), timeout=180)
    assert res.returncode == 2 and res.stderr.count("not shared storage") == 3, res.stderr[-3000:]
