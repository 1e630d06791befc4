"""Early stopping with Ray Tune's ASHAScheduler: validation reports during retraining, the scheduler config, and a
tiny grid on local Ray where a hopeless trial is stopped, its Ray resources freed, its row ``stopped``, and a resume
runs nothing."""

from __future__ import annotations

import math
import time

import pytest
import torch

from shortened.errors import ShortenedError
from shortened.sweep import SweepConfig, load_sweep_config
from shortened.sweep.store import ResultsStore
from test_sweep import tiny_sweep, write_yaml


def asha_sweep(model_dir, storage, **kw) -> dict:
    """dense, cpt, lora (a LoRA learning rate so small it cannot improve: hopeless) and none on one pruned tiny
    Llama; 1024 tokens in 128-token steps, validation every 256, rungs at 256 and 512 tokens."""
    cfg = tiny_sweep(model_dir, storage, name="asha", criteria=["magnitude"], blocks=[2],
                     methods=["cpt", "lora", "none"],
                     train={"train_tokens": 1024, "micro_batch_size": 2, "lr": 3e-3, "zero_stage": 0,
                            "report_every_steps": 4, "data": {"seq_len": 64}, "lora": {"lr": 1e-7},
                            "val_every_tokens": 256, "val_windows": 4},
                     eval={"ppl": ["wikitext2"], "ppl_max_windows": 4},
                     resources={"workers_per_trial": 1, "cpus_per_worker": 0.95, "max_concurrent_trials": 1},
                     scheduler={"name": "asha", "metric": "val_ppl", "grace_tokens": 256, "reduction_factor": 2},
                     selection={"tolerance_pct": 1000})
    cfg.update(kw)
    return cfg


# -- config -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"scheduler": {"name": "asha", "metric": "loss"}}, "scheduler.metric"),
    ({"scheduler": {"name": "hyperband"}}, "scheduler.name"),
    ({"scheduler": {"name": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor"),
    ({"scheduler": {"name": "asha", "grace_tokens": 1024}}, "scheduler.grace_tokens 1024 must be less than "
                                                            "train.train_tokens 1024"),
    ({"train_no_val": True}, "only with train.val_every_tokens set"),
    ({"train_source": "/tmp"}, "has no validation split"),
])
def test_bad_scheduler_config_names_the_field(tmp_path, change, message):
    cfg = asha_sweep(tmp_path / "model", tmp_path / "runs")
    if change.pop("train_no_val", False):
        cfg["train"] = {k: v for k, v in cfg["train"].items() if k != "val_every_tokens"}
    if (source := change.pop("train_source", None)) is not None:
        cfg["train"] = {**cfg["train"], "data": {"seq_len": 64, "source": source}}
    if "scheduler" in change:
        cfg["scheduler"] = {**cfg["scheduler"], **change["scheduler"]}
    path = write_yaml(tmp_path / "bad.yaml", cfg)
    with pytest.raises(ShortenedError) as err:
        load_sweep_config(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)


def test_scheduler_defaults_to_none_and_asha_gets_the_budget(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from shortened.sweep.runner import scheduler_for

    plain = tiny_sweep(tmp_path, tmp_path)
    assert SweepConfig.model_validate(plain).scheduler.name == "none"
    assert isinstance(scheduler_for(SweepConfig.model_validate(plain)), FIFOScheduler)
    asha = scheduler_for(SweepConfig.model_validate(asha_sweep(tmp_path, tmp_path,
                                                               methods=["cpt", "cpt+lora"])))
    assert isinstance(asha, ASHAScheduler)
    assert (asha._time_attr, asha.metric, asha._max_t) == ("tokens", "val_ppl", 2048)  # cpt+lora: both phases
    assert [r[0] for r in asha._brackets[0]._rungs] == [2048, 1024, 512, 256]


# -- validation -----------------------------------------------------------------------------------------------------

def test_validation_windows_and_metrics(smollm2_tokenizer, data_dir):
    """Fixed windows of the holdout shards (not the training ones); the loss is the model's mean next-token NLL."""
    from tiny_models import tiny_model

    from shortened.data.config import DataConfig
    from shortened.training.validation import validation_metrics, validation_windows

    data = DataConfig(seq_len=32)
    windows = validation_windows(data, smollm2_tokenizer, 3)
    assert windows.shape == (3, 32) and windows.dtype == torch.long
    assert torch.equal(windows, validation_windows(data, smollm2_tokenizer, 3))  # the same on every call (rank)
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer)).eval()
    m = validation_metrics(model, windows, rank=0, world_size=1, device=torch.device("cpu"))
    with torch.no_grad():
        expected = sum(model(input_ids=w[None], labels=w[None]).loss.item() for w in windows) / 3
    assert m["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert m["val_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert model.training  # put back in train mode
    with pytest.raises(ShortenedError, match="has no validation split"):
        validation_windows(DataConfig(source=str(data_dir / "c4"), seq_len=32), smollm2_tokenizer, 2)


# -- a sweep on local Ray -------------------------------------------------------------------------------------------

def _released(ray, timeout_s: float = 60.0) -> tuple[float, list, list]:
    """Wait until every CPU is free again; returns the free CPUs, the placement groups not removed and the live
    Ray Train controller actors."""
    from ray.util.state import list_actors, list_placement_groups

    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        groups = [g for g in list_placement_groups() if g.state != "REMOVED"]
        controllers = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "Controller" in a.class_name]
        if (free == 2.0 and not groups and not controllers) or time.monotonic() > deadline:
            return free, groups, controllers
        time.sleep(1.0)


def test_asha_stops_the_hopeless_trial_and_frees_its_resources(tmp_path, tiny_llama_dir, local_ray):
    from shortened.sweep.runner import run_sweep

    cfg = SweepConfig.model_validate(asha_sweep(tiny_llama_dir, tmp_path))
    out = run_sweep(cfg)
    rows = {t["key"]: t for t in out.trials}
    assert {k: t["status"] for k, t in rows.items()} == {
        "dense": "completed", "magnitude-b2-cpt": "completed", "magnitude-b2-lora": "stopped",
        "magnitude-b2-none": "completed"}
    stopped = rows["magnitude-b2-lora"]
    val = {m["name"]: m["value"] for m in stopped["metrics"] if m["dataset"] == "validation"}
    assert stopped["tokens_trained"] == 256 and val["val_ppl"] == pytest.approx(math.exp(val["val_loss"]))
    assert rows["magnitude-b2-cpt"]["tokens_trained"] == 1024
    # the CPT trial's validation at the rung was better: it went on (its history holds every validation)
    import json

    history = json.loads((cfg.layout.trained("magnitude-b2-cpt") / "retraining.json").read_text())["history"]
    cpt_val = {h["tokens"]: h["val_ppl"] for h in history if "val_ppl" in h}
    assert sorted(cpt_val) == [256, 512, 768, 1024] and cpt_val[256] < val["val_ppl"]
    assert not cfg.layout.result_json("magnitude-b2-lora").is_file()
    assert out.choice.chosen is not None and out.choice.chosen["key"] != "magnitude-b2-lora"

    free, groups, controllers = _released(local_ray)
    assert free == 2.0 and not groups and not controllers, (free, groups, controllers)

    again = run_sweep(cfg, resume=True)  # the stopped trial is settled: nothing runs
    assert again.ran == []
    assert {t["key"]: t["status"] for t in again.trials} == {k: t["status"] for k, t in rows.items()}
    store = ResultsStore(cfg.resolved_store_url())
    assert store.counts(cfg.name)["trials"] == 4
