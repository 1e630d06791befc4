"""Benchmark: retraining on SmolLM2 pruned 20% (``ppl``).

1. Throughput: tokens/s of one Ray Train worker (DeepSpeed, ZeRO stage 0, fp32) next to a bare PyTorch loop
   (AdamW, same model, data, batch and step count), steady state (the first report window, with start-up, is
   left out). Goal: Ray/bare >= 0.90.
2. Healing: WikiText-2 perplexity (paper protocol, first ``--ppl-windows`` windows) of the pruned model before
   and after a short CPT and a short LoRA with the same token budget on the SlimPajama sample.

    python benchmarks/retrain.py [--steps 24] [--seq-len 256] [--heal-tokens 16384] [--ppl-windows 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import psutil
import torch

from shortened.data import DataConfig, PackedStream, take
from shortened.evaluation.perplexity import evaluate_ppl
from shortened.models import load_model, load_tokenizer, materialize
from shortened.paths import REPO_ROOT
from shortened.training.config import TrainConfig
from shortened.training.retrain import ScaleConfig, retrain

RESULTS = REPO_ROOT / "benchmarks" / "results"
CACHE = REPO_ROOT / ".cache" / "models"
RUNS = REPO_ROOT / ".cache" / "bench-retrain"


def bare_loop(model_dir: str, cfg: TrainConfig, steps: int) -> float:
    """Steady-state tokens/s of a plain PyTorch loop (first ``report_every_steps`` steps left out)."""
    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, device="cpu", dtype="float32").train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    it = iter(PackedStream(cfg.data, load_tokenizer(model_dir)))
    skip = cfg.report_every_steps
    for step in range(steps):
        if step == skip:
            start = time.perf_counter()
        batch = take(it, cfg.micro_batch_size)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - skip) * cfg.micro_batch_size * cfg.data.seq_len / (time.perf_counter() - start)


def ray_worker(model_dir: str, cfg: TrainConfig, name: str) -> float:
    out = RUNS / name
    retrain(model_dir, str(out), cfg, scale=ScaleConfig(num_workers=1, cpus_per_worker=psutil.cpu_count()),
            storage_path=str(RUNS / "storage"), name=f"{name}-{int(time.time())}", overwrite=True)
    history = json.loads((out / "retraining.json").read_text())["history"]
    steady = history[1:]  # each window's tokens/s; the first includes start-up
    return sum(h["tokens_per_s"] for h in steady) / len(steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--heal-tokens", type=int, default=16384)
    ap.add_argument("--ppl-windows", type=int, default=200)
    ap.add_argument("--skip-heal", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    ray.init(num_cpus=psutil.cpu_count() + 1, log_to_driver=False)

    from benchmarks_support import pruned_smollm2  # noqa: E402  (shared with eval_speed.py)

    dense = str(materialize("smollm2", CACHE / "smollm2-135m-instruct-hf"))
    pruned = pruned_smollm2(dense)
    data = DataConfig(seq_len=args.seq_len)
    tp_cfg = TrainConfig(train_tokens=args.steps * args.micro_batch_size * args.seq_len, data=data,
                         micro_batch_size=args.micro_batch_size, zero_stage=0, report_every_steps=6,
                         checkpoint_every_tokens=None)
    bare = bare_loop(pruned, tp_cfg, args.steps)
    worker = ray_worker(pruned, tp_cfg, "throughput")
    result = {"throughput": {"bare_tokens_per_s": bare, "ray_worker_tokens_per_s": worker, "ratio": worker / bare,
                             "steps": args.steps, "batch": f"{args.micro_batch_size}x{args.seq_len}"}}
    print(f"\n| loop | tokens/s |\n|---|---|\n| bare PyTorch | {bare:.1f} |\n| Ray Train worker (DeepSpeed) | "
          f"{worker:.1f} |\n\nratio {worker / bare:.3f} (goal >= 0.90: {'met' if worker / bare >= 0.9 else 'NOT met'})")

    if not args.skip_heal:
        tok = load_tokenizer(pruned)
        rows = []

        def ppl(model_dir: str) -> float:
            m = load_model(model_dir, device="cpu", dtype="float32")
            return evaluate_ppl(m, tok, "wikitext2", max_windows=args.ppl_windows, batch_size=8)["value"]

        rows.append({"model": "dense (30 blocks)", "tokens": 0, "ppl": ppl(dense), "seconds": 0})
        rows.append({"model": "pruned 20% (23 blocks)", "tokens": 0, "ppl": ppl(pruned), "seconds": 0})
        for method in ("cpt", "lora"):
            cfg = TrainConfig(method=method, train_tokens=args.heal_tokens, data=data,
                              micro_batch_size=args.micro_batch_size, zero_stage=2, report_every_steps=8,
                              checkpoint_every_tokens=None, warmup_ratio=0.1)
            start = time.perf_counter()
            out = RUNS / f"heal-{method}"
            retrain(pruned, str(out), cfg, scale=ScaleConfig(num_workers=1, cpus_per_worker=psutil.cpu_count()),
                    storage_path=str(RUNS / "storage"), name=f"heal-{method}-{int(time.time())}", overwrite=True)
            rows.append({"model": f"pruned + {method}", "tokens": args.heal_tokens, "ppl": ppl(str(out)),
                         "seconds": time.perf_counter() - start})
        result["healing"] = {"rows": rows, "ppl_windows": args.ppl_windows, "protocol": "paper-128"}
        print(f"\n| model | retraining tokens | WikiText-2 PPL (first {args.ppl_windows} windows) | train s |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['tokens']:,} | {r['ppl']:.2f} | {r['seconds']:.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "retrain.json"
    out.write_text(json.dumps({**result, "args": vars(args), "machine": {
        "cpus": psutil.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
