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


def taylor_before_backward_accumulation(model, calibration, batch_size):
    """The Taylor+ implementation before gradients were accumulated by ``backward()`` (kept as the reference): an fp32
    salience per weight plus every block gradient of a batch at once, Σ_batches W ⊙ g per weight, then |.| summed."""
    blocks = find_blocks(model).blocks
    params = [[p for n, p in b.named_parameters() if n.endswith("weight")] for b in blocks]
    flat = [p for ps in params for p in ps]
    salience = [torch.zeros_like(p, dtype=torch.float32) for p in flat]
    model.eval()
    for ids in calibration.split(batch_size):
        with torch.enable_grad():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
        for acc, p, g in zip(salience, flat, grads):
            if g is not None:
                acc.add_(p.detach().float() * g.float())
    scores, k = [], 0
    for ps in params:
        scores.append(sum(salience[k + j].abs().sum().item() for j in range(len(ps))))
        k += len(ps)
    return scores


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_taylor_equals_the_implementation_before_backward_accumulation(arch, batch_size):
    """|W ⊙ Σ_batches g| from accumulated .grad equals Σ_batches W ⊙ g summed per batch (4 or 2 batches), in fp32 to
    rounding; afterwards no parameter holds a gradient and requires_grad is as it was."""
    model = tiny_model(arch)
    new = CRITERIA["taylor"].score(model, CALIB, ctx(batch_size=batch_size)).scores
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not model.training
    old = taylor_before_backward_accumulation(model, CALIB, batch_size)
    torch.testing.assert_close(torch.tensor(new, dtype=torch.float64), torch.tensor(old, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert len(set(new)) == LAYERS and min(new) > 0  # every block scored, all different


def test_taylor_restores_frozen_parameters_existing_grads_and_training_mode():
    model = tiny_model("llama").train()
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen before: stays frozen
    head_grad = torch.ones_like(model.lm_head.weight)
    model.lm_head.weight.grad = head_grad  # a gradient held before: held after
    expected = taylor_before_backward_accumulation(tiny_model("llama"), CALIB, 2)
    model.train()
    scores = CRITERIA["taylor"].score(model, CALIB, ctx(batch_size=2)).scores
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert model.training
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.lm_head.weight.grad is head_grad
    others = [p for n, p in model.named_parameters() if n not in ("model.embed_tokens.weight", "lm_head.weight")]
    assert all(p.requires_grad and p.grad is None for p in others)


def test_scores_record_dtype_device_and_attention():
    from shortened.models import attn_used

    model = tiny_model("llama")
    s = CRITERIA["magnitude"].score(model, None, ctx())
    assert (s.dtype, s.device, s.torch_version) == ("float32", "cpu", torch.__version__)
    assert s.attn_implementation == attn_used(model) == "sdpa"
    s = CRITERIA["magnitude"].score(tiny_model("llama").to(torch.bfloat16), None, ctx())
    assert s.dtype == "bfloat16"


def test_scores_metadata_round_trip_and_older_files(tmp_path, caplog):
    import json

    scores = BlockScores("taylor", [2.0, 1.5], model="m", dtype="bfloat16", device="cuda:0",
                         attn_implementation="flash_attention_2", torch_version="2.13.0")
    scores.save(tmp_path / "s.json")
    data = json.loads((tmp_path / "s.json").read_text())
    assert (data["dtype"], data["device"], data["attn_implementation"], data["torch_version"]) == \
        ("bfloat16", "cuda:0", "flash_attention_2", "2.13.0")
    back = BlockScores.load(tmp_path / "s.json")
    assert back == scores
    # a file written before the fields existed loads, with None for each
    for key in ("dtype", "device", "attn_implementation", "torch_version"):
        del data[key]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = BlockScores.load(tmp_path / "old.json")
    assert (old.dtype, old.device, old.attn_implementation, old.torch_version) == (None, None, None, None)
    assert old.scores == [2.0, 1.5]
    with caplog.at_level("WARNING", logger="shortened.criteria.base"):
        assert old.dtype_mismatch(torch.float32) is None  # older file: nothing to compare
        assert back.dtype_mismatch(torch.bfloat16) is None
        assert back.dtype_mismatch("bfloat16") is None
        assert not caplog.records
        message = back.dtype_mismatch(torch.float32, where="s.json")
    assert "bfloat16" in message and "float32" in message and "cuda:0" in message and message.startswith("s.json")
    assert [r.getMessage() for r in caplog.records] == [message]


def _sweep_fields(model_dir, tmp_path, **changes):
    return {"name": "scoredtype", "model": str(model_dir), "criteria": ["magnitude"], "blocks": [1],
            "train": {"train_tokens": 8}, "storage_path": str(tmp_path / "runs"), "device": "cpu", **changes}


def test_sweep_scores_file_records_the_pinned_score_dtype(tmp_path, caplog):
    """score_dtype pins the dtype compute_scores loads the model in, whatever dtype the other stages use; a scores
    file from another dtype is warned about when a trial prunes from it."""
    from shortened.sweep.config import SweepConfig
    from shortened.sweep.trial import _warn_scores_dtype, compute_scores, scoring_dtype

    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    pinned = SweepConfig.model_validate(_sweep_fields(tmp_path / "tiny", tmp_path, dtype="auto",
                                                      score_dtype="bfloat16", attn_implementation="eager"))
    assert scoring_dtype(pinned) == "bfloat16"
    out = compute_scores(pinned.model_dump(mode="json"), "magnitude", 1, str(tmp_path / "scores.json"))
    scores = BlockScores.load(out)
    assert (scores.dtype, scores.device, scores.attn_implementation) == ("bfloat16", "cpu", "eager")
    expected = CRITERIA["magnitude"].score(tiny_model("llama").to(torch.bfloat16), None, ctx()).scores
    assert scores.scores == pytest.approx(expected, rel=1e-6)

    unpinned = SweepConfig.model_validate(_sweep_fields(tmp_path / "tiny", tmp_path, dtype="float32"))
    assert unpinned.score_dtype is None and scoring_dtype(unpinned) == "float32"
    assert unpinned.attn_implementation == "auto"
    with caplog.at_level("WARNING", logger="shortened.criteria.base"):
        _warn_scores_dtype(pinned, scores, out)
        assert not caplog.records
        _warn_scores_dtype(unpinned, scores, out)  # scores in bf16, this config scores in fp32
    assert len(caplog.records) == 1 and "bfloat16" in caplog.records[0].getMessage() \
        and "float32" in caplog.records[0].getMessage()


def test_score_dtype_is_checked_and_named(tmp_path):
    import yaml

    from shortened.sweep.config import load_sweep_config

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_sweep_fields(tmp_path, tmp_path, score_dtype="float8")))
    with pytest.raises(ShortenedError, match="score_dtype.*'float8' is not one of auto"):
        load_sweep_config(path)
    path.write_text(yaml.safe_dump(_sweep_fields(tmp_path, tmp_path, score_dtype="fp32")))
    assert load_sweep_config(path).score_dtype == "fp32"


def test_cli_prune_warns_when_reused_scores_were_computed_in_another_dtype(tmp_path, caplog):
    from shortened.cli import main

    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    scores = tmp_path / "scores.json"
    common = ["--model", str(tmp_path / "tiny"), "--criterion", "magnitude", "--device", "cpu", "--keep-first", "1",
              "--keep-last", "1", "--quiet"]
    assert main(["score", *common, "--dtype", "bfloat16", "--out", str(scores)]) == 0
    assert BlockScores.load(scores).dtype == "bfloat16"
    with caplog.at_level("WARNING", logger="shortened.criteria.base"):
        assert main(["prune", *common, "--dtype", "bfloat16", "--blocks", "1", "--scores", str(scores),
                     "--out", str(tmp_path / "same")]) == 0
        assert not [r for r in caplog.records if r.name == "shortened.criteria.base"]
        assert main(["prune", *common, "--dtype", "float32", "--blocks", "1", "--scores", str(scores),
                     "--out", str(tmp_path / "other")]) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "shortened.criteria.base"]
    assert len(warned) == 1 and warned[0].startswith(f"--scores {scores}: the magnitude scores were computed in "
                                                     "bfloat16 on cpu, but float32 is in use now")
