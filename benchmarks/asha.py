"""Early stopping with ASHA (Li et al., 2020, "A System for Massively Parallel Hyperparameter Tuning"): the same
grid of retraining trials run twice in one go, without a scheduler and with ``scheduler: {name: asha}``; compares
the selected trial and the tokens trained in total (goal: the same selection with >= 30% fewer tokens).

Default: SmolLM2-135M, criteria ppl/taylor/magnitude × ratios 0.2/0.35 × CPT (6 retraining trials, the dense
baseline, taylor at 35% the hopeless one), a small token budget so both sweeps fit in ~25 min on 2 CPU cores.

    python benchmarks/asha.py [--train-tokens 2048] [--val-every 256] [--grace 256] [--reduction-factor 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks_support import RESULTS, print_table

from shortened.sweep import SweepConfig
from shortened.sweep.runner import run_sweep


def sweep_config(args, name: str, storage: str, asha: bool) -> SweepConfig:
    cfg = {
        "name": name, "model": args.model, "criteria": args.criteria, "ratios": args.ratios, "methods": args.methods,
        "calibration": {"n_samples": 10, "seq_len": 128},
        "train": {"train_tokens": args.train_tokens, "micro_batch_size": 2, "lr": args.lr, "warmup_ratio": 0.0,
                  "zero_stage": 0, "report_every_steps": 4, "data": {"source": "slimpajama-sample",
                                                                      "seq_len": args.seq_len},
                  "lora": {"lr": 1e-3, "zero_stage": 0},
                  "val_every_tokens": args.val_every, "val_windows": args.val_windows},
        "eval": {"ppl": ["wikitext2"], "ppl_max_windows": args.ppl_windows},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.95},
        "selection": {"policy": "max_ratio_within", "metric": "ppl:wikitext2", "tolerance_pct": args.tolerance},
        "storage_path": storage,
        "scheduler": ({"name": "asha", "metric": "val_ppl", "mode": "min", "grace_tokens": args.grace,
                       "reduction_factor": args.reduction_factor} if asha else {"name": "none"}),
    }
    return SweepConfig.model_validate(cfg)


def summary(out) -> dict:
    trials = {}
    for t in out.trials:
        m = {f"{r['name']}:{r['dataset']}": r["value"] for r in t["metrics"]}
        trials[t["key"]] = {"status": t["status"], "tokens_trained": t["tokens_trained"] or 0,
                            "val_ppl": m.get("val_ppl:validation"), "ppl_wikitext2": m.get("ppl:wikitext2"),
                            "train_s": t["train_s"], "total_s": t["total_s"]}
    return {"selected": out.choice.chosen and out.choice.chosen["key"], "trials": trials,
            "tokens_total": sum(t["tokens_trained"] for t in trials.values()),
            "trials_wall_s": out.phases.get("trials"), "sweep_s": out.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--criteria", nargs="+", default=["ppl", "taylor", "magnitude"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.35])
    ap.add_argument("--methods", nargs="+", default=["cpt"])
    ap.add_argument("--train-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--val-every", type=int, default=256)
    ap.add_argument("--val-windows", type=int, default=4)
    ap.add_argument("--grace", type=int, default=256)
    ap.add_argument("--reduction-factor", type=float, default=3.0)
    ap.add_argument("--ppl-windows", type=int, default=20)
    ap.add_argument("--tolerance", type=float, default=150.0)
    ap.add_argument("--out", default=str(RESULTS / "asha.json"))
    args = ap.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="asha-bench-") as tmp:
        stamp = time.strftime("%H%M%S")
        for label, asha in (("without ASHA", False), ("with ASHA", True)):
            cfg = sweep_config(args, f"asha-{'on' if asha else 'off'}-{stamp}", tmp, asha)
            if asha:  # the same block scores as the first sweep (scoring is not what is compared)
                first = sweep_config(args, f"asha-off-{stamp}", tmp, False).layout
                for c in args.criteria:
                    cfg.layout.scores(c).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(first.scores(c), cfg.layout.scores(c))
            runs[label] = summary(run_sweep(cfg))
    keys = sorted(set().union(*(r["trials"] for r in runs.values())))
    rows = []
    for k in keys:
        row = [k]
        for r in runs.values():
            t = r["trials"].get(k, {})
            ppl = t.get("ppl_wikitext2")
            row += [t.get("status", "-"), str(t.get("tokens_trained", 0)),
                    f"{t['val_ppl']:.4g}" if t.get("val_ppl") is not None else "",
                    f"{ppl:.4g}" if ppl is not None else ""]
        rows.append(row)
    print_table(["trial", "status", "tokens", "val_ppl", "wikitext2", "status (ASHA)", "tokens (ASHA)",
                 "val_ppl (ASHA)", "wikitext2 (ASHA)"], rows)
    off, on = runs["without ASHA"], runs["with ASHA"]
    saved = 1 - on["tokens_total"] / off["tokens_total"] if off["tokens_total"] else 0.0
    result = {"config": vars(args), "runs": runs, "same_selection": off["selected"] == on["selected"],
              "tokens_saved_fraction": saved}
    print()
    print_table(["measure", "without ASHA", "with ASHA"], [
        ["selected trial", str(off["selected"]), str(on["selected"])],
        ["tokens trained (all trials)", str(off["tokens_total"]), str(on["tokens_total"])],
        ["trial phase wall (s)", f"{off['trials_wall_s']:.0f}", f"{on['trials_wall_s']:.0f}"],
        ["trials stopped", "0", str(sum(t["status"] == "stopped" for t in on["trials"].values()))]])
    print(f"\nsame selection: {result['same_selection']}; tokens saved: {saved:.1%} (goal >= 30%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
