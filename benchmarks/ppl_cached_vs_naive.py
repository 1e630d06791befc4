"""Benchmark: the ``ppl`` criterion on SmolLM2, cached (hidden states reused) vs naive (full forward per block).

Each method runs in a fresh process (so peak RSS is its own), alternating, on the same calibration set; the
scores must agree. Prints a table and writes JSON.

Both methods need one pass through the final norm and LM head per removed block, so the time ratio depends on
how heavy the head is next to a block. SmolLM2's head (49152 x 576) costs about 8 blocks' FLOPs; LLaMA-7B's
(32000 x 4096) about 0.65 of a block. Besides SmolLM2, the benchmark therefore also runs ``llama7b-shape``: a
random-init Llama with 32 blocks and LLaMA-7B's head/block proportion at 1/8 width (timing only; its scores are
meaningless but must still agree).

    python benchmarks/ppl_cached_vs_naive.py [--models smollm2,llama7b-shape] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from shortened.paths import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


LLAMA7B_SHAPE = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8,
                     num_hidden_layers=32, vocab_size=4000, max_position_embeddings=2048)


def prepare(name: str, samples: int, seq_len: int) -> tuple[str, torch.Tensor]:
    """A local HF folder for ``name`` and its calibration tokens."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from shortened.data.calibration import CalibrationConfig, calibration_windows
    from shortened.models import load_tokenizer, materialize

    cache = REPO_ROOT / ".cache" / "models"
    if name == "llama7b-shape":
        folder = cache / name
        if not (folder / "config.json").is_file():
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA7B_SHAPE)).save_pretrained(folder)
        calib = torch.randint(0, LLAMA7B_SHAPE["vocab_size"], (samples, seq_len),
                              generator=torch.Generator().manual_seed(0))
        return str(folder), calib
    folder = materialize(name, cache / name.replace("/", "--"))
    calib = calibration_windows(load_tokenizer(str(folder)), CalibrationConfig(n_samples=samples, seq_len=seq_len))
    return str(folder), calib


def _run(method: str, model_dir: str, calib: torch.Tensor, batch_size: int, queue) -> None:
    from shortened.blocks import block_param_counts
    from shortened.criteria.ppl import removal_nll, removal_nll_naive
    from shortened.models import load_model

    model = load_model(model_dir, device="cpu", dtype="float32")
    loaded_rss = _rss_mb()
    fn = removal_nll if method == "cached" else removal_nll_naive
    per_block = block_param_counts(model)
    blocks = list(range(len(per_block)))
    head = model.get_output_embeddings().weight.numel()
    start = time.perf_counter()
    nll = fn(model, calib, blocks, batch_size)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"method": method, "seconds": seconds, "peak_rss_mb": peak, "loaded_rss_mb": loaded_rss,
               "nll": [nll[i] for i in blocks], "head_in_blocks": head / (sum(per_block) / len(per_block))})


def measure(method: str, model_dir: str, calib: torch.Tensor, batch_size: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(method, model_dir, calib, batch_size, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bench_model(name: str, args: argparse.Namespace) -> dict:
    model_dir, calib = prepare(name, args.samples, args.seq_len)
    runs: dict[str, list[dict]] = {"cached": [], "naive": []}
    for r in range(args.repeats):
        for method in (("cached", "naive") if r % 2 == 0 else ("naive", "cached")):
            res = measure(method, model_dir, calib, args.batch_size)
            runs[method].append(res)
            print(f"  {name} run {r + 1} {method:6s} {res['seconds']:7.1f} s  peak RSS {res['peak_rss_mb']:.0f} MB",
                  flush=True)
    cached_nll, naive_nll = runs["cached"][0]["nll"], runs["naive"][0]["nll"]
    n = len(cached_nll)
    summary = {m: {"seconds_median": statistics.median(r["seconds"] for r in rs),
                   "seconds": [r["seconds"] for r in rs],
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                   "peak_above_loaded_mb": max(r["peak_rss_mb"] - r["loaded_rss_mb"] for r in rs)}
               for m, rs in runs.items()}
    return {"model": name, "blocks": n, "head_cost_in_blocks": runs["cached"][0]["head_in_blocks"],
            "block_forwards": {"cached": n * (n - 1) // 2, "naive": n * (n - 1)},
            "results": summary,
            "time_ratio_cached_over_naive": summary["cached"]["seconds_median"] / summary["naive"]["seconds_median"],
            "max_relative_nll_difference": max(abs(a - b) / abs(b) for a, b in zip(cached_nll, naive_nll))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,llama7b-shape")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS / "ppl_cached_vs_naive.json"))
    args = parser.parse_args()

    rows = [bench_model(name, args) for name in args.models.split(",")]
    report = {"benchmark": "ppl criterion: cached vs naive", "goal_ratio": 0.55,
              "calibration": {"samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size},
              "models": rows, "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                                          "torch": torch.__version__}}
    print(f"\nppl criterion, all blocks scored, calibration {args.samples}x{args.seq_len}, batch {args.batch_size}, "
          f"median of {args.repeats}")
    print("| model | blocks | head cost (blocks) | block fwd cached/naive | cached s | naive s | ratio | "
          "peak RSS cached/naive MB | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, nv = r["results"]["cached"], r["results"]["naive"]
        print(f"| {r['model']} | {r['blocks']} | {r['head_cost_in_blocks']:.2f} | "
              f"{r['block_forwards']['cached']}/{r['block_forwards']['naive']} | {c['seconds_median']:.1f} | "
              f"{nv['seconds_median']:.1f} | {r['time_ratio_cached_over_naive']:.3f} | "
              f"{c['peak_rss_mb']:.0f}/{nv['peak_rss_mb']:.0f} | {r['max_relative_nll_difference']:.1e} |")
    print("goal: ratio <= 0.55")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
