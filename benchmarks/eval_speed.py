"""Benchmark: generation speed of SmolLM2 original vs pruned 20% with the paper's ``ppl`` criterion.

Both models in one process, runs alternating (warm-up discarded), greedy with the KV cache, forced output length,
a short fixed prompt. Goal at batch 1: speedup >= 1.19x (ideal 30/24 blocks = 1.25x, less the head's share).

    python benchmarks/eval_speed.py [--batch-sizes 1,8,32] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform

import psutil
import torch

from shortened.evaluation.speed import compare_speed, speed_table
from shortened.models import count_params, load_model, load_tokenizer, materialize
from shortened.paths import REPO_ROOT

from benchmarks_support import pruned_smollm2

RESULTS = REPO_ROOT / "benchmarks" / "results"
CACHE = REPO_ROOT / ".cache" / "models"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--new-tokens", default="128")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    dense_dir = str(materialize("smollm2", CACHE / "smollm2-135m-instruct-hf"))
    pruned_dir = pruned_smollm2(dense_dir)
    models = {name: (load_model(d, device=args.device), load_tokenizer(d))
              for name, d in (("original", dense_dir), ("pruned-20%-ppl", pruned_dir))}
    rows = compare_speed(models, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                         new_tokens=[int(n) for n in args.new_tokens.split(",")], repeats=args.repeats,
                         warmup=args.warmup)
    info = {name: {"blocks": m.config.num_hidden_layers, "params": count_params(m), "dtype": str(m.dtype)}
            for name, (m, _) in models.items()}
    print("\n" + speed_table(rows))
    b1 = [r for r in rows if r["model"] != "original" and r["batch_size"] == 1]
    for r in b1:
        print(f"\nbatch 1, {r['new_tokens']} tokens: speedup {r['speedup_vs_baseline']:.3f}x "
              f"(goal >= 1.19x: {'met' if r['speedup_vs_baseline'] >= 1.19 else 'NOT met'}; ideal 1.25x)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "eval_speed.json"
    out.write_text(json.dumps({"rows": rows, "models": info, "args": vars(args),
                               "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                                           "torch": torch.__version__, "device": str(next(iter(models.values()))[0]
                                                                                       .device)}}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
