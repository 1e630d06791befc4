"""Block discovery and removal keep every architecture correct: forward, cached generation, save/reload."""

from __future__ import annotations

import pytest
import torch
from tiny_models import LAYERS, TINY, random_tokens, tiny_model
from transformers import AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

from shortened.blocks import find_blocks, num_layers, remove_blocks, without_blocks
from shortened.errors import ShortenedError

REMOVED = [1, 4, 6]


def greedy(model, ids, use_cache):
    return model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=use_cache,
                          pad_token_id=0)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_prune_generate_save_reload(model_type, tmp_path):
    model = tiny_model(model_type)
    ids = random_tokens(2, 16)
    kept_before = [find_blocks(model).blocks[i] for i in range(LAYERS) if i not in REMOVED]
    remove_blocks(model, REMOVED)

    blocks = find_blocks(model).blocks
    assert len(blocks) == LAYERS - len(REMOVED) == num_layers(model.config)
    assert all(a is b for a, b in zip(blocks, kept_before))  # the right blocks stayed, in order
    for new_idx, block in enumerate(blocks):
        idxs = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert idxs == {new_idx}

    logits = model(ids).logits
    assert logits.shape == (2, 16, model.config.vocab_size) and torch.isfinite(logits).all()
    prompt = ids[:1, :5]
    with_cache, without_cache = greedy(model, prompt, True), greedy(model, prompt, False)
    assert torch.equal(with_cache, without_cache)
    assert len(set(without_cache[0, 5:].tolist())) > 1  # not a degenerate constant output

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(find_blocks(reloaded)) == LAYERS - len(REMOVED)
    assert torch.equal(reloaded(ids).logits, logits)
    assert torch.equal(greedy(reloaded, prompt, True), with_cache)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "qwen2"])
def test_per_layer_config_lists_follow_the_blocks(model_type):
    model = tiny_model(model_type)
    types = list(model.config.layer_types)
    remove_blocks(model, REMOVED)
    assert list(model.config.layer_types) == [t for i, t in enumerate(types) if i not in REMOVED]


def test_without_blocks_restores_everything():
    model = tiny_model("gemma3_text")
    ids = random_tokens(1, 12)
    before = model(ids).logits
    types = list(model.config.layer_types)
    with without_blocks(model, [2, 3]):
        assert len(find_blocks(model)) == LAYERS - 2
        assert not torch.equal(model(ids).logits, before)
    assert len(find_blocks(model)) == LAYERS and list(model.config.layer_types) == types
    assert [b.self_attn.layer_idx for b in find_blocks(model).blocks] == list(range(LAYERS))
    assert torch.equal(model(ids).logits, before)


def test_bad_removals_are_refused():
    model = tiny_model("llama")
    for bad in ([8], [-1], [2, 2], list(range(LAYERS))):
        with pytest.raises(ShortenedError, match="removed_blocks|cannot remove all"):
            remove_blocks(model, bad)
    assert len(find_blocks(model)) == LAYERS


def test_encoder_decoder_is_refused_with_its_model_type():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2))
    with pytest.raises(ShortenedError, match="'t5'.*encoder-decoder"):
        find_blocks(t5)


def test_model_without_a_block_list_is_refused_with_its_model_type():
    model = tiny_model("llama")
    model.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()] * 3)  # not the layer count
    with pytest.raises(ShortenedError, match="model_type 'llama': cannot find its decoder blocks .* found none"):
        find_blocks(model)
    # one mixed-class list of the layer count is a hybrid's block list; two are ambiguous
    model.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()] * 4)
    assert find_blocks(model).path == "model.layers"
    model.model.extra = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()] * 4)
    with pytest.raises(ShortenedError, match=r"found several \(model.layers, model.extra\)"):
        find_blocks(model)
