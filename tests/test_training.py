"""Retraining: Ray Train workers running DeepSpeed ZeRO 2 and 3 on a tiny model; a worker killed mid-run and the
exact token stream after recovery; the exported HF checkpoint; LoRA merge; distillation; bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from shortened.data import DataConfig, PackedStream, take
from shortened.errors import ShortenedError
from shortened.training.config import TrainConfig
from shortened.training.loop import Phase, distill_loss, run, trained_tokens, with_lora
from shortened.training.retrain import ScaleConfig, retrain
from shortened.training.session import LocalSession

SEQ = 64


def cfg(**kw) -> TrainConfig:
    base = dict(train_tokens=SEQ * 2 * 2 * 16, micro_batch_size=2, data=DataConfig(seq_len=SEQ), lr=3e-3,
                warmup_ratio=0.0, report_every_steps=4, checkpoint_every_tokens=SEQ * 2 * 2 * 6)
    return TrainConfig(**{**base, **kw})


def heldout_loss(model_dir, tokenizer) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = take(iter(PackedStream(DataConfig(split="validation", seq_len=SEQ), tokenizer)), 8)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


# -- Ray Train + DeepSpeed ----------------------------------------------------------------------------------------

def test_zero2_cpt_trains_and_exports_a_loadable_model(ray_cluster, tiny_llama_dir, smollm2_tokenizer, tmp_path):
    out = tmp_path / "cpt"
    res = retrain(str(tiny_llama_dir), str(out), cfg(zero_stage=2, token_log=True), storage_path=str(tmp_path / "s"),
                  name="z2", scale=ScaleConfig(num_workers=2))
    history = json.loads((out / "retraining.json").read_text())["history"]
    assert [h["step"] for h in history] == [4, 6, 8, 12, 16] and history[-1]["tokens"] == SEQ * 2 * 2 * 16
    assert history[-1]["loss"] < history[0]["loss"] - 0.5, [h["loss"] for h in history]
    assert res.metrics["step"] == 16 and res.phases[0]["checkpoint"]
    assert heldout_loss(out, smollm2_tokenizer) < heldout_loss(tiny_llama_dir, smollm2_tokenizer) - 0.5
    tokens = trained_tokens(out, 2)
    assert len(tokens[0]) == len(tokens[1]) == 16 and not set(tokens[0].values()) & set(tokens[1].values())
    # the same run name again: resumes from the final checkpoint, trains nothing more, re-exports
    again = retrain(str(tiny_llama_dir), str(out), cfg(zero_stage=2, token_log=True),
                    storage_path=str(tmp_path / "s"), name="z2", scale=ScaleConfig(num_workers=2), overwrite=True)
    assert again.metrics["step"] == 16 and trained_tokens(out, 2) == tokens
    record = json.loads((out / "retraining.json").read_text())
    assert record["tokens"] == record["phases"][0]["tokens_requested"] == SEQ * 2 * 2 * 16
    assert record["tokens_trained"] == record["tokens_trained_total"] == SEQ * 2 * 2 * 16
    assert record["world_size"] == 2 and [p["run"] for p in record["phases"]] == ["z2"]
    # the same name for another retraining, or another worker count: refused before any worker starts
    ckpts = sorted(p.name for p in (tmp_path / "s" / "z2").glob("checkpoint_*"))
    stamp = (out / "retraining.json").stat().st_mtime_ns
    with pytest.raises(ShortenedError, match=r"run 'z2' .* train.lr \(was 0.003, now 0.001\)"):
        retrain(str(tiny_llama_dir), str(out), cfg(zero_stage=2, token_log=True, lr=1e-3),
                storage_path=str(tmp_path / "s"), name="z2", scale=ScaleConfig(num_workers=2), overwrite=True)
    with pytest.raises(ShortenedError, match=r"checkpointed by 2 worker\(s\).*use --workers 2"):
        retrain(str(tiny_llama_dir), str(out), cfg(zero_stage=2, token_log=True), storage_path=str(tmp_path / "s"),
                name="z2", scale=ScaleConfig(num_workers=1), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "s" / "z2").glob("checkpoint_*")) == ckpts
    assert (out / "retraining.json").stat().st_mtime_ns == stamp and trained_tokens(out, 2) == tokens


def test_zero3_worker_killed_mid_run_resumes_the_exact_token_stream(ray_cluster, tiny_llama_dir, tmp_path):
    c = cfg(zero_stage=3, token_log=True)
    clean = retrain(str(tiny_llama_dir), str(tmp_path / "clean"), c, storage_path=str(tmp_path / "s"), name="clean",
                    scale=ScaleConfig(num_workers=2))
    marker = tmp_path / "killed"
    faulty = retrain(str(tiny_llama_dir), str(tmp_path / "faulty"), c, storage_path=str(tmp_path / "s"),
                     name="faulty", scale=ScaleConfig(num_workers=2), max_failures=1,
                     worker_env={"SHORTENED_FAULT": f"1:9:{marker}"})  # rank 1 dies after step 9
    history = json.loads((tmp_path / "clean" / "retraining.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"] - 0.5  # ZeRO-3 trains too
    assert marker.exists()  # the fault happened, and the run still finished
    log1 = [json.loads(x)["step"] for x in open(tmp_path / ".faulty.tokens.rank1.jsonl")]
    # (0-based steps) the checkpoint after 6 steps was restored: steps 6-8 were trained twice, 0-5 and 9-15 once
    assert [log1.count(s) for s in range(16)] == [1] * 6 + [2] * 3 + [1] * 7
    assert trained_tokens(tmp_path / "faulty", 2) == trained_tokens(tmp_path / "clean", 2)
    assert faulty.metrics["loss"] == pytest.approx(clean.metrics["loss"], rel=1e-4)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "clean")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "faulty")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_bad_input_fails_before_workers_start(ray_cluster, tiny_llama_dir, tmp_path):
    with pytest.raises(ShortenedError, match="does not exist"):
        retrain(str(tiny_llama_dir), str(tmp_path / "o"), cfg(data=DataConfig(source=str(tmp_path / "nope"))),
                storage_path=str(tmp_path / "s"), name="bad")
    with pytest.raises(ShortenedError, match="not a Hugging Face model folder"):
        retrain(str(tmp_path), str(tmp_path / "o"), cfg(), storage_path=str(tmp_path / "s"), name="bad")
    with pytest.raises(ShortenedError, match=r"8 workers × \(1 CPU\) can never be placed: the cluster's nodes fit 4"):
        retrain(str(tiny_llama_dir), str(tmp_path / "o"), cfg(), storage_path=str(tmp_path / "s"), name="bad",
                scale=ScaleConfig(num_workers=8))
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        cfg(offload_params=True)


# -- without Ray: LoRA and distillation ---------------------------------------------------------------------------

def test_lora_merge_gives_the_adapter_logits(tiny_llama_dir):
    from tiny_models import random_tokens

    model = with_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), cfg()).eval()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # B starts at zero; give the adapter an effect
    ids = random_tokens(2, 16)
    with torch.no_grad():
        adapted = model(ids).logits
        merged = model.merge_and_unload()(ids).logits
    assert not torch.allclose(adapted, AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(ids).logits, atol=1e-3)
    assert (adapted - merged).abs().max() < 5e-4  # fp32 rounding of W + BA vs W x + B(A x); logits are O(1)


def test_lora_run_without_ray_changes_only_adapted_weights(tiny_llama_dir, tmp_path):
    c = cfg(method="lora", train_tokens=SEQ * 2 * 6, report_every_steps=3, checkpoint_every_tokens=None,
            lora={"lr": 3e-3})
    run(Phase(method="lora", model=str(tiny_llama_dir), out=str(tmp_path / "lora"), tokens=c.train_tokens, train=c),
        LocalSession(tmp_path / "run"))
    before = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "lora").state_dict()
    assert before.keys() == after.keys()  # merged: a plain model, no adapter keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in c.lora.target_modules for k in changed)
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2


def test_distillation_loss_decreases(tiny_llama_dir, tmp_path, smollm2_tokenizer):
    from shortened.blocks import remove_blocks

    student = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    remove_blocks(student, [3, 4, 5])
    student.save_pretrained(tmp_path / "student")
    smollm2_tokenizer.save_pretrained(tmp_path / "student")
    (tmp_path / "student" / "pruning.json").write_text(json.dumps({"model": str(tiny_llama_dir)}))
    c = cfg(method="distill", train_tokens=SEQ * 2 * 12, report_every_steps=4, checkpoint_every_tokens=None,
            distill={"weight": 1.0, "temperature": 2.0})
    from shortened.training.retrain import find_teacher

    teacher = find_teacher(str(tmp_path / "student"), c)
    assert teacher == str(tiny_llama_dir)
    run(Phase(method="distill", model=str(tmp_path / "student"), out=str(tmp_path / "d"), tokens=c.train_tokens,
              train=c, teacher=teacher), LocalSession(tmp_path / "run"))
    history = json.loads((tmp_path / "d" / "retraining.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert json.loads((tmp_path / "d" / "pruning.json").read_text())["model"] == str(tiny_llama_dir)
    logits = torch.randn(2, 5, 11)
    labels = torch.ones(2, 5, dtype=torch.long)
    assert distill_loss(logits, logits, labels, 2.0).abs() < 1e-6
    assert distill_loss(logits, torch.randn(2, 5, 11), labels, 2.0) > 0.01


def test_cli_cpt_then_lora_runs_two_phases(ray_cluster, tiny_llama_dir, tmp_path, capsys):
    from shortened.cli import main

    yaml_cfg = tmp_path / "t.yaml"
    yaml_cfg.write_text("micro_batch_size: 2\nlr: 3.0e-3\nreport_every_steps: 2\nlora:\n  train_tokens: 512\n")
    out = tmp_path / "healed"
    assert main(["retrain", "--model", str(tiny_llama_dir), "--method", "cpt+lora", "--config", str(yaml_cfg),
                 "--train-tokens", "1024", "--seq-len", "64", "--zero-stage", "2", "--workers", "2",
                 "--storage-path", str(tmp_path / "s"), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["phase"] for p in report["phases"]] == ["cpt", "lora"] and report["metrics"]["step"] == 2
    lora = json.loads((out / "retraining.json").read_text())
    assert lora["method"] == "lora" and lora["base_model"] == str(tmp_path / "s" / "healed-cpt" / "model")
    cpt = json.loads((tmp_path / "s" / "healed-cpt" / "model" / "retraining.json").read_text())
    assert cpt["method"] == "cpt" and cpt["history"][-1]["tokens"] == 1024
    # the final record states both phases: 1024 CPT tokens, then 512 LoRA tokens on the given modules
    assert [(p["method"], p["run"], p["tokens_requested"], p["tokens_trained"], p["world_size"])
            for p in lora["phases"]] == [("cpt", "healed-cpt", 1024, 1024, 2), ("lora", "healed-lora", 512, 512, 2)]
    assert lora["tokens_trained_total"] == 1536 and lora["tokens_trained"] == 512
    assert sorted(lora["lora_targets"]["modules"]) == sorted(
        f"{'self_attn' if r in 'qkvo' else 'mlp'}.{r}_proj" for r in ("q", "k", "v", "o", "gate", "up", "down"))
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads the merged result
    assert main(["retrain", "--model", str(tiny_llama_dir), "--config", str(tmp_path / "missing.yaml"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
