"""Turn one record into training tokens: plain text, or an Alpaca instruction with its prompt masked out.

Every document ends with EOS, so packed blocks keep documents apart. Labels equal the input ids (the model
shifts them) except where :data:`IGNORE_INDEX` masks a prompt out of the loss.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

from shortened.data.config import DataConfig

IGNORE_INDEX = -100
_SURROGATE = re.compile("[\ud800-\udfff]")

# The Stanford Alpaca template, as LLM-Pruner and Shortened-LLaMA use it for LoRA.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")


def record_problem(record: dict, cfg: DataConfig) -> str | None:
    """Why a record cannot be used (counted as a bad line), or None.

    The fields the format tokenizes must be strings of valid Unicode: a lone UTF-16 surrogate (JSON's
    ``"\\ud83d"`` without its pair) cannot be encoded to UTF-8, so the tokenizer would fail on it.
    """
    if cfg.format == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                return f"no string {key!r} (Alpaca records need instruction, output and optionally input)"
        if not isinstance(record.get("input", ""), str):
            return "'input' is not a string"
        fields: tuple[str, ...] = ("instruction", "input", "output")
    else:
        if not isinstance(record.get(cfg.text_field), str):
            return f"no string {cfg.text_field!r} field"
        fields = (cfg.text_field,)
    for key in fields:
        if _SURROGATE.search(record.get(key, "")):
            return f"invalid Unicode (a lone UTF-16 surrogate in {key!r})"
    return None


def is_empty(record: dict, cfg: DataConfig) -> bool:
    return cfg.format == "text" and not record[cfg.text_field]


def alpaca_prompt(record: dict) -> str:
    template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def encode(record: dict, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one document, EOS appended."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if cfg.format == "alpaca":
        prompt = tokenizer(alpaca_prompt(record), add_special_tokens=False)["input_ids"]
        answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + eos
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
    ids = tokenizer(record[cfg.text_field], add_special_tokens=False)["input_ids"] + eos
    return ids, ids
