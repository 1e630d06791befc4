"""The training-free seam patch (``--patch linear``, shortened.seam_patch): exact fusion across architectures,
a better seam on the calibration data, standard checkpoints, refusals, the CLI and the sweep's patch axis."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from tiny_models import LAYERS, random_tokens, tiny_model
from transformers import AutoModelForCausalLM

from shortened.blocks import find_blocks, remove_blocks
from shortened.cli import main
from shortened.criteria import BlockScores
from shortened.errors import ShortenedError
from shortened.pruning import PRUNING_JSON, prune_and_save
from shortened.seam_patch import apply_unfused, fit_seams, fuse, patch_windows, seams

REMOVED = [3, 4, 6]  # two seams: block 2 patched for the run 3..4, block 5 for block 6
# lowest scores go: blocks 3, 4 and 6 of the 8
SCORES = [9.0, 9.0, 9.0, 1.0, 1.0, 9.0, 1.0, 9.0]


def _hidden_after(model, tokens, block: int) -> torch.Tensor:
    """The hidden state a block produced (output_hidden_states[i + 1] is block i's output)."""
    with torch.no_grad():
        return model(input_ids=tokens, output_hidden_states=True).hidden_states[block + 1]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2", "phi3", "gpt_neox"])
def test_fused_logits_equal_the_unfused_block_plus_t_computation(model_type):
    dense = tiny_model(model_type)
    calib = random_tokens(8, 32)
    found = fit_seams(dense, REMOVED, calib, batch_size=4)
    assert [(s.block, s.removed) for s in found] == [(2, [3, 4]), (5, [6])]
    assert all(s.transform.shape == (32, 32) and s.transform.dtype == torch.float64 for s in found)
    unfused = copy.deepcopy(dense)  # the deep copy carries its own down projections: refit to hold them
    handles = [apply_unfused(s) for s in fit_seams(unfused, REMOVED, calib, batch_size=4)]
    remove_blocks(unfused, REMOVED)
    remove_blocks(dense, REMOVED)
    for s in found:
        fuse(s)
    x = random_tokens(2, 24, seed=1)
    with torch.no_grad():
        fused, reference = dense(input_ids=x).logits, unfused(input_ids=x).logits
        for h in handles:
            h.remove()
        plain = unfused(input_ids=x).logits
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    assert (fused - plain).abs().max() > 1e-3  # the patch changed the model


def test_seams_split_removed_runs_and_skip_a_run_at_block_zero():
    got = seams([9, 5, 6, 0, 1])
    assert [(s.block, s.removed, s.skipped is None) for s in got] == [(-1, [0, 1], False), (4, [5, 6], True),
                                                                       (8, [9], True)]
    assert "block 0" in got[0].to_json()["skipped"]


def test_patched_seam_is_closer_to_the_removed_blocks_output_and_recorded(tmp_path):
    dense = tiny_model("llama")
    calib = random_tokens(16, 32)
    l_dense = _hidden_after(dense, calib, 4)  # L: what the last removed block of the first run produced
    unpatched = copy.deepcopy(dense)
    remove_blocks(unpatched, REMOVED)
    result = prune_and_save(dense, BlockScores("magnitude", SCORES), 3, tmp_path / "out", keep_first=1,
                            keep_last=1, patch="linear", calibration=calib, batch_size=8)
    patch = json.loads((tmp_path / "out" / PRUNING_JSON).read_text())["patch"]
    assert patch == result.report["patch"]
    assert patch["method"] == "linear" and patch["ridge"] == 0.0
    first, second = patch["seams"]
    assert (first["block"], first["removed"], second["block"], second["removed"]) == (2, [3, 4], 5, [6])
    assert first["module"] == "mlp.down_proj" and first["calibration_tokens"] == 16 * 32
    for seam in (first, second):
        assert 0 <= seam["fit_residual"] < seam["residual_before"]
    # the kept block 2 is block 2 of the pruned model too: its input is the dense one's
    err = lambda h: float(((h.double() - l_dense.double()) ** 2).sum() / (l_dense.double() ** 2).sum())  # noqa: E731
    patched_err, unpatched_err = err(_hidden_after(dense, calib, 2)), err(_hidden_after(unpatched, calib, 2))
    assert patched_err < unpatched_err
    assert patched_err == pytest.approx(first["fit_residual"], rel=1e-3)
    assert unpatched_err == pytest.approx(first["residual_before"], rel=1e-3)
    # per token: mean_t ‖h_t − L_t‖² / ‖L_t‖², what the default relative fit minimizes
    tok_err = lambda h: float((((h.double() - l_dense.double()) ** 2).sum(-1)  # noqa: E731
                               / (l_dense.double() ** 2).sum(-1)).mean())
    assert tok_err(_hidden_after(dense, calib, 2)) == pytest.approx(first["token_fit_residual"], rel=1e-3)
    assert tok_err(_hidden_after(unpatched, calib, 2)) == pytest.approx(first["token_residual_before"], rel=1e-3)
    assert first["token_fit_residual"] < first["token_residual_before"]


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2"])
def test_saved_patched_folder_is_a_standard_checkpoint_with_the_same_logits(tmp_path, model_type):
    dense = tiny_model(model_type)
    result = prune_and_save(dense, BlockScores("magnitude", SCORES), 3, tmp_path / "out", keep_first=1,
                            keep_last=1, patch="linear", calibration=random_tokens(8, 32), save_dtype="float32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is type(result.model) and len(find_blocks(loaded)) == LAYERS - 3
    assert set(loaded.state_dict()) == set(result.model.state_dict())  # no new parameters
    x = random_tokens(2, 16, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, result.model(input_ids=x).logits)


@pytest.mark.parametrize("model_type", ["gemma2", "olmo2"])
def test_post_mlp_norm_architectures_are_refused_naming_the_norm(tmp_path, model_type):
    dense = tiny_model(model_type)
    with pytest.raises(ShortenedError, match=rf"model_type '{model_type}'.*post_feedforward_layernorm"):
        prune_and_save(dense, BlockScores("magnitude", SCORES), 3, tmp_path / "out", keep_first=1, keep_last=1,
                       patch="linear", calibration=random_tokens(4, 16))
    assert not (tmp_path / "out").exists()


def test_bad_patch_arguments_are_refused_before_work(tmp_path):
    dense = tiny_model("llama")
    scores = BlockScores("magnitude", SCORES)
    with pytest.raises(ShortenedError, match="patch 'cubic'"):
        prune_and_save(dense, scores, 3, tmp_path / "a", patch="cubic")
    with pytest.raises(ShortenedError, match="needs calibration"):
        prune_and_save(dense, scores, 3, tmp_path / "b", keep_first=1, keep_last=1, patch="linear")
    assert len(find_blocks(dense)) == LAYERS and not list(tmp_path.iterdir())


def test_cli_prune_patch_linear_round_trip(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = ["prune", "--model", tiny_llama_dir, "--criterion", "magnitude", "--blocks", 2, "--keep-first", 1,
            "--keep-last", 1, "--calib-samples", 4, "--calib-seq-len", 32, "--patch", "linear", "--patch-ridge",
            0.01, "--quiet", "--out", out]
    assert main([str(a) for a in args]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / PRUNING_JSON).read_text())
    assert report["patch"]["ridge"] == 0.01 and printed["patch"] == report["patch"]["seams"]
    assert report["patch"]["fit"] == "relative"
    assert sum(len(s["removed"]) for s in report["patch"]["seams"]) == 2
    # no --patch-samples: the patch is fitted on 16 tokens per hidden dimension, not on the criteria's 4 windows
    d = AutoModelForCausalLM.from_pretrained(out).config.hidden_size
    calib = report["patch"]["calibration"]  # the patch's own set, reproducible: source, windows, seed, hash
    assert calib["n_samples"] == 16 * d // 32 and calib["seq_len"] == 32 and calib["num_tokens"] == 16 * d
    assert calib["resolved_source"] and len(calib["sha256"]) == 64
    assert all(s["calibration_tokens"] == 16 * d and s["fit_residual"] < s["residual_before"]
               for s in report["patch"]["seams"])
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == LAYERS - 2
    assert main(["prune", "--model", str(tiny_llama_dir), "--criterion", "magnitude", "--blocks", "2",
                 "--patch", "cubic", "--out", str(tmp_path / "bad")]) == 2
    assert "--patch" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # a fit option without the patch is a forgotten --patch linear, refused before the model loads
    assert main(["prune", "--model", str(tiny_llama_dir), "--criterion", "magnitude", "--blocks", "2",
                 "--patch_fit", "lstsq", "--out", str(tmp_path / "bad")]) == 2
    assert "--patch_fit set the seam patch's fit, but --patch is none" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_sweep_patch_axis_keys_and_prune_stage(tiny_llama_dir, tmp_path):
    from shortened.sweep.config import SweepConfig, load_sweep_config
    from shortened.sweep.trial import TrialSpec, compute_scores, grid_specs, prune_stage

    base = dict(name="p", model=str(tiny_llama_dir), criteria=["ppl"], blocks=[2], methods=["none", "cpt"],
                keep_first=1, keep_last=1, calibration={"n_samples": 4, "seq_len": 32},
                train={"train_tokens": 64}, storage_path=str(tmp_path / "runs"))
    assert [s.key for s in grid_specs(SweepConfig.model_validate(base))] == ["dense", "ppl-b2-none",
                                                                            "ppl-b2-cpt"]  # unchanged keys
    cfg = SweepConfig.model_validate({**base, "patch": ["none", "linear"], "patch_samples": 6, "patch_fit": "lstsq"})
    assert [s.key for s in grid_specs(cfg)] == ["dense", "ppl-b2-none", "ppl-b2-cpt", "ppl-b2+linear-none",
                                                "ppl-b2+linear-cpt"]
    assert TrialSpec(method="cpt", criterion="ppl", ratio=0.2, patch="linear").key == "ppl-r0.2+linear-cpt"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**base, "patch": ["cubic"]}))
    with pytest.raises(ShortenedError, match=r"patch\.0.*'none' or 'linear'"):
        load_sweep_config(bad)
    with pytest.raises(ShortenedError, match="bisect searches unpatched models"):
        bad.write_text(yaml.safe_dump({**base, "blocks": None, "search": "bisect", "methods": ["none"],
                                       "patch": ["linear"], "selection": {"policy": "max_ratio_within"}}))
        load_sweep_config(bad)
    scores = compute_scores(cfg, "ppl", 2, str(tmp_path / "scores.json"))
    report = prune_stage(cfg, TrialSpec(method="none", criterion="ppl", blocks=2, patch="linear"), scores,
                         str(tmp_path / "pruned"))
    assert report["patch"]["seams"] and report["patch"]["seams"][0]["calibration_tokens"] == 6 * 32
    assert report["patch"]["fit"] == "lstsq" and report["patch"]["seams"][0]["fit"] == "lstsq"
    assert report["patch"]["calibration"]["n_samples"] == 6 and report["patch"]["calibration"]["seq_len"] == 32
    assert json.loads((tmp_path / "pruned" / PRUNING_JSON).read_text())["patch"] == report["patch"]


def test_too_few_calibration_tokens_for_the_map_warn_unless_a_ridge_is_set(caplog):
    """T is d × d: fitted on fewer than 16·d tokens without a ridge it overfits (SmolLM2: 1.80× the unpatched
    perplexity on 10×128 windows), which the fit says; enough tokens or a ridge give no warning."""
    import logging

    model = tiny_model("llama")
    d = model.config.hidden_size
    with caplog.at_level(logging.WARNING, logger="shortened.seam_patch"):
        fit_seams(model, REMOVED, random_tokens(4, 32))
        few = [r.getMessage() for r in caplog.records]
        caplog.clear()
        fit_seams(model, REMOVED, random_tokens(4, 32), ridge=0.01)
        fit_seams(model, REMOVED, random_tokens(16 * d // 64 + 1, 64))
    assert len(few) == 1 and f"{d}×{d} map on 128 calibration tokens (fewer than {16 * d})" in few[0], few
    assert caplog.records == []


def test_relative_fit_is_the_token_weighted_least_squares_and_lstsq_the_plain_one():
    """``relative`` solves Σ_t ‖M_t·T − R_t‖² / ‖L_t‖² (R = L − Y), ``lstsq`` Σ_t ‖M_t·T − R_t‖²: both checked
    against the closed form on M, Y, L captured here; a token of massive norm moves lstsq's T, not relative's."""
    model = tiny_model("llama")
    blocks = find_blocks(model).blocks
    calib = random_tokens(24, 32)
    got = {}
    hooks = [blocks[2].mlp.down_proj.register_forward_hook(lambda _m, _i, o: got.__setitem__("m", o)),
             blocks[2].register_forward_hook(lambda _m, _i, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o)),
             blocks[4].register_forward_hook(lambda _m, _i, o: got.__setitem__("l", o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for h in hooks:
        h.remove()
    m, h, l_ = (got[k].double().reshape(-1, got[k].shape[-1]) for k in ("m", "h", "l"))
    r = l_ - (h - m)
    w2 = 1 / (l_ * l_).sum(1, keepdim=True)
    want = {"relative": torch.linalg.solve((m * w2).T @ m, (m * w2).T @ r), "lstsq": torch.linalg.solve(m.T @ m, m.T @ r)}
    for fit, t in want.items():
        seam = fit_seams(model, [3, 4], calib, batch_size=24, fit=fit)[0]
        assert seam.block == 2 and seam.fit == fit
        torch.testing.assert_close(seam.transform, t, rtol=1e-6, atol=1e-8)
    assert (want["relative"] - want["lstsq"]).abs().max() > 1e-3  # the weighting matters on real activations
    with pytest.raises(ShortenedError, match="patch_fit 'cosine'"):
        fit_seams(model, [3, 4], calib, fit="cosine")
    # a tokenizer larger than the model's vocabulary: named, not an IndexError inside the embedding
    too_big = calib.clone()
    too_big[0, 0] = model.config.vocab_size
    with pytest.raises(ShortenedError, match=rf"token id {model.config.vocab_size}, but the model embeds only "
                                             rf"{model.config.vocab_size} ids.*tokenizer does not match"):
        fit_seams(model, [3, 4], too_big)


def test_patch_windows_cover_16_tokens_per_dimension_unless_given():
    assert patch_windows(10, 128, 576) == 72  # SmolLM2: 9216 tokens
    assert patch_windows(10, 128, 4096) == 512  # a 7B Llama
    assert patch_windows(200, 128, 576) == 200  # never fewer than the criteria's windows
    assert patch_windows(10, 128, 576, samples=3) == 3


def test_report_draws_patched_trials_on_their_own_line():
    from shortened.sweep.report import _series

    def trial(key, ratio, ppl):
        return {"key": key, "criterion": "ppl", "method": "cpt", "ratio_actual": ratio, "status": "completed",
                "metrics": [{"name": "ppl", "dataset": "wikitext2", "value": ppl, "protocol": "paper-128"}]}

    lines = _series([trial("ppl-r0.2-cpt", 0.2, 150.0), trial("ppl-r0.2+linear-cpt", 0.2, 140.0),
                     trial("ppl-r0.35+linear-cpt", 0.35, 400.0), trial("ppl-r0.35-cpt", 0.35, 800.0)], "ppl")
    assert lines == {"ppl / cpt": [(0.2, 150.0), (0.35, 800.0)], "ppl+linear / cpt": [(0.2, 140.0), (0.35, 400.0)]}
