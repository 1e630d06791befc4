"""Sweep scheduling efficiency: the wall time of the trial phase against the sum of the trials' own times divided by
the concurrency (goal ≤ 1.2). Runs a sweep config (default: the demo) under a fresh name in a scratch folder.

    python benchmarks/sweep.py [--config jobs/configs/demo.yaml]
    python benchmarks/sweep.py --from runs/demo      # read a finished, not resumed, sweep instead of running one
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks_support import RESULTS, print_table

from shortened.sweep import load_sweep_config
from shortened.sweep.report import open_experiment
from shortened.sweep.runner import TIMINGS_JSON, run_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(Path(__file__).parent.parent / "jobs/configs/demo.yaml"))
    ap.add_argument("--from", dest="experiment", help="an experiment folder from a sweep that ran in one go")
    args = ap.parse_args()
    if args.experiment:
        store, name, exp_dir = open_experiment(args.experiment)
        timing = json.loads((exp_dir / TIMINGS_JSON).read_text())
        if timing["resumed"]:
            raise SystemExit(f"{args.experiment} was resumed; its trial times span several runs")
        all_trials = store.trials(name)
        concurrency, phases, seconds = timing["concurrency"], timing["phases_s"], timing["sweep_s"]
        source = str(exp_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
            cfg = load_sweep_config(args.config, {"name": f"bench-{time.strftime('%H%M%S')}", "storage_path": tmp,
                                                  "store_url": None})
            out = run_sweep(cfg)
        all_trials, concurrency, phases, seconds, source = out.trials, out.concurrency, out.phases, out.seconds, \
            args.config
    trials = sorted(all_trials, key=lambda t: -(t["total_s"] or 0))
    rows = [[t["key"], f"{t['prune_s'] or 0:.1f}", f"{t['train_s'] or 0:.1f}", f"{t['eval_s'] or 0:.1f}",
             f"{t['total_s']:.1f}"] for t in trials]
    print_table(["trial", "prune s", "train s", "eval s", "total s"], rows)
    total = sum(t["total_s"] for t in trials)
    ideal = total / concurrency
    longest = max(t["total_s"] for t in trials)
    bound = max(ideal, longest)
    wall = phases["trials"]
    summary = {"source": source, "trials": len(trials), "concurrency": concurrency,
               "sum_trial_s": total, "ideal_s": ideal, "longest_trial_s": longest, "trials_wall_s": wall,
               "ratio_wall_vs_sum_over_concurrency": wall / ideal,
               "ratio_wall_vs_lower_bound": wall / bound, "phases_s": phases, "sweep_wall_s": seconds,
               "trial_times": {t["key"]: {k: t[k] for k in ("prune_s", "train_s", "eval_s", "total_s")}
                               for t in trials}}
    print()
    print_table(["measure", "value"], [
        ["trials", str(len(trials))], ["concurrency", str(concurrency)],
        ["sum of trial times / concurrency (s)", f"{ideal:.1f}"], ["longest trial (s)", f"{longest:.1f}"],
        ["trial phase wall (s)", f"{wall:.1f}"],
        ["wall / (sum / concurrency)", f"{wall / ideal:.3f}  (goal ≤ 1.2)"],
        ["wall / max(sum / concurrency, longest)", f"{wall / bound:.3f}"],
        ["scores / speed phases (s)", f"{phases['scores']:.1f} / {phases['speed']:.1f}"],
        ["whole sweep (s)", f"{seconds:.1f}"]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sweep.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {RESULTS / 'sweep.json'}")


if __name__ == "__main__":
    main()
