"""The GPU check: every GPU path of the library, in one process, in minutes. Run it when a GPU is lent.

What runs (each row: seconds, tokens/s, peak GPU memory, pass/fail):

- ``score-ppl``, ``score-taylor``: block scores of the dense model (the paper's PPL and Taylor+ criteria);
- ``prune``: remove blocks for the ratio and save the pruned checkpoint (dtype checked);
- ``cpt-zero2``, ``cpt-zero3``: the real training loop (:func:`shortened.training.loop.run` under a
  :class:`~shortened.training.session.LocalSession`, no Ray) with DeepSpeed ZeRO-2 and ZeRO-3 in bf16; on a GPU
  its collectives go through NCCL;
- ``lora``, ``distill``: the LoRA and distillation phases of the same loop;
- ``perplexity``, ``zeroshot``: the evaluation paths (zero-shot on a small limit, skipped when lm-eval is not
  installed);
- ``speed``: generation speed of the pruned model against the dense one.

The models are built here from configs, with random weights: ``llama-1b`` (Llama-3.2-1B proportions: hidden 2048,
16 blocks, GQA 32/8, vocabulary 128256) and ``smollm2`` (SmolLM2-135M's shape, 30 blocks), or ``tiny`` on the CPU.
The text is the shared SlimPajama sample when it is present, else generated; the tokenizer is a byte-level BPE
trained on it in a second. Nothing is read from a hub.

    python benchmarks/gpu_check.py                       # on the GPU: llama-1b + smollm2, ~6 minutes on an H200
    python benchmarks/gpu_check.py --device cpu --size tiny   # the reduced form `make test` runs

The table goes to stdout, and as JSON to ``--out`` (default ``$OUT`` when set, else ``benchmarks/results``).
Exit status 1 when any row failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks_support import print_table  # noqa: E402

SIZES = {
    # Llama-3.2-1B's proportions (1.24 B parameters)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                     tie_word_embeddings=True),
    # SmolLM2-135M's shape
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024, tie_word_embeddings=True),
}
# (models, seq_len, calibration windows, training tokens per phase, speed new tokens, zero-shot limit) per size
PLANS = {
    "gpu": dict(models=["llama-1b", "smollm2"], seq_len=1024, calib=16, train_tokens=16 * 4 * 1024, micro_batch=4,
                new_tokens=128, zeroshot_limit=50, ppl_windows=32),
    "tiny": dict(models=["tiny"], seq_len=64, calib=4, train_tokens=4 * 2 * 64, micro_batch=2, new_tokens=8,
                 zeroshot_limit=4, ppl_windows=4),
}
CHECKS = ("score-ppl", "score-taylor", "prune", "cpt-zero2", "cpt-zero3", "lora", "distill", "perplexity",
          "zeroshot", "speed")
WORDS = ("the model block layer prune heal token data train loss shard node cluster memory speed ratio score "
         "paper result value depth width cache attention gradient weight sample text stream worker").split()


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """Documents with some structure (a Zipf-like word choice, repeated phrases), so that a model can learn."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(3, 12)):
            words = rng.choices(WORDS, weights, k=rng.randint(4, 14))
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def corpus(limit: int = 4000) -> tuple[list[str], str]:
    """Texts to train the tokenizer on and feed the loop: the shared SlimPajama sample when present."""
    from shortened.paths import shared_data_dir

    data = shared_data_dir()
    sample = data / "slimpajama-sample" / "train" if data is not None else None
    if sample is not None and sample.is_dir():
        from itertools import islice

        from shortened.data.stream import iter_texts

        texts = list(islice(iter_texts(str(sample)), limit))
        if texts:
            return texts, str(sample)
    return synthetic_docs(limit // 4), "generated"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on ``texts`` (≤ ``vocab_size`` tokens), wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=min(vocab_size, 4096), special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")


def build_model_dir(size: str, tokenizer, out: Path, dtype: torch.dtype) -> Path:
    """A random Llama of ``size``'s shape in ``dtype``, saved with the tokenizer under ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SIZES[size], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, initializer_range=0.02)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class Recorder:
    """Runs the checks one by one, timing each and taking the peak memory; a failure is a row, not an abort."""

    def __init__(self, device: torch.device):
        self.device, self.rows = device, []

    def __call__(self, name: str, model_name: str, fn: Callable[[], dict]) -> dict | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        row = {"check": name, "model": model_name}
        try:
            detail = fn() or {}
            row.update(status="pass", **{k: v for k, v in detail.items() if k != "skip"})
            if detail.get("skip"):
                row["status"] = "skipped"
                row["why"] = detail["skip"]
        except Exception as exc:  # noqa: BLE001 - each check is reported, the others still run
            row.update(status="fail", error=f"{type(exc).__name__}: {exc}"[:500])
            traceback.print_exc()
        row["seconds"] = time.perf_counter() - start
        if row.get("tokens_per_s") is None and row.get("tokens"):  # tokens this check pushed through the model
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # of the whole process
        self.rows.append(row)
        print(f"[gpu-check] {name} on {model_name}: {row['status']} in {row['seconds']:.1f}s", flush=True)
        return detail if row["status"] == "pass" else None


def training_config(phase_method: str, data_dir: Path, plan: dict, zero_stage: int, precision: str):
    from shortened.data import DataConfig
    from shortened.training.config import TrainConfig

    return TrainConfig(method=phase_method, data=DataConfig(source=str(data_dir), seq_len=plan["seq_len"]),
                       train_tokens=plan["train_tokens"], micro_batch_size=plan["micro_batch"], grad_accum=1,
                       zero_stage=zero_stage, precision=precision, report_every_steps=2, lr=3e-4, warmup_ratio=0.0)


def train_phase(method: str, model_dir: Path, out: Path, data_dir: Path, plan: dict, zero_stage: int,
                precision: str, teacher: Path | None = None) -> dict:
    from shortened.training.loop import Phase, run
    from shortened.training.session import LocalSession

    cfg = training_config(method, data_dir, plan, zero_stage, precision)
    history_dir = out.parent / f"{out.name}-run"
    metrics = run(Phase(method=method, model=str(model_dir), out=str(out), tokens=cfg.train_tokens, train=cfg,
                        teacher=str(teacher) if teacher else None), LocalSession(history_dir))
    record = json.loads((out / "retraining.json").read_text())
    history = record["history"]
    if not all(torch.isfinite(torch.tensor(h["loss"])) for h in history):
        raise RuntimeError(f"non-finite loss in {[h['loss'] for h in history]}")
    return {"tokens": record["tokens_trained"], "tokens_per_s": metrics.get("tokens_per_s"),
            "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"], "steps": record.get("phases", [{}])
            [-1].get("steps")}


def run_checks(args: argparse.Namespace) -> list[dict]:
    from shortened.device import resolve_device, resolve_dtype
    from shortened.criteria.ppl import perplexity
    from shortened.evaluation.speed import compare_speed
    from shortened.models import load_model
    from shortened.pruning import blocks_for_ratio, prune, save_pruned, score_blocks

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    plan = PLANS["tiny" if args.size == "tiny" else "gpu"]
    models = [args.size] if args.size not in ("gpu", "tiny") else plan["models"]
    only = set(args.only.split(",")) if args.only else set(CHECKS)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    record = Recorder(device)

    texts, text_source = corpus()
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "shard-000.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    tokenizer = train_tokenizer(texts, 4096)
    ids = torch.tensor(tokenizer("\n\n".join(texts[:400]), add_special_tokens=False).input_ids)
    seq = plan["seq_len"]
    windows = ids[: (ids.numel() // seq) * seq].view(-1, seq)
    calib, held_out = windows[: plan["calib"]], windows[plan["calib"]: plan["calib"] + plan["ppl_windows"]]
    print(f"[gpu-check] device {device}, dtype {dtype}, text {text_source}, {len(windows)} windows of {seq}",
          flush=True)

    for size in models:
        dense_dir = build_model_dir(size, tokenizer, work / f"{size}-dense", dtype)
        model = load_model(str(dense_dir), device=str(device), dtype=str(dtype).removeprefix("torch."))
        scores = {}
        for crit in ("ppl", "taylor"):
            if f"score-{crit}" not in only:
                continue

            def score(crit=crit):
                scores[crit] = score_blocks(model, crit, calib, batch_size=4, progress=False)
                # ppl: one forward over the calibration per scored block; taylor: one forward+backward in all
                passes = len(scores[crit].extra.get("allowed", scores[crit].scores)) if crit == "ppl" else 1
                return {"tokens": calib.numel() * passes, "scores": [round(v, 4) for v in scores[crit].scores]}

            record(f"score-{crit}", size, score)
        pruned_dir = work / f"{size}-pruned"

        def do_prune():
            s = scores.get("ppl") or score_blocks(model, "magnitude", None, progress=False)
            n = blocks_for_ratio(model, args.ratio)
            result = prune(model, s, n, ratio_requested=args.ratio)
            save_pruned(result, pruned_dir, tokenizer, overwrite=True)
            saved = json.loads((pruned_dir / "config.json").read_text())
            return {"removed": result.report["removed_blocks"], "ratio_actual": result.report["ratio_actual"],
                    "saved_dtype": saved.get("dtype") or saved.get("torch_dtype")}

        if "prune" in only or only & {"cpt-zero2", "cpt-zero3", "lora", "distill", "speed", "perplexity"}:
            record("prune", size, do_prune)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not (pruned_dir / "config.json").is_file():
            continue
        if size == models[0]:  # training and evaluation on the main model only, to fit the time
            for stage in (2, 3):
                if f"cpt-zero{stage}" in only:
                    record(f"cpt-zero{stage}", size, lambda stage=stage: train_phase(
                        "cpt", pruned_dir, work / f"{size}-cpt{stage}", data_dir, plan, stage, precision))
            if "lora" in only:
                record("lora", size, lambda: train_phase("lora", pruned_dir, work / f"{size}-lora", data_dir, plan,
                                                         2, precision))
            if "distill" in only:
                record("distill", size, lambda: train_phase("distill", pruned_dir, work / f"{size}-distill",
                                                            data_dir, plan, 2, precision, teacher=dense_dir))
        pruned = load_model(str(pruned_dir), device=str(device), dtype=str(dtype).removeprefix("torch."))
        if "perplexity" in only:
            def ppl():
                value = perplexity(pruned, held_out, batch_size=4, progress=False)
                if not value == value or value <= 1:
                    raise RuntimeError(f"perplexity {value}")
                return {"tokens": held_out.numel(), "ppl": value}

            record("perplexity", size, ppl)
        if "zeroshot" in only and size == models[0]:
            record("zeroshot", size, lambda: zeroshot(pruned, tokenizer, plan["zeroshot_limit"]))
        if "speed" in only:
            def speed():
                dense = load_model(str(dense_dir), device=str(device), dtype=str(dtype).removeprefix("torch."))
                rows = compare_speed({"dense": (dense, tokenizer), "pruned": (pruned, tokenizer)},
                                     new_tokens=[plan["new_tokens"]], repeats=2, warmup=1, progress=False)
                by = {r["model"]: r for r in rows}
                return {"tokens_per_s": by["pruned"]["tokens_per_s"],
                        "speedup": by["pruned"]["speedup_vs_baseline"],
                        "memory": {m: {k: v for k, v in r.items() if "memory" in k or k.endswith("_mb")}
                                   for m, r in by.items()}}

            record("speed", size, speed)
        del pruned
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return record.rows


def zeroshot(model, tokenizer, limit: int) -> dict:
    """The zero-shot path on a small limit: lm-eval on the local task files (skipped without lm-eval or data)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return {"skip": "lm-eval is not installed here"}
    from shortened.evaluation.zeroshot import evaluate_zeroshot
    from shortened.paths import shared_data_dir

    if shared_data_dir() is None:
        return {"skip": "no shared data folder (SHORTENED_DATA_DIR) with the zero-shot task files"}
    out = evaluate_zeroshot(model, tokenizer, ["arc_easy", "boolq"], limit=limit, batch_size=8)
    items = sum(r["items"] for r in out["tasks"])
    return {"tokens": None, "items": items, "mean": out["mean"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cpu")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float32")
    ap.add_argument("--size", default="gpu", choices=["gpu", "tiny", *SIZES],
                    help="gpu: llama-1b then smollm2; tiny: the CPU form; or one model shape")
    ap.add_argument("--ratio", type=float, default=0.2, help="pruning ratio (share of parameters)")
    ap.add_argument("--only", help=f"comma-separated checks out of {','.join(CHECKS)}")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args(argv)
    if args.only and (bad := set(args.only.split(",")) - set(CHECKS)):
        ap.error(f"--only: unknown check(s) {sorted(bad)}; choose from {', '.join(CHECKS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    rows = run_checks(args)
    total = time.perf_counter() - start
    mem = "peak_gpu_mb" if any("peak_gpu_mb" in r for r in rows) else "peak_rss_mb"
    print_table(["check", "model", "status", "seconds", "tokens/s", mem.replace("_", " "), "note"],
                [[r["check"], r["model"], r["status"], f"{r['seconds']:.1f}",
                  f"{r['tokens_per_s']:.0f}" if isinstance(r.get("tokens_per_s"), (int, float)) else "",
                  f"{r.get(mem, 0):.0f}", (r.get("error") or r.get("why") or "")[:80]] for r in rows])
    print(f"total {total:.0f}s")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    (out / "gpu_check.json").write_text(json.dumps(
        {"rows": rows, "seconds_total": total, "device": args.device, "cuda_device": cuda, "size": args.size,
         "torch": torch.__version__, "python": platform.python_version(),
         "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None}, indent=2, default=str))
    return 1 if any(r["status"] == "fail" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
