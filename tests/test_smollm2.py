"""The real model: SmolLM2-135M-Instruct (30 Llama blocks) pruned 20% with the paper's ppl criterion."""

from __future__ import annotations

import random

import pytest

from shortened.blocks import without_blocks
from shortened.criteria.ppl import perplexity, removal_nll, removal_nll_naive
from shortened.data.calibration import CalibrationConfig, calibration_windows
from shortened.pruning import allowed_blocks, blocks_for_ratio, prune, score_blocks

pytestmark = pytest.mark.slow


def test_cached_ppl_scores_equal_naive_on_smollm2(smollm2, smollm2_tokenizer):
    calib = calibration_windows(smollm2_tokenizer, CalibrationConfig(n_samples=4, seq_len=64, seed=3))
    blocks = list(range(30))
    cached = removal_nll(smollm2, calib, blocks, batch_size=4)
    naive = removal_nll_naive(smollm2, calib, blocks, batch_size=4)
    assert [cached[i] for i in blocks] == pytest.approx([naive[i] for i in blocks], rel=1e-5)


def test_ppl_pruning_beats_random_block_removal(smollm2, smollm2_tokenizer):
    calib = calibration_windows(smollm2_tokenizer, CalibrationConfig())  # paper: 10 x 128, seed 0
    dense_ppl = perplexity(smollm2, calib, batch_size=10)
    scores = score_blocks(smollm2, "ppl", calib, batch_size=10, progress=False)
    assert scores.scores[0] > 100 * dense_ppl  # the first block is vital in every LLM
    n = blocks_for_ratio(smollm2, 0.20)
    assert n == 7  # 20% of 134.5M params, 3.54M per block, rounded down
    allowed = allowed_blocks(30, 4, 2)
    random_ppls = []
    for seed in range(3):
        removed = sorted(random.Random(seed).sample(allowed, n))
        with without_blocks(smollm2, removed):
            random_ppls.append(perplexity(smollm2, calib, batch_size=10))
    chosen = sorted(sorted(allowed, key=lambda i: scores.scores[i])[:n])
    with without_blocks(smollm2, chosen):
        pruned_ppl = perplexity(smollm2, calib, batch_size=10)
    print(f"dense {dense_ppl:.2f}, ppl-pruned {pruned_ppl:.2f}, random {[round(p, 2) for p in random_ppls]}")
    assert dense_ppl < pruned_ppl < min(random_ppls)
    # and the library's prune() removes exactly those blocks
    model = type(smollm2).from_pretrained(smollm2.name_or_path).eval()
    report = prune(model, scores, n, ratio_requested=0.2).report
    assert report["removed_blocks"] == chosen and report["num_blocks_after"] == 23
    assert report["ratio_actual"] == pytest.approx(0.184, abs=0.002)
    assert perplexity(model, calib, batch_size=10) == pytest.approx(pruned_ppl, rel=1e-5)
