"""What a person sees: results alone on stdout (so `| jq` works), a short and meaningful console when not a terminal
(no worker progress bars, no known harmless library warnings), the sweep's live view, and `--version`.

Each command runs as a real process, outside any git folder, with stdout and stderr captured apart (neither is a
terminal, as in CI or `ray job logs`)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BAR = re.compile(r"\d+%\|")  # a tqdm bar


def shortened(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "shortened.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def noise(stderr: str) -> list[str]:
    """Lines no user needs: progress bars, Ray workers' forwarded output, known harmless library messages."""
    harmless = ("Setting accelerator to CPU", "fatal: not a git repository", "`pretrained` model kwarg",
                "Loading weights", "Writing model shards", "Custom kwargs can be passed", "Token authentication")
    return [line for line in stderr.splitlines() if BAR.search(line) or any(h in line for h in harmless)]


def test_version_is_the_installed_distributions(tmp_path):
    proc = shortened(["--version"], tmp_path)
    assert proc.returncode == 0 and proc.stdout == f"shortened {version('shortened')}\n" and proc.stderr == ""


def test_score_and_eval_print_their_json_alone_and_quiet_is_quiet(tmp_path, tiny_llama_dir):
    scores = tmp_path / "scores.json"
    proc = shortened(["score", "--model", str(tiny_llama_dir), "--criterion", "ppl", "--keep-first", "1",
                      "--keep-last", "1", "--calibration.n_samples", "2", "--calibration.seq_len", "32", "--quiet",
                      "--out", str(scores)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)  # stdout is the result and nothing else
    assert printed["out"] == str(scores) and printed["scores"] == [round(s, 4) for s in
                                                                   json.loads(scores.read_text())["scores"]]
    assert noise(proc.stderr) == [] and len(proc.stderr.splitlines()) <= 3, proc.stderr

    out = tmp_path / "eval.json"
    proc = shortened(["eval", "--model", str(tiny_llama_dir), "--ppl", "wikitext2", "--ppl-windows", "2",
                      "--tasks", "piqa", "--limit", "4", "--quiet", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(out.read_text())
    # the human table is on stderr; no lm-eval bars or warnings, no git probe ("fatal: not a git repository")
    assert "| ppl | wikitext2 |" in proc.stderr and noise(proc.stderr) == [], proc.stderr
    assert len(proc.stderr.splitlines()) <= 12, proc.stderr


@pytest.fixture
def second_ray():
    """Another Ray instance on this machine, as another user's sweep or a test suite would have."""
    import ray

    if ray.is_initialized():  # an earlier test's Ray in this process is still up: it is the other instance
        yield
        return
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    yield
    ray.shutdown()


def test_sweep_console_is_short_and_meaningful_beside_another_ray(tmp_path, tiny_llama_dir, second_ray):
    cfg = dict(name="tiny", model=str(tiny_llama_dir), criteria=["magnitude"], blocks=[2], methods=["cpt"],
               keep_first=1, keep_last=1,
               train={"train_tokens": 256, "micro_batch_size": 2, "lr": 3e-3, "zero_stage": 0, "report_every_steps": 1,
                      "data": {"seq_len": 64}},
               eval={"ppl": ["wikitext2"], "ppl_max_windows": 2, "tasks": ["piqa"], "limit": 4, "speed": False},
               resources={"workers_per_trial": 1, "cpus_per_worker": 0.95}, selection={"tolerance_pct": 1000},
               storage_path=str(tmp_path / "runs"))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    proc = shortened(["sweep", "tiny.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    err = proc.stderr.splitlines()
    # no worker chatter at all (Ray prefixes forwarded lines with "(task pid=…)"), no tracebacks from a placement
    # group cleaner that found two Ray instances, and no known harmless messages
    assert not [line for line in err if "pid=" in line], proc.stderr
    assert "Traceback" not in proc.stderr and "multiple active Ray instances" not in proc.stderr, proc.stderr
    assert noise(proc.stderr) == [], proc.stderr
    # the view: a line per state or phase change of each trial, with tokens / budget for the trained one
    assert any(re.search(r"finished magnitude-b2-cpt · 256/256 tokens · ppl:wikitext2 [\d.e+]+", line)
               for line in err), proc.stderr
    assert any(line.startswith("[sweep tiny]") and "finished dense" in line for line in err), proc.stderr
    assert len(err) <= 12, proc.stderr
    # stdout: the table and the selection, nothing else
    assert proc.stdout.startswith("| trial |") and "selected: " in proc.stdout
    assert len(proc.stdout.splitlines()) <= 12, proc.stdout
    # the progress rank 0 wrote, read by the view
    assert json.loads((tmp_path / "runs" / "tiny" / "progress" / "magnitude-b2-cpt.json").read_text())["tokens"] == 256


def test_retrain_prints_its_json_alone(tmp_path, tiny_llama_dir):
    proc = shortened(["retrain", "--model", str(tiny_llama_dir), "--method", "cpt", "--train_tokens", "128",
                      "--data.seq_len", "32", "--micro_batch_size", "2", "--num_workers", "1", "--zero_stage", "0",
                      "--storage_path", str(tmp_path / "ray"), "--out", str(tmp_path / "healed")], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["out"] == str(tmp_path / "healed") and printed["metrics"]["tokens"] == 128
    assert noise(proc.stderr) == [] and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) <= 15, proc.stderr


def test_live_view_redraws_a_table_on_a_terminal(tmp_path):
    """On a terminal the view is a rich table (one row per trial, totals in the caption); here rendered into a
    buffer that claims to be one."""
    from shortened.console import SweepConsole
    from shortened.sweep import SweepConfig
    from shortened.sweep.trial import TrialResult, TrialSpec, TrialTimings

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    cfg = SweepConfig.model_validate(dict(name="t", model=str(tmp_path), criteria=["ppl"], blocks=[2],
                                          methods=["cpt"], train={"train_tokens": 1000},
                                          storage_path=str(tmp_path)))
    screen = Terminal()
    dense, cpt = TrialSpec(method="dense"), TrialSpec(method="cpt", criterion="ppl", blocks=2)
    with SweepConsole("t", cfg.layout, cfg, stream=screen, poll_s=0.05) as view:
        assert view.live
        view.add_trials([cpt, dense])
        view.trial_started(dense)
        view.trial_finished(dense, TrialResult(
            key="dense", spec=dense, model_path="m", num_blocks=8, removed_blocks=[], blocks_requested=None, params=1,
            params_before=1, ratio_actual=0.0, timings=TrialTimings(total_s=60.0),
            metrics=[{"name": "ppl", "dataset": "wikitext2", "value": 12.5, "protocol": "paper"}]))
        view.trial_started(cpt)
    text = screen.getvalue()  # the last frame, drawn when the view stops
    assert "ppl:wikitext2" in text and "12.5" in text and "ppl-b2-cpt" in text and "0 / 1,000" in text
    assert "1/2 done, 1 running" in text


def test_ray_train_controller_retry_warnings_are_dropped_after_its_own_logging_setup():
    """Ray Train's controller logs "Failed to send resource request … safe to ignore" with a traceback when a busy
    machine delays an RPC; the worker setup hook drops it even after the controller's dictConfig replaced the
    "ray.train" handlers, while other warnings of the same logger still print."""
    import logging.config

    from shortened.console import worker_setup

    name = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
    buf = io.StringIO()
    worker_setup()
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                               "handlers": {"console": {"class": "logging.StreamHandler", "stream": buf}},
                               "loggers": {"ray.train": {"level": "DEBUG", "handlers": ["console"],
                                                         "propagate": False}}})
    try:
        raise TimeoutError("GetTimeoutError")
    except TimeoutError:
        logging.getLogger(name).warning("Failed to send resource request for abc. If this only happens transiently "
                                        "during network partition or CPU being overloaded, it's safe to ignore this "
                                        "error.", exc_info=True)
    logging.getLogger(name).warning("something a user must see")
    assert buf.getvalue() == "something a user must see\n"


def test_a_trial_the_scheduler_stopped_shows_as_stopped(tmp_path):
    from shortened.console import SweepConsole
    from shortened.sweep import SweepConfig
    from shortened.sweep.trial import TrialSpec

    cfg = SweepConfig.model_validate(dict(name="t", model=str(tmp_path), criteria=["taylor"], ratios=[0.35],
                                          methods=["cpt"], train={"train_tokens": 2048}, storage_path=str(tmp_path)))
    out = io.StringIO()
    spec = TrialSpec(method="cpt", criterion="taylor", ratio=0.35)
    with SweepConsole("t", cfg.layout, cfg, stream=out, poll_s=0.05) as view:
        view.add_trials([spec])
        view.trial_started(spec)
        view.trial_stopped(spec, 256, "val_ppl 1.3e+05")
        assert view.rows[spec.key].state == "stopped" and view.eta(view.rows[spec.key], 0.0) is None
    lines = out.getvalue().splitlines()
    assert re.search(r"1/1 done · stopped early \(scheduler\) taylor-r0.35-cpt · 256/2,048 tokens · val_ppl 1.3e\+05",
                     lines[-2]), lines
    assert "1 of 1 trial(s) ended (1 stopped early)" in lines[-1]
