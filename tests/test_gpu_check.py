"""The GPU check's reduced CPU form, so the script that runs when a GPU is lent cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

from shortened.paths import REPO_ROOT

def test_gpu_check_runs_every_path_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--size", "tiny", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["check"]: r for r in report["rows"]}
    assert list(rows) == ["score-ppl", "score-taylor", "prune", "cpt-zero2", "cpt-zero3", "lora", "distill",
                          "perplexity", "zeroshot", "speed"]
    assert {r["status"] for r in rows.values()} == {"pass"}, [r for r in rows.values() if r["status"] != "pass"]
    # scores over all 12 blocks; blocks removed within the keep-first-4 / keep-last-2 rule
    assert len(rows["score-ppl"]["scores"]) == len(rows["score-taylor"]["scores"]) == 12
    assert rows["prune"]["removed"] and all(4 <= b < 10 for b in rows["prune"]["removed"])
    assert 0 < rows["prune"]["ratio_actual"] <= 0.2
    assert rows["prune"]["saved_dtype"] == "float32"  # the source model's dtype on CPU
    for phase in ("cpt-zero2", "cpt-zero3", "lora", "distill"):
        assert rows[phase]["tokens"] >= 4 * 2 * 64 and rows[phase]["tokens_per_s"] > 0
    assert rows["perplexity"]["ppl"] > 1
    assert rows["speed"]["speedup"] > 0
    table = proc.stdout
    assert "| check | model | status | seconds | tokens/s | peak rss mb | note |" in table
