"""Benchmark: packing throughput of the data layer next to the token consumption of a SmolLM2 training step.

Both measured in this one process, one after the other, on the same machine and data (the SlimPajama sample):

- packing: tokenize + pack ``PackedStream`` blocks (no training), for rank 0 of 1 and of 3 (a document-level
  split reads every shard), in tokens/s, with peak RSS growth;
- training: full-parameter AdamW steps (forward, backward, optimizer) on SmolLM2 in fp32 with blocks from the
  same stream, in tokens/s, after a warm-up step.

Goal: packing >= 20x faster than training consumes, so one data stream per worker never starves a step.

    python benchmarks/data_packing.py [--seq-len 512] [--pack-tokens 2000000] [--train-steps 4] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import psutil
import torch

from shortened.data import DataConfig, PackedStream, take
from shortened.models import load_model, load_tokenizer, materialize
from shortened.paths import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"


def packing(tokenizer, seq_len: int, tokens: int, rank: int, world: int) -> dict:
    stream = PackedStream(DataConfig(seq_len=seq_len), tokenizer, rank=rank, world_size=world)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    it, blocks, peak = iter(stream), tokens // seq_len, rss0
    start = time.perf_counter()
    for i in range(blocks):
        next(it)
        if i % 200 == 0:
            peak = max(peak, proc.memory_info().rss)
    seconds = time.perf_counter() - start
    return {"what": f"pack rank {rank}/{world} ({stream.docs.split_mode} split)", "tokens": blocks * seq_len,
            "seconds": seconds, "tokens_per_s": blocks * seq_len / seconds, "rss_growth_mb": (peak - rss0) / 2**20}


def training(model_dir: str, tokenizer, seq_len: int, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = load_model(model_dir, device="cpu", dtype="float32")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    it = iter(PackedStream(DataConfig(seq_len=seq_len), tokenizer))

    def step() -> float:
        b = take(it, batch)
        loss = model(input_ids=b["input_ids"], labels=b["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: allocations, optimizer state
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    seconds = time.perf_counter() - start
    tokens = steps * batch * seq_len
    return {"what": f"train SmolLM2 full AdamW fp32, {batch}x{seq_len}/step", "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--pack-tokens", type=int, default=2_000_000)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(psutil.cpu_count(logical=False) or 2)

    model_dir = str(materialize("smollm2", REPO_ROOT / ".cache" / "models" / "smollm2-135m-instruct-hf"))
    tokenizer = load_tokenizer(model_dir)
    rows = [packing(tokenizer, args.seq_len, args.pack_tokens, 0, 1),
            packing(tokenizer, args.seq_len, args.pack_tokens, 0, 3),
            training(model_dir, tokenizer, args.seq_len, args.batch, args.train_steps)]
    train_tps = rows[-1]["tokens_per_s"]
    for r in rows[:2]:
        r["x_training"] = r["tokens_per_s"] / train_tps
    print(f"\n| what | tokens | seconds | tokens/s | × training | RSS growth MB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r.get('x_training', 1):,.0f} | {r.get('rss_growth_mb', float('nan')):.1f} |")
    worst = min(r["x_training"] for r in rows[:2])
    print(f"\npacking / training (worst case): {worst:,.0f}x  (goal >= 20x: {'met' if worst >= 20 else 'NOT met'})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "data_packing.json"
    out.write_text(json.dumps({"rows": rows, "goal_x": 20, "worst_x": worst, "args": vars(args),
                               "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                                           "torch": torch.__version__}}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
