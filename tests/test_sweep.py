"""The sweep: config validation, selection policies, the store's idempotent writes, and full sweeps on a tiny model
on local Ray — a grid interrupted by killing its driver and resumed, and a bisection checked against a grid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shortened.cli import main
from shortened.errors import ShortenedError
from shortened.sweep import Selection, SweepConfig, load_sweep_config
from shortened.sweep.selection import pareto_front, select
from shortened.sweep.layout import LOCK_NAME, ExperimentLayout
from shortened.sweep.store import ResultsStore
from shortened.sweep.trial import TrialResult, TrialSpec, TrialTimings, grid_specs, longest_first

REPO = Path(__file__).resolve().parent.parent


def tiny_sweep(model_dir: Path, storage: Path, **kw) -> dict:
    """A sweep a 2-core machine runs in ~2 minutes: 8-block tiny Llama, 64-token sequences, quick evals."""
    cfg = dict(name="tiny", model=str(model_dir), criteria=["ppl"], blocks=[2, 4], methods=["lora", "cpt"],
               keep_first=1, keep_last=1, calibration={"n_samples": 4, "seq_len": 64},
               train={"train_tokens": 512, "micro_batch_size": 2, "lr": 3e-3, "zero_stage": 0,
                      "report_every_steps": 2, "data": {"seq_len": 64}},
               eval={"ppl": ["wikitext2"], "ppl_max_windows": 8, "tasks": ["piqa"], "limit": 8, "speed": True,
                     "speed_new_tokens": [8], "speed_repeats": 1},
               resources={"workers_per_trial": 1, "cpus_per_worker": 0.95},
               selection={"tolerance_pct": 5}, storage_path=str(storage))
    cfg.update(kw)
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- config -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, field", [
    ({"criteria": ["ppl", "nope"]}, "criteria"),
    ({"ratios": [0.2, 1.5], "blocks": None}, "ratios"),
    ({"methods": ["cpt", "sgd"]}, "methods.1"),
    ({"train": {"train_tokens": 0}}, "train.train_tokens"),
    ({"resources": {"workers_per_trial": 0}}, "resources.workers_per_trial"),
    ({"name": "a/b"}, "name"),
    ({"selection": {"metric": "ppl:ptb"}}, "selection.metric"),
    ({"search": "bisect"}, "search: bisect searches one criterion and one method"),
    ({"colour": "blue"}, "colour"),
    ({"calibration": {"n_sample": 5}}, "calibration.n_sample"),  # a misspelt field is refused, not dropped
    ({"train": {"train_tokens": 64, "attn_implementation": "eager"}}, "set attn_implementation at the top level"),
])
def test_bad_config_names_the_field_and_creates_nothing(tmp_path, change, field):
    cfg = {**tiny_sweep(tmp_path / "model", tmp_path / "runs"), **change}
    path = write_yaml(tmp_path / "bad.yaml", cfg)
    with pytest.raises(ShortenedError) as err:
        load_sweep_config(path)
    assert str(path) in str(err.value) and field in str(err.value), str(err.value)
    assert main(["sweep", str(path)]) == 2
    assert not (tmp_path / "runs").exists()


def test_bad_inputs_fail_before_ray_starts(tmp_path, tiny_llama_dir):
    import ray

    base = tiny_sweep(tiny_llama_dir, tmp_path / "runs")
    cases = [({"model": str(tmp_path / "missing")}, "missing"),
             ({"train": {**base["train"], "data": {"source": str(tmp_path / "no-shards")}}}, "train.data"),
             ({"blocks": [2, 7]}, "blocks 7 removes more than the 6 blocks"),
             ({"attn_implementation": "flash_attention_2"}, "attn_implementation 'flash_attention_2' needs GPUs"),
             ({"attn_implementation": "eagre"}, "eagre"),
             ({"device": "cuda"}, "resources.use_gpu"),
             ({"blocks": None, "ratios": [0.2]}, r"ratio 0.2 \(\d+ of 8 blocks\) removes more than the 6 blocks"),
             ({"methods": ["partial"], "train": {**base["train"], "partial_blocks": 7}},
              r"train.partial_blocks 7 must be between 1 and the 4 blocks of the most pruned model \(4 of 8 removed\)"),
             # every worker count a trial may run on splits the global batch (2 x 1 x MAX 4 = 8: not over 3)
             ({"resources": {"workers": [1, 4], "cpus_per_worker": 0.5}},
              r"resources.workers \[1, 4\]: a global batch of 8 sequences cannot be split evenly over 3 worker"),
             ({"resources": {"workers_per_trial": 3, "cpus_per_worker": 0.5},
               "train": {**base["train"], "global_batch_size": 4}},
              r"resources.workers_per_trial 3: a global batch of 4 sequences cannot be split evenly over 3 "
              r"worker\(s\).*choose worker counts that divide 4"),
             ({"env": "garbage"}, "SHORTENED_MALLOC_MMAP_THRESHOLD")]
    for change, message in cases:
        env = change.pop("env", None)
        path = write_yaml(tmp_path / "c.yaml", {**base, **change})
        with pytest.MonkeyPatch.context() as mp:
            if env is not None:
                mp.setenv("SHORTENED_MALLOC_MMAP_THRESHOLD", env)
            with pytest.raises(ShortenedError, match=message):
                from shortened.sweep.runner import run_sweep

                run_sweep(load_sweep_config(path))
        assert not ray.is_initialized() and not (tmp_path / "runs").exists()


def test_yaml_key_written_twice_is_refused_naming_file_and_line(tmp_path, tiny_llama_dir):
    """PyYAML keeps the last of two equal keys without a word; a sweep that ran ratio 0.3 where the user also wrote
    0.2 would be silently wrong."""
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep(tiny_llama_dir, tmp_path / "runs")) + "ratios: [0.2]\nratios: [0.3]\n")
    with pytest.raises(ShortenedError, match=rf"{path}: line \d+: key 'ratios' appears twice in one mapping"):
        load_sweep_config(path)
    (tmp_path / "bad.yaml").write_text("name: a\n  ratios: [0.2\n")
    with pytest.raises(ShortenedError, match=r"bad.yaml: line 2, column 9: mapping values are not allowed here"):
        load_sweep_config(tmp_path / "bad.yaml")
    assert not (tmp_path / "runs").exists()


def test_grid_specs_and_concurrency(tmp_path):
    from shortened.sweep.preflight import concurrency

    cfg = SweepConfig.model_validate(tiny_sweep(tmp_path, tmp_path, criteria=["ppl", "taylor"], blocks=None,
                                                ratios=[0.35, 0.2, 0.2]))
    keys = [s.key for s in grid_specs(cfg)]
    assert keys == ["dense", "ppl-r0.2-lora", "ppl-r0.2-cpt", "ppl-r0.35-lora", "ppl-r0.35-cpt",
                    "taylor-r0.2-lora", "taylor-r0.2-cpt", "taylor-r0.35-lora", "taylor-r0.35-cpt"]
    launch = [s.key for s in longest_first(grid_specs(cfg))]  # heaviest first, the dense evaluation last
    assert launch[:2] == ["ppl-r0.2-cpt", "taylor-r0.2-cpt"] and launch[-1] == "dense"
    assert concurrency(cfg, {"CPU": 2.0}) == 2  # (0.05 + 0.95) × 2
    assert concurrency(cfg, {"CPU": 16.0}) == 16
    gpu = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={
        "use_gpu": True, "num_workers": 4, "cpus_per_worker": 2})})
    assert concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 2  # GPUs bound it: 4 per trial
    with pytest.raises(ShortenedError, match="one trial needs 8.05 CPUs and 4 GPUs"):
        concurrency(gpu, {"CPU": 64.0, "GPU": 2.0})


def test_retraining_methods_have_one_definition():
    """training.config.Method lists the methods; the sweep's (with none), the CLI's --method choices, the trial
    costs and the messages that list them all follow it."""
    import re

    from shortened.cli import build_parser
    from shortened.sweep.config import SWEEP_METHODS
    from shortened.sweep.trial import DENSE, METHOD_COST
    from shortened.training.config import METHODS, PHASE_METHODS, PHASES

    assert SWEEP_METHODS == ("none", *METHODS)
    assert set(METHOD_COST) == {*SWEEP_METHODS, DENSE}
    assert set(PHASES) == set(METHODS) and {p for ps in PHASES.values() for p in ps} == set(PHASE_METHODS)
    retrain = build_parser()._subparsers._group_actions[0].choices["retrain"]
    assert next(a for a in retrain._actions if a.dest == "method").choices == METHODS
    with pytest.raises(ValueError, match=re.escape(f"at least one method ({', '.join(SWEEP_METHODS)})")):
        SweepConfig.model_validate(tiny_sweep(Path("m"), Path("s"), methods=[]))


# -- selection ------------------------------------------------------------------------------------------------------

def trial(key, ratio, ppl, acc=None, params=100, status="completed", latency=None):
    metrics = [{"name": "ppl", "dataset": "wikitext2", "value": ppl, "protocol": "paper-128"}]
    if acc is not None:
        metrics.append({"name": "zeroshot_mean", "dataset": "all", "value": acc, "protocol": "lm-eval"})
    if latency is not None:
        metrics.append({"name": "latency_s", "dataset": "gen-b1-n128", "value": latency, "protocol": "greedy"})
    return {"key": key, "ratio_actual": ratio, "status": status, "params": params, "method": "cpt",
            "criterion": "ppl", "removed_blocks": [], "model_path": f"/m/{key}", "metrics": metrics}


TRIALS = [trial("dense", 0.0, 10.0, 0.60, params=100, latency=1.0),
          trial("a", 0.20, 11.0, 0.58, params=80, latency=0.8),
          trial("b", 0.20, 12.0, 0.59, params=80, latency=0.8),
          trial("c", 0.35, 14.0, 0.50, params=65, latency=0.65),
          trial("d", 0.50, 30.0, 0.40, params=50, latency=0.5),
          trial("e", 0.60, 9.0, None, params=40, status="error")]


def test_max_ratio_within_picks_the_largest_ratio_inside_the_tolerance():
    c = select(TRIALS, Selection(metric="ppl:wikitext2", tolerance_pct=40))
    assert c.chosen["key"] == "c" and c.baseline == 10.0  # 14 ≤ 10 × 1.4; d (30) is out; e errored
    assert [x["ok"] for x in c.candidates] == [True, True, True, False]
    c = select(TRIALS, Selection(metric="ppl:wikitext2", tolerance_pct=15))
    assert c.chosen["key"] == "a"  # a and b tie on ratio; a has the better perplexity
    c = select(TRIALS, Selection(metric="zeroshot_mean", tolerance_pct=5))  # accuracy: may fall by 5%
    assert c.chosen["key"] == "b"  # 0.59 and 0.58 ≥ 0.57; the tie on ratio goes to the higher accuracy
    none = select(TRIALS, Selection(metric="ppl:wikitext2", tolerance_pct=1))
    assert none.chosen is None and "within 1%" in none.reason


def test_best_under_budget_and_pareto():
    c = select(TRIALS, Selection(policy="best_under_budget", metric="zeroshot_mean", max_params=70))
    assert c.chosen["key"] == "c"
    c = select(TRIALS, Selection(policy="best_under_budget", metric="ppl:wikitext2", max_latency_s=0.85))
    assert c.chosen["key"] == "a"
    assert select(TRIALS, Selection(policy="best_under_budget", max_params=10)).chosen is None
    assert pareto_front([("x", 0.1, 5.0), ("y", 0.2, 4.0), ("z", 0.2, 6.0), ("w", 0.3, 7.0)], lower=True) == \
        ["y", "w"]
    c = select(TRIALS, Selection(policy="pareto", metric="ppl:wikitext2"))
    assert c.frontier == ["dense", "a", "c", "d"] and c.chosen["key"] == "c"  # the knee


# -- store ----------------------------------------------------------------------------------------------------------

def test_store_upserts_are_idempotent(tmp_path):
    store = ResultsStore(f"sqlite:///{tmp_path / 'sub' / 'r.db'}")
    store.ensure_experiment("e", {"a": 1}, str(tmp_path))
    rows = [{"name": "ppl", "dataset": "wikitext2", "value": 12.5, "protocol": "paper-128"},
            {"name": "acc", "dataset": "piqa", "value": 0.6, "protocol": "lm-eval"}]
    for _ in range(3):
        store.upsert_trial("e", "ppl-r0.2-cpt", {"method": "cpt", "status": "completed", "ratio": 0.2}, rows,
                           replace_metrics=True)
    store.upsert_trial("e", "ppl-r0.2-cpt", {"method": "cpt"}, [{**rows[0], "value": 11.0}])
    assert store.counts("e") == {"trials": 1, "metrics": 2}
    t = store.trials("e")[0]
    assert t["ratio"] == 0.2 and t["metrics"][0]["value"] == 11.0
    with pytest.raises(ShortenedError, match="no experiment 'other'"):
        store.trials("other")
    with pytest.raises(ShortenedError, match="results store"):
        ResultsStore("nosuchdialect://x")


# -- the trial boundary: TrialResult, the layout, the worker scale ---------------------------------------------------

def test_trial_result_round_trips_and_reads_older_results(tmp_path):
    spec = TrialSpec(method="cpt", criterion="ppl", blocks=2)
    metrics = [{"name": "ppl", "dataset": "wikitext2", "value": 12.5, "protocol": "paper-128"}]
    result = TrialResult(key=spec.key, spec=spec, model_path="/m", num_blocks=6, removed_blocks=[3, 4],
                         blocks_requested=2, params=80, params_before=100, ratio_actual=0.2, tokens_trained=512,
                         timings=TrialTimings(prune_s=1.0, train_s=2.0, eval_s=3.0, total_s=6.5), metrics=metrics)
    result.save(tmp_path / "result.json")
    assert TrialResult.load(tmp_path / "result.json") == result
    assert TrialResult.model_validate_json(str(result)) == result  # what Tune's own log holds of a reported result
    # a result.json written before TrialResult ({"row": ..., "metrics": ...}): a resumed older sweep reads it
    assert TrialResult.model_validate({"row": result.row(), "metrics": metrics}) == result
    by_ratio = TrialSpec(method="none", criterion="ppl", ratio=0.2)
    old = {"row": {**result.row(), "key": by_ratio.key, "method": "none", "ratio": 0.2}, "metrics": metrics}
    assert TrialResult.model_validate(old).spec == by_ratio
    with pytest.raises(ValueError, match="not its spec's"):
        TrialResult.model_validate({**result.model_dump(), "key": "other"})
    # the store takes it as it is
    store = ResultsStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.ensure_experiment("e", {}, str(tmp_path))
    store.record_result("e", result, tune_trial_id="t1")
    stored = store.trials("e")[0]
    assert {k: stored[k] for k in result.row()} == result.row() and stored["tune_trial_id"] == "t1"
    assert stored["metrics"] == metrics


def test_layout_owns_every_path_of_an_experiment(tmp_path):
    cfg = SweepConfig.model_validate(tiny_sweep(tmp_path / "model", tmp_path / "runs"))
    exp = (tmp_path / "runs" / "tiny").resolve()
    layout = cfg.layout
    assert layout == ExperimentLayout(exp) == ExperimentLayout.of(tmp_path / "runs", "tiny")
    assert cfg.resolved_store_url() == layout.store_url == f"sqlite:///{exp / 'results.db'}"
    assert [layout.sweep_json, layout.lock, layout.selection_json, layout.report, layout.train, layout.tune] == \
        [exp / "sweep.json", exp / "driver.lock", exp / "selection.json", exp / "report", exp / "train", exp / "tune"]
    assert [layout.scores("ppl"), layout.result_json("k"), layout.eval_json("k"), layout.speed(6)] == \
        [exp / "scores" / "ppl.json", exp / "trials/k/result.json", exp / "trials/k/eval.json", exp / "speed/blocks6.json"]
    assert layout.evaluated_model("k", retrained=False) == layout.pruned("k") == exp / "trials/k/pruned"
    assert layout.evaluated_model("k", retrained=True) == layout.trained("k") == exp / "trials/k/model"


def test_resources_are_the_worker_scale_under_the_yaml_names(tmp_path):
    from shortened.cluster import ClusterChecked, ScaleConfig

    cfg = SweepConfig.model_validate(tiny_sweep(tmp_path, tmp_path, resources={
        "workers_per_trial": 2, "cpus_per_worker": 0.5, "use_gpu": True, "driver_cpus": 0.1}))
    r = cfg.resources
    assert isinstance(r, ScaleConfig) and r.num_workers == 2 and r.worker_bundle() == {"CPU": 0.5, "GPU": 1}
    assert r.worker_scale() == ScaleConfig(num_workers=2, cpus_per_worker=0.5, use_gpu=True)
    dumped = cfg.model_dump(mode="json")["resources"]  # sweep.json and the store keep the YAML's names
    assert dumped["workers_per_trial"] == 2 and "num_workers" not in dumped
    assert SweepConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    checked = ClusterChecked(str(tmp_path), r.worker_scale())
    assert checked.covers(tmp_path / "tiny" / "train", r)
    assert not checked.covers(tmp_path / "tiny", ScaleConfig(num_workers=1)) and not checked.covers("/elsewhere", r)


# -- one driver per experiment; resume checks; interruption ---------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from shortened.sweep.layout import ExperimentLayout
from shortened.sweep.lock import ExperimentLock
ExperimentLock(ExperimentLayout(Path(sys.argv[1])).lock, "experiment").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_driver_is_refused_and_a_dead_one_taken_over(tmp_path, tiny_llama_dir):
    import ray

    from shortened.sweep.lock import ExperimentLock
    from shortened.sweep.runner import run_sweep

    cfg = SweepConfig.model_validate(tiny_sweep(tiny_llama_dir, tmp_path / "runs"))
    exp = cfg.layout.root
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(exp)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ShortenedError) as err:
            run_sweep(cfg)
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and f"host {os.uname().nodename}" in msg and "since 20" in msg, msg
        assert "another driver" in msg and str(exp / LOCK_NAME) in msg
        assert not ray.is_initialized() and os.listdir(exp) == [LOCK_NAME]  # nothing of the sweep was written
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9 leaves its lock): the next driver takes over, as --resume after a crash does
    lock = ExperimentLock(exp / LOCK_NAME, "experiment").acquire()
    assert lock.took_over["pid"] == holder.pid and "is gone" in lock.took_over["why"]
    lock.release()
    assert not (exp / LOCK_NAME).exists()


def test_lock_heartbeat_and_holders_on_other_hosts(tmp_path):
    from shortened.sweep.lock import ExperimentLock

    lock = ExperimentLock(tmp_path / LOCK_NAME, "e", heartbeat_s=0.1).acquire()
    first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first  # refreshed while held
    lock.release()
    # another host's driver: alive while its heartbeat is fresh, dead once it is older than the limit
    other = {"host": "other-node", "pid": 1, "since": time.time() - 60, "since_utc": "2026-01-01 00:00:00 UTC",
             "token": "t"}
    (tmp_path / LOCK_NAME).write_text(json.dumps({**other, "heartbeat": time.time() - 5}))
    with pytest.raises(ShortenedError, match="host other-node, pid 1, since 2026-01-01 00:00:00 UTC"):
        ExperimentLock(tmp_path / LOCK_NAME, "e", stale_after_s=60).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({**other, "heartbeat": time.time() - 61}))
    lock = ExperimentLock(tmp_path / LOCK_NAME, "e", stale_after_s=60).acquire()
    assert lock.took_over["host"] == "other-node" and "no heartbeat for 61 s" in lock.took_over["why"]
    lock.release()


def test_resume_with_a_worker_count_that_cannot_split_the_global_batch_is_refused_before_ray(tmp_path,
                                                                                              tiny_llama_dir):
    import ray

    from shortened.sweep.config import resolve_local_paths
    from shortened.sweep.runner import SWEEP_JSON, run_sweep
    from shortened.training.identity import write_record

    one = SweepConfig.model_validate(tiny_sweep(tiny_llama_dir, tmp_path / "runs"))
    exp = one.layout.root
    exp.mkdir(parents=True)
    (exp / SWEEP_JSON).write_text(json.dumps(resolve_local_paths(one).model_dump(mode="json")))
    for key in ("ppl-b2-cpt", "ppl-b4-lora"):  # both checkpointed by 1 worker; ppl-b4-lora finished since
        write_record(exp / "train" / key, {"num_workers": 1})
        (exp / "train" / key / "checkpoint_x").mkdir()
        (exp / "train" / key / "checkpoint_x" / "data_cursor_rank0.json").write_text("{}")
    (exp / "trials" / "ppl-b4-lora").mkdir(parents=True)
    (exp / "trials" / "ppl-b4-lora" / "result.json").write_text("{}")
    # 2 workers would split the global batch of 2 sequences (tests/test_elastic.py resumes a sweep so); 3 cannot
    three = SweepConfig.model_validate(tiny_sweep(tiny_llama_dir, tmp_path / "runs",
                                                  resources={"workers_per_trial": 3, "cpus_per_worker": 0.5}))
    with pytest.raises(ShortenedError, match=r"workers_per_trial 3: ppl-b2-cpt: a global batch of 2 sequences "
                                             r"cannot be split evenly over 3 worker\(s\)"):
        run_sweep(three, resume=True)
    assert not ray.is_initialized() and not (exp / "driver.lock").exists()


def test_local_paths_are_absolute_at_load_and_checked_before_ray(tmp_path, tiny_llama_dir, monkeypatch):
    import shutil

    import ray

    from shortened.sweep.runner import run_sweep

    shutil.copytree(tiny_llama_dir, tmp_path / "tiny")
    (tmp_path / "good.jsonl").write_text('{"text": "hello"}\n')
    monkeypatch.chdir(tmp_path)
    cfg = tiny_sweep(Path("tiny"), Path("runs"), methods=["distill"],
                     train={"train_tokens": 512, "data": {"source": "good.jsonl", "seq_len": 64},
                            "distill": {"teacher": "tiny"}}, calibration={"source": "good.jsonl", "n_samples": 1,
                                                                            "seq_len": 4})
    loaded = load_sweep_config(write_yaml(tmp_path / "s.yaml", cfg))
    assert loaded.model == loaded.train.distill.teacher == str(tmp_path / "tiny")
    assert loaded.train.data.source == loaded.calibration.source == str(tmp_path / "good.jsonl")
    assert load_sweep_config(write_yaml(tmp_path / "h.yaml", {**cfg, "model": "smollm2"})).model == "smollm2"
    # a model folder with only config.json, a teacher that is nowhere: refused before Ray, nothing written
    (tmp_path / "cfg-only").mkdir()
    shutil.copy(tmp_path / "tiny" / "config.json", tmp_path / "cfg-only")
    for change, message in [({"model": "cfg-only"}, "cfg-only': the folder has config.json but no weight files"),
                            ({"train": {**cfg["train"], "distill": {"teacher": "gone/teacher"}}},
                             "distill teacher 'gone/teacher'")]:
        with pytest.raises(ShortenedError, match=message):
            run_sweep(load_sweep_config(write_yaml(tmp_path / "c.yaml", {**cfg, **change})))
        assert not ray.is_initialized() and not (tmp_path / "runs").exists()


# -- full sweeps on local Ray -----------------------------------------------------------------------------------------

def tune_results(exp_dir: Path) -> dict[str, TrialResult]:
    """What Tune itself recorded for each finished trial (its result.json files, where the reported TrialResult is
    logged as its JSON), by trial key."""
    from shortened.sweep.runner import RESULT

    out = {}
    for f in exp_dir.glob("tune/*/*/result.json"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if RESULT in r:
                out[r["key"]] = TrialResult.model_validate_json(r[RESULT])
    return out


def run_cli(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shortened.cli", *args], cwd=REPO, start_new_session=True,
                            env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_grid_sweep_killed_driver_resumes_without_duplicates(tmp_path, tiny_llama_dir):
    cfg_path = write_yaml(tmp_path / "tiny.yaml", tiny_sweep(tiny_llama_dir, tmp_path / "runs"))
    exp = tmp_path / "runs" / "tiny"
    # 1. start the sweep and kill its driver (and the local Ray it started) once the first trial has finished
    proc = run_cli(["sweep", str(cfg_path)])
    deadline = time.time() + 300
    while time.time() < deadline and not list(exp.glob("trials/*/result.json")):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in exp.glob("trials/*/result.json")}
    assert finished and len(finished) < 5
    # 2. a plain re-run refuses the existing name; --resume finishes it
    again = run_cli(["sweep", str(cfg_path)])
    assert again.wait(120) == 2 and "already exists" in again.stdout.read()
    resumed = run_cli(["sweep", str(cfg_path), "--resume"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "selected: " in out
    # finished trials were not run again
    assert {k: (exp / "trials" / k / "result.json").stat().st_mtime_ns for k in finished} == finished
    store = ResultsStore(f"sqlite:///{exp / 'results.db'}")
    trials = {t["key"]: t for t in store.trials("tiny")}
    assert sorted(trials) == sorted(["dense", "ppl-b2-lora", "ppl-b2-cpt", "ppl-b4-lora", "ppl-b4-cpt"])
    assert all(t["status"] == "completed" for t in trials.values())
    # the store's rows are Tune's results (speed rows are added after the trials)
    tuned = tune_results(exp)
    for key, t in trials.items():
        rec = TrialResult.load(exp / "trials" / key / "result.json")
        if key in tuned:
            assert tuned[key] == rec
        stored = {(m["name"], m["dataset"]): m["value"] for m in t["metrics"]
                  if not m["dataset"].startswith("gen-")}
        assert stored == {(m.name, m.dataset): m.value for m in rec.metrics}
        assert t["model_path"] == rec.model_path
        assert t["num_blocks"] == 8 - (t["blocks_requested"] or 0) and t["model_path"]
        if key != "dense":
            assert t["tokens_trained"] == 512 and len(t["removed_blocks"]) == t["blocks_requested"]
            # the trial's Train run is named after it and says what it trains (a reused name is refused)
            run = json.loads((exp / "train" / key / "shortened-run.json").read_text())
            assert run["run"] == key and run["method"] == t["method"] and run["num_workers"] == 1
            assert run["model"] == str(exp / "trials" / key / "pruned") and run["tokens"] == 512
            assert {m["dataset"] for m in t["metrics"] if m["name"] == "speedup_vs_baseline"} == {"gen-b1-n8"}
    # the selection is the policy's answer, computed here independently
    base = next(m["value"] for m in trials["dense"]["metrics"] if m["name"] == "ppl")
    ok = [(t["ratio_actual"], -next(m["value"] for m in t["metrics"] if m["name"] == "ppl"), k)
          for k, t in trials.items() if k != "dense"
          and next(m["value"] for m in t["metrics"] if m["name"] == "ppl") <= base * 1.05]
    expected = max(ok)[2] if ok else None
    selection = json.loads((exp / "selection.json").read_text())
    assert (selection["chosen"] or {}).get("key") == expected
    assert store.experiment("tiny")["selected_trial"] == expected
    # a second resume runs nothing and adds no rows
    counts = store.counts("tiny")
    assert main(["sweep", str(cfg_path), "--resume"]) == 0
    assert store.counts("tiny") == counts
    # results, select and report read it back
    assert main(["results", str(exp), "--format", "json"]) == 0
    assert main(["select", str(exp), "--policy", "pareto"]) == 0
    assert main(["report", str(exp)]) == 0 and main(["report", str(exp), "--format", "html"]) == 0
    report = (exp / "report" / "report.md").read_text()
    for png in ("ppl_wikitext2.png", "zeroshot_mean.png", "speedup_gen-b1-n8.png", "pareto.png"):
        assert f"]({png})" in report and (exp / "report" / png).read_bytes()[:4] == b"\x89PNG"
    assert "<table" in (exp / "report" / "report.html").read_text()


@pytest.fixture(scope="module")
def short_smollm2(tmp_path_factory, smollm2_hf_dir) -> Path:
    """SmolLM2 cut to 10 of its 30 blocks: a real language model small enough that a grid over every block count
    runs in a minute, and where removing blocks raises perplexity."""
    from shortened.blocks import remove_blocks
    from shortened.models import load_model, load_tokenizer

    out = tmp_path_factory.mktemp("smollm2-10")
    model = load_model(str(smollm2_hf_dir), device="cpu", dtype="float32")
    keep = {0, 1, 2, 3, 10, 15, 20, 25, 28, 29}
    remove_blocks(model, [i for i in range(30) if i not in keep])
    model.save_pretrained(out)
    load_tokenizer(str(smollm2_hf_dir)).save_pretrained(out)
    return out


@pytest.mark.slow
def test_bisect_finds_the_boundary_of_the_grid_in_log2_trials(tmp_path, short_smollm2, local_ray):
    from shortened.sweep.runner import run_sweep

    common = dict(methods=["none"], eval={"ppl": ["wikitext2"], "ppl_max_windows": 8})
    grid = run_sweep(SweepConfig.model_validate(tiny_sweep(short_smollm2, tmp_path, name="grid",
                                                           blocks=list(range(1, 9)), **common)))
    ppl = {t["blocks_requested"] or 0: t["metrics"][0]["value"] for t in grid.trials}
    # a tolerance between two measured values, so the answer is a real boundary
    ordered = sorted(v for n, v in ppl.items() if n)
    tol = (ordered[len(ordered) // 2] / ppl[0] - 1) * 100 + 1e-6
    assert tol > 0, ppl
    cfg = tiny_sweep(short_smollm2, tmp_path, name="bisect", blocks=None, search="bisect", **common,
                     selection={"tolerance_pct": tol})
    out = run_sweep(SweepConfig.model_validate(cfg))
    probes = [t for t in out.trials if t["key"] != "dense"]
    assert 1 <= len(probes) <= 4  # ceil(log2(8 + 1))
    n = out.choice.chosen["blocks_requested"] if out.choice.chosen else 0
    limit = ppl[0] * (1 + tol / 100)
    assert ppl[n] <= limit  # the answer meets the tolerance ...
    assert n == 8 or ppl[n + 1] > limit  # ... and one more block does not
    assert n + 1 in {t["blocks_requested"] for t in probes} | {9}  # which the search itself measured
    assert {t["blocks_requested"]: t["metrics"][0]["value"] for t in probes} == \
        {t["blocks_requested"]: ppl[t["blocks_requested"]] for t in probes}


@pytest.mark.parametrize("name", ["demo", "llama3-8b", "vicuna-7b"])
def test_shipped_configs_validate(name):
    cfg = load_sweep_config(REPO / "jobs" / "configs" / f"{name}.yaml")
    assert len(grid_specs(cfg)) == 1 + len(cfg.criteria) * len(cfg.ratios) * len(cfg.methods)



def test_interrupted_sweep_says_how_to_resume_and_selects_nothing(tmp_path, tiny_llama_dir, local_ray, monkeypatch,
                                                                  caplog):
    from shortened.sweep import runner

    driver, marker = os.getpid(), str(tmp_path / "interrupted")

    def interrupting(config, sweep, cluster=None, worker_env=None):  # the first trial to start Ctrl-Cs the driver
        import os
        import signal
        import time

        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            os.kill(driver, signal.SIGINT)
        except FileExistsError:
            pass
        time.sleep(60)

    monkeypatch.setattr(runner, "_trainable", interrupting)
    cfg = SweepConfig.model_validate(tiny_sweep(tiny_llama_dir, tmp_path / "runs", criteria=["magnitude"],
                                                methods=["none"], blocks=[2], eval={"ppl": ["wikitext2"]}))
    with pytest.raises(runner.SweepInterrupted) as err:
        runner.run_sweep(cfg)
    msg = str(err.value)
    exp = cfg.layout.root
    assert "interrupted" in msg and "shortened sweep CONFIG --resume" in msg and str(exp / "sweep.json") in msg
    assert "Tuner.restore" not in msg + caplog.text
    assert not (exp / "selection.json").exists() and not (exp / "driver.lock").exists()
    assert (exp / "sweep.json").exists()  # what --resume needs
