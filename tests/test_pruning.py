"""Ratio → block count, the keep rule, pruning.json, atomic output and bad-input errors (library and CLI)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny_models import LAYERS, random_tokens, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

from shortened.cli import main
from shortened.criteria import BlockScores
from shortened.errors import ShortenedError
from shortened.pruning import (allowed_blocks, blocks_for_ratio, prune, resolve_block_count, save_pruned,
                               score_blocks)


def test_paper_example_llama7b_20_percent_is_6_of_32_blocks():
    with torch.device("meta"):  # shapes only: no memory for 6.7B parameters
        model = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                                             num_hidden_layers=32, num_attention_heads=32,
                                                             vocab_size=32000))
    assert blocks_for_ratio(model, 0.20) == 6
    assert blocks_for_ratio(model, 0.35) == 11
    assert blocks_for_ratio(model, 0.0) == 0


def test_keep_rule_and_block_count_errors():
    assert allowed_blocks(8, 4, 2) == [4, 5]
    assert allowed_blocks(8, 0, 0) == list(range(8))
    with pytest.raises(ShortenedError, match="protect all 8 blocks"):
        allowed_blocks(8, 5, 3)
    model = tiny_model("llama")
    with pytest.raises(ShortenedError, match="more than the 2 blocks"):
        resolve_block_count(model, ratio=None, blocks=3, keep_first=4, keep_last=2)
    with pytest.raises(ShortenedError, match=r"ratio 0.9 \(\d+ of 8 blocks\) removes more"):
        resolve_block_count(model, ratio=0.9, blocks=None, keep_first=4, keep_last=2)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ShortenedError, match="must be in \\[0, 1\\)"):
            resolve_block_count(model, ratio=bad, blocks=None, keep_first=0, keep_last=0)
    assert resolve_block_count(model, ratio=None, blocks=3, keep_first=0, keep_last=0) == 3


def test_prune_report_and_saved_checkpoint(tmp_path):
    model = tiny_model("qwen2", max_window_layers=3, use_sliding_window=True, sliding_window=8)
    types_before = list(model.config.layer_types)
    assert len(set(types_before)) == 2  # mixed full/sliding layers, so the subsetting is visible
    calib = random_tokens(4, 24)
    scores = score_blocks(model, "ppl", calib, keep_first=1, keep_last=1, batch_size=4, progress=False)
    n = blocks_for_ratio(model, 0.3)
    result = prune(model, scores, n, keep_first=1, keep_last=1, ratio_requested=0.3, model_name="tiny")
    r = result.report
    expected_removed = sorted(sorted(range(1, 7), key=lambda i: scores.scores[i])[:n])
    assert r["removed_blocks"] == expected_removed
    assert r["kept_blocks"] == [i for i in range(LAYERS) if i not in expected_removed]
    assert r["num_blocks_before"] == LAYERS and r["num_blocks_after"] == LAYERS - n
    assert r["params_after"] < r["params_before"]
    assert r["ratio_actual"] == pytest.approx(1 - r["params_after"] / r["params_before"])
    assert r["ratio_actual"] <= 0.3
    out = save_pruned(result, tmp_path / "out")
    saved = json.loads((out / "pruning.json").read_text())
    assert saved["scores"] == pytest.approx(scores.scores) and saved["removed_blocks"] == expected_removed
    assert set(saved) >= {"model", "criterion", "scores", "removed_blocks", "kept_blocks", "num_blocks_before",
                          "num_blocks_after", "params_before", "params_after", "ratio_requested", "ratio_actual",
                          "keep_first", "keep_last", "calibration"}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == LAYERS - n
    assert list(reloaded.config.layer_types) == [types_before[i] for i in r["kept_blocks"]]
    with pytest.raises(ShortenedError, match="exists and is not empty"):
        save_pruned(result, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    result = prune(model, BlockScores("magnitude", [1.0] * LAYERS), 1, keep_first=0, keep_last=0)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- CLI -------------------------------------------------------------------------------------------------------


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_cli_score_then_prune_reuses_scores(tiny_llama_dir, tmp_path, capsys):
    scores = tmp_path / "scores.json"
    assert run_cli("score", "--model", tiny_llama_dir, "--criterion", "ppl", "--calib-samples", 4,
                   "--calib-seq-len", 32, "--keep-first", 1, "--keep-last", 1, "--quiet", "--out", scores) == 0
    data = json.loads(scores.read_text())
    assert data["criterion"] == "ppl" and len(data["scores"]) == LAYERS
    assert data["calibration"]["n_samples"] == 4 and data["calibration"]["seq_len"] == 32
    assert data["calibration"]["resolved_source"].endswith("slimpajama-sample/train")
    # With --scores nothing is scored: an unreadable calibration source is never touched.
    out = tmp_path / "pruned"
    assert run_cli("prune", "--model", tiny_llama_dir, "--criterion", "ppl", "--blocks", 2, "--keep-first", 1,
                   "--keep-last", 1, "--scores", scores, "--calib-source", tmp_path / "missing", "--out", out) == 0
    report = json.loads((out / "pruning.json").read_text())
    assert report["scores"] == pytest.approx(data["scores"])
    assert report["calibration"] == data["calibration"]
    assert report["removed_blocks"] == sorted(sorted(range(1, 7), key=lambda i: data["scores"][i])[:2])
    assert (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == LAYERS - 2


@pytest.mark.parametrize("args, message", [
    (["--criterion", "nope", "--ratio", "0.2"], "criterion 'nope' is unknown"),
    (["--criterion", "magnitude", "--ratio", "1.0"], r"ratio 1.0 must be in \[0, 1\)"),
    (["--criterion", "magnitude", "--blocks", "3"], "removes more than the 2 blocks"),
    (["--criterion", "magnitude", "--blocks", "1", "--keep-first", "6", "--keep-last", "2"], "protect all 8"),
])
def test_cli_bad_input_fails_clearly_and_writes_nothing(tiny_llama_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert run_cli("prune", "--model", tiny_llama_dir, *args, "--out", out) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_unreadable_model_and_non_empty_output(tiny_llama_dir, tmp_path, capsys):
    assert run_cli("prune", "--model", tmp_path / "nowhere", "--criterion", "magnitude", "--blocks", 1,
                   "--out", tmp_path / "o") == 2
    assert "nowhere" in capsys.readouterr().err
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text("{broken")
    assert run_cli("prune", "--model", bad, "--criterion", "magnitude", "--blocks", 1, "--out", tmp_path / "o") == 2
    assert "could not be read" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    assert run_cli("prune", "--model", tiny_llama_dir, "--criterion", "magnitude", "--blocks", 1,
                   "--out", full) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert run_cli("prune", "--model", tiny_llama_dir, "--criterion", "magnitude", "--blocks", 1,
                   "--out", full, "--overwrite") == 0
    assert (full / "pruning.json").is_file() and not (full / "keep.txt").exists()
    assert not (tmp_path / "o").exists()
