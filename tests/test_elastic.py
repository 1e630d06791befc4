"""Elastic resume (issue 19 §3): a CPT run whose workers die after a checkpoint, resumed with another worker count,
trains exactly the continuation of the run's global sequence order (none twice, none skipped) for exactly its step
budget, with the optimizer state resharded (DeepSpeed's universal checkpoint); retraining.json records the resume.
The same for a sweep resumed with another workers_per_trial. Also the elastic worker range and its errors."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from shortened.cluster import ScaleConfig
from shortened.data import DataConfig
from shortened.data.batches import GlobalBatches
from shortened.errors import ShortenedError
from shortened.training.audit import trained_sequences
from shortened.training.config import TrainConfig
from shortened.training.retrain import retrain

SEQ = 64
GLOBAL = 4  # sequences per optimizer step: 2 workers x 2, or 1 worker x 2 x 2 micro-batches
STEPS = 8


def cfg(**kw) -> TrainConfig:
    base = dict(train_tokens=SEQ * GLOBAL * STEPS, micro_batch_size=2, data=DataConfig(seq_len=SEQ), lr=3e-3,
                warmup_ratio=0.0, report_every_steps=2, checkpoint_every_tokens=SEQ * GLOBAL * 2, token_log=True)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def global_order(smollm2_tokenizer) -> list[str]:
    """The run's global sequence order, as one process reads it: a hash per sequence index."""
    batches = GlobalBatches(DataConfig(seq_len=SEQ), smollm2_tokenizer, global_batch=GLOBAL, micro_batch_size=GLOBAL)
    order = []
    for _ in range(STEPS):
        for batch in batches.step_batches():
            assert batch["sequence"].tolist() == list(range(len(order), len(order) + GLOBAL))
            order += [hashlib.sha256(row.numpy().tobytes()).hexdigest()[:16] for row in batch["input_ids"]]
    return order


def killed_then_resumed(tmp_path, tiny_llama_dir, c: TrainConfig, before: int, after: int) -> dict:
    """Run 1 with ``before`` workers, rank 0 SIGKILLed after step 5 (checkpoints after steps 2 and 4, no restarts:
    the run fails); run 2 with ``after`` workers under the same name. Returns retraining.json."""
    storage, out, marker = tmp_path / "ray", tmp_path / "out", tmp_path / "killed"
    with pytest.raises(Exception):  # noqa: B017 - Ray Train's error for a worker group that died
        retrain(str(tiny_llama_dir), str(out), c, storage_path=str(storage), name="elastic",
                scale=ScaleConfig(num_workers=before, cpus_per_worker=1), worker_env={"SHORTENED_FAULT": f"0:5:{marker}"})
    assert marker.exists() and not (out / "config.json").exists()
    retrain(str(tiny_llama_dir), str(out), c, storage_path=str(storage), name="elastic",
            scale=ScaleConfig(num_workers=after, cpus_per_worker=1), overwrite=True)
    return json.loads((out / "retraining.json").read_text())


def check_continuation(tmp_path, record: dict, order: list[str], before: int, after: int,
                       resumed_at: tuple[int, ...]) -> None:
    resume = record["resumes"]
    assert len(resume) == 1 and resume[0]["step"] in resumed_at, resume
    step = resume[0]["step"]
    assert resume == [{"step": step, "tokens": step * GLOBAL * SEQ, "workers_before": before, "workers_after": after}]
    rows = trained_sequences(tmp_path / ("model" if (tmp_path / "model").is_dir() else "out"))
    first = [r for r in rows if r["world_size"] == before]
    second = [r for r in rows if r["world_size"] == after and r["started_at"] == step]
    assert len(first) + len(second) == len(rows)
    # before the kill: the global order from the start (at least through the step that was checkpointed)
    assert sorted(r["seq"] for r in first)[:step * GLOBAL] == list(range(step * GLOBAL))
    assert all(r["sha"] == order[r["seq"]] for r in first)
    # after the resume: exactly the rest of the global order, in order, with the uninterrupted run's tokens
    assert [r["seq"] for r in second] == list(range(step * GLOBAL, STEPS * GLOBAL))
    assert [r["sha"] for r in second] == order[step * GLOBAL:]
    history = record["history"]
    assert history[-1]["step"] == STEPS and record["tokens_trained"] == STEPS * GLOBAL * SEQ == record["tokens"]
    assert record["world_size"] == after and record["config"]["global_batch_size"] == GLOBAL
    assert history[-1]["loss"] < history[0]["loss"], [h["loss"] for h in history]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_workers_killed_resume_on_one(ray_cluster, tiny_llama_dir, global_order, tmp_path, zero_stage,
                                          monkeypatch):
    """2 -> 1 with synchronous uploads: resumes at the checkpoint after step 4, and ends on the weights and loss of
    the uninterrupted 2-worker run (the optimizer state was resharded, not restarted). Under ZeRO-3 the tiny
    model's optimizer runs in many sub-groups (``sub_group_size`` 10·h²), and the weight decay of each parameter
    group and AdamW's step count per sub-group must survive DeepSpeed's universal load (they did not: weights
    drifted by 1e-4 to 2e-3 in 4 steps)."""
    import torch
    from transformers import AutoModelForCausalLM

    for name in ("SHORTENED_MALLOC_MMAP_THRESHOLD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)  # the default policy (host_memory): the driver decides
    c = cfg(zero_stage=zero_stage, checkpoint_upload="sync")
    record = killed_then_resumed(tmp_path, tiny_llama_dir, c, 2, 1)
    check_continuation(tmp_path, record, global_order, 2, 1, resumed_at=(4,))
    assert record["config"]["micro_batch_size"] == 2 and record["config"]["grad_accum"] == 2  # re-split for 1
    # ZeRO-3 workers start with glibc's thresholds fixed (host_memory); ZeRO-2 keeps glibc's defaults
    assert record["phases"][-1]["malloc_mmap_threshold"] == (128 * 1024 if zero_stage == 3 else None)
    clean = retrain(str(tiny_llama_dir), str(tmp_path / "clean"), c, storage_path=str(tmp_path / "ray"),
                    name="clean", scale=ScaleConfig(num_workers=2, cpus_per_worker=1))
    assert [r["sha"] for r in trained_sequences(tmp_path / "clean")] == global_order
    assert json.loads((tmp_path / "clean" / "retraining.json").read_text())["resumes"] == []
    assert record["history"][-1]["loss"] == pytest.approx(clean.metrics["loss"], rel=1e-4)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "clean")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_sweep_trial_killed_on_one_worker_resumes_on_two(ray_cluster, tiny_llama_dir, global_order, tmp_path):
    """A sweep whose CPT trial (ZeRO-3, asynchronous uploads: the default) loses its only worker after step 5,
    resumed with workers_per_trial 2: the trial continues where its checkpoint left it, on the same global sequence
    order (the checkpoint after step 4 may still have been uploading when the worker died: then the one after
    step 2 is the latest)."""
    from shortened.sweep.config import SweepConfig
    from shortened.sweep.runner import run_sweep

    def sweep(workers: int) -> SweepConfig:
        return SweepConfig.model_validate(dict(
            name="elastic", model=str(tiny_llama_dir), criteria=["magnitude"], blocks=[2], methods=["cpt"],
            keep_first=1, keep_last=1, train=cfg(zero_stage=3, global_batch_size=GLOBAL).model_dump(mode="json"),
            eval={"ppl": ["wikitext2"], "ppl_max_windows": 2, "tasks": [], "speed": False},
            resources={"workers_per_trial": workers, "cpus_per_worker": 1}, selection={"tolerance_pct": 1000},
            storage_path=str(tmp_path / "runs")))

    marker = tmp_path / "killed"
    with pytest.raises(ShortenedError, match=r"1 trial\(s\) failed"):
        run_sweep(sweep(1), worker_env={"SHORTENED_FAULT": f"0:5:{marker}"})
    assert marker.exists()
    run_sweep(sweep(2), resume=True)
    model = tmp_path / "runs" / "elastic" / "trials" / "magnitude-b2-cpt" / "model"
    record = json.loads((model / "retraining.json").read_text())
    check_continuation(model.parent, record, global_order, 1, 2, resumed_at=(2, 4))
    assert record["config"]["micro_batch_size"] == 2 and record["config"]["grad_accum"] == 1  # 2 x 1 x 2 workers
    after = [h for h in record["history"] if h["step"] > record["resumes"][0]["step"]]
    assert all(h["checkpoint_stall_s"] > 0 for h in after if h["step"] % 2 == 0)


def test_worker_range_errors_before_workers_start(ray_cluster, tiny_llama_dir, tmp_path):
    with pytest.raises(ShortenedError, match=r"workers: .*MIN 3 > MAX 2"):
        ScaleConfig(workers=(3, 2))
    assert ScaleConfig(workers=(1, 2)).ray_num_workers == (1, 2) and ScaleConfig(workers=(1, 2)).num_workers == 2
    # [1, 3]: a global batch of 2 x 1 x 3 = 6 splits over 1, 2 and 3 workers; [2, 4] (8) not over 3
    with pytest.raises(ShortenedError, match=r"global batch of 8 sequences cannot be split evenly over 3 worker"):
        retrain(str(tiny_llama_dir), str(tmp_path / "o"), cfg(), storage_path=str(tmp_path / "s"), name="range",
                scale=ScaleConfig(workers=(2, 4)))
    assert not (tmp_path / "o").exists() and not (tmp_path / "s" / "range").exists()
    assert TrainConfig(train_tokens=1, micro_batch_size=2, grad_accum=3).for_world_size(4).global_batch_size == 24
    split = cfg(global_batch_size=8).for_world_size(2)
    assert (split.micro_batch_size, split.grad_accum) == (2, 2)
    split = cfg(global_batch_size=6, micro_batch_size=4).for_world_size(2)
    assert (split.micro_batch_size, split.grad_accum) == (3, 1)
