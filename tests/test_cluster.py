"""On a real multi-node Ray cluster (cluster/local.sh: a head and two worker nodes, each its own `ray start`, token
auth on): sweeps submitted with `ray job submit`, CPT spread over two nodes, a worker node killed mid-CPT, a killed
sweep driver, and bad input that must fail fast. Every driver runs in a subprocess, as a user's would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from shortened.cluster import ClusterChecked, ScaleConfig, _probe, placement_problem
from shortened.paths import REPO_ROOT, shared_data_dir
from shortened.sweep.store import ResultsStore
from shortened.training.audit import trained_tokens

LOCAL = REPO_ROOT / "cluster" / "local.sh"
PORT = 6391
SEQ = 64
# the CPT both the spread run and the sweep's faulted trial do: 16 steps, a checkpoint every 6
TRAIN = {"train_tokens": SEQ * 2 * 2 * 16, "micro_batch_size": 2, "lr": 3e-3, "warmup_ratio": 0.0, "zero_stage": 2,
         "report_every_steps": 4, "checkpoint_every_tokens": SEQ * 2 * 2 * 6, "token_log": True,
         "data": {"seq_len": SEQ}}
TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "SHORTENED_DATA_DIR": str(shared_data_dir() or "")}


# -- without a cluster ------------------------------------------------------------------------------------------------

def test_placement_is_judged_per_node():
    nodes = [{"CPU": 1}, {"CPU": 2}, {"CPU": 2}]
    assert placement_problem(2, {"CPU": 1.5}, "STRICT_SPREAD", nodes) is None
    assert "need 3 different nodes" in placement_problem(3, {"CPU": 1.5}, "STRICT_SPREAD", nodes)
    # 5 CPUs in total, but no node holds a 3-CPU worker
    assert "fit 0" in placement_problem(1, {"CPU": 3}, "PACK", nodes)
    assert placement_problem(5, {"CPU": 1}, "PACK", nodes) is None
    assert "fit 5" in placement_problem(6, {"CPU": 1}, "PACK", nodes)
    assert "largest fits 2" in placement_problem(3, {"CPU": 1}, "STRICT_PACK", nodes)
    assert "GPU: 0" in placement_problem(1, {"CPU": 1, "GPU": 1}, "PACK", nodes)


def test_retrain_told_what_was_checked_skips_the_cluster_checks(tmp_path, tiny_llama_dir, monkeypatch):
    """A sweep's driver checks the cluster once; a trial's retraining, handed what was checked, does not connect,
    judge placement or probe every node's storage again (and does all three when not told, or told about another
    storage path or scale)."""
    import shortened.cluster
    from shortened.data import DataConfig
    from shortened.training import retrain as rt
    from shortened.training.config import TrainConfig

    calls = []
    monkeypatch.setattr(rt, "connect", lambda address=None: calls.append("connect"))
    monkeypatch.setattr(shortened.cluster, "check_placement", lambda *a: calls.append("placement"))
    monkeypatch.setattr(rt, "check_shared_storage", lambda path: calls.append("storage"))

    class Stop(Exception):
        pass

    def stop(*args):  # the first step after the checks: no Ray Train run here
        raise Stop

    monkeypatch.setattr(rt.identity, "write_record", stop)
    scale = ScaleConfig(num_workers=1)
    cfg = TrainConfig(train_tokens=256, data=DataConfig(seq_len=64))
    storage = tmp_path / "exp" / "train"
    for checked, expected in [(None, ["connect", "placement", "storage"]),
                              (ClusterChecked(str(tmp_path / "exp"), scale), []),
                              (ClusterChecked(str(tmp_path / "other"), scale), ["connect", "placement", "storage"]),
                              (ClusterChecked(str(tmp_path / "exp"), ScaleConfig(num_workers=2)),
                               ["connect", "placement", "storage"])]:
        calls.clear()
        with pytest.raises(Stop):
            rt.retrain(str(tiny_llama_dir), str(tmp_path / "out"), cfg, storage_path=str(storage), name="t",
                       scale=scale, checked=checked)
        assert calls == expected, checked


def test_storage_probe_tells_unwritable_from_unshared(tmp_path):
    driver_file = tmp_path / ".probe-t"
    driver_file.write_text("t")
    assert _probe(str(tmp_path), str(driver_file), "t")["error"] is None
    assert "not shared storage" in _probe(str(tmp_path), str(tmp_path / ".probe-other"), "t")["error"]
    (tmp_path / "file").write_text("")
    assert "cannot write" in _probe(str(tmp_path / "file" / "runs"), str(driver_file), "t")["error"]
    import ray

    assert not ray.is_initialized()  # probing outside Ray must not start one (a second Ray on the machine)


def test_relative_output_paths_are_refused_inside_a_ray_job(monkeypatch):
    from shortened.cluster import JOB_ENV, check_job_paths
    from shortened.errors import ShortenedError

    check_job_paths(storage_path="runs")  # not a job: relative is fine
    monkeypatch.setenv(JOB_ENV, "{}")
    check_job_paths(storage_path="/mnt/shared/runs", out="s3://bucket/x")
    with pytest.raises(ShortenedError, match="storage_path 'runs' is relative, but this runs as a Ray job"):
        check_job_paths(storage_path="runs")


def test_launcher_config_validates_and_manifests_agree_with_the_project():
    import jsonschema
    import ray
    import ray.autoscaler

    launcher = yaml.safe_load((REPO_ROOT / "cluster" / "aws-gpu.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)  # Ray's own cluster-launcher schema
    assert launcher["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert all("RAY_AUTH_MODE=token" in c for c in launcher["head_start_ray_commands"][1:]
               + launcher["worker_start_ray_commands"][1:])
    kube = REPO_ROOT / "cluster" / "kuberay"
    cluster = yaml.safe_load((kube / "raycluster.yaml").read_text())
    job = yaml.safe_load((kube / "rayjob.yaml").read_text())
    pvc = yaml.safe_load((kube / "shared-pvc.yaml").read_text())
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray.__version__
        assert spec["authOptions"] == {"mode": "token", "secretName": "shortened-ray-token"}
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
        for pod in pods:  # every pod mounts the shared claim at /mnt/shared
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                      if "persistentVolumeClaim" in v}
            mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
            assert claims[mounts["/mnt/shared"]] == pvc["metadata"]["name"]
    script, config, *flags = job["spec"]["entrypoint"].split()[1:]
    assert (REPO_ROOT / script).is_file() and (REPO_ROOT / config).is_file()
    assert flags == ["--storage-path", "/mnt/shared/shortened"]
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]


# -- the local multi-node cluster -------------------------------------------------------------------------------------

class Cluster:
    def __init__(self, state: Path):
        self.state = state
        self.env = {**os.environ, "SHORTENED_CLUSTER_DIR": str(state), "SHORTENED_CLUSTER_PORT": str(PORT),
                    "RAY": str(Path(sys.executable).parent / "ray")}
        self.dashboard = f"http://127.0.0.1:{PORT + 1875}"

    def sh(self, *args: str, timeout: float = 180) -> str:
        out = subprocess.run([str(LOCAL), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def client_env(self, **extra: str) -> dict:
        """A driver's environment: the cluster's address and token (from `source $(cluster/local.sh env)`)."""
        env = {**os.environ, **TEST_ENV, **extra}
        for line in (self.state / "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        return env

    def node_of(self, pid: int) -> int:
        """Which local node a process belongs to (its `ray start` root is one of its ancestors)."""
        roots = {int((d / "pid").read_text()): int(d.name.removeprefix("node")) for d in self.state.glob("node*")}
        for proc in [psutil.Process(pid), *psutil.Process(pid).parents()]:
            if proc.pid in roots:
                return roots[proc.pid]
        raise AssertionError(f"pid {pid} belongs to no node of the local cluster")

    def processes(self) -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if str(self.state) in " ".join(p.info["cmdline"] or [])]


@pytest.fixture(scope="module")
def cluster():
    state = Path(f"/tmp/sct-{os.getpid()}")  # short: Ray's socket paths are length-limited
    c = Cluster(state)
    out = c.sh("up", "--workers", "2", "--head-cpus", "1", "--worker-cpus", "2", "--port", str(PORT))
    assert "head + 2 worker node(s)" in out
    try:
        yield c
    finally:
        c.sh("down")
        time.sleep(1)
        left = c.processes()
        shutil.rmtree(state, ignore_errors=True)
        assert not left, f"processes left behind: {[p.info['cmdline'][:3] for p in left]}"


def submit(c: Cluster, args: list[str], job_id: str, log: Path, **env: str) -> subprocess.Popen:
    """`ray job submit` the sweep entry point with the repo as working dir; the CLI waits for the job and exits 1
    unless it succeeds."""
    runtime_env = {"env_vars": {**TEST_ENV, **env}}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", c.dashboard, "--working-dir",
           str(REPO_ROOT), "--submission-id", job_id, "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/sweep.py", *args]
    return subprocess.Popen(cmd, env=c.client_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            cwd=REPO_ROOT, start_new_session=True)


def sweep_config(path: Path, model: Path, storage: Path, **kw) -> Path:
    cfg = dict(name="cluster", model=str(model), criteria=["ppl"], blocks=[2], methods=["cpt"], keep_first=1,
               keep_last=1, calibration={"n_samples": 4, "seq_len": SEQ}, train=TRAIN,
               eval={"ppl": ["wikitext2"], "ppl_max_windows": 8},
               resources={"workers_per_trial": 2, "cpus_per_worker": 1.5, "task_cpus": 1,
                          "placement_strategy": "STRICT_SPREAD", "max_failures": 1},
               selection={"tolerance_pct": 1000}, storage_path=str(storage))
    cfg.update(kw)
    path.write_text(yaml.safe_dump(cfg))
    return path


def wait_for(what, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} while waiting:\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s" + (f":\n{log.read_text()[-4000:]}" if log else ""))


@pytest.fixture(scope="module")
def spread_run(cluster, tiny_llama_dir, tmp_path_factory):
    """CPT with two ZeRO-2 workers forced onto different nodes, uninterrupted (the fault test's reference)."""
    tmp = tmp_path_factory.mktemp("spread")
    (tmp / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    out = subprocess.run([sys.executable, "-m", "shortened.cli", "retrain", "--model", str(tiny_llama_dir),
                          "--config", str(tmp / "train.yaml"), "--workers", "2", "--cpus-per-worker", "1.5",
                          "--placement", "STRICT_SPREAD", "--storage-path", str(tmp / "storage"), "--name", "spread",
                          "--out", str(tmp / "model")], env=cluster.client_env(), capture_output=True, text=True,
                         timeout=400, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp


@pytest.mark.slow
def test_cpt_spreads_over_two_nodes_and_checkpoints_to_shared_storage(spread_run):
    history = json.loads((spread_run / "model" / "retraining.json").read_text())["history"]
    assert history[-1]["tokens"] == TRAIN["train_tokens"] and history[-1]["loss"] < history[0]["loss"] - 0.5
    nodes = {}
    for rank in (0, 1):
        lines = [json.loads(x) for x in open(spread_run / f".model.tokens.rank{rank}.jsonl")]
        assert len(lines) == 16
        nodes[rank] = {x["node"] for x in lines}
    assert len(nodes[0]) == len(nodes[1]) == 1 and nodes[0] != nodes[1]  # one node each, not the same one
    ckpts = sorted(p for p in (spread_run / "storage" / "spread").glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2  # keep_checkpoints: the two newest of steps 6, 12, 16
    last = ckpts[-1]
    assert json.loads(next(last.rglob("trainer_state.json")).read_text())["step"] == 16
    # each rank's data cursor and its own ZeRO-2 optimizer partition, written from two nodes into one folder
    assert len(list(last.rglob("data_cursor_rank*.json"))) == 2
    assert len(list(last.rglob("zero_pp_rank_*_optim_states.pt"))) == 2


@pytest.mark.slow
def test_sweep_job_survives_losing_a_worker_node_mid_cpt(cluster, spread_run, tiny_llama_dir, tmp_path):
    marker = tmp_path / "held"
    cfg = sweep_config(tmp_path / "sweep.yaml", tiny_llama_dir, tmp_path / "runs")
    log = tmp_path / "job.log"
    # rank 1 holds after step 9 (the checkpoint after step 6 is on shared storage) until its node is killed
    job = submit(cluster, [str(cfg)], "sweep-node-loss", log, SHORTENED_FAULT=f"1:9:{marker}:hold")
    held = wait_for(lambda: marker.is_file() and json.loads(marker.read_text()), 400, job, log)
    node = cluster.node_of(held["pid"])
    assert node in (1, 2)
    assert f"node {node} killed" in cluster.sh("stop-node", str(node))
    assert not psutil.pid_exists(held["pid"])
    cluster.sh("start-node", str(node))
    assert job.wait(600) == 0, log.read_text()[-4000:]
    exp = tmp_path / "runs" / "cluster"
    store = ResultsStore(f"sqlite:///{exp / 'results.db'}")
    assert store.counts("cluster")["trials"] == 2  # exactly one row per trial
    trials = {t["key"]: t for t in store.trials("cluster")}
    assert sorted(trials) == ["dense", "ppl-b2-cpt"] and all(t["status"] == "completed" for t in trials.values())
    assert trials["ppl-b2-cpt"]["tokens_trained"] == TRAIN["train_tokens"]
    model = exp / "trials" / "ppl-b2-cpt" / "model"
    # resumed from the checkpoint after 6 steps: (0-based) steps 6-8 trained twice by rank 1, all others once
    steps = [json.loads(x)["step"] for x in open(model.parent / ".model.tokens.rank1.jsonl")]
    assert [steps.count(s) for s in range(16)] == [1] * 6 + [2] * 3 + [1] * 7
    # and every step ended on the very batches of the uninterrupted run
    assert trained_tokens(model, 2) == trained_tokens(spread_run / "model", 2)


@pytest.mark.slow
def test_sweep_job_driver_killed_then_resumed(cluster, tiny_llama_dir, tmp_path):
    cfg = sweep_config(tmp_path / "sweep.yaml", tiny_llama_dir, tmp_path / "runs", blocks=[2, 4],
                       resources={"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
                       train={**TRAIN, "train_tokens": 1024, "zero_stage": 0, "checkpoint_every_tokens": None,
                              "token_log": False})
    exp = tmp_path / "runs" / "cluster"
    log = tmp_path / "job1.log"
    job = submit(cluster, [str(cfg)], "sweep-driver-kill", log)
    wait_for(lambda: list(exp.glob("trials/*/result.json")), 400, job, log)
    driver = [p for p in psutil.process_iter(["cmdline"]) if "jobs/sweep.py" in " ".join(p.info["cmdline"] or [])
              and str(cfg) in p.info["cmdline"] and "job" not in p.info["cmdline"][:3]]
    assert len(driver) == 1, driver
    driver[0].kill()
    assert job.wait(120) == 1 and "failed" in log.read_text()  # the job ends FAILED, promptly
    finished = {p.parent.name: p.stat().st_mtime_ns for p in exp.glob("trials/*/result.json")}
    assert 1 <= len(finished) < 3
    log2 = tmp_path / "job2.log"
    job2 = submit(cluster, [str(cfg), "--resume"], "sweep-driver-kill-resume", log2)
    assert job2.wait(600) == 0, log2.read_text()[-4000:]
    assert {k: (exp / "trials" / k / "result.json").stat().st_mtime_ns for k in finished} == finished
    store = ResultsStore(f"sqlite:///{exp / 'results.db'}")
    assert store.counts("cluster")["trials"] == 3
    assert {t["key"]: t["status"] for t in store.trials("cluster")} == {
        "dense": "completed", "ppl-b2-cpt": "completed", "ppl-b4-cpt": "completed"}
    assert json.loads((exp / "selection.json").read_text())["chosen"]["key"] == "ppl-b4-cpt"


# -- bad input: a clear error in seconds, nothing written -----------------------------------------------------------

def run_sweep_cli(cfg: Path, env: dict, *args: str, timeout: float = 120) -> tuple[int, str, float]:
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "shortened.cli", "sweep", str(cfg), *args], env=env,
                         capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    return out.returncode, out.stdout + out.stderr, time.time() - start


def test_unreachable_address_fails_fast(tiny_llama_dir, tmp_path):
    cfg = sweep_config(tmp_path / "s.yaml", tiny_llama_dir, tmp_path / "runs")
    rc, out, took = run_sweep_cli(cfg, {**os.environ, **TEST_ENV}, "--address", "127.0.0.1:1")
    assert rc == 2 and "cannot connect to the Ray cluster at '127.0.0.1:1' (from --address)" in out, out
    # a routable address nobody answers on: bounded by the connect timeout, not Ray's minute of retries
    rc, out, took = run_sweep_cli(cfg, {**os.environ, **TEST_ENV, "RAY_ADDRESS": "10.255.255.1:6379"})
    assert rc == 2 and "cannot connect to the Ray cluster at '10.255.255.1:6379' (from RAY_ADDRESS)" in out, out
    assert took < 40
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_bad_storage_and_unplaceable_workers_fail_fast(cluster, tiny_llama_dir, tmp_path):
    env = cluster.client_env()
    (tmp_path / "file").write_text("")
    cfg = sweep_config(tmp_path / "s.yaml", tiny_llama_dir, tmp_path / "file" / "runs")
    rc, out, _ = run_sweep_cli(cfg, env)
    assert rc == 2 and f"storage path '{tmp_path / 'file' / 'runs'}' is not writable" in out, out
    # storage only the driver sees (a private mount, like a node-local disk): every worker node says so
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0:
        private = tmp_path / "private"
        private.mkdir()
        cfg = sweep_config(tmp_path / "p.yaml", tiny_llama_dir, private)
        cmd = f"mount -t tmpfs none {private} && exec {sys.executable} -m shortened.cli sweep {cfg}"
        res = subprocess.run(["unshare", "-m", "sh", "-c", cmd], env=env, capture_output=True, text=True,
                             timeout=120, cwd=REPO_ROOT)
        assert res.returncode == 2 and "does not see files the driver writes there" in res.stderr, res.stderr
        assert res.stderr.count("not shared storage") == 3  # head and both worker nodes
    # workers the cluster can never place: per node, not in total
    for resources, message in [
        ({"workers_per_trial": 3, "cpus_per_worker": 1.5, "placement_strategy": "STRICT_SPREAD"},
         "3 workers × (1.5 CPU) with STRICT_SPREAD need 3 different nodes that each fit one worker; "
         "the cluster has 2"),
        ({"workers_per_trial": 1, "cpus_per_worker": 3},
         "1 worker × (3 CPU) can never be placed: the cluster's nodes fit 0"),
    ]:
        cfg = sweep_config(tmp_path / "w.yaml", tiny_llama_dir, tmp_path / "runs", resources=resources)
        rc, out, took = run_sweep_cli(cfg, env)
        assert rc == 2 and message in out, out
    assert not (tmp_path / "runs" / "cluster").exists()
