"""Benchmark: the training-free seam patch (``--patch linear``, ReplaceMe) on SmolLM2-135M, before retraining.

For the criteria ppl and angular at 20% and 35%, the same removed blocks unpatched and patched (the linear map
fitted on the SlimPajama-sample calibration windows: the criteria's own 10 × 128 tokens, and a larger set): the
seam fit residuals, WikiText-2 and PTB perplexity (the paper protocol on the first --ppl-windows windows) and the
seven-task zero-shot mean (--limit items a task). Goal (issue 20): patched ≤ 0.8× the unpatched WikiText-2
perplexity. Resumes row by row; writes benchmarks/results/seam_patch.json and prints a Markdown table.

    python benchmarks/seam_patch.py --limit 0               # perplexity only
    python benchmarks/seam_patch.py --limit 20              # then add the zero-shot mean to every row
"""

from __future__ import annotations

import argparse
import json
import time

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
    ap.add_argument("--patch-samples", default="10,128", help="calibration windows (x 128 tokens) of the patch fit")
    ap.add_argument("--ridge", type=float, default=0.0)
    args = ap.parse_args()
    dense_dir = str(materialize("smollm2", CACHE / "smollm2-135m-instruct-hf"))
    settings = {k: getattr(args, k) for k in ("criteria", "ratios", "ppl_windows", "patch_samples", "ridge")}
    saved = json.loads(OUT.read_text()) if OUT.is_file() else {}
    rows: dict[str, dict] = saved.get("rows", {}) if saved.get("settings") == settings else {}
    tok = load_tokenizer(dense_dir)
    load = lambda: load_model(dense_dir, device="cpu", dtype="float32")  # noqa: E731
    score_calib = calibration_windows(tok, CalibrationConfig())
    patch_calib = {n: calibration_windows(tok, CalibrationConfig(n_samples=n)) for n in
                   map(int, args.patch_samples.split(","))}

    def row(key: str, build) -> dict:
        """Perplexity once; the zero-shot mean added when --limit asks for it (a later run with --limit adds it
        to the saved rows)."""
        r = rows.get(key)
        want_zs = args.limit and (r is None or r.get("zeroshot_limit") != args.limit)
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
    for crit in args.criteria.split(","):
        for ratio in map(float, args.ratios.split(",")):
            scores, n = None, None
            variants = [("none", None)] + [(f"linear@{k}x128", w) for k, w in patch_calib.items()]
            for name, windows in variants:
                def build():
                    nonlocal scores, n
                    m = load()
                    if scores is None:
                        n = blocks_for_ratio(m, ratio)
                        scores = score_blocks(m, crit, score_calib, n_remove=n, batch_size=10, progress=False)
                    t = time.perf_counter()
                    res = prune(m, scores, n, patch="none" if windows is None else "linear", calibration=windows,
                                patch_ridge=args.ridge, batch_size=8)
                    return m, {"criterion": crit, "ratio": ratio, "patch": name,
                               "removed": res.report["removed_blocks"], "prune_s": round(time.perf_counter() - t, 1),
                               "seams": res.report.get("patch", {}).get("seams", [])}
                row(f"{crit}@{ratio}/{name}", build)

    head = ["criterion", "ratio", "removed", "patch", "seam residual (before → after)", "WikiText-2 PPL",
            "× unpatched", "PTB PPL", "zero-shot mean"]
    body = []
    for key, r in rows.items():
        if key == "dense":
            body.append(["dense", "0", "–", "–", "–", f"{r['ppl_wikitext2']:.2f}", "–", f"{r['ppl_ptb']:.2f}",
                         f"{r.get('zeroshot_mean', float('nan')):.3f}"])
            continue
        base = rows.get(f"{r['criterion']}@{r['ratio']}/none")
        resid = "; ".join(f"{s['residual_before']:.3f} → {s['fit_residual']:.3f}" for s in r["seams"]
                          if "fit_residual" in s) or "–"
        body.append([r["criterion"], f"{r['ratio']:g}", ",".join(map(str, r["removed"])), r["patch"], resid,
                     f"{r['ppl_wikitext2']:.2f}",
                     f"{r['ppl_wikitext2'] / base['ppl_wikitext2']:.2f}" if base else "–", f"{r['ppl_ptb']:.2f}",
                     f"{r.get('zeroshot_mean', float('nan')):.3f}"])
    print_table(head, body)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
