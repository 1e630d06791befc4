"""Reverse-order pruning and partial fine-tuning (Lu et al. 2024, "Reassessing Layer Pruning in LLMs"): the
``reverse`` criterion removes the run before the kept tail; method ``partial`` trains only the last k blocks, the
final norm and the LM head, through the real training loop (LocalSession, no Ray) under every ZeRO stage."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from shortened.data import DataConfig
from shortened.errors import ShortenedError
from shortened.training.config import TrainConfig
from shortened.training.loop import Phase, run
from shortened.training.session import LocalSession

SEQ = 64


def tiny_dir(tmp_path_factory, tokenizer, model_type: str):
    from tiny_models import tiny_model

    out = tmp_path_factory.mktemp(f"tiny-{model_type}")
    tiny_model(model_type, vocab_size=len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# (model_type, ZeRO stage, the names that must train with k=2 of 8 blocks: block prefix, final norm, LM head, and
# for a tied head the input embedding it is)
CASES = [
    ("llama", 3, ("model.layers.", "model.norm.", "lm_head.weight", None)),
    ("qwen2", 0, ("model.layers.", "model.norm.", "lm_head.weight", None)),
    ("gpt2", 1, ("transformer.h.", "transformer.ln_f.", "lm_head.weight", "transformer.wte.weight")),
]


@pytest.mark.parametrize("model_type,stage,names", CASES, ids=[c[0] for c in CASES])
def test_partial_changes_only_the_last_blocks_norm_and_head(model_type, stage, names, smollm2_tokenizer,
                                                            tmp_path_factory, tmp_path):
    model_dir = tiny_dir(tmp_path_factory, smollm2_tokenizer, model_type)
    c = TrainConfig(method="partial", partial_blocks=2, train_tokens=SEQ * 2 * 3, micro_batch_size=2,
                    data=DataConfig(seq_len=SEQ), lr=3e-3, warmup_ratio=0.0, zero_stage=stage)
    run(Phase(method="partial", model=str(model_dir), out=str(tmp_path / "out"), tokens=c.train_tokens, train=c),
        LocalSession(tmp_path / "run"))
    before = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert before.keys() == after.keys()
    block, norm, head, tied = names
    expected = {k for k in before if k.startswith((f"{block}6.", f"{block}7.", norm)) or k in (head, tied)}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # every other tensor is bit-identical; each trained weight matrix moved (a bias may stay at 0 by chance: no)
    assert changed == expected, (sorted(changed ^ expected))
    record = json.loads((tmp_path / "out" / "retraining.json").read_text())
    trained = record["phases"][0]["partial"]
    assert record["method"] == "partial" and record["zero_stage"] == stage
    assert trained["blocks"] == [6, 7] and trained["tied"] == (tied is not None)
    assert trained["lm_head"] == head.removesuffix(".weight") and trained["final_norm"] == norm.rstrip(".")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert trained["trained_params"] == sum(p.numel() for n, p in model.named_parameters()
                                            if n in expected or (tied and n == tied))
    assert trained["trained_tensors"] == len(trained["trained_names"]) and set(trained["trained_names"]) <= expected


def test_reverse_removes_the_run_before_the_kept_tail():
    from tiny_models import tiny_model

    from shortened.criteria import DATA_FREE, get_criterion
    from shortened.pruning import blocks_for_ratio, prune, score_blocks

    assert "reverse" in DATA_FREE
    model = tiny_model("llama")  # 8 blocks
    scores = score_blocks(model, "reverse", None, keep_first=1, keep_last=2, progress=False)
    assert scores.scores == sorted(scores.scores, reverse=True)  # later = less important
    assert prune(tiny_model("llama"), scores, 3, keep_first=1, keep_last=2).report["removed_blocks"] == [3, 4, 5]
    n = blocks_for_ratio(model, 0.2)
    report = prune(model, scores, n, keep_first=1, keep_last=2, ratio_requested=0.2).report
    assert n >= 1 and report["removed_blocks"] == list(range(6 - n, 6)) and report["ratio_actual"] <= 0.2
    # under a budget the run stops at the first block that does not fit instead of skipping to an earlier one
    select = get_criterion("reverse").select
    assert select(scores, 3, range(1, 6), sizes=[1, 1, 1, 9, 1, 1, 1, 1], max_params=3) == [4, 5]
    assert select(scores, 3, range(1, 6)) == [3, 4, 5]


def test_bad_partial_blocks_is_refused_before_training(tiny_llama_dir, tmp_path, capsys):
    from pydantic import ValidationError

    from shortened.cli import main
    from shortened.training.retrain import retrain

    with pytest.raises(ValidationError, match="partial_blocks"):
        TrainConfig(method="partial", partial_blocks=0, train_tokens=64)
    c = TrainConfig(method="partial", partial_blocks=9, train_tokens=64, data=DataConfig(seq_len=SEQ))
    with pytest.raises(ShortenedError, match="partial_blocks 9 must be between 1 and the 8 blocks"):
        retrain(str(tiny_llama_dir), str(tmp_path / "o"), c, storage_path=str(tmp_path / "s"), name="r")
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
    assert main(["retrain", "--model", str(tiny_llama_dir), "--method", "partial", "--partial_blocks", "9",
                 "--train_tokens", "128", "--data.seq_len", "64", "--storage_path", str(tmp_path / "s"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "partial_blocks 9" in capsys.readouterr().err


def test_cli_retrain_partial(tiny_llama_dir, tmp_path, capsys):
    """The real command (Ray Train, one worker): --method partial --partial_blocks 2."""
    from shortened.cli import main

    import ray

    out = tmp_path / "healed"
    assert main(["retrain", "--model", str(tiny_llama_dir), "--method", "partial", "--partial_blocks", "2",
                 "--train_tokens", "256", "--data.seq_len", "64", "--micro_batch_size", "2", "--lr", "3e-3",
                 "--storage_path", str(tmp_path / "s"), "--out", str(out)]) == 0
    assert not ray.is_initialized()  # the command's own Ray ends with it (later tests refuse before Ray starts)
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["tokens"] == 256
    record = json.loads((out / "retraining.json").read_text())
    assert record["config"]["partial_blocks"] == 2 and record["phases"][0]["partial"]["blocks"] == [6, 7]
    before = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {
        k for k in before if k.startswith(("model.layers.6.", "model.layers.7.", "model.norm.", "lm_head."))}
