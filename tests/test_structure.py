"""A pruned checkpoint is exactly the model that was scored: configs that encode per-layer structure as index
lists, formulas or construction-time values, the meta-device safety net, and parameter budgets on blocks of
different sizes (issue 16)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shortened.blocks import find_blocks, remove_blocks, without_blocks
from shortened.criteria import CRITERIA, BlockScores
from shortened.criteria.ppl import removal_nll, removal_nll_naive
from shortened.errors import ShortenedError
from shortened.pruning import blocks_for_ratio, check_prunable, param_budget, prune, save_pruned, score_blocks
from shortened.structure import first_difference, skeleton

logging.getLogger("transformers").setLevel(logging.ERROR)
IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def build(model_type: str, **kw):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=128, max_position_embeddings=128, initializer_range=0.2,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    return AutoModelForCausalLM.from_config(cfg).eval()


def mlp_kinds(model) -> list[str]:
    return ["moe" if hasattr(b.mlp, "experts") else "dense" for b in find_blocks(model).blocks]


def prune_save_reload(model, scores: list[float], n: int, out):
    result = prune(model, BlockScores("magnitude", scores), n, keep_first=0, keep_last=0)
    save_pruned(result, out)
    return result, AutoModelForCausalLM.from_pretrained(out).eval()


def assert_same_model(a, b):
    with torch.no_grad():
        assert torch.allclose(a(IDS).logits, b(IDS).logits, atol=1e-5)


QWEN_MOE = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=6)


def test_formula_decoder_sparse_step_becomes_an_explicit_dense_list(tmp_path):
    model = build("qwen2_moe", shared_expert_intermediate_size=16, decoder_sparse_step=2, **QWEN_MOE)
    assert mlp_kinds(model) == ["dense", "moe"] * 3
    result, back = prune_save_reload(model, [9.0, 9, 1, 9, 9, 9], 1, tmp_path / "p")  # a dense block goes
    assert mlp_kinds(result.model) == ["dense", "moe", "moe", "dense", "moe"]
    assert back.config.decoder_sparse_step == 1 and back.config.mlp_only_layers == [0, 3]
    assert mlp_kinds(back) == mlp_kinds(result.model)
    assert_same_model(result.model, back)


def test_index_list_mlp_only_layers_is_remapped(tmp_path):
    model = build("qwen3_moe", head_dim=8, decoder_sparse_step=1, mlp_only_layers=[4], **QWEN_MOE)
    result, back = prune_save_reload(model, [9.0, 1, 9, 9, 9, 9], 1, tmp_path / "p")
    assert back.config.mlp_only_layers == [3]
    assert mlp_kinds(back) == ["moe", "moe", "moe", "dense", "moe"] == mlp_kinds(result.model)
    assert_same_model(result.model, back)


def test_first_k_dense_replace_counts_the_kept_dense_blocks(tmp_path):
    model = build("deepseek_v3", hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=1, topk_group=1, num_attention_heads=4, num_key_value_heads=4,
                  kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                  num_hidden_layers=6, first_k_dense_replace=3)
    result, back = prune_save_reload(model, [9.0, 1, 9, 1, 9, 9], 2, tmp_path / "p")
    assert back.config.first_k_dense_replace == 2
    assert mlp_kinds(back) == ["dense", "dense", "moe", "moe"] == mlp_kinds(result.model)
    assert_same_model(result.model, back)


def test_hybrid_attn_layer_indices_renumbered_and_generation_still_works(tmp_path):
    model = build("bamba", hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=6, attn_layer_indices=[2, 5], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                  mamba_n_groups=1, mamba_chunk_size=16)
    result, back = prune_save_reload(model, [9.0, 1, 9, 9, 9, 9], 1, tmp_path / "p")
    assert back.config.attn_layer_indices == [1, 4]
    kinds = [type(b.mamba if hasattr(b, "mamba") else b.self_attn).__name__ for b in result.model.model.layers]
    assert kinds == ["BambaMixer", "BambaAttention", "BambaMixer", "BambaMixer", "BambaAttention"]
    assert [type(b.mamba if hasattr(b, "mamba") else b.self_attn).__name__ for b in back.model.layers] == kinds
    with torch.no_grad():  # the in-memory model's cache follows the rewritten config
        cached = result.model.generate(IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        plain = result.model.generate(IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, plain)
    assert_same_model(result.model, back)


def test_construction_time_value_from_layer_idx_is_refused_before_anything_is_written(tmp_path):
    model = build("gpt2", n_embd=32, n_head=4, n_layer=6, n_positions=128, scale_attn_by_inverse_layer_idx=True)
    cached = removal_nll(model, IDS, list(range(6)), 1)  # what ppl scores is the model the block list gives
    naive = removal_nll_naive(model, IDS, list(range(6)), 1)
    assert max(abs(cached[i] - naive[i]) / naive[i] for i in range(6)) < 1e-5
    with pytest.raises(ShortenedError, match=r"block 2 \(original block 3\).*attribute 'scaling'"):
        check_prunable(model, [2])  # blocks 0-1 keep their index; block 3 becomes block 2
    with pytest.raises(ShortenedError, match=r"does not describe the pruned model.*attribute 'scaling'"):
        prune(model, BlockScores("magnitude", [9.0, 1, 9, 9, 9, 9]), 1, keep_first=0, keep_last=0)
    with pytest.raises(ShortenedError, match="scale_attn_by_inverse_layer_idx"):
        score_blocks(build("gpt2", n_embd=32, n_head=4, n_layer=6, n_positions=128,
                           scale_attn_by_inverse_layer_idx=True), "magnitude", None, keep_first=1, keep_last=1)
    assert list(tmp_path.iterdir()) == []
    # removing only the last block changes no kept block's index: allowed, and exact
    model = build("gpt2", n_embd=32, n_head=4, n_layer=6, n_positions=128, scale_attn_by_inverse_layer_idx=True)
    result, back = prune_save_reload(model, [9.0, 9, 9, 9, 9, 1], 1, tmp_path / "last")
    assert_same_model(result.model, back)


def test_safety_net_catches_a_config_that_rebuilds_something_else(tmp_path, monkeypatch):
    """A layout nobody listed: the saved config is tampered with between removal and publishing."""
    import shortened.io as io

    model = build("qwen3_moe", head_dim=8, decoder_sparse_step=1, mlp_only_layers=[], **QWEN_MOE)
    result = prune(model, BlockScores("magnitude", [9.0, 1, 9, 9, 9, 9]), 1, keep_first=0, keep_last=0)
    write = io.write_json_atomic

    def tamper(path, data):
        write(path, data)
        cfg = json.loads((path.parent / "config.json").read_text())
        cfg["mlp_only_layers"] = [2]
        (path.parent / "config.json").write_text(json.dumps(cfg))

    monkeypatch.setattr(io, "write_json_atomic", tamper)
    with pytest.raises(ShortenedError, match=r"saved config.json does not describe the pruned model: block 2 "
                                             r"\(original block 3\).*mlp"):
        save_pruned(result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging folder


def test_first_difference_names_class_shape_and_value():
    a, b = build("llama", hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2), None
    b = skeleton(type(a), a.config)
    assert first_difference(a, b) is None
    a.model.layers[1].mlp.down_proj = torch.nn.Linear(64, 16, bias=False)
    assert first_difference(a, b) == ("model.layers.1.mlp.down_proj",
                                      "parameter 'weight' has shape (16, 64) in the pruned model but (32, 64) when "
                                      "built from the config")


def test_without_blocks_restores_rewritten_index_lists():
    model = build("qwen3_moe", head_dim=8, decoder_sparse_step=1, mlp_only_layers=[4], **QWEN_MOE)
    before = model.config.to_dict()
    with without_blocks(model, [1, 2]):
        assert model.config.mlp_only_layers == [2] and model.config.num_hidden_layers == 4
    assert model.config.to_dict() == before


def test_removal_is_undone_exactly_for_module_copies_of_the_layer_count():
    model = build("ctrl", n_embd=32, n_head=4, n_layer=6, dff=64, n_positions=128)
    with without_blocks(model, [2]):
        assert model.transformer.num_layers == 5
    assert model.transformer.num_layers == 6
    remove_blocks(model, [2, 3])
    assert model.transformer.num_layers == 4


# --- --ratio on blocks of different sizes -------------------------------------------------------------------


def nemotron_h():
    return build("nemotron_h", hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8, num_hidden_layers=8, hybrid_override_pattern="M-M*M-M-", mamba_num_heads=8,
                 mamba_head_dim=16, ssm_state_size=16, n_groups=1, chunk_size=16, tie_word_embeddings=True)


def test_ratio_is_a_parameter_budget_with_every_block_at_its_real_size():
    model = nemotron_h()
    sizes = [sum(p.numel() for p in b.parameters()) for b in model.model.layers]
    total = sum(p.numel() for p in model.parameters())
    assert len(set(sizes)) == 3  # Mamba, MLP and attention blocks differ
    ratio = 2.05 * (sum(sizes) / len(sizes)) / total  # two mean-sized blocks
    budget = param_budget(model, ratio)
    assert blocks_for_ratio(model, ratio) == max(k for k in range(9) if sum(sorted(sizes)[:k]) <= budget)
    mamba_lowest = [1.0 if s == max(sizes) else 9.0 for s in sizes]
    result = prune(model, BlockScores("ppl", mamba_lowest), blocks_for_ratio(model, ratio), keep_first=0,
                   keep_last=0, ratio_requested=ratio)
    r = result.report
    assert r["ratio_actual"] <= ratio and r["params_before"] - r["params_after"] <= budget
    big = [i for i, s in enumerate(sizes) if s == max(sizes)]
    # as many of the lowest-scored (Mamba) blocks as fit, then the next lowest that still fit
    expected, used = [], 0
    for i in sorted(range(8), key=lambda i: (mamba_lowest[i], i)):
        if len(expected) < blocks_for_ratio(nemotron_h(), ratio) and used + sizes[i] <= budget:
            expected.append(i)
            used += sizes[i]
    assert r["removed_blocks"] == sorted(expected) and set(expected) & set(big)
    assert r["param_budget"] == budget and r["block_params"] == sizes


def test_iterative_and_angular_stay_within_the_budget():
    sizes = [10, 50, 10, 10, 50, 10]
    it = BlockScores("iterative", [0, 1, 2, 3, 4, 5], extra={"removal_order": [1, 4, 0, 2, 3, 5]})
    sel = CRITERIA["iterative"].select
    assert sel(it, 3, range(6)) == [0, 1, 4]
    assert sel(it, 3, range(6), sizes=sizes, max_params=60) == [1]  # the prefix [1, 4] would be 100
    assert sel(it, 3, range(6), sizes=sizes, max_params=110) == [0, 1, 4]
    span = {"span_distance": [[0.5] * 6, [0.1, 0.2, 0.3, 0.2, 0.4], [0.05, 0.3, 0.3, 0.3], [0.3] * 3]}
    ang = BlockScores("angular", [0.5] * 6, extra=span)
    assert CRITERIA["angular"].select(ang, 3, range(6)) == [0, 1, 2]
    # every 3-span costs at least 70: within 60 the closest 2-span that fits is [0, 1] (60), within 30 only [2, 3]
    assert CRITERIA["angular"].select(ang, 3, range(6), sizes=sizes, max_params=60) == [0, 1]
    assert CRITERIA["angular"].select(ang, 3, range(6), sizes=sizes, max_params=30) == [2, 3]
    low = BlockScores("magnitude", [1, 0, 3, 4, 0, 6])
    assert CRITERIA["magnitude"].select(low, 3, range(6), sizes=sizes, max_params=70) == [0, 1, 2]


def test_ratio_at_the_edge_of_whole_blocks_never_goes_over():
    """A ratio computed in floats as exactly k blocks' share may round either way; the budget is exact."""
    from tiny_models import tiny_model

    for k in (1, 2, 3):
        model = tiny_model("llama")
        total = sum(p.numel() for p in model.parameters())
        block = sum(p.numel() for p in model.model.layers[0].parameters())
        for ratio in (k * block / total, (k * block - 1) / total, (k * block + 1) / total):
            m = tiny_model("llama")
            r = prune(m, BlockScores("magnitude", [1.0] * 8), blocks_for_ratio(m, ratio), keep_first=1, keep_last=1,
                      ratio_requested=ratio).report
            assert r["ratio_actual"] <= ratio and r["params_before"] - r["params_after"] <= ratio * total
            assert len(r["removed_blocks"]) == (k if k * block <= ratio * total else k - 1)
