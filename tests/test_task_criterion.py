"""The ``task`` criterion (Minitron, Muralidharan et al. 2024): the span whose removal lowers a zero-shot metric
least, measured with the project's lm-eval evaluation on the real task files (../shared/data)."""

from __future__ import annotations

import copy
import json
import math

import pytest
from transformers import AutoModelForCausalLM

from shortened.criteria import BlockScores, TaskCriterionConfig, get_criterion
from shortened.data.calibration import CalibrationConfig
from shortened.errors import ShortenedError

SAMPLE = TaskCriterionConfig(task="piqa", limit=12)
KEEP_FIRST, KEEP_LAST = 3, 2  # 8 blocks: 3, 4 and 5 removable


@pytest.fixture(scope="module")
def scored(tiny_llama_dir, smollm2_tokenizer):
    from shortened.pruning import score_with_calibration

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    scores = score_with_calibration(model, "task", tokenizer=smollm2_tokenizer,
                                    calibration=CalibrationConfig(n_samples=2, seq_len=32),
                                    keep_first=KEEP_FIRST, keep_last=KEEP_LAST, n_remove=2, progress=False, task=SAMPLE)
    return model, scores


def test_the_chosen_span_is_the_one_whose_removal_costs_least(scored, smollm2_tokenizer):
    from shortened.blocks import remove_blocks
    from shortened.criteria.task import TaskSample
    from shortened.pruning import prune

    model, scores = scored
    sample = TaskSample(SAMPLE, smollm2_tokenizer)
    dense = sample.metric(model)
    # each span of two removable blocks, removed for real from a copy of the model (not the criterion's
    # temporary removal)
    direct = {s: dense - sample.metric(remove_blocks(copy.deepcopy(model), [s, s + 1])) for s in (3, 4)}
    drop = scores.extra["span_drop"]
    assert scores.extra["dense_metric"] == dense and 0 < dense < 1
    assert {s: drop[1][s] for s in direct} == pytest.approx(direct, abs=1e-12)
    assert all(math.isnan(drop[1][s]) for s in (0, 1, 2, 5, 6))  # spans that touch a kept block are not scored
    best = min(direct, key=lambda s: (direct[s], s))
    report = prune(copy.deepcopy(model), scores, 2, keep_first=KEEP_FIRST, keep_last=KEEP_LAST).report
    assert report["removed_blocks"] == [best, best + 1]
    # per-block scores: the span-1 drops, nan where the keep rule forbids removal
    assert [math.isnan(v) for v in scores.scores] == [True, True, True, False, False, False, True, True]


def test_the_scores_file_round_trips(scored, tmp_path):
    _, scores = scored
    scores.save(tmp_path / "task.json")
    loaded = BlockScores.load(tmp_path / "task.json")
    assert loaded.criterion == "task" and loaded.extra["task"] == "piqa" and loaded.extra["limit"] == 12
    assert json.dumps(loaded.to_json()) == json.dumps(scores.to_json())
    select = get_criterion("task").select
    assert select(loaded, 2, range(3, 6)) == select(scores, 2, range(3, 6))
    assert len(select(loaded, 1, range(3, 6))) == 1  # shorter spans were scored too
    with pytest.raises(ShortenedError, match="at most 2 blocks, 3 are to be removed"):
        select(loaded, 3, range(3, 6))


def test_bad_task_options_are_refused_before_the_model_loads(tiny_llama_dir, tmp_path, capsys):
    from shortened.cli import main

    with pytest.raises(ValueError, match="unknown zero-shot task"):
        TaskCriterionConfig(task="piqaa")
    assert main(["score", "--model", str(tiny_llama_dir), "--criterion", "task", "--blocks", "2",
                 "--task_criterion.task", "piqaa", "--out", str(tmp_path / "s.json")]) == 2
    assert "piqaa" in capsys.readouterr().err and not (tmp_path / "s.json").exists()
