"""Each criterion against an independent, slow computation of the same formula on a tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import LAYERS, random_tokens, tiny_model

from shortened.blocks import find_blocks
from shortened.criteria import CRITERIA, BlockScores, ScoringContext
from shortened.errors import ShortenedError

ARCHS = ["llama", "gpt2", "gemma3_text"]  # positional vs keyword hidden state, tuple vs tensor outputs, softcap
CALIB = random_tokens(4, 24, seed=1)
ALL = list(range(LAYERS))


def ctx(batch_size=2, allowed=ALL, n_remove=None):
    return ScoringContext(allowed=list(allowed), batch_size=batch_size, n_remove=n_remove, progress=False)


def slow_ppl_without(model, i, calib):
    """Copy the model, delete block i from its ModuleList, full forward with labels."""
    m = copy.deepcopy(model)
    bl = find_blocks(m)
    del bl.blocks[i]
    m.config.num_hidden_layers = len(bl.blocks)  # gpt2 maps this to n_layer
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = [t for k, t in enumerate(m.config.layer_types) if k != i]
    with torch.no_grad():
        loss = m(input_ids=calib, labels=calib, use_cache=False).loss  # mean over all predicted tokens
    return math.exp(loss.item())


def block_io(model, calib):
    """(input, output) hidden states of every block, via plain forward hooks."""
    io = []
    hooks = [b.register_forward_hook(lambda mod, a, k, out: io.append(
        (a[0] if a else k["hidden_states"], out[0] if isinstance(out, tuple) else out)), with_kwargs=True)
        for b in find_blocks(model).blocks]
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for h in hooks:
        h.remove()
    return io


@pytest.mark.parametrize("arch", ARCHS)
def test_ppl_cached_equals_slow_and_naive(arch):
    model = tiny_model(arch)
    cached = CRITERIA["ppl"].score(model, CALIB, ctx(batch_size=4)).scores
    slow = [slow_ppl_without(model, i, CALIB) for i in ALL]
    assert cached == pytest.approx(slow, rel=1e-4)
    assert max(slow) / min(slow) > 1.05  # blocks really differ, so the comparison means something
    from shortened.criteria.ppl import score_ppl
    assert score_ppl(model, CALIB, ctx(batch_size=4), cached=False).scores == pytest.approx(cached, rel=1e-5)
    # batching does not change the numbers
    assert CRITERIA["ppl"].score(model, CALIB, ctx(batch_size=1)).scores == pytest.approx(cached, rel=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_taylor_matches_per_batch_gradients(arch):
    model = tiny_model(arch)
    scores = CRITERIA["taylor"].score(model, CALIB, ctx(batch_size=2)).scores
    blocks = find_blocks(model).blocks
    acc, abs_per_batch = {}, [0.0] * LAYERS
    for ids in CALIB.split(2):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for b, block in enumerate(blocks):
            for name, p in block.named_parameters():
                if name.endswith("weight"):
                    acc[(b, name)] = acc.get((b, name), 0) + (p * p.grad).detach()
                    abs_per_batch[b] += (p * p.grad).abs().sum().item()
    model.zero_grad()
    expected = [sum(v.abs().sum().item() for (b, _), v in acc.items() if b == i) for i in ALL]
    assert scores == pytest.approx(expected, rel=1e-4)
    # the sum over batches is signed before the absolute value: smaller than summing per-batch |W·g|
    assert all(s < a for s, a in zip(scores, abs_per_batch))


def test_magnitude_is_sum_of_absolute_block_weights():
    model = tiny_model("llama")
    scores = CRITERIA["magnitude"].score(model, None, ctx()).scores
    blocks = find_blocks(model).blocks
    expected = [sum(p.abs().sum().item() for n, p in b.named_parameters() if n.endswith("weight")) for b in blocks]
    assert scores == pytest.approx(expected, rel=1e-6)
    assert model.model.embed_tokens.weight.abs().sum().item() not in scores


@pytest.mark.parametrize("arch", ARCHS)
def test_block_influence_is_one_minus_cosine(arch):
    model = tiny_model(arch)
    scores = CRITERIA["block_influence"].score(model, CALIB, ctx(batch_size=3)).scores
    expected = []
    for x, y in block_io(model, CALIB):
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        expected.append((1 - cos).mean().item())
    assert scores == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_angular_distance_and_span_choice(arch):
    model = tiny_model(arch)
    result = CRITERIA["angular"].score(model, CALIB, ctx())
    io = block_io(model, CALIB)
    states = [x for x, _ in io] + [io[-1][1]]

    def dist(start, n):
        a, b = states[start][:, -1], states[start + n][:, -1]
        return (torch.arccos((F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).clamp(-1, 1)) / math.pi).mean()

    for n in (1, 3):
        for start in range(LAYERS - n + 1):
            assert result.extra["span_distance"][n - 1][start] == pytest.approx(dist(start, n).item(), abs=1e-5)
    assert result.scores == pytest.approx(result.extra["span_distance"][0])
    allowed = list(range(2, 7))
    chosen = CRITERIA["angular"].select(result, 3, allowed)
    best = min(range(2, 5), key=lambda s: dist(s, 3).item())
    assert chosen == [best, best + 1, best + 2]
    with pytest.raises(ShortenedError, match="no contiguous span of 6"):
        CRITERIA["angular"].select(result, 6, allowed)


def test_iterative_matches_greedy_full_forwards():
    model = tiny_model("llama")
    allowed = list(range(2, 7))
    result = CRITERIA["iterative"].score(model, CALIB, ctx(batch_size=4, allowed=allowed, n_remove=3))
    m, order = copy.deepcopy(model), []
    for _ in range(3):
        kept = [i for i in ALL if i not in order]
        best = min((i for i in allowed if i not in order), key=lambda i: slow_ppl_without(m, kept.index(i), CALIB))
        del find_blocks(m).blocks[kept.index(best)]
        m.config.num_hidden_layers -= 1
        order.append(best)
    assert result.extra["removal_order"] == order
    assert CRITERIA["iterative"].select(result, 2, allowed) == sorted(order[:2])
    with pytest.raises(ShortenedError, match="cover 3 removal steps, 4 requested"):
        CRITERIA["iterative"].select(result, 4, allowed)


def test_scores_json_round_trip(tmp_path):
    scores = BlockScores("ppl", [1.0, float("nan"), 3.5], extra={"a": 1}, calibration={"seed": 0}, model="m")
    scores.save(tmp_path / "s.json")
    back = BlockScores.load(tmp_path / "s.json")
    assert back.criterion == "ppl" and back.scores[0] == 1.0 and math.isnan(back.scores[1]) and back.extra == {"a": 1}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ShortenedError, match="bad.json"):
        BlockScores.load(tmp_path / "bad.json")
