"""Benchmark: how long training stands still for a checkpoint, synchronous against asynchronous upload (issue 19 §4).

The model of issue 19: a Llama with hidden 1024, 16 blocks, MLP 4096, 16 heads / 4 KV heads, tied embeddings and
SmolLM2's tokenizer (294M parameters), random init, made once under ``.cache/models``. One Ray Train worker runs CPT
(DeepSpeed ZeRO-2, fp32 on CPU) for ``--steps`` steps with a checkpoint every ``--every`` steps, once with
``checkpoint_upload: sync`` (every worker waits while Ray Train copies the staged shards to the storage path) and
once with ``async`` (the default: Ray Train uploads them in a background thread). The stall of a checkpoint is the
time the training loop spends in it (:func:`shortened.training.checkpoint.save_checkpoint`: the space check,
DeepSpeed writing the shards to the local staging folder, the report, and in sync mode the upload), recorded per
checkpoint as ``checkpoint_stall_s`` in ``retraining.json``'s history. The storage path is a local folder here, so
the upload is a local copy; to object storage (``s3://``) the sync stall grows with the upload, the async one does
not.

    python benchmarks/checkpoints.py [--steps 6] [--every 2] [--seq-len 128] [--size 294m|tiny]

Prints a table and writes ``benchmarks/results/checkpoints.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import psutil
from benchmarks_support import CACHE, RESULTS, print_table

from shortened.data import DataConfig
from shortened.models import load_tokenizer, materialize
from shortened.paths import REPO_ROOT
from shortened.training.config import TrainConfig
from shortened.training.retrain import ScaleConfig, retrain

SIZES = {  # issue 19's 294M model, and a tiny one to try the script quickly
    "294m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
RUNS = REPO_ROOT / ".cache" / "bench-checkpoints"


def model_dir(size: str) -> Path:
    """The benchmark's random Llama with SmolLM2's tokenizer, saved once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = CACHE / f"llama-{size}-random"
    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(str(materialize("smollm2", REPO_ROOT / ".cache" / "tests" / "smollm2-135m-instruct-hf")))
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=2048,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SIZES[size])
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(model: Path, upload: str, args) -> dict:
    """One CPT run with ``upload``; returns its checkpoint stalls, wall time and a checkpoint's size."""
    cfg = TrainConfig(train_tokens=args.steps * args.seq_len, micro_batch_size=1, data=DataConfig(seq_len=args.seq_len),
                      warmup_ratio=0.0, report_every_steps=args.every, checkpoint_every_tokens=args.every * args.seq_len,
                      checkpoint_upload=upload, zero_stage=2, keep_checkpoints=1)
    name = f"{upload}-{int(time.time())}"
    out, storage = RUNS / name, RUNS / "storage"
    start = time.perf_counter()
    retrain(str(model), str(out), cfg, scale=ScaleConfig(num_workers=1, cpus_per_worker=psutil.cpu_count()),
            storage_path=str(storage), name=name, overwrite=True)
    wall = time.perf_counter() - start
    record = json.loads((out / "retraining.json").read_text())
    stalls = [h["checkpoint_stall_s"] for h in record["history"] if "checkpoint_stall_s" in h]
    ckpt = max(c for c in (storage / name).glob("checkpoint_*") if c.is_dir())  # (not the manager's snapshot file)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    shutil.rmtree(storage / name, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return {"upload": upload, "stalls_s": stalls, "stall_mean_s": statistics.mean(stalls), "stall_max_s": max(stalls),
            "wall_s": round(wall, 1), "checkpoint_bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--every", type=int, default=2, help="steps between checkpoints")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--size", choices=sorted(SIZES), default="294m")
    ap.add_argument("--out", default=str(RESULTS / "checkpoints.json"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    model = model_dir(args.size)
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    n_params = sum(f.stat().st_size for f in model.glob("*.safetensors")) // 4  # saved in fp32
    results = [run(model, upload, args) for upload in ("sync", "async")]
    rows = [[r["upload"], str(len(r["stalls_s"])), f"{r['stall_mean_s']:.2f}", f"{r['stall_max_s']:.2f}",
             ", ".join(f"{s:.2f}" for s in r["stalls_s"]), f"{r['checkpoint_bytes'] / 1e9:.2f}", f"{r['wall_s']:.0f}"]
            for r in results]
    print(f"\nmodel: Llama {args.size} ({n_params / 1e6:.0f}M parameters, hidden {c.hidden_size}, "
          f"{c.num_hidden_layers} blocks), 1 worker, ZeRO-2 fp32 on CPU, {args.steps} steps of {args.seq_len} tokens, "
          f"a checkpoint every {args.every} steps; storage: a local folder\n")
    print_table(["upload", "checkpoints", "stall mean (s)", "stall max (s)", "each (s)", "checkpoint (GB)",
                 "run wall (s)"], rows)
    sync, asyn = results
    print(f"\nasync/sync stall per checkpoint: {asyn['stall_mean_s'] / sync['stall_mean_s']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": {"size": args.size, "params": n_params, "hidden_size": c.hidden_size,
                  "num_hidden_layers": c.num_hidden_layers, "intermediate_size": c.intermediate_size},
        "setup": {"workers": 1, "zero_stage": 2, "precision": "fp32", "device": "cpu", "steps": args.steps,
                  "every": args.every, "seq_len": args.seq_len, "storage": "local folder",
                  "cpus": psutil.cpu_count(), "machine": platform.platform()},
        "results": results, "async_over_sync_stall": asyn["stall_mean_s"] / sync["stall_mean_s"]}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
