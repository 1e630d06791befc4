"""Every causal-LM architecture transformers ships, pruned by two blocks: the in-memory pruned model equals the
saved-and-reloaded one and generates the same with and without its KV cache, or pruning refuses with a
ShortenedError. Zero silent mismatches (issue 16)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from arch_matrix import model_types, tiny_config

from shortened.blocks import find_blocks
from shortened.criteria import BlockScores
from shortened.errors import ShortenedError
from shortened.pruning import prune, save_pruned

REMOVED = [2, 4]  # shifts the blocks after each, and keeps block 3 (full attention in period-4 hybrid layouts)
IDS = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))


PROMPTS = [torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]


def _generate(model, cache: bool, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=cache, pad_token_id=0)


def _dense(model_type: str):
    """The tiny dense model, or why it cannot stand in for its architecture (then the row is skipped)."""
    from transformers import AutoModelForCausalLM

    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
        if not all(torch.equal(_generate(model, True, p), _generate(model, False, p)) for p in PROMPTS):
            return None, "the dense tiny model's cached generation differs from uncached"
        return model, None
    except ImportError as exc:
        return None, f"needs a package not installed: {str(exc).strip().splitlines()[0][:100]}"
    except Exception as exc:  # noqa: BLE001 — the generic shrink does not fit every config class
        return None, f"no tiny config builds and runs: {type(exc).__name__}: {str(exc)[:100]}"


def _removable_pair(model, n: int) -> list[int]:
    """Two blocks to remove: REMOVED unless it would take a hybrid's last full-attention block (refused, and tested
    on its own below), then the first pair that keeps one."""
    types = getattr(model.config.get_text_config(), "layer_types", None) or []
    full = {i for i, t in enumerate(types) if t == "full_attention"}
    pairs = [REMOVED] + [[a, b] for a in range(1, n - 1) for b in range(a + 1, n - 1)] + [[1, n - 1]]
    return next((p for p in pairs if max(p) < n and not (full and full <= set(p))), [1, n - 1])


def prune_one(model_type: str) -> tuple[str, str]:
    """('exact' | 'refused' | 'skipped' | 'MISMATCH', detail) for one architecture."""
    model, why = _dense(model_type)
    if model is None:
        return "skipped", why
    with tempfile.TemporaryDirectory(prefix=f"matrix-{model_type}-") as tmp:
        return _prune_and_compare(model, tmp + "/pruned")


def _prune_and_compare(model, out: str) -> tuple[str, str]:
    try:
        n = len(find_blocks(model))
        removed = _removable_pair(model, n)
        scores = [1.0 if i in removed else 9.0 for i in range(n)]
        result = prune(model, BlockScores("magnitude", scores), len(removed), keep_first=0, keep_last=0)
        save_pruned(result, out)
    except ShortenedError as exc:
        return "refused", str(exc)[:160]
    back = type(result.model).from_pretrained(out).eval()
    with torch.no_grad():
        diff = (result.model(IDS).logits - back(IDS).logits).abs().max().item()
    same_gen = torch.equal(_generate(result.model, True), _generate(result.model, False))
    reload_gen = torch.equal(_generate(result.model, True), _generate(back, True))
    if diff > 1e-4 or not same_gen or not reload_gen:
        return "MISMATCH", f"max |logit diff| {diff:.2e}, cached==uncached {same_gen}, reloaded gen same {reload_gen}"
    return "exact", ""


def _row(model_type: str) -> tuple[str, str]:
    """One architecture's row, in a worker process (a crash is reported as a row, then fails the test)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        return prune_one(model_type)
    except Exception as exc:  # noqa: BLE001
        return "CRASH", f"{type(exc).__name__}: {str(exc)[:160]}"


def test_every_causal_lm_architecture_prunes_exactly_or_refuses(capsys):
    # one process per core (each single-threaded, OMP_NUM_THREADS=1 from conftest): the rows are independent and
    # mostly Python overhead, so two processes halve the test's ~5-10 min on a 2-core machine
    types = model_types()
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = dict(zip(types, pool.map(_row, types, chunksize=2)))
    counts = Counter(kind for kind, _ in rows.values())
    with capsys.disabled():
        print(f"\narchitecture matrix ({len(rows)} causal-LM config classes): {dict(counts)}")
        for kind in ("skipped", "refused"):
            print(f"  {kind}: " + ", ".join(sorted(m for m, (k, _) in rows.items() if k == kind)))
    bad = {m: d for m, (k, d) in rows.items() if k in ("MISMATCH", "CRASH")}
    assert not bad, f"silent mismatches or crashes: {bad}"
    # the architectures the README names as tested must stay exact
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox", "gpt2",
                       "opt", "falcon_mamba", "olmo2", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3",
                       "nemotron_h", "granite", "starcoder2", "lfm2",
                       # each needed a rewrite beyond per-layer lists (index lists, formulas, module copies, …)
                       "deepseek_v2", "bamba", "granitemoehybrid", "falcon_h1", "qwen3_next", "llama4_text", "olmo3",
                       "olmo_hybrid", "kimi_linear", "gpt_neo", "ctrl", "rwkv", "gpt_neox_japanese"):
        assert rows[model_type][0] == "exact", (model_type, rows[model_type])
    assert counts["exact"] >= 130


@pytest.mark.parametrize("model_type", ["qwen3_next", "olmo3"])
def test_removing_every_full_attention_block_is_refused(model_type):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    assert "full_attention" in model.config.get_text_config().layer_types[3]
    with pytest.raises(ShortenedError, match=r"removes every full-attention block \(\[3\]"):
        prune(model, BlockScores("magnitude", [9.0, 1, 9, 1, 9, 9]), 2, keep_first=0, keep_last=0)
