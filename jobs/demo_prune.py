"""`make demo` (until the sweep lands): prune SmolLM2-135M-Instruct by 20% with the paper's ppl criterion.

Scores the 30 blocks on 10 x 128 calibration tokens from the SlimPajama sample, removes the least important ones
(never the first 4 or last 2), saves a standard HF checkpoint with pruning.json, reloads it with plain
transformers, and compares held-out perplexity and a greedy generation with the dense model.
"""

from __future__ import annotations

import argparse
import time

from transformers import AutoModelForCausalLM

from shortened.blocks import find_blocks
from shortened.criteria.ppl import perplexity
from shortened.data.calibration import CalibrationConfig, calibration_windows, describe
from shortened.data.sources import resolve_alias
from shortened.models import load_model, load_tokenizer
from shortened.paths import REPO_ROOT
from shortened.pruning import blocks_for_ratio, prune, save_pruned, score_blocks


def generate(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False, use_cache=True)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--out", default=str(REPO_ROOT / "out" / "demo" / "smollm2-ppl-20"))
    args = parser.parse_args()

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    calib_cfg = CalibrationConfig()
    calib = calibration_windows(tokenizer, calib_cfg)
    heldout = calibration_windows(tokenizer, CalibrationConfig(n_samples=20, seq_len=128, seed=1,
                                                               source=resolve_alias("slimpajama-sample", "validation")))
    print(f"[{time.perf_counter() - t0:5.0f}s] loaded {args.model}: {len(find_blocks(model))} blocks")
    dense_ppl = perplexity(model, heldout)
    prompt = "The three most important things to know about the French Revolution are"
    dense_text = generate(model, tokenizer, prompt)

    scores = score_blocks(model, "ppl", calib, batch_size=10)
    scores.calibration, scores.model = describe(calib_cfg, calib), args.model
    n = blocks_for_ratio(model, args.ratio)
    result = prune(model, scores, n, ratio_requested=args.ratio, model_name=args.model)
    out = save_pruned(result, args.out, tokenizer, overwrite=True)
    print(f"[{time.perf_counter() - t0:5.0f}s] scored and pruned; saved to {out}")

    pruned = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no custom code
    pruned_ppl = perplexity(pruned, heldout)
    r = result.report
    print(f"\nppl scores per block: {[round(s, 1) for s in r['scores']]}")
    print(f"removed blocks {r['removed_blocks']} ({r['num_blocks_before']} -> {r['num_blocks_after']} blocks, "
          f"{r['params_before'] / 1e6:.1f}M -> {r['params_after'] / 1e6:.1f}M params, "
          f"{100 * r['ratio_actual']:.1f}% removed for {100 * args.ratio:.0f}% asked)")
    print("\n| model | blocks | params | held-out PPL (SlimPajama sample validation, 20x128) |")
    print("|---|---|---|---|")
    print(f"| dense | {r['num_blocks_before']} | {r['params_before'] / 1e6:.1f}M | {dense_ppl:.2f} |")
    print(f"| ppl-pruned | {r['num_blocks_after']} | {r['params_after'] / 1e6:.1f}M | {pruned_ppl:.2f} |")
    print(f"\nprompt: {prompt!r}\n  dense : {dense_text}\n  pruned: {generate(pruned, tokenizer, prompt)}")
    print(f"\n(no retraining yet: pruning alone costs quality; CPT/LoRA heal it.) done in "
          f"{time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
