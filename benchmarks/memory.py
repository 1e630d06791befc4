"""Benchmark: host memory per Ray Train worker, and how it scales down with workers under ZeRO-3.

The model of issue 19: a random Llama (hidden 1024, 16 blocks, MLP 4096, 16 heads / 4 KV heads, tied embeddings,
SmolLM2's tokenizer and vocabulary; ~294M parameters, one fp32 copy 1.17 GB), saved to a temporary folder. Each
configuration is a CPT retraining through the real ``retrain`` (Ray Train workers, DeepSpeed, fp32 or bf16 on CPU, a few
steps of short sequences, a checkpoint and the export at the end); a worker's peak resident memory is its
process's ``getrusage`` maximum, which every rank reports into ``retraining.json`` (``peak_rss_mb``). Beside it:
the analytical model-state footprint (16 bytes x parameters / workers: mixed precision's 16-bit weights and
gradients with fp32 master weights and AdamW's two fp32 moments, the ZeRO paper's 2 + 2 + 12 bytes) and an idle
worker's peak (a Ray Train worker that imports the same libraries and does nothing). The default precision is
bf16, the one that footprint describes; ``--precision fp32`` trains in fp32, where DeepSpeed keeps 20 bytes per
parameter (its fp32 master copy beside the fp32 weights), writing ``memory-fp32.json``.

Goal: ZeRO-3 with 2 workers <= 0.6 x ZeRO-3 with 1 worker, and <= 1.5 x (footprint + idle worker).

    python benchmarks/memory.py [--steps 3] [--seq-len 128] [--configs zero3-1,zero3-2,zero0-1] [--precision fp32]

Runs one configuration at a time (the 2-worker run holds two workers at once); about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import torch

from shortened.paths import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"
CACHE = REPO_ROOT / ".cache" / "models"
GIB = 2**30
ARCH = dict(hidden_size=1024, num_hidden_layers=16, intermediate_size=4096, num_attention_heads=16,
            num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=2048)


def build_model(folder: Path) -> int:
    """The issue's Llama, randomly initialised (seed 0), saved in fp32 with SmolLM2's tokenizer; its parameter
    count (tied embeddings once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shortened.models import count_params, load_tokenizer, materialize

    tokenizer = load_tokenizer(str(materialize("smollm2", CACHE / "smollm2-135m-instruct-hf")))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **ARCH)
    model = LlamaForCausalLM(config)
    n = count_params(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return n


def idle_worker(config: dict) -> None:
    """Ray Train's loop for the idle baseline: import what a training worker imports, then write the peak to
    ``config["out"]`` (Ray Train keeps only metrics reported with a checkpoint)."""
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import shortened.training.loop  # noqa: F401

    Path(config["out"]).write_text(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def idle_rss_mb(work: Path) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = work / "idle.json"
    TorchTrainer(idle_worker, train_loop_config={"out": str(out)}, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name=f"idle-{int(time.time())}", storage_path=str(work / "storage"))).fit()
    return json.loads(out.read_text())


def retrain_peaks(model_dir: Path, work: Path, zero_stage: int, workers: int, steps: int, seq_len: int,
                  precision: str = "bf16") -> dict:
    """One CPT retraining; every worker's peak RSS (MiB) and the wall time."""
    from shortened.cluster import ScaleConfig
    from shortened.data import DataConfig
    from shortened.training.config import TrainConfig
    from shortened.training.retrain import retrain

    cfg = TrainConfig(method="cpt", zero_stage=zero_stage, micro_batch_size=1, data=DataConfig(seq_len=seq_len),
                      precision=precision,
                      train_tokens=steps * seq_len * workers, report_every_steps=steps, checkpoint_every_tokens=None,
                      keep_checkpoints=1)
    name = f"zero{zero_stage}-{workers}"
    out = work / f"out-{name}"
    start = time.perf_counter()
    retrain(str(model_dir), str(out), cfg, scale=ScaleConfig(num_workers=workers, cpus_per_worker=1),
            storage_path=str(work / "storage"), name=f"{name}-{int(time.time())}")
    seconds = time.perf_counter() - start
    record = json.loads((out / "retraining.json").read_text())
    shutil.rmtree(out)
    shutil.rmtree(work / "storage", ignore_errors=True)  # the checkpoints: GBs each
    phase = record["phases"][-1]
    return {"peak_rss_mb": phase["peak_rss_mb"], "seconds": seconds, "steps": phase["steps"],
            "tokens": phase["tokens_trained"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--configs", default="zero3-1,zero3-2,zero0-1", help="zeroSTAGE-WORKERS, comma-separated")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                    help="training precision (bf16: 16-bit weights and gradients with fp32 master weights and AdamW "
                         "state, the 16 bytes per parameter of the footprint; fp32: DeepSpeed keeps 20)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    ray.init(num_cpus=psutil.cpu_count() + 1, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    try:
        params = build_model(work / "model")
        idle = idle_rss_mb(work)
        runs = {}
        for spec in args.configs.split(","):
            stage, workers = (int(x) for x in spec.removeprefix("zero").split("-"))
            runs[spec] = {"zero_stage": stage, "workers": workers,
                          **retrain_peaks(work / "model", work, stage, workers, args.steps, args.seq_len,
                                          args.precision)}
            print(f"{spec}: peak RSS per worker {[round(m / 1024, 2) for m in runs[spec]['peak_rss_mb']]} GiB "
                  f"({runs[spec]['seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()

    rows, table = [], []
    for spec, r in runs.items():
        footprint = 16 * params / r["workers"] / GIB
        peak = max(r["peak_rss_mb"]) / 1024
        r.update(peak_gib=peak, footprint_gib=footprint, idle_gib=idle / 1024,
                 peak_over_footprint_plus_idle=peak / (footprint + idle / 1024))
        rows.append(r)
        table.append([f"ZeRO-{r['zero_stage']}", str(r["workers"]), " / ".join(f"{m / 1024:.2f}" for m in
                                                                              r["peak_rss_mb"]),
                      f"{footprint:.2f}", f"{idle / 1024:.2f}", f"{r['peak_over_footprint_plus_idle']:.2f}",
                      f"{r['seconds']:.0f}"])
    from benchmarks_support import print_table

    print(f"\n{params / 1e6:.1f}M parameters; CPT, {args.steps} steps of 1 x {args.seq_len} tokens per worker, "
          f"{args.precision} on CPU, checkpoint and export at the end\n")
    print_table(["ZeRO", "workers", "peak RSS per worker (GiB)", "footprint 16 B x params / workers (GiB)",
                 "idle worker (GiB)", "peak / (footprint + idle)", "seconds"], table)
    goals = {}
    if "zero3-1" in runs and "zero3-2" in runs:
        one, two = runs["zero3-1"], runs["zero3-2"]
        goals = {"two_over_one": two["peak_gib"] / one["peak_gib"],
                 "two_over_footprint_plus_idle": two["peak_over_footprint_plus_idle"]}
        goals["met"] = goals["two_over_one"] <= 0.6 and goals["two_over_footprint_plus_idle"] <= 1.5
        print(f"\nZeRO-3, 2 workers / 1 worker: {goals['two_over_one']:.2f} (goal <= 0.6); 2 workers / (footprint + "
              f"idle): {goals['two_over_footprint_plus_idle']:.2f} (goal <= 1.5): "
              f"{'met' if goals['met'] else 'NOT met'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("memory.json" if args.precision == "bf16" else f"memory-{args.precision}.json")
    out.write_text(json.dumps({"params": params, "arch": ARCH, "idle_worker_mb": idle, "runs": rows, "goals": goals,
                               "args": vars(args), "machine": {"cpus": psutil.cpu_count(),
                                                               "memory_gib": psutil.virtual_memory().total / GIB,
                                                               "python": platform.python_version(),
                                                               "torch": torch.__version__}}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
