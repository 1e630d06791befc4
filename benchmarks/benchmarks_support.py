"""Models the benchmarks share, made once and cached under ``.cache/models``."""

from __future__ import annotations

from shortened.models import load_model, load_tokenizer
from shortened.paths import REPO_ROOT

CACHE = REPO_ROOT / ".cache" / "models"


def pruned_smollm2(dense_dir: str) -> str:
    """SmolLM2 pruned 20% by ppl (10x128 SlimPajama-sample calibration), made once and cached."""
    from shortened.data.calibration import CalibrationConfig, calibration_windows
    from shortened.pruning import blocks_for_ratio, prune, save_pruned, score_blocks

    out = CACHE / "smollm2-ppl-20"
    if (out / "pruning.json").is_file():
        return str(out)
    model, tok = load_model(dense_dir, device="cpu", dtype="float32"), load_tokenizer(dense_dir)
    scores = score_blocks(model, "ppl", calibration_windows(tok, CalibrationConfig()), batch_size=10)
    save_pruned(prune(model, scores, blocks_for_ratio(model, 0.2), ratio_requested=0.2), out, tok, overwrite=True)
    return str(out)


RESULTS = REPO_ROOT / "benchmarks" / "results"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A Markdown table on stdout."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(r) + " |")
