"""Judge a model three ways: perplexity (paper/gptq protocols), the seven zero-shot tasks (lm-eval), and
generation speed. :func:`evaluate` runs what an :class:`EvalConfig` asks on a model in memory and returns one
JSON-able dict with everything needed to reproduce each number; ``shortened eval`` is its command line."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shortened.evaluation.perplexity import PPL_DATASETS, PROTOCOL_SEQ_LEN, evaluate_ppl
from shortened.evaluation.zeroshot import TASKS, evaluate_zeroshot, parse_tasks, resolve_batch_size


class EvalConfig(BaseModel):
    """What to evaluate: perplexity datasets, zero-shot tasks, generation speed."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    ppl: list[str] = Field(default_factory=lambda: ["wikitext2", "ptb"])
    """Perplexity datasets: wikitext2, ptb, ptb_valid, c4."""
    ppl_protocol: Literal["paper", "gptq"] = "paper"
    """paper: 128-token windows; gptq: 2048."""
    ppl_seq_len: int | None = Field(None, ge=2)
    """Perplexity window length (None: the protocol's, 128 paper or 2048 gptq)."""
    ppl_bos: Literal["auto", "first", "every", "none"] = "auto"
    """BOS on the first window only (auto: if the tokenizer adds one), on every window, or none."""
    ppl_max_windows: int | None = Field(None, ge=1)
    """Evaluate only the first N perplexity windows (quick runs)."""
    ppl_source: Literal["auto", "local", "hub"] = "auto"
    """Where the perplexity texts come from: the offline files in ../shared/data, the hub, or auto (the files
    when present, else the hub)."""
    tasks: list[str] = Field(default_factory=list)
    """Zero-shot tasks, or all: boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa."""
    tasks_source: Literal["local", "hub"] = "local"
    """local files in ../shared/data (offline) or lm-eval's hub tasks."""
    limit: int | None = Field(None, ge=1)
    """Zero-shot items per task (quick runs; None: the full splits)."""
    speed: bool = False
    """Measure generation latency/throughput and peak memory."""
    speed_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1], min_length=1)
    """Batch sizes of the speed runs (paper: 1, ..., 256)."""
    speed_new_tokens: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [128], min_length=1)
    """Forced output lengths of the speed runs (paper: 128, 512)."""
    speed_repeats: int = Field(3, ge=1)
    """Timed repeats of each speed run."""
    speed_warmup: int = Field(1, ge=0)
    """Untimed warm-up runs before them."""
    batch_size: int = Field(8, ge=1)
    """Perplexity windows per forward (and zero-shot sequences on a CPU, by default)."""
    zeroshot_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    """Zero-shot sequences per forward: a number, auto (lm-eval finds the largest that fits), or None: auto on a
    GPU, batch_size on a CPU."""
    zeroshot_cache: str | None = None
    """Folder for lm-eval's response cache (one file per model weights): an interrupted zero-shot run resumes
    where it stopped."""
    progress: bool = True
    """Progress bars."""

    @field_validator("ppl")
    @classmethod
    def _known_ppl(cls, v: list[str]) -> list[str]:
        unknown = [d for d in v if d not in PPL_DATASETS]
        if unknown:
            raise ValueError(f"unknown perplexity dataset(s) {unknown}; choose from {', '.join(PPL_DATASETS)}")
        return v

    @field_validator("zeroshot_cache")
    @classmethod
    def _cache_is_a_folder(cls, v: str | None) -> str | None:
        if v is not None and Path(v).exists() and not Path(v).is_dir():
            raise ValueError(f"{v} exists and is not a folder (the response cache is a folder of files)")
        return v

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        return parse_tasks(v) if v else v


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig,
             baseline: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None) -> dict:
    """Perplexity rows, zero-shot rows and mean, and speed rows (vs ``baseline`` when given) for one model."""
    import lm_eval
    import torch
    import transformers

    from shortened.blocks import num_layers
    from shortened.evaluation.speed import PROMPT, compare_speed
    from shortened.models import attn_used, check_positions, count_params

    # Lengths the model cannot take fail here, before any work (past its positions a forward is garbage or hours).
    if cfg.ppl:
        seq_len = cfg.ppl_seq_len or PROTOCOL_SEQ_LEN[cfg.ppl_protocol]
        check_positions(model, seq_len, "--ppl-seq-len" if cfg.ppl_seq_len else
                        f"--ppl-protocol {cfg.ppl_protocol} ({seq_len}-token windows)")
    if cfg.speed:
        for name, (m, tok) in {"model": (model, tokenizer), **({"baseline": baseline} if baseline else {})}.items():
            prompt = len(tok(PROMPT, add_special_tokens=False).input_ids)
            longest = prompt + max(cfg.speed_new_tokens)
            check_positions(m, longest, f"--speed-new-tokens {max(cfg.speed_new_tokens)} (after the {prompt}-token "
                                        f"prompt, on the {name})")

    start = time.perf_counter()
    result: dict = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "config": cfg.model_dump(),
                    "model_info": {"params": count_params(model), "blocks": num_layers(model.config),
                                   "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
                                   "attn_implementation": attn_used(model)},
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "lm_eval": lm_eval.__version__}}
    result["ppl"] = [evaluate_ppl(model, tokenizer, d, protocol=cfg.ppl_protocol, seq_len=cfg.ppl_seq_len,
                                  bos=cfg.ppl_bos, batch_size=cfg.batch_size, max_windows=cfg.ppl_max_windows,
                                  source=cfg.ppl_source, progress=cfg.progress) for d in cfg.ppl]
    if cfg.tasks:
        result["zeroshot"] = evaluate_zeroshot(model, tokenizer, cfg.tasks, limit=cfg.limit,
                                               batch_size=resolve_batch_size(cfg.zeroshot_batch_size, model.device,
                                                                             cfg.batch_size),
                                               source=cfg.tasks_source,
                                               cache_dir=cfg.zeroshot_cache)
    if cfg.speed:
        models = {"model": (model, tokenizer)}
        if baseline is not None:
            models = {"baseline": baseline, **models}
        result["speed"] = compare_speed(models, batch_sizes=cfg.speed_batch_sizes, new_tokens=cfg.speed_new_tokens,
                                        repeats=cfg.speed_repeats, warmup=cfg.speed_warmup, progress=cfg.progress)
    result["seconds"] = time.perf_counter() - start
    return result


def metric_rows(result: dict) -> list[dict]:
    """Flat ``{name, dataset, value, protocol}`` rows of an :func:`evaluate` result (for tables and the store).

    Speed rows give ``latency_s``, ``tokens_per_s``, ``speedup_vs_baseline`` and the model's own memory in MiB:
    ``model_memory_mb`` (weights), ``generation_peak_mb`` (working memory) and ``peak_memory_mb`` (their sum); see
    :mod:`shortened.evaluation.speed`. Speed rows saved before these existed (whose ``peak_memory_mb`` counted every
    model on the device) give no memory rows."""
    rows = [{"name": "ppl", "dataset": r["dataset"], "value": r["value"], "protocol": f"{r['protocol']}-{r['seq_len']}"}
            for r in result.get("ppl", [])]
    zs = result.get("zeroshot")
    if zs:
        protocol = f"lm-eval-{zs['lm_eval_version']}" + (f"-limit{zs['limit']}" if zs["limit"] else "")
        rows += [{"name": r["metric"], "dataset": r["task"], "value": r["value"], "protocol": protocol}
                 for r in zs["tasks"]]
        rows.append({"name": "zeroshot_mean", "dataset": "+".join(r["task"] for r in zs["tasks"]),
                     "value": zs["mean"], "protocol": protocol})
    for r in result.get("speed", []):
        if r["model"] != "baseline":
            dataset = f"gen-b{r['batch_size']}-n{r['new_tokens']}"
            rows += [{"name": name, "dataset": dataset, "value": r[name], "protocol": "greedy"}
                     for name in ("latency_s", "tokens_per_s", "speedup_vs_baseline")]
            if "model_memory_mb" in r:  # memory of this model alone (rows written before it carried both models)
                kind = r["memory_kind"]
                rows += [{"name": name, "dataset": dataset, "value": r[name], "protocol": protocol}
                         for name, protocol in (("model_memory_mb", "params+buffers"), ("generation_peak_mb", kind),
                                                ("peak_memory_mb", f"params+buffers+{kind}"))]
    return rows


__all__ = ["EvalConfig", "PROTOCOL_SEQ_LEN", "TASKS", "evaluate", "metric_rows"]
