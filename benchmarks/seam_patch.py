"""Benchmark: the training-free seam patch (``--patch linear``, ReplaceMe) on SmolLM2-135M, before retraining.

For the criteria ppl and angular at 20% and 35% (and any other criterion, e.g. ``--criteria task --ratios 0.2``:
Minitron's span choice by piqa accuracy), the same removed blocks unpatched and patched, each patch variant
``FIT@N`` a fit objective (``lstsq``: plain least squares, the issue's formula; ``relative``: each token's error
relative to its target's norm, the default) on N SlimPajama-sample calibration windows of 128 tokens (10: the
criteria's own set; 72: the default for SmolLM2, 16 tokens per hidden dimension; 128): the seam fit residuals, WikiText-2 and PTB perplexity (the paper protocol on the first --ppl-windows windows) and the
seven-task zero-shot mean (--limit items a task). Goal (issue 20): patched ≤ 0.8× the unpatched WikiText-2
perplexity. Resumes row by row; writes benchmarks/results/seam_patch.json and prints a Markdown table.

    python benchmarks/seam_patch.py --limit 0               # perplexity only
    python benchmarks/seam_patch.py --limit 20              # then add the zero-shot mean to every row
    python benchmarks/seam_patch.py --limit 0 --cpt ppl@0.2,angular@0.2   # then CPT those, unpatched and patched

``--cpt``: the pruned models of those rows, unpatched and patched (``--cpt-patch``), are each retrained by CPT
through the real path (``retrain``: Ray Train, one worker, DeepSpeed ZeRO-2, fp32 on CPU) on the same
``--cpt-tokens`` SlimPajama-sample tokens with the same schedule, then WikiText-2/PTB perplexity again.
"""

from __future__ import annotations

import argparse
import json
import time

from shortened.criteria import TaskCriterionConfig
from shortened.data.calibration import CalibrationConfig, calibration_windows
from shortened.evaluation.perplexity import evaluate_ppl
from shortened.evaluation.zeroshot import evaluate_zeroshot
from shortened.io import write_json_atomic
from shortened.models import load_model, load_tokenizer, materialize
from shortened.pruning import blocks_for_ratio, prune, score_blocks

from benchmarks_support import CACHE, RESULTS, print_table

OUT = RESULTS / "seam_patch.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--criteria", default="ppl,angular")
    ap.add_argument("--ratios", default="0.2,0.35")
    ap.add_argument("--ppl-windows", type=int, default=40, help="128-token windows per perplexity dataset")
    ap.add_argument("--limit", type=int, default=20, help="zero-shot items per task (0: none; a later run with a "
                    "limit adds it to the saved rows)")
    ap.add_argument("--variants", default="lstsq@10,lstsq@128,relative@72,relative@128",
                    help="patch variants FIT@WINDOWS (fit: lstsq or relative; windows of 128 calibration tokens)")
    ap.add_argument("--ridge", type=float, default=0.0)
    ap.add_argument("--zeroshot-variants", default="dense,none,relative@72x128",
                    help="the variants whose rows get the zero-shot mean")
    ap.add_argument("--cpt", default="", help="criterion@ratio rows to retrain by CPT, unpatched and patched")
    ap.add_argument("--cpt-patch", default="relative@72x128", help="the patched variant retrained")
    ap.add_argument("--cpt-tokens", type=int, default=8192)
    args = ap.parse_args()
    dense_dir = str(materialize("smollm2", CACHE / "smollm2-135m-instruct-hf"))
    # what the saved rows' values depend on (--criteria and --ratios only choose rows: a later run adds rows)
    settings = {k: getattr(args, k) for k in ("ppl_windows", "ridge")}
    saved = json.loads(OUT.read_text()) if OUT.is_file() else {}
    legacy = {k: v for k, v in saved.get("settings", {}).items() if k in settings}  # files that kept more keys
    rows: dict[str, dict] = saved.get("rows", {}) if legacy == settings else {}
    tok = load_tokenizer(dense_dir)
    load = lambda: load_model(dense_dir, device="cpu", dtype="float32")  # noqa: E731
    score_calib = calibration_windows(tok, CalibrationConfig())
    variants = [v.split("@") for v in args.variants.split(",")]
    patch_calib = {n: calibration_windows(tok, CalibrationConfig(n_samples=n)) for n in {int(w) for _, w in variants}}

    def row(key: str, build) -> dict:
        """Perplexity once; the zero-shot mean added when --limit asks for it (a later run with --limit adds it
        to the saved rows)."""
        r = rows.get(key)
        want_zs = (args.limit and key.split("/")[-1] in args.zeroshot_variants.split(",")
                   and (r is None or r.get("zeroshot_limit") != args.limit))
        if r is not None and not want_zs:
            return r
        start = time.perf_counter()
        model, info = build()
        if r is None:
            r = {**info, **{f"ppl_{d}": evaluate_ppl(model, tok, d, max_windows=args.ppl_windows,
                                                     progress=False)["value"] for d in ("wikitext2", "ptb")}}
        if want_zs:
            zs = evaluate_zeroshot(model, tok, "all", limit=args.limit, batch_size=16)
            r.update(zeroshot_mean=zs["mean"], zeroshot_limit=args.limit,
                     tasks={t["task"]: t["value"] for t in zs["tasks"]})
        r["seconds"] = round(r.get("seconds", 0) + time.perf_counter() - start, 1)
        rows[key] = r
        write_json_atomic(OUT, {"settings": settings, "rows": rows})
        print(f"  {key}: {json.dumps({k: v for k, v in r.items() if k != 'tasks'})}", flush=True)
        return r

    row("dense", lambda: (load(), {"patch": "dense"}))
    scored: dict[tuple[str, float], tuple] = {}  # (criterion, ratio) → (scores, blocks removed), scored once

    def builder(crit: str, ratio: float, name: str, fit: str | None, windows):
        """A function that loads the dense model and prunes it as the row ``crit@ratio/name`` says."""
        def build():
            m = load()
            if (crit, ratio) not in scored:
                n = blocks_for_ratio(m, ratio)
                scored[crit, ratio] = (score_blocks(m, crit, score_calib, n_remove=n, batch_size=10, progress=False,
                                                    tokenizer=tok,
                                                    task=TaskCriterionConfig() if crit == "task" else None), n)
            scores, n = scored[crit, ratio]
            t = time.perf_counter()
            res = prune(m, scores, n, patch="none" if windows is None else "linear", calibration=windows,
                        patch_ridge=args.ridge, patch_fit=fit or "relative", batch_size=8)
            build.result = res
            return m, {"criterion": crit, "ratio": ratio, "patch": name, "removed": res.report["removed_blocks"],
                       "prune_s": round(time.perf_counter() - t, 1),
                       "seams": res.report.get("patch", {}).get("seams", [])}
        return build

    builders = {}
    for crit in args.criteria.split(","):
        for ratio in map(float, args.ratios.split(",")):
            for name, fit, windows in [("none", None, None)] + [(f"{f}@{w}x128", f, patch_calib[int(w)])
                                                                 for f, w in variants]:
                builders[f"{crit}@{ratio}/{name}"] = builder(crit, ratio, name, fit, windows)
                row(f"{crit}@{ratio}/{name}", builders[f"{crit}@{ratio}/{name}"])

    for key in filter(None, args.cpt.split(",")):
        for name in ("none", args.cpt_patch):
            r = rows[f"{key}/{name}"]
            if r.get("cpt", {}).get("tokens_budget") == args.cpt_tokens:
                continue
            r["cpt"] = cpt(builders[f"{key}/{name}"], f"{key}-{name}".replace("@", "-").replace("/", "-"),
                           args.cpt_tokens, tok, args.ppl_windows)
            write_json_atomic(OUT, {"settings": settings, "rows": rows})
            print(f"  {key}/{name} after CPT: {json.dumps(r['cpt'])}", flush=True)

    head = ["criterion", "ratio", "removed", "patch", "seam residual (before → after)", "WikiText-2 PPL",
            "× unpatched", "PTB PPL", "zero-shot mean", "after CPT: WikiText-2 PPL", "× unpatched", "PTB PPL"]
    body = []
    for key, r in rows.items():
        if key == "dense":
            body.append(["dense", "0", "–", "–", "–", f"{r['ppl_wikitext2']:.2f}", "–", f"{r['ppl_ptb']:.2f}",
                         f"{r.get('zeroshot_mean', float('nan')):.3f}", "–", "–", "–"])
            continue
        base = rows.get(f"{r['criterion']}@{r['ratio']}/none")
        resid = "; ".join(f"{s['residual_before']:.3f} → {s['fit_residual']:.3f}" for s in r["seams"]
                          if "fit_residual" in s) or "–"
        body.append([r["criterion"], f"{r['ratio']:g}", ",".join(map(str, r["removed"])), r["patch"], resid,
                     f"{r['ppl_wikitext2']:.2f}",
                     f"{r['ppl_wikitext2'] / base['ppl_wikitext2']:.2f}" if base else "–", f"{r['ppl_ptb']:.2f}",
                     f"{r.get('zeroshot_mean', float('nan')):.3f}", *after_cpt(r, base)])
    print_table(head, body)
    print(f"wrote {OUT}")


def after_cpt(r: dict, base: dict | None) -> list[str]:
    """The after-CPT cells of a row (dashes where it was not retrained)."""
    c, b = r.get("cpt"), (base or {}).get("cpt")
    if not c:
        return ["–", "–", "–"]
    return [f"{c['ppl_wikitext2']:.2f} ({c['tokens']:,} tok)",
            f"{c['ppl_wikitext2'] / b['ppl_wikitext2']:.2f}" if b else "–", f"{c['ppl_ptb']:.2f}"]


def cpt(build, tag: str, tokens: int, tok, ppl_windows: int) -> dict:
    """Save the pruned model ``build`` makes, retrain it by CPT on ``tokens`` tokens, and measure it again."""
    import os

    import psutil
    import ray

    from shortened.data import DataConfig
    from shortened.pruning import save_pruned
    from shortened.training.config import TrainConfig
    from shortened.training.retrain import ScaleConfig, retrain

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if not ray.is_initialized():
        ray.init(num_cpus=psutil.cpu_count() + 1, log_to_driver=False)
    build()
    pruned = save_pruned(build.result, CACHE / f"seam-{tag}", tok, overwrite=True)
    out = CACHE.parent / "bench-seam-cpt" / tag
    cfg = TrainConfig(method="cpt", train_tokens=tokens, data=DataConfig(seq_len=256), micro_batch_size=2,
                      zero_stage=2, report_every_steps=4, checkpoint_every_tokens=None, warmup_ratio=0.1)
    start = time.perf_counter()
    retrain(str(pruned), str(out), cfg, scale=ScaleConfig(num_workers=1, cpus_per_worker=psutil.cpu_count()),
            storage_path=str(out.parent / "storage"), name=f"{tag}-{int(time.time())}", overwrite=True)
    wall = time.perf_counter() - start
    record = json.loads((out / "retraining.json").read_text())
    model = load_model(str(out), device="cpu", dtype="float32")
    return {"tokens_budget": tokens, "tokens": record["tokens_trained"], "wall_s": round(wall, 1),
            **{f"ppl_{d}": evaluate_ppl(model, tok, d, max_windows=ppl_windows, progress=False)["value"]
               for d in ("wikitext2", "ptb")}}


if __name__ == "__main__":
    main()
