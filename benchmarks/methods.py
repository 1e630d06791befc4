"""Benchmark (issue 20 §2): reverse-order pruning with partial fine-tuning against the Shortened LLaMA recipes, on
SmolLM2-135M pruned 20%, at equal training tokens.

Lu et al. 2024 ("Reassessing Layer Pruning in LLMs", arXiv:2411.15558) find that removing the last blocks before
the kept tail (``reverse``) and training only the last few blocks and the LM head (``partial``) beats LoRA at a
lower cost. Compared here: ``reverse``+``partial``, ``reverse``+``lora``, ``ppl``+``lora``, ``ppl``+``cpt``, each
through the real path (``retrain``: Ray Train, one worker, DeepSpeed ZeRO-2, fp32 on CPU), same data (the
SlimPajama sample), same token budget, same LR schedule. Reported: WikiText-2 perplexity (paper protocol,
128-token windows, the first ``--ppl-windows``) of the pruned model before and after, the parameters trained, the
steady-state training tokens/s (report windows after the first) and the wall time of each retraining (Ray start-up
of the run included).

    flock /tmp/heavy.lock .venv/bin/python benchmarks/methods.py [--tokens 8192] [--seq-len 256] [--ppl-windows 100]

Writes ``benchmarks/results/methods.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import psutil
import torch

from benchmarks_support import CACHE, RESULTS, print_table, pruned_smollm2
from shortened.data import DataConfig
from shortened.evaluation.perplexity import evaluate_ppl
from shortened.models import load_model, load_tokenizer, materialize
from shortened.paths import REPO_ROOT
from shortened.training.config import TrainConfig
from shortened.training.retrain import ScaleConfig, retrain

RUNS = REPO_ROOT / ".cache" / "bench-methods"
COMBOS = [("reverse", "partial"), ("reverse", "lora"), ("ppl", "lora"), ("ppl", "cpt")]


def pruned_reverse(dense_dir: str, ratio: float = 0.2) -> str:
    """SmolLM2 pruned ``ratio`` by ``reverse`` (the paper's keep rule: first 4 and last 2 blocks kept), cached."""
    from shortened.pruning import blocks_for_ratio, prune, save_pruned, score_blocks

    out = CACHE / f"smollm2-reverse-{round(ratio * 100)}"
    if (out / "pruning.json").is_file():
        return str(out)
    model, tok = load_model(dense_dir, device="cpu", dtype="float32"), load_tokenizer(dense_dir)
    scores = score_blocks(model, "reverse", None, progress=False)
    save_pruned(prune(model, scores, blocks_for_ratio(model, ratio), ratio_requested=ratio), out, tok, overwrite=True)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="training tokens per method")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--partial-blocks", type=int, default=3)
    ap.add_argument("--ppl-windows", type=int, default=100)
    args = ap.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    ray.init(num_cpus=psutil.cpu_count() + 1, log_to_driver=False)
    dense = str(materialize("smollm2", CACHE / "smollm2-135m-instruct-hf"))
    pruned = {"ppl": pruned_smollm2(dense), "reverse": pruned_reverse(dense)}
    tok = load_tokenizer(dense)

    def ppl(model_dir: str) -> float:
        m = load_model(model_dir, device="cpu", dtype="float32")
        return evaluate_ppl(m, tok, "wikitext2", max_windows=args.ppl_windows, batch_size=8, progress=False)["value"]

    dense_ppl = ppl(dense)
    plans = {c: json.loads(open(os.path.join(p, "pruning.json")).read()) for c, p in pruned.items()}
    before = {c: ppl(p) for c, p in pruned.items()}
    rows = []
    for criterion, method in COMBOS:
        cfg = TrainConfig(method=method, train_tokens=args.tokens, data=DataConfig(seq_len=args.seq_len),
                          micro_batch_size=args.micro_batch_size, zero_stage=2, report_every_steps=4,
                          checkpoint_every_tokens=None, warmup_ratio=0.1, partial_blocks=args.partial_blocks)
        out = RUNS / f"{criterion}-{method}"
        start = time.perf_counter()
        retrain(pruned[criterion], str(out), cfg, scale=ScaleConfig(num_workers=1, cpus_per_worker=psutil.cpu_count()),
                storage_path=str(RUNS / "storage"), name=f"{criterion}-{method}-{int(time.time())}", overwrite=True)
        wall = time.perf_counter() - start
        record = json.loads((out / "retraining.json").read_text())
        steady = record["history"][1:] or record["history"]
        phase = record["phases"][-1]
        trained = (phase.get("partial") or {}).get("trained_params")
        if method == "lora":  # the adapters' parameters (retraining.json names the modules, not the count)
            from shortened.training.lora import with_lora

            lora = with_lora(load_model(pruned[criterion], device="cpu", dtype="float32"), cfg)
            trained = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        elif method == "cpt":
            trained = sum(p.numel() for p in load_model(pruned[criterion], device="cpu", dtype="float32").parameters())
        rows.append({"criterion": criterion, "method": method, "removed_blocks": plans[criterion]["removed_blocks"],
                     "ratio_actual": plans[criterion]["ratio_actual"], "ppl_before": before[criterion],
                     "ppl_after": ppl(str(out)), "tokens": record["tokens_trained"], "trained_params": trained,
                     "tokens_per_s": sum(h["tokens_per_s"] for h in steady) / len(steady), "wall_s": wall})
        print(f"{criterion}+{method}: {rows[-1]}", flush=True)
    print(f"\nSmolLM2-135M, dense WikiText-2 PPL {dense_ppl:.2f} (first {args.ppl_windows} windows of 128 tokens); "
          f"{args.tokens:,} training tokens per method ({args.micro_batch_size}x{args.seq_len} per step)\n")
    print_table(["criterion + method", "blocks removed", "ratio", "PPL before", "PPL after", "params trained",
                 "tokens/s", "wall s"],
                [[f"{r['criterion']}+{r['method']}", str(r["removed_blocks"]), f"{r['ratio_actual']:.3f}",
                  f"{r['ppl_before']:.2f}", f"{r['ppl_after']:.2f}",
                  f"{r['trained_params'] / 1e6:.2f}M" if r["trained_params"] else "?", f"{r['tokens_per_s']:.0f}",
                  f"{r['wall_s']:.0f}"] for r in rows])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "methods.json"
    path.write_text(json.dumps({"dense_ppl": dense_ppl, "rows": rows, "args": vars(args), "machine": {
        "cpus": psutil.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
