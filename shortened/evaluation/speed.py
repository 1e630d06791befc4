"""Generation speed: latency and throughput by batch size × output length, with each model's own memory.

As in the paper: a short fixed prompt, a forced output length (EOS suppressed until the length is reached),
greedy decoding with the KV cache, warm-up runs discarded. Several models are compared in one run by alternating
their runs, so drift in the machine's speed hits them alike.

Memory is reported per model, never as a figure of the whole device (the sweep's speed stage holds the dense and the
pruned model on one GPU at once, so the device's peak would count both and hide what pruning saves). Each row has,
all in MiB (2**20 bytes):

* ``model_memory_mb``: the model's own parameters and buffers, exact from the tensors (``numel × element_size``,
  each tensor once, tied weights once) — what holding the weights costs, on any device;
* ``generation_peak_mb``: the generation's working memory — KV cache, activations, logits — as the peak rise over
  the memory in use when the run starts (the largest over the measured runs). On a GPU from CUDA's allocator
  (``max_memory_allocated`` minus ``memory_allocated`` at the start, after ``reset_peak_memory_stats``); on a CPU
  from the process RSS (sampled every 5 ms), with freed heap memory handed back to the OS before each run
  (glibc ``malloc_trim``) so that memory freed by an earlier run is not reused unseen. ``memory_kind`` says which
  (``cuda_max_allocated`` or ``process_rss``); the RSS figure is coarser (page granularity, sampling);
* ``peak_memory_mb``: their sum — the peak of that model alone, serving that batch: weights plus that generation's
  working memory;
* ``device_peak_mb``: the raw peak of the whole device (CUDA max allocated) or process (RSS) during the runs:
  every model loaded counts, so it is not a per-model figure; kept to reconcile with outside tools.

The results store (:func:`shortened.evaluation.metric_rows`) gets ``model_memory_mb`` (protocol
``params+buffers``), ``generation_peak_mb`` (protocol: the ``memory_kind``) and ``peak_memory_mb`` (protocol
``params+buffers+<memory_kind>``), with ``latency_s``, ``tokens_per_s`` and ``speedup_vs_baseline``.
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


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's own tensors hold: every parameter and buffer once (tied weights once), ``numel ×
    element_size``, exact on any device. Meta tensors (no storage) count 0."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values() if t.device.type != "meta")


_MALLOC_TRIM = None  # glibc's malloc_trim, looked up once (False where there is none)


def _release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so that an RSS rise is memory the next run
    itself takes, not memory an earlier run freed and the allocator kept; a no-op without glibc."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes
            import ctypes.util

            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError, TypeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that gets, in MiB, the peak memory of the device (CUDA) or process (CPU RSS) inside the block
    (``mb``: everything loaded counts) and its rise over the start (``delta_mb``: the block's own working memory),
    with ``kind`` (``cuda_max_allocated`` or ``process_rss``)."""
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        peak_bytes = torch.cuda.max_memory_allocated(device)
        result.update(mb=peak_bytes / 2**20, delta_mb=max(0, peak_bytes - before) / 2**20, kind="cuda_max_allocated")
        return
    _release_free_heap()
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
    """One row per (model, batch size, output length): median latency (s), throughput (tokens/s), and that model's
    own memory in MiB (``model_memory_mb``, ``generation_peak_mb``, ``peak_memory_mb``: see the module docstring);
    the first model is the baseline and every row carries its speedup over it.

    Raises :class:`ShortenedError` for ``repeats < 1`` or ``warmup < 0``, or when a generation does not make the
    forced number of tokens."""
    if repeats < 1 or warmup < 0:
        raise ShortenedError(f"repeats must be >= 1 and warmup >= 0, got {repeats}/{warmup}")
    rows = []
    total = len(batch_sizes) * len(new_tokens) * (repeats + warmup) * len(models)
    with tqdm(total=total, desc="speed", disable=not progress, unit="run") as bar:
        for bs in batch_sizes:
            for n in new_tokens:
                times: dict[str, list[float]] = {name: [] for name in models}
                mem: dict[str, dict] = {}  # the largest device peak and rise over the measured runs
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
                for name, (model, _) in models.items():
                    latency = statistics.median(times[name])
                    weights = model_memory_bytes(model) / 2**20
                    rows.append({"model": name, "batch_size": bs, "new_tokens": n, "prompt_tokens":
                                 int(inputs[name].shape[1]), "latency_s": latency, "latency_runs_s": times[name],
                                 "tokens_per_s": bs * n / latency, "model_memory_mb": weights,
                                 "generation_peak_mb": mem[name]["delta_mb"],
                                 "peak_memory_mb": weights + mem[name]["delta_mb"], "memory_kind": mem[name]["kind"],
                                 "device_peak_mb": mem[name]["mb"], "speedup_vs_baseline": base / latency})
    return rows


def speed_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`compare_speed` rows; memory columns in MiB, of each model alone."""
    lines = ["| model | batch | new tokens | latency s | tokens/s | speedup | peak MiB (model alone) | weights MiB | "
             "generation MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['new_tokens']} | {r['latency_s']:.3f} | "
                     f"{r['tokens_per_s']:.1f} | {r['speedup_vs_baseline']:.3f} | {r['peak_memory_mb']:.0f} | "
                     f"{r['model_memory_mb']:.0f} | {r['generation_peak_mb']:.0f} |")
    return "\n".join(lines)
