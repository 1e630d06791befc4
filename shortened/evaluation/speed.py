"""Generation speed: latency and throughput by batch size × output length, with peak memory.

As in the paper: a short fixed prompt, a forced output length (EOS suppressed until the length is reached),
greedy decoding with the KV cache, warm-up runs discarded. Peak memory is CUDA's max allocated on GPU and the
process RSS (sampled) on CPU. Several models are compared in one run by alternating their runs, so drift in
the machine's speed hits them alike.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager

import psutil
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shortened.errors import ShortenedError
from shortened.models import generation_pad_id

PROMPT = "The three most important things to know about"


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that gets the peak memory inside the block (``mb``) and its rise over the start
    (``delta_mb``: the generation's own working memory, as RSS also counts every model loaded)."""
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        peak_bytes = torch.cuda.max_memory_allocated(device)
        result.update(mb=peak_bytes / 2**20, delta_mb=(peak_bytes - before) / 2**20, kind="cuda_max_allocated")
        return
    proc, stop = psutil.Process(), threading.Event()
    before = proc.memory_info().rss
    peak = [before]

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        result.update(mb=peak[0] / 2**20, delta_mb=(peak[0] - before) / 2**20, kind="process_rss")


@torch.no_grad()
def generate_once(model: PreTrainedModel, input_ids: torch.Tensor, new_tokens: int,
                  pad_token_id: int | None = None) -> tuple[float, int]:
    """Seconds for one greedy generation of exactly ``new_tokens`` tokens per row, and the tokens made. Pads with
    ``pad_token_id`` (default: :func:`~shortened.models.generation_pad_id`, never a list of EOS ids)."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda *_: None)
    sync()
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=generation_pad_id(model) if pad_token_id is None else pad_token_id)
    sync()
    made = out.shape[1] - input_ids.shape[1]
    if made != new_tokens:
        raise ShortenedError(f"generation made {made} tokens, not the forced {new_tokens}")
    return time.perf_counter() - start, made * out.shape[0]


def compare_speed(models: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]], *,
                  batch_sizes: Sequence[int] = (1,), new_tokens: Sequence[int] = (128,), repeats: int = 3,
                  warmup: int = 1, prompt: str = PROMPT, progress: bool = True) -> list[dict]:
    """One row per (model, batch size, output length): median latency, throughput, peak memory; the first model
    is the baseline and every row carries its speedup over it."""
    if repeats < 1 or warmup < 0:
        raise ShortenedError(f"repeats must be >= 1 and warmup >= 0, got {repeats}/{warmup}")
    rows = []
    total = len(batch_sizes) * len(new_tokens) * (repeats + warmup) * len(models)
    with tqdm(total=total, desc="speed", disable=not progress, unit="run") as bar:
        for bs in batch_sizes:
            for n in new_tokens:
                times: dict[str, list[float]] = {name: [] for name in models}
                mem: dict[str, dict] = {}
                inputs = {}
                pads = {}
                for name, (model, tok) in models.items():
                    model.eval()
                    pads[name] = generation_pad_id(model, tok)
                    inputs[name] = tok([prompt] * bs, return_tensors="pt", add_special_tokens=False
                                       ).input_ids.to(model.device)
                for r in range(warmup + repeats):  # alternate models within each round
                    for name, (model, _) in models.items():
                        with peak_memory(model.device) as peak:
                            seconds, _ = generate_once(model, inputs[name], n, pads[name])
                        if r >= warmup:
                            times[name].append(seconds)
                            old = mem.get(name, {"mb": 0.0, "delta_mb": 0.0})
                            mem[name] = {"mb": max(peak["mb"], old["mb"]), "kind": peak["kind"],
                                         "delta_mb": max(peak["delta_mb"], old["delta_mb"])}
                        bar.update()
                base = statistics.median(times[next(iter(models))])
                for name in models:
                    latency = statistics.median(times[name])
                    rows.append({"model": name, "batch_size": bs, "new_tokens": n, "prompt_tokens":
                                 int(inputs[name].shape[1]), "latency_s": latency, "latency_runs_s": times[name],
                                 "tokens_per_s": bs * n / latency, "peak_memory_mb": mem[name]["mb"],
                                 "peak_memory_delta_mb": mem[name]["delta_mb"], "memory_kind": mem[name]["kind"], "speedup_vs_baseline": base / latency})
    return rows


def speed_table(rows: list[dict]) -> str:
    lines = ["| model | batch | new tokens | latency s | tokens/s | speedup | peak MB | of it, generation MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['new_tokens']} | {r['latency_s']:.3f} | "
                     f"{r['tokens_per_s']:.1f} | {r['speedup_vs_baseline']:.3f} | {r['peak_memory_mb']:.0f} | "
                     f"{r['peak_memory_delta_mb']:.0f} |")
    return "\n".join(lines)
