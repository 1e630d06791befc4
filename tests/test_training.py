"""Retraining: Ray Train workers running DeepSpeed ZeRO 2 and 3 on a tiny model; a worker killed mid-run and the
exact token stream after recovery; the exported HF checkpoint; LoRA merge; distillation; bad input."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from shortened.data import DataConfig, PackedStream, take
from shortened.errors import ShortenedError
from shortened.training.audit import trained_tokens
from shortened.training.config import TrainConfig
from shortened.training.distill import distill_loss
from shortened.training.lora import with_lora
from shortened.training.loop import Phase, run
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
    # the same name for another retraining, or a worker count that cannot split its global batch: refused before
    # any worker starts (another worker count resumes: tests/test_elastic.py)
    ckpts = sorted(p.name for p in (tmp_path / "s" / "z2").glob("checkpoint_*"))
    stamp = (out / "retraining.json").stat().st_mtime_ns
    with pytest.raises(ShortenedError, match=r"run 'z2' .* train.lr \(was 0.003, now 0.001\)"):
        retrain(str(tiny_llama_dir), str(out), cfg(zero_stage=2, token_log=True, lr=1e-3),
                storage_path=str(tmp_path / "s"), name="z2", scale=ScaleConfig(num_workers=2), overwrite=True)
    with pytest.raises(ShortenedError, match=r"global batch of 4 sequences cannot be split evenly over 3 worker"):
        retrain(str(tiny_llama_dir), str(out), cfg(zero_stage=2, token_log=True), storage_path=str(tmp_path / "s"),
                name="z2", scale=ScaleConfig(num_workers=3), overwrite=True)
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
    record = json.loads((tmp_path / "lora" / "retraining.json").read_text())
    assert record["zero_stage"] == record["phases"][0]["zero_stage"] == 2  # lora.zero_stage, not zero_stage
    assert record["phases"][0]["attn_implementation"] == "sdpa"  # auto on a CPU


def test_training_attention_implementation_is_resolved_for_the_training_device(tiny_llama_dir, tmp_path,
                                                                               monkeypatch):
    """An explicit kernel is used for the student and the teacher; flash-attention that cannot run here is
    refused naming the option before any step."""
    from shortened.training import loop

    loaded = []
    real = loop.build_model

    def spy(phase, dtype=torch.float32, attn_implementation="sdpa"):
        model = real(phase, dtype, attn_implementation)
        loaded.append((model.config._attn_implementation, dtype))
        return model

    monkeypatch.setattr(loop, "build_model", spy)
    c = cfg(train_tokens=SEQ * 2 * 2, report_every_steps=2, checkpoint_every_tokens=None, attn_implementation="eager")
    run(Phase(method="cpt", model=str(tiny_llama_dir), out=str(tmp_path / "e"), tokens=c.train_tokens, train=c),
        LocalSession(tmp_path / "run"))
    assert loaded[0] == ("eager", torch.float32)
    assert json.loads((tmp_path / "e" / "retraining.json").read_text())["phases"][0]["attn_implementation"] == "eager"
    flash = cfg(train_tokens=SEQ * 2 * 2, attn_implementation="flash_attention_2")
    with pytest.raises(ShortenedError, match="attn_implementation 'flash_attention_2'"):
        run(Phase(method="cpt", model=str(tiny_llama_dir), out=str(tmp_path / "f"), tokens=flash.train_tokens,
                  train=flash), LocalSession(tmp_path / "run-f"))
    assert not (tmp_path / "f").exists()


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
                 "--train-tokens", "1024", "--seq-len", "64", "--zero-stage", "2", "--lora-zero-stage", "0",
                 "--workers", "2",
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
    assert [(p["method"], p["zero_stage"]) for p in lora["phases"]] == [("cpt", 2), ("lora", 0)]
    assert sorted(lora["lora_targets"]["modules"]) == sorted(
        f"{'self_attn' if r in 'qkvo' else 'mlp'}.{r}_proj" for r in ("q", "k", "v", "o", "gate", "up", "down"))
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads the merged result
    assert main(["retrain", "--model", str(tiny_llama_dir), "--config", str(tmp_path / "missing.yaml"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


# -- devices: every tensor handed to a collective is on the session's device ----------------------------------------

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all_single", "barrier")
FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
             "linspace", "scalar_tensor")


class DefaultDeviceElsewhere:
    """``torch`` as the training modules see it in the device test: a tensor factory called without
    ``device=`` builds on the meta device. On a GPU such a tensor lands on the CPU, not on the session's GPU, and
    NCCL cannot reduce it; on a CPU machine the default and the session's device are both the CPU, so without this
    the mistake could not show."""

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in FACTORIES:
            def build(*args, **kw):
                if kw.get("device") is None:
                    kw["device"] = "meta"
                return attr(*args, **kw)
            return build
        if name == "from_numpy":
            return lambda a: attr(a).to("meta")
        return attr


def _tensors(values) -> list:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += _tensors(v)
    return out


def record_collectives(monkeypatch, device) -> list[dict]:
    """Wrap torch.distributed's collectives: each call is recorded (name, calling module, tensor devices, kwargs)
    and one given a tensor off ``device`` fails at once, naming the caller."""
    import sys

    calls: list[dict] = []
    for name in COLLECTIVES:
        real = getattr(torch.distributed, name)

        def wrapper(*args, _real=real, _name=name, **kw):
            caller = sys._getframe(1).f_globals.get("__name__", "?")
            devices = [t.device for t in _tensors(list(args) + list(kw.values()))]
            calls.append({"name": _name, "caller": caller, "devices": devices, "kw": dict(kw)})
            off = [d for d in devices if d != device]
            assert not off, f"{caller} handed torch.distributed.{_name} a tensor on {off[0]}, not on {device}"
            return _real(*args, **kw)
        monkeypatch.setattr(torch.distributed, name, wrapper)
    return calls


def test_every_collective_of_the_training_loop_gets_tensors_on_the_session_device(tiny_llama_dir, tmp_path,
                                                                                   monkeypatch):
    """The real loop (distillation at ZeRO-3: teacher, chunked KL, metrics, a checkpoint mid-run and at the end,
    the ZeRO-3 export), one process on gloo, with every collective recorded and tensors built without a device
    put elsewhere (:class:`DefaultDeviceElsewhere`). The metrics all-reduce once built a CPU tensor: on NCCL every
    GPU retrain crashed at its first report."""
    from shortened.training import checkpoint, distill, loop, session as session_mod

    for module in (loop, checkpoint, distill, session_mod):
        monkeypatch.setattr(module, "torch", DefaultDeviceElsewhere())
    s = LocalSession(tmp_path / "run")
    calls = record_collectives(monkeypatch, s.device)
    c = cfg(method="distill", zero_stage=3, train_tokens=SEQ * 2 * 4, report_every_steps=1,
            checkpoint_every_tokens=SEQ * 2 * 2, checkpoint_staging_dir=str(tmp_path / "staging"))
    run(Phase(method="distill", model=str(tiny_llama_dir), out=str(tmp_path / "d"), tokens=c.train_tokens, train=c,
              teacher=str(tiny_llama_dir)), s)
    ours = [(c["name"], c["caller"]) for c in calls if c["caller"].startswith("shortened.")]
    # per report the metrics all-reduce; per checkpoint the staging check's all-reduce and the session's barrier
    assert ours.count(("all_reduce", "shortened.training.loop")) == 4
    assert ours.count(("all_reduce", "shortened.training.checkpoint")) == 2
    assert ours.count(("barrier", "shortened.training.session")) == 2
    assert any(c["caller"].startswith("deepspeed") for c in calls)  # DeepSpeed's own (ZeRO-3 gathers) too
    assert all(d == s.device for c in calls for d in c["devices"])
    assert (tmp_path / "d" / "config.json").is_file()


def test_the_barrier_names_the_gpu_under_nccl(monkeypatch):
    """NCCL's barrier is an all-reduce on a GPU: it is given the session's GPU (device_ids), gloo's is given none."""
    from shortened.training.session import barrier

    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda **kw: calls.append(kw))
    barrier(torch.device("cuda", 3))
    barrier(torch.device("cpu"))
    assert calls == [{"device_ids": [3]}, {}]


# -- distillation: the KL in chunks ---------------------------------------------------------------------------------

def unchunked_distill_loss(student_logits, teacher_logits, labels, temperature):
    """The formula before chunking: fp32 copies of both whole logit tensors."""
    import torch.nn.functional as F

    mask = labels[:, 1:] != -100
    s = student_logits[:, :-1][mask].float() / temperature
    t = teacher_logits[:, :-1][mask].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kl_equals_the_unchunked_value_and_gradient(dtype):
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(3, 17, 50, generator=g) * 3).to(dtype)
    teacher = (torch.randn(3, 17, 50, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 50, (3, 17), generator=g)
    labels[0, 2:9] = -100  # a masked prompt
    labels[2, 5] = -100
    s_ref = student.clone().requires_grad_(True)
    ref = unchunked_distill_loss(s_ref, teacher, labels, 2.0)
    ref.backward()
    assert ref.item() > 0.1
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}  # bf16 gradients: 8 mantissa bits
    for chunk in (1, 4, 7, 16, 43, 51, 10_000):  # 43 predicted positions: chunks dividing it or not, one, all
        s = student.clone().requires_grad_(True)
        loss = distill_loss(s, teacher, labels, 2.0, chunk_tokens=chunk)
        loss.backward()
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-6)
        assert s.grad.dtype == dtype
        torch.testing.assert_close(s.grad.float(), s_ref.grad.float(), **tol)


def test_chunked_kl_of_a_batch_without_targets_is_zero():
    student = torch.randn(2, 5, 11, requires_grad=True)
    loss = distill_loss(student, torch.randn(2, 5, 11), torch.full((2, 5), -100), 2.0, chunk_tokens=3)
    loss.backward()
    assert loss.item() == 0 and not student.grad.any()  # not nan: one masked micro-batch cannot poison the run


# -- ZeRO stage per method ----------------------------------------------------------------------------------------

def test_zero_buckets_follow_the_model_width():
    """DeepSpeed's GPU-sized defaults (5·10⁸ gradient elements, 10⁹ live parameters, one optimizer sub-group of
    10⁹) are each a full extra copy of a smaller model per rank: they are sized from the hidden size instead."""
    from shortened.training.deepspeed_config import deepspeed_config

    h = 1024
    z3 = deepspeed_config(cfg(zero_stage=3), 2, "bf16", hidden_size=h)["zero_optimization"]
    assert z3 == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True, "reduce_bucket_size": h * h,
                  "stage3_prefetch_bucket_size": int(0.9 * h * h), "stage3_param_persistence_threshold": 10 * h,
                  "stage3_max_live_parameters": 10 * h * h, "stage3_max_reuse_distance": 10 * h * h,
                  "sub_group_size": 10 * h * h}
    assert deepspeed_config(cfg(zero_stage=2), 2, "bf16", hidden_size=h)["zero_optimization"] == {
        "stage": 2, "reduce_bucket_size": h * h}  # the stage-3 keys only under ZeRO-3
    assert deepspeed_config(cfg(zero_stage=0), 2, "bf16", hidden_size=h)["zero_optimization"] == {"stage": 0}


def test_each_phase_gets_its_methods_zero_stage(caplog, tmp_path):
    from shortened.training.deepspeed_config import deepspeed_config
    from shortened.training.retrain import phases_for

    c = cfg(method="cpt+lora", zero_stage=3, offload_params=True, precision="bf16")
    phases = phases_for("m", str(tmp_path / "o"), c, str(tmp_path / "s"), "run")
    with caplog.at_level("WARNING"):
        zero = {p.method: deepspeed_config(p.train, 8, "bf16", p.method)["zero_optimization"] for p in phases}
    assert zero == {"cpt": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                            "stage3_gather_16bit_weights_on_model_save": True},
                    "lora": {"stage": 2}}  # LoRA: frozen weights stay whole, no per-step all-gather
    assert "offload_params is not used by the lora phase: it runs ZeRO stage 2" in caplog.text
    stage = {m: deepspeed_config(cfg(method=m, zero_stage=3), 2, "fp32")["zero_optimization"]["stage"]
             for m in ("cpt", "lora", "distill")}
    assert stage == {"cpt": 3, "lora": 2, "distill": 3}
    assert deepspeed_config(cfg(method="lora", lora={"zero_stage": 3}), 2, "fp32")["zero_optimization"]["stage"] == 3
    assert deepspeed_config(cfg(method="lora", lora={"zero_stage": 0}), 2, "fp32")["zero_optimization"] == {"stage": 0}
    # offload no phase can use is an error; offload_optimizer at a LoRA phase's stage 0 is dropped in cpt+lora
    with pytest.raises(ValueError, match=r"offload_params needs zero_stage 3 in a phase, got lora.zero_stage 2"):
        cfg(method="lora", zero_stage=3, offload_params=True)
    with pytest.raises(ValueError, match=r"offload_optimizer needs a ZeRO stage of 1, 2 or 3 in a phase"):
        cfg(method="lora", lora={"zero_stage": 0}, offload_optimizer=True)
    mixed = cfg(method="cpt+lora", lora={"zero_stage": 0}, offload_optimizer=True)
    assert "offload_optimizer" in deepspeed_config(mixed, 2, "fp32", "cpt")["zero_optimization"]
    assert "optimizer" not in deepspeed_config(mixed, 2, "fp32", "lora")  # the client AdamW, not CPU Adam


# -- checkpoint staging -------------------------------------------------------------------------------------------

def test_checkpoint_size_estimate():
    from shortened.training.checkpoint import checkpoint_bytes

    def est(p, t, stage, world, precision, **kw):
        return checkpoint_bytes(p, t, zero_stage=stage, world_size=world, precision=precision, **kw)

    # 12 bytes per trainable parameter of fp32 master + Adam, partitioned under ZeRO-3 (no 16-bit copy written)
    assert est(1000, 1000, 3, 8, "bf16", local_ranks=8) == 12_000
    assert est(6_700_000_000, 6_700_000_000, 3, 8, "bf16", local_ranks=8) == 80_400_000_000  # ~80 GB per node
    assert est(1000, 1000, 3, 16, "bf16", local_ranks=8) == 6_000  # two nodes share it
    # ZeRO-2: partitioned optimizer state, whole weights (training dtype) on rank 0's node
    assert est(1000, 1000, 2, 2, "bf16", local_ranks=1) == 2 * 1000 + 12_000 // 2
    assert est(1000, 1000, 2, 2, "bf16", local_ranks=1, has_rank0=False) == 6_000
    assert est(1000, 1000, 2, 1, "fp32") == 16_000
    # ZeRO-0: everything on rank 0; fp32 has no separate master copy
    assert est(1000, 1000, 0, 2, "fp32", local_ranks=2) == 12_000 and est(1000, 1000, 0, 2, "bf16") == 14_000
    # LoRA: frozen weights plus the adapters' 12 bytes each
    assert est(1000, 10, 2, 4, "bf16", local_ranks=4) == 2_000 + 120
    assert est(1000, 10, 3, 4, "bf16", local_ranks=4) == 2 * 990 + 120


class StagingSession(LocalSession):
    """Records each checkpoint folder the loop hands over and what it held at that moment."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.staged: list[tuple[str, list[str]]] = []

    def report(self, metrics, checkpoint_dir=None, asynchronous=False):
        if checkpoint_dir:
            self.staged.append((checkpoint_dir, sorted(os.listdir(checkpoint_dir))))
        return super().report(metrics, checkpoint_dir, asynchronous)


def test_checkpoints_stage_in_the_configured_folder_and_short_space_stops_before_writing(tiny_llama_dir, tmp_path,
                                                                                          monkeypatch):
    import shutil

    from shortened.training.checkpoint import check_staging_space, checkpoint_bytes

    staging = tmp_path / "nvme" / "staging"  # created when missing
    c = cfg(zero_stage=2, train_tokens=SEQ * 2 * 2, report_every_steps=1, checkpoint_every_tokens=None,
            checkpoint_staging_dir=str(staging))
    s = StagingSession(tmp_path / "run")
    run(Phase(method="cpt", model=str(tiny_llama_dir), out=str(tmp_path / "o"), tokens=c.train_tokens, train=c), s)
    [(folder, files)] = s.staged
    assert os.path.dirname(folder) == str(staging) and "ckpt" in files and "data_cursor_rank0.json" in files
    assert list(staging.iterdir()) == []  # cleaned up once handed over
    # the estimate is the checkpoint's size (fp32, ZeRO-2, one rank: 4 bytes of weights + 12 of optimizer each)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters())
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())
    written = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    estimate = checkpoint_bytes(n, n, zero_stage=2, world_size=1, precision="fp32")
    assert estimate == 16 * n and abs(written - estimate) < 0.01 * estimate, (written, estimate)
    record = json.loads((tmp_path / "o" / "retraining.json").read_text())
    assert record["zero_stage"] == record["phases"][0]["zero_stage"] == 2

    # too little space: a clear error naming the folder and both sizes, before anything is written
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=5 * 10**9))
    with pytest.raises(ShortenedError, match=rf"checkpoint staging folder {tmp_path / 'x'} has 5.0 GB free, but "
                                             r"this node's ranks need about 1050.3 GB .*checkpoint_staging_dir"):
        check_staging_space(tmp_path / "x", 10**12, LocalSession(tmp_path / "r2"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    s2 = StagingSession(tmp_path / "run2")
    with pytest.raises(ShortenedError, match=rf"{staging} has 0.0 GB free, but this node's ranks need about 0.3 GB"):
        run(Phase(method="cpt", model=str(tiny_llama_dir), out=str(tmp_path / "o2"), tokens=c.train_tokens, train=c),
            s2)
    assert s2.staged == [] and list(staging.iterdir()) == [] and not (tmp_path / "run2" / "checkpoints").exists()
    assert not (tmp_path / "o2").exists()


# -- per-document position ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_document_positions_keep_attention_within_documents(attn):
    """With transformers' sdpa and eager attention, position ids that restart per document give each document of a
    packed row the logits it has alone; flattening a batch for flash-attention keeps the rows apart and the loss."""
    from tiny_models import random_tokens, tiny_model

    from shortened.data.packing import document_positions
    from shortened.training.loop import model_inputs

    model = tiny_model("llama", attn_implementation=attn)
    ids = random_tokens(2, 24)
    pos = torch.stack([torch.from_numpy(document_positions(np.array(starts), 24)) for starts in ([10], [7, 15])])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # (a cache turns the mask off)
        alone = model(input_ids=ids[:1, 10:], use_cache=False).logits
        plain = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(packed[:1, 10:], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain[:1, 10:], alone, atol=1e-2)  # without them, the second document sees the first
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}
    flat = model_inputs(batch, torch.device("cpu"), flatten=True)
    assert flat["input_ids"].shape == (1, 48) and flat["position_ids"][0, 24] == 0
    with torch.no_grad():
        rows = model(**model_inputs(batch, torch.device("cpu")), use_cache=False)
        joined = model(**flat, use_cache=False)
    torch.testing.assert_close(joined.logits.view(2, 24, -1), rows.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(joined.loss, rows.loss, rtol=1e-5, atol=1e-6)


def test_training_with_document_positions(tiny_llama_dir, tmp_path, monkeypatch):
    from shortened.training import loop

    seen = []
    real = loop.model_inputs

    def recording(batch, device, flatten=False):
        inputs = real(batch, device, flatten)
        seen.append(inputs["position_ids"])
        return inputs
    monkeypatch.setattr(loop, "model_inputs", recording)
    c = cfg(train_tokens=SEQ * 2 * 4, report_every_steps=2, checkpoint_every_tokens=None,
            data=DataConfig(seq_len=SEQ, document_positions=True))
    run(Phase(method="cpt", model=str(tiny_llama_dir), out=str(tmp_path / "o"), tokens=c.train_tokens, train=c),
        LocalSession(tmp_path / "run"))
    assert len(seen) == 4 and all(p.shape == (2, SEQ) and (p[:, 0] == 0).all() for p in seen)
    assert sum(int((p[:, 1:] == 0).sum()) for p in seen) > 0  # documents start inside blocks too
    history = json.loads((tmp_path / "o" / "retraining.json").read_text())["history"]
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
