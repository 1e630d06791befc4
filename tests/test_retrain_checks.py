"""Retraining input that must be refused or resolved on the driver, before Ray or any worker starts (no Ray here):
run identity and worker count of a reused run name, LoRA targets per architecture, ranges, local paths."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from shortened.data import DataConfig
from shortened.errors import ShortenedError
from shortened.training import identity
from shortened.training.config import TrainConfig
from shortened.training.lora import resolve_lora_targets, with_lora
from shortened.training.retrain import (ScaleConfig, absolute_data, phases_for, resolve_teacher, retrain,
                                        run_records)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import TINY, tiny_model  # noqa: E402


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"train_tokens": 256, "data": DataConfig(seq_len=64), **kw})


def assert_no_ray():
    import ray

    assert not ray.is_initialized()


# -- run identity: a reused run name ----------------------------------------------------------------------------

@pytest.fixture
def two_models(tmp_path, tiny_llama_dir):
    """Model A and model B: same architecture and shape, other weights (as in a re-pruned folder)."""
    a, b = tmp_path / "A", tmp_path / "B"
    shutil.copytree(tiny_llama_dir, a)
    m = tiny_model("llama", seed=1, vocab_size=json.loads((a / "config.json").read_text())["vocab_size"])
    shutil.copytree(tiny_llama_dir, b)
    m.save_pretrained(b)
    return a, b


def fake_checkpointed_run(storage: Path, name: str, model: Path, c: TrainConfig, workers: int) -> Path:
    """What a Ray Train run leaves after a checkpoint: the identity record and one data cursor per rank."""
    phases = phases_for(str(model), str(storage / "out"), c, str(storage), name)
    run_dir = storage / name
    identity.write_record(run_dir, run_records(phases, ScaleConfig(num_workers=workers))[0])
    ckpt = run_dir / "checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir()
    for r in range(workers):
        (ckpt / f"data_cursor_rank{r}.json").write_text("{}")
    return run_dir


def test_fingerprint_tells_models_of_one_shape_apart(two_models):
    a, b = two_models
    assert identity.model_fingerprint(a) == identity.model_fingerprint(a)
    assert identity.model_fingerprint(a) != identity.model_fingerprint(b)


@pytest.mark.parametrize("change, named", [
    ({"model": "B"}, "model (was {A}, now {B}; the weights/config differ)"),
    ({"method": "lora"}, "method (was 'cpt', now 'lora')"),
    ({"lr": 3e-3}, "train.lr (was 0.0001, now 0.003)"),
    ({"data": DataConfig(seq_len=128)}, "train.data.seq_len (was 64, now 128)"),
    ({"train_tokens": 512}, "tokens (was 256, now 512)"),
])
def test_reused_run_name_with_another_retraining_is_refused_before_ray(tmp_path, two_models, change, named):
    a, b = two_models
    storage = tmp_path / "ray"
    run_dir = fake_checkpointed_run(storage, "healed", a, cfg(), workers=1)
    before = (run_dir / identity.RUN_JSON).read_text()
    change = dict(change)
    model = b if change.pop("model", None) else a
    with pytest.raises(ShortenedError) as err:
        retrain(str(model), str(tmp_path / "out"), cfg(**change), storage_path=str(storage), name="healed",
                scale=ScaleConfig(num_workers=1))
    msg = str(err.value)
    assert "Ray Train run 'healed'" in msg and named.format(A=a, B=b) in msg, msg
    assert_no_ray()
    assert not (tmp_path / "out").exists() and (run_dir / identity.RUN_JSON).read_text() == before


def test_same_retraining_may_change_only_operational_settings(tmp_path, two_models):
    a, _ = two_models
    run_dir = fake_checkpointed_run(tmp_path / "ray", "healed", a, cfg(), workers=1)
    record = run_records(phases_for(str(a), "o", cfg(report_every_steps=3, keep_checkpoints=5,
                                                      checkpoint_every_tokens=64, token_log=True,
                                                      lora={"r": 64}, distill={"weight": 2.0}),  # unused by cpt
                                    str(tmp_path / "ray"), "healed"), ScaleConfig(num_workers=1))[0]
    identity.check_run(run_dir, record)  # no error: it resumes
    # the same model moved elsewhere is the same model
    moved = tmp_path / "moved"
    shutil.copytree(a, moved)
    identity.check_run(run_dir, {**record, "model": str(moved),
                                 "model_fingerprint": identity.model_fingerprint(moved)})


def test_checkpoint_resumes_with_a_worker_count_that_splits_its_global_batch(tmp_path, two_models):
    """Another worker count resumes (tests/test_elastic.py trains it); one that cannot split the checkpoint's
    global batch (1 worker x 1 sequence) evenly is refused before Ray starts, naming the numbers."""
    a, _ = two_models
    storage = tmp_path / "ray"
    fake_checkpointed_run(storage, "resume-test", a, cfg(), workers=1)
    run_dir = storage / "resume-test"
    assert identity.run_global_batch(run_dir, cfg(), 2) == 1  # the checkpoint's, not 1 x 1 x 2
    identity.check_run(run_dir, run_records(phases_for(str(a), "o", cfg(global_batch_size=1), str(storage),
                                                       "resume-test"), ScaleConfig(num_workers=2))[0])
    with pytest.raises(ShortenedError, match=r"run 'resume-test': a global batch of 1 sequences cannot be split "
                                             r"evenly over 2 worker\(s\).*choose --workers among the divisors of 1"):
        retrain(str(a), str(tmp_path / "out"), cfg(), storage_path=str(storage), name="resume-test",
                scale=ScaleConfig(num_workers=2))
    assert_no_ray()
    # a run that never reached a checkpoint has nothing to resume: another worker count is fine
    shutil.rmtree(storage / "resume-test" / "checkpoint_2026-01-01_00-00-00.000000")
    identity.check_run(storage / "resume-test", run_records(
        phases_for(str(a), "o", cfg(), str(storage), "resume-test"), ScaleConfig(num_workers=2))[0])


def test_checkpoints_without_identity_record_are_refused(tmp_path, tiny_llama_dir):
    (tmp_path / "ray" / "old" / "checkpoint_x").mkdir(parents=True)
    with pytest.raises(ShortenedError, match="has checkpoints but no shortened-run.json"):
        retrain(str(tiny_llama_dir), str(tmp_path / "out"), cfg(), storage_path=str(tmp_path / "ray"), name="old",
                scale=ScaleConfig(num_workers=1))
    assert_no_ray()


def test_cpt_then_lora_checks_both_runs(tmp_path, two_models):
    a, b = two_models
    c = cfg(method="cpt+lora")
    phases = phases_for(str(a), str(tmp_path / "out"), c, str(tmp_path / "ray"), "h")
    assert [p.run for p in phases] == ["h-cpt", "h-lora"]
    recs = run_records(phases, ScaleConfig(num_workers=1))
    assert recs[1]["model_fingerprint"] == f"output of run h-cpt ({identity.digest(recs[0])})"
    other = run_records(phases_for(str(b), str(tmp_path / "out"), c, str(tmp_path / "ray"), "h"),
                        ScaleConfig(num_workers=1))
    assert identity.differences(recs[1], other[1])  # LoRA on another CPT result is another LoRA run
    r64 = run_records(phases_for(str(a), str(tmp_path / "out"), cfg(method="cpt+lora", lora={"r": 64}),
                                 str(tmp_path / "ray"), "h"), ScaleConfig(num_workers=1))
    assert identity.differences(recs[0], r64[0]) == []  # the CPT phase does not use the LoRA settings ...
    assert identity.differences(recs[1], r64[1]) == ["train.lora.r (was 8, now 64)"]  # ... the LoRA phase does


# -- LoRA targets --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", list(TINY))
def test_lora_adapts_every_attention_and_mlp_projection(model_type, caplog):
    from shortened.blocks import find_blocks

    model = tiny_model(model_type)
    block = find_blocks(model).blocks[0]
    linears = sorted(n for n, m in block.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    has_gate = any(x in n for n in linears for x in ("gate_proj", "gate_up_proj"))
    with caplog.at_level(logging.WARNING):
        peft_model = with_lora(model, cfg(method="lora"))
    adapted_block = find_blocks(peft_model.base_model.model).blocks[0]
    adapted = sorted(n for n, m in adapted_block.named_modules() if hasattr(m, "lora_A"))
    assert adapted == linears, (model_type, adapted, linears)
    targets = peft_model.shortened_lora_targets
    assert sorted(targets["modules"]) == linears
    assert set(targets["roles"]) == {"q", "k", "v", "o", "up", "down"} | ({"gate"} if has_gate else set())
    if has_gate:
        assert targets["unmatched"] == [] and "match no module" not in caplog.text
    else:  # the paper's gate projection does not exist here: said, by name
        assert targets["unmatched"] == ["gate_proj"] and "gate_proj" in caplog.text
    assert not [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "lm_head" in n]


def test_fused_modules_play_every_role_they_fuse():
    t = resolve_lora_targets(tiny_model("phi3"), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]).to_json()
    assert t["roles"] == {"q": ["self_attn.qkv_proj"], "k": ["self_attn.qkv_proj"], "v": ["self_attn.qkv_proj"],
                          "o": ["self_attn.o_proj"], "gate": ["mlp.gate_up_proj"], "up": ["mlp.gate_up_proj"],
                          "down": ["mlp.down_proj"]}
    gpt2 = resolve_lora_targets(tiny_model("gpt2"), ["o", "down"]).to_json()  # c_proj: o in attn, down in the MLP
    assert gpt2["roles"] == {"o": ["attn.c_proj"], "down": ["mlp.c_proj"]}
    only_v = resolve_lora_targets(tiny_model("opt"), ["v"]).to_json()
    assert only_v["modules"] == ["self_attn.v_proj"]


def test_lora_target_matching_nothing_is_named(caplog):
    with caplog.at_level(logging.WARNING):
        pm = with_lora(tiny_model("llama"), cfg(method="lora", lora={"target_modules": ["q", "wrong_name"]}))
    assert "wrong_name" in caplog.text and pm.shortened_lora_targets["modules"] == ["self_attn.q_proj"]
    with pytest.raises(ShortenedError, match=r"\['nope'\] match no module of the llama blocks"):
        with_lora(tiny_model("llama"), cfg(method="lora", lora={"target_modules": ["nope"]}))


# -- ranges: nothing passes unchecked, nothing is silently replaced ------------------------------------------------

@pytest.mark.parametrize("fields, field", [
    ({"lr": float("nan")}, "lr"), ({"lr": 0}, "lr"), ({"betas": (1.0, 0.9)}, "betas"),
    ({"weight_decay": -0.1}, "weight_decay"), ({"seed": -1}, "seed"), ({"micro_batch_size": 0}, "micro_batch_size"),
    ({"lora": {"r": 0}}, "lora.r"), ({"lora": {"target_modules": []}}, "lora.target_modules"),
    ({"distill": {"temperature": float("inf")}}, "distill.temperature"), ({"train_tokens": 0}, "train_tokens"),
])
def test_train_config_ranges(fields, field):
    from shortened.errors import validated

    with pytest.raises(ShortenedError, match=field.replace(".", r"\.")):
        validated(TrainConfig, {"train_tokens": 256, **fields}, "retrain setting")


@pytest.mark.parametrize("kw, named", [({"num_workers": 0}, "num_workers"), ({"num_workers": 1.5}, "num_workers"),
                                       ({"cpus_per_worker": 0}, "cpus_per_worker"),
                                       ({"gpus_per_worker": -1}, "gpus_per_worker"),
                                       ({"placement_strategy": "ANY"}, "placement_strategy")])
def test_scale_config_ranges(kw, named):
    with pytest.raises(ShortenedError, match=named):
        ScaleConfig(**kw)


@pytest.mark.parametrize("flags, named", [(["--seq-len", "0"], "seq.len"), (["--workers", "0"], "workers"),
                                          (["--max-failures", "-1"], "max.failures"),
                                          (["--cpus-per-worker", "0"], "cpus.per.worker")])
def test_cli_refuses_bad_numbers_before_ray(tmp_path, tiny_llama_dir, capsys, flags, named):
    """Refused by the flag's own check or the config's range, never replaced (0 → 2048) nor passed on to Ray."""
    from shortened.cli import main

    try:
        rc = main(["retrain", "--model", str(tiny_llama_dir), "--train-tokens", "256", "--storage-path",
                   str(tmp_path / "s"), "--out", str(tmp_path / "o"), *flags])
    except SystemExit as exc:  # argparse's own check of the flag
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("shortened retrain: error") and re.search(named, err), err
    assert_no_ray()
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


# -- local paths: resolved once at entry, checked before Ray ------------------------------------------------------

def test_relative_data_source_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = absolute_data(cfg(data=DataConfig(source="good.jsonl", seq_len=64)))
    assert c.data.source == str(tmp_path / "good.jsonl")
    assert absolute_data(cfg(data=DataConfig(source="shards/*.jsonl"))).data.source == str(tmp_path / "shards/*.jsonl")
    for kept in ("slimpajama-sample", "hf:cerebras/SlimPajama-627B", "s3://bucket/x"):
        assert absolute_data(cfg(data=DataConfig(source=kept))).data.source == kept


def test_relative_teacher_is_resolved_or_refused_on_the_driver(tmp_path, tiny_llama_dir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    shutil.copytree(tiny_llama_dir, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert resolve_teacher("tiny", "pruning.json") == str(tmp_path / "tiny")
    student = tmp_path / "student"
    shutil.copytree(tiny_llama_dir, student)
    (student / "pruning.json").write_text(json.dumps({"model": "tiny"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # ./tiny is not here: not a hub repo either
    with pytest.raises(ShortenedError, match=r"distill teacher 'tiny' \(.*student/pruning.json\) is no local path"):
        retrain(str(student), str(tmp_path / "out"), cfg(method="distill"), storage_path=str(tmp_path / "s"),
                name="d", scale=ScaleConfig(num_workers=1))
    assert_no_ray()
    (tmp_path / "only-config").mkdir()
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "only-config")
    with pytest.raises(ShortenedError, match="only-config.*no weight files"):
        retrain(str(student), str(tmp_path / "out"), cfg(method="distill"), storage_path=str(tmp_path / "s"),
                name="d", teacher=str(tmp_path / "only-config"), scale=ScaleConfig(num_workers=1))
    assert_no_ray()
    assert not (tmp_path / "out").exists() and not (tmp_path / "s").exists()


def test_model_folder_needs_weights_and_tokenizer(tmp_path, tiny_llama_dir):
    only_config = tmp_path / "m"
    only_config.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", only_config)
    with pytest.raises(ShortenedError, match="has config.json but no weight files"):
        retrain(str(only_config), str(tmp_path / "o"), cfg(), storage_path=str(tmp_path / "s"), name="x")
    no_tok = tmp_path / "w"
    tiny_model("llama").save_pretrained(no_tok)
    with pytest.raises(ShortenedError, match="no usable tokenizer"):
        retrain(str(no_tok), str(tmp_path / "o"), cfg(), storage_path=str(tmp_path / "s"), name="x")
    assert_no_ray()
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_record_from_before_a_field_existed_compares_it_at_its_default(tmp_path, two_models):
    """A run checkpointed by an older release (its record lacks fields added since) resumes when the new fields
    are at their defaults, and is refused, naming the field, when one is set otherwise."""
    a, _ = two_models
    old = run_records(phases_for(str(a), "o", cfg(method="lora"), str(tmp_path / "ray"), "h"),
                      ScaleConfig(num_workers=1))[0]
    del old["train"]["lora"]["zero_stage"], old["train"]["data"]["document_positions"]
    new = run_records(phases_for(str(a), "o", cfg(method="lora"), str(tmp_path / "ray"), "h"),
                      ScaleConfig(num_workers=1))[0]
    assert identity.differences(old, new) == []
    changed = run_records(phases_for(str(a), "o", cfg(method="lora", lora={"zero_stage": 0}),
                                     str(tmp_path / "ray"), "h"), ScaleConfig(num_workers=1))[0]
    assert identity.differences(old, changed) == ["train.lora.zero_stage (was 2, now 0)"]
