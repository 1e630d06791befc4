"""Perplexity on WikiText-2, PTB and C4 in two named protocols.

``paper`` (Shortened LLaMA / LLM-Pruner): the split's rows joined with ``"\\n\\n"``, tokenized once without
special tokens, cut into non-overlapping 128-token windows (the remainder dropped); BOS on the first window only
when the tokenizer adds one by itself (as ``tokenizer(text)`` does in the official code), or on every window
(``bos="every"``: BOS plus 127 text tokens, as the official code does for Gemma). ``gptq``: the same with
2048-token windows (C4: documents joined with a space, at most 256 windows, as GPTQ does).
The local files in ``../shared/data`` are read by default; the hub datasets when they are absent or asked for.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shortened.criteria.ppl import perplexity
from shortened.errors import ShortenedError
from shortened.models import eval_mode
from shortened.paths import shared_data_dir

Protocol = Literal["paper", "gptq"]
Bos = Literal["auto", "first", "every", "none"]
PROTOCOL_SEQ_LEN = {"paper": 128, "gptq": 2048}
C4_HUB_DOCS = 1100  # GPTQ's C4 validation slice


@dataclass(frozen=True)
class PplDataset:
    name: str
    split: str
    local: str  # path under the shared data folder
    hub: str  # what the hub loader reads, for the record
    read_local: Callable[[str], list[str]]
    read_hub: Callable[[], list[str]]


def _wikitext_rows(path: str) -> list[str]:
    """The rows of HF ``wikitext-2-raw-v1`` from the raw file: a line with its newline, '' for a blank line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line + "\n" if line.strip() else "" for line in lines]


def _ptb_rows(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f]


def _c4_rows(folder: str) -> list[str]:
    import glob

    rows = []
    for shard in sorted(glob.glob(f"{folder}/*.json.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            rows += [json.loads(line)["text"] for line in f if line.strip()]
    return rows


def _hub(path: str, name: str | None, split: str, field: str, **kw) -> Callable[[], list[str]]:
    def read() -> list[str]:
        import datasets

        try:
            return list(datasets.load_dataset(path, name, split=split, **kw)[field])
        except Exception as exc:  # noqa: BLE001
            raise ShortenedError(f"hub dataset {path}/{name} ({split}) could not be loaded: {exc}") from exc
    return read


PPL_DATASETS: dict[str, PplDataset] = {d.name: d for d in [
    PplDataset("wikitext2", "test", "wikitext2/wiki.test.raw", "wikitext/wikitext-2-raw-v1 test", _wikitext_rows,
               _hub("wikitext", "wikitext-2-raw-v1", "test", "text")),
    PplDataset("ptb", "test", "ptb/ptb.test.txt", "ptb_text_only test", _ptb_rows,
               _hub("ptb_text_only", "penn_treebank", "test", "sentence")),
    PplDataset("ptb_valid", "validation", "ptb/ptb.valid.txt", "ptb_text_only validation", _ptb_rows,
               _hub("ptb_text_only", "penn_treebank", "validation", "sentence")),
    PplDataset("c4", "validation", "c4", "allenai/c4 en validation shard 0", _c4_rows,
               lambda: _hub("allenai/c4", None, "validation", "text",
                            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"})()[:C4_HUB_DOCS]),
]}


def load_rows(dataset: str, source: Literal["auto", "local", "hub"] = "auto") -> tuple[list[str], str]:
    """The dataset's rows and where they came from (a local path or the hub name)."""
    if dataset not in PPL_DATASETS:
        raise ShortenedError(f"unknown perplexity dataset {dataset!r}; choose from {', '.join(PPL_DATASETS)}")
    d = PPL_DATASETS[dataset]
    data = shared_data_dir()
    local = data / d.local if data is not None else None
    if source != "hub" and local is not None and local.exists():
        return d.read_local(str(local)), str(local)
    if source == "local":
        raise ShortenedError(f"perplexity dataset {dataset!r}: local file {local or d.local} is missing "
                             "(set SHORTENED_DATA_DIR or use the hub)")
    return d.read_hub(), d.hub


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def ppl_windows(rows: list[str], tokenizer: PreTrainedTokenizerBase, *, dataset: str, protocol: Protocol = "paper",
                seq_len: int | None = None, bos: Bos = "auto") -> tuple[torch.Tensor, dict]:
    """Token windows ``[n, seq_len]`` of a protocol, and the facts to record next to the number."""
    if protocol not in PROTOCOL_SEQ_LEN:
        raise ShortenedError(f"unknown perplexity protocol {protocol!r}; choose from {', '.join(PROTOCOL_SEQ_LEN)}")
    seq_len = seq_len or PROTOCOL_SEQ_LEN[protocol]
    gptq_c4 = protocol == "gptq" and dataset == "c4"
    text = (" " if gptq_c4 else "\n\n").join(rows)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    resolved = ("first" if adds_bos(tokenizer) else "none") if bos == "auto" else bos
    if resolved != "none" and tokenizer.bos_token_id is None:
        raise ShortenedError(f"bos={bos!r} but the tokenizer has no BOS token")
    bos_id = torch.tensor([tokenizer.bos_token_id or 0])
    if resolved == "every":
        n = ids.numel() // (seq_len - 1)
        windows = torch.cat([bos_id.expand(n, 1), ids[:n * (seq_len - 1)].view(n, seq_len - 1)], dim=1)
    else:
        if resolved == "first":
            ids = torch.cat([bos_id, ids])
        n = ids.numel() // seq_len
        windows = ids[:n * seq_len].view(n, seq_len)
    if gptq_c4:
        windows = windows[:256]
    if len(windows) == 0:
        raise ShortenedError(f"{dataset}: {ids.numel()} tokens, not one {seq_len}-token window")
    return windows, {"protocol": protocol, "seq_len": seq_len, "bos": resolved, "text_tokens": int(ids.numel()),
                     "windows": int(len(windows)), "joined_with": " " if gptq_c4 else "\\n\\n"}


def evaluate_ppl(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: str, *,
                 protocol: Protocol = "paper", seq_len: int | None = None, bos: Bos = "auto", batch_size: int = 8,
                 max_windows: int | None = None, source: Literal["auto", "local", "hub"] = "auto",
                 progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``dataset``: one result row with everything needed to reproduce it."""
    rows, origin = load_rows(dataset, source)
    windows, facts = ppl_windows(rows, tokenizer, dataset=dataset, protocol=protocol, seq_len=seq_len, bos=bos)
    if max_windows is not None:
        windows = windows[:max_windows]
    start = time.perf_counter()
    with eval_mode(model):
        value = perplexity(model, windows, batch_size=batch_size, progress=progress, desc=f"ppl {dataset}")
    split = PPL_DATASETS[dataset].split
    return {"metric": "ppl", "dataset": dataset, "split": split, "value": value, "source": origin, **facts,
            "windows_evaluated": int(len(windows)), "tokens_evaluated": int(windows.numel()),
            "seconds": time.perf_counter() - start}
