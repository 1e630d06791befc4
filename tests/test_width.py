"""Width pruning (the depth-vs-width baseline): removing head groups and MLP channels is exactly masking them, the
saved folder loads with from_pretrained and generates with a KV cache, and the parameter budget is met."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from shortened.errors import ShortenedError
from shortened.models import count_params
from shortened.width import WIDTH_JSON, WidthPlan, plan_for_params, prune_width, save_width_pruned, width_scores
from tiny_models import random_tokens, tiny_model


def masked_logits(model, scores, plan: WidthPlan, tokens: torch.Tensor) -> torch.Tensor:
    """The unpruned model with the same groups' o_proj columns and channels' down_proj columns zeroed: what the
    pruned model must compute exactly (heads and channels only reach the residual stream through those)."""
    import copy

    m = copy.deepcopy(model)
    for b, sc in zip(m.model.layers, scores):
        a = b.self_attn
        hd, rep = a.head_dim, a.num_key_value_groups
        drop_g = torch.topk(-sc["groups"], plan.groups).indices
        drop_c = torch.topk(-sc["channels"], plan.channels).indices
        for g in drop_g.tolist():
            a.o_proj.weight.data[:, g * rep * hd:(g + 1) * rep * hd] = 0
        b.mlp.down_proj.weight.data[:, drop_c] = 0
    with torch.no_grad():
        return m(input_ids=tokens).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_pruning_width_equals_masking(arch, method):
    model = tiny_model(arch, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    tokens = random_tokens(2, 16)
    scores = width_scores(model, method, calibration=random_tokens(4, 16, seed=1))
    plan = WidthPlan(groups=1, channels=24, method=method)
    expected = masked_logits(model, scores, plan, tokens)
    prune_width(model, plan, scores)
    with torch.no_grad():
        got = model(input_ids=tokens).logits
    assert torch.allclose(got, expected, atol=1e-5)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (2, 1, 40)
    assert all(len(k) == 1 for k in plan.kept_groups) and all(len(c) == 40 for c in plan.kept_channels)


def test_scores_rank_what_matters():
    model = tiny_model("llama", intermediate_size=64)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5] = 0  # channel 5 of block 0 contributes nothing
        model.model.layers[0].mlp.gate_proj.weight[5] = 0
        model.model.layers[0].mlp.up_proj.weight[5] = 0
    for method in ("magnitude", "activation"):
        sc = width_scores(model, method, calibration=random_tokens(2, 16))
        assert sc[0]["channels"].argmin().item() == 5 and sc[0]["channels"][5] == 0
    assert not torch.equal(width_scores(model, "magnitude")[1]["channels"].argsort(),
                           width_scores(model, "activation", random_tokens(2, 16))[1]["channels"].argsort())


def test_plan_meets_the_parameter_budget_and_the_checkpoint_round_trips(tmp_path, smollm2_tokenizer):
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer), num_hidden_layers=6, intermediate_size=96,
                       num_attention_heads=4, num_key_value_heads=2)
    before = count_params(model)
    target = before - 5_000
    plan = plan_for_params(model, target)
    prune_width(model, plan, width_scores(model))
    after = count_params(model)
    from shortened.width import unit_params

    assert target - unit_params(model)[1] * 6 < after <= target  # within one channel per block of the budget
    out = save_width_pruned(model, plan, tmp_path / "w", smollm2_tokenizer, source="tiny", params_before=before)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = random_tokens(1, 12)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits, atol=1e-5)
        # generation with a KV cache equals recomputing every step without one
        cached = loaded.generate(tokens, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = loaded.generate(tokens, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    meta = json.loads((out / WIDTH_JSON).read_text())
    assert meta["params_after"] == after and meta["groups"] == plan.groups and len(meta["kept_channels"]) == 6


def test_bad_width_input():
    model = tiny_model("llama")
    with pytest.raises(ShortenedError, match="is not below"):
        plan_for_params(model, count_params(model) + 1)
    with pytest.raises(ShortenedError, match="at least one of each must stay"):
        prune_width(model, WidthPlan(groups=2, channels=0), width_scores(model))
    with pytest.raises(ShortenedError, match="activation scores need calibration"):
        width_scores(model, "activation")
    with pytest.raises(ShortenedError, match="unknown width score"):
        width_scores(model, "random")
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ShortenedError, match="width pruning supports"):
        width_scores(gpt2)


def test_cli_prune_width_matches_a_depth_pruned_folder(tmp_path, smollm2_tokenizer, capsys):
    """`shortened prune-width --like DEPTH` ends at (just under) the depth-pruned model's size with calibration
    scores, writes a loadable folder, and bad input fails with a named error and writes nothing."""
    from shortened.cli import main
    from shortened.pruning import prune, save_pruned, score_blocks

    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer), num_hidden_layers=8, intermediate_size=96,
                       num_attention_heads=4, num_key_value_heads=2)
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    smollm2_tokenizer.save_pretrained(dense)
    depth = save_pruned(prune(model, score_blocks(model, "magnitude", None, keep_first=1, keep_last=1),
                              2, keep_first=1, keep_last=1), tmp_path / "depth")
    target = json.loads((depth / "pruning.json").read_text())["params_after"]
    out = tmp_path / "width"
    assert main(["prune-width", "--model", str(dense), "--like", str(depth), "--calib-samples", "2",
                 "--calib-seq-len", "32", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert count_params(loaded) == printed["params_after"] <= target
    assert target - count_params(loaded) < 0.02 * target
    meta = json.loads((out / WIDTH_JSON).read_text())
    assert meta["method"] == "activation" and meta["model"] == str(dense)
    assert loaded.config.num_hidden_layers == 8  # width pruning keeps every block
    assert loaded.dtype == torch.float32  # the source's dtype
    # --save-dtype: a bf16 folder, the report saying so
    assert main(["prune-width", "--model", str(dense), "--like", str(depth), "--score", "magnitude",
                 "--save-dtype", "bfloat16", "--out", str(tmp_path / "w16")]) == 0
    assert json.loads((tmp_path / "w16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "w16" / WIDTH_JSON).read_text())["saved_dtype"] == "bfloat16"

    assert main(["prune-width", "--model", str(dense), "--like", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no pruning.json" in capsys.readouterr().err
    assert main(["prune-width", "--model", str(dense), "--params", "10", "--score", "magnitude",
                 "--out", str(tmp_path / "y")]) == 2
    assert "keep a head group and a channel" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
