"""The paper's seven zero-shot tasks through lm-evaluation-harness, on a model object in memory.

Task definitions of our own read the local files in ``../shared/data/zeroshot`` (no network) and reproduce
lm-eval's standard prompts; with ``source="hub"`` lm-eval's own hub tasks run instead. The paper reports acc for
BoolQ, PIQA, WinoGrande and ARC-e, acc_norm for HellaSwag, ARC-c and OBQA, and the mean of the seven.
"""

from __future__ import annotations

import bz2
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shortened.errors import ShortenedError
from shortened.models import eval_mode
from shortened.paths import shared_data_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZeroShotTask:
    name: str
    metric: Literal["acc", "acc_norm"]  # the paper's metric for this task
    local: str  # file under the shared data folder
    hub_task: str  # lm-eval's registered task
    load: Callable[[Path], list[dict]]  # local file -> normalized docs
    chance: float  # accuracy of a random guess, for sanity checks


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _boolq(path: Path) -> list[dict]:
    docs = []
    for d in _jsonl(path):
        q = d["query"].removeprefix("Passage: ")
        docs.append({"query": q + ("" if q.endswith("?") else "?") + "\nAnswer:", "choices": d["choices"],
                     "gold": d["gold"]})
    return docs


def _arc(path: Path) -> list[dict]:
    return [{"query": d["query"] + "\nAnswer:", "choices": d["choices"], "gold": d["gold"]} for d in _jsonl(path)]


def _obqa(path: Path) -> list[dict]:
    return [{"query": d["query"], "choices": d["choices"], "gold": d["gold"]} for d in _jsonl(path)]


def _piqa(path: Path) -> list[dict]:
    labels = (path.parent / "valid-labels.lst").read_text().split()
    docs = _jsonl(path)
    if len(labels) != len(docs):
        raise ShortenedError(f"{path}: {len(docs)} items but {len(labels)} labels in valid-labels.lst")
    return [{"query": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]], "gold": int(y)}
            for d, y in zip(docs, labels)]


def _hellaswag(path: Path) -> list[dict]:
    """6 lines an item: query, gold index, 4 endings (lm-eval's clean-up already applied)."""
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    lines = lines[:len(lines) // 6 * 6]
    return [{"query": lines[i], "choices": lines[i + 2:i + 6], "gold": int(lines[i + 1])}
            for i in range(0, len(lines), 6)]


def _winogrande(path: Path) -> list[dict]:
    """Partial scoring, as lm-eval: the continuation is scored after each candidate context."""
    return [{"contexts": d["context_options"], "continuation": d["continuation"], "gold": d["gold"]}
            for d in _jsonl(path)]


TASKS: dict[str, ZeroShotTask] = {t.name: t for t in [
    ZeroShotTask("boolq", "acc", "zeroshot/gauntlet/boolq.jsonl", "boolq", _boolq, 0.5),
    ZeroShotTask("piqa", "acc", "zeroshot/piqa/valid.jsonl", "piqa", _piqa, 0.5),
    ZeroShotTask("hellaswag", "acc_norm", "zeroshot/hellaswag_val_full.txt.bz2", "hellaswag", _hellaswag, 0.25),
    ZeroShotTask("winogrande", "acc", "zeroshot/gauntlet/winogrande.jsonl", "winogrande", _winogrande, 0.5),
    ZeroShotTask("arc_easy", "acc", "zeroshot/gauntlet/arc_easy.jsonl", "arc_easy", _arc, 0.25),
    ZeroShotTask("arc_challenge", "acc_norm", "zeroshot/gauntlet/arc_challenge.jsonl", "arc_challenge", _arc, 0.25),
    ZeroShotTask("openbookqa", "acc_norm", "zeroshot/gauntlet/openbook_qa.jsonl", "openbookqa", _obqa, 0.25),
]}
PREFIX = "shortened_"


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ShortenedError(f"unknown zero-shot task(s) {unknown}; choose from {', '.join(TASKS)} or 'all'")
    return names


def load_docs(task: str) -> tuple[list[dict], Path]:
    t = TASKS[task]
    data = shared_data_dir()
    path = data / t.local if data is not None else Path(t.local)
    if not path.is_file():
        raise ShortenedError(f"zero-shot task {task!r}: local file {path} is missing (set SHORTENED_DATA_DIR or "
                             "use source='hub')")
    return t.load(path), path


def task_config(task: str) -> dict:
    """An lm-eval task config (a dict lm-eval builds a ConfigurableTask from) reading the local file."""
    docs, path = load_docs(task)

    def dataset(**_):
        import datasets

        return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})

    if task == "winogrande":
        texts = dict(doc_to_text=lambda d: d["gold"], doc_to_choice=lambda d: d["contexts"],
                     doc_to_target=lambda d: d["continuation"])
    else:
        texts = dict(doc_to_text=lambda d: d["query"], doc_to_choice=lambda d: d["choices"],
                     doc_to_target=lambda d: d["gold"])
    return {"task": PREFIX + task, "custom_dataset": dataset, "test_split": "test", "output_type": "multiple_choice",
            "num_fewshot": 0,
            **texts, "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                     for m in ("acc", "acc_norm")],
            "metadata": {"version": 1.0, "local_file": str(path)}}


def accuracy_stderr(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` over ``n`` items (the sample standard error lm-eval reports)."""
    return (p * (1 - p) / (n - 1)) ** 0.5 if n > 1 else 0.0


def mean_stderr(stderrs: Sequence[float]) -> float:
    """Standard error of the mean of independent task scores with these standard errors."""
    return sum(se ** 2 for se in stderrs) ** 0.5 / len(stderrs)


def above_chance(value: float, chance: float, n: int) -> bool:
    """Whether ``value`` beats guessing: more than 2 standard errors of a guesser's accuracy over ``n`` items above
    ``chance`` (a one-sided test at about 2%)."""
    return value - chance > 2 * (chance * (1 - chance) / n) ** 0.5


def weights_digest(model: PreTrainedModel) -> str:
    """A short hash of the parameters' names, dtypes and values: which model a cached response belongs to."""
    import hashlib

    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


CPU_BATCH_SIZE = 8  # sequences per forward on a CPU, where lm-eval's "auto" search would start at 64


def resolve_batch_size(batch_size: int | Literal["auto"] | None, device, cpu_default: int = CPU_BATCH_SIZE
                       ) -> int | Literal["auto"]:
    """The batch size handed to lm-eval: ``batch_size`` when given (an int >= 1 or ``"auto"``); else ``"auto"`` on a
    GPU (lm-eval finds the largest batch that fits, from 64 down, on the longest request) and ``cpu_default``
    elsewhere. ``device`` is a :class:`torch.device` or its name. Raises :class:`ShortenedError` for anything else
    (0, negatives, other strings)."""
    if batch_size is None:
        return "auto" if str(device).startswith("cuda") else cpu_default
    if batch_size == "auto" or (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        return batch_size
    raise ShortenedError(f"zero-shot batch size {batch_size!r}: an integer >= 1 or 'auto'")


def evaluate_zeroshot(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: str | Sequence[str] = "all",
                      *, limit: int | None = None, batch_size: int | Literal["auto"] | None = None,
                      source: Literal["local", "hub"] = "local", max_length: int | None = None,
                      cache_dir: str | None = None) -> dict:
    """Run the tasks through lm-eval's HFLM wrapping ``model`` (no copy); one row per task plus the mean.

    ``batch_size``: sequences per forward, an int or ``"auto"``; None means :func:`resolve_batch_size`'s default
    (``"auto"`` on a GPU, 8 on a CPU). The result records the size used (``batch_size``, and for ``"auto"`` the
    sizes lm-eval found, ``batch_sizes_found``).
    ``cache_dir``: lm-eval's response cache, committed per request, in a file named by a hash of the model's weights
    (lm-eval keys it by request only), so an interrupted full-split run resumes where it stopped.
    Raises :class:`ShortenedError` for an unknown task, a missing local task file or a bad batch size."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from shortened.console import skip_git_probe

    skip_git_probe(load=True)  # lm-eval's `git describe` of the caller's folder: noise outside git, and not about the model
    names = parse_tasks(tasks)
    batch_size = resolve_batch_size(batch_size, model.device)
    start = time.perf_counter()
    specs = [task_config(t) for t in names] if source == "local" else [TASKS[t].hub_task for t in names]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    with eval_mode(model):
        cache = str(Path(cache_dir) / f"lm-eval-{weights_digest(model)}") if cache_dir else None
        if cache:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        # the local task definitions are complete configs: lm-eval's index of its own task files is not needed
        # (building it takes ~27 s a call on 2 cores)
        manager = TaskManager(include_defaults=source != "local")
        out = lm_eval.simple_evaluate(model=lm, tasks=specs, num_fewshot=0, limit=limit, bootstrap_iters=0,
                                      use_cache=cache, log_samples=False, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, task_manager=manager)
    rows = []
    for t in names:
        key = PREFIX + t if source == "local" else TASKS[t].hub_task
        res = out["results"][key]
        metric, chance = TASKS[t].metric, TASKS[t].chance
        value, items = float(res[f"{metric},none"]), int(out["n-samples"][key]["effective"])
        rows.append({"metric": metric, "task": t, "value": value, "stderr": accuracy_stderr(value, items),
                     "acc": float(res["acc,none"]), "acc_norm": float(res.get("acc_norm,none", res["acc,none"])),
                     "items": items, "items_total": int(out["n-samples"][key]["original"]),
                     "chance": chance, "above_chance": above_chance(value, chance, items), "source": source})
    mean = sum(r["value"] for r in rows) / len(rows)
    found = sorted(set(getattr(lm, "batch_sizes", {}).values())) if batch_size == "auto" else None
    return {"tasks": rows, "mean": mean, "mean_stderr": mean_stderr([r["stderr"] for r in rows]),
            "complete": len(names) == len(TASKS), "limit": limit, "batch_size": batch_size,
            **({"batch_sizes_found": found} if found is not None else {}),
            "lm_eval_version": lm_eval.__version__, "seconds": time.perf_counter() - start}
