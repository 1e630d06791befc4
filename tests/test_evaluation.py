"""Evaluation: perplexity protocols, zero-shot tasks through lm-eval checked against a hand computation,
generation speed with forced lengths, and the `shortened eval` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from shortened.blocks import remove_blocks
from shortened.evaluation import EvalConfig, evaluate, metric_rows
from shortened.evaluation.perplexity import evaluate_ppl, load_rows, ppl_windows
from shortened.evaluation.speed import compare_speed
from shortened.evaluation.zeroshot import TASKS, above_chance, evaluate_zeroshot, load_docs
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    return tiny_model("llama", vocab_size=len(smollm2_tokenizer)).eval()


# -- perplexity ---------------------------------------------------------------------------------------------------

def test_local_ppl_datasets_match_the_hub_splits(data_dir):
    rows, origin = load_rows("wikitext2")
    assert len(rows) == 4358 and origin.endswith("wiki.test.raw")  # HF wikitext-2-raw-v1 test has 4358 rows
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert len(load_rows("ptb")[0]) == 3761 and load_rows("ptb")[0][0] == "no it was n't black monday"
    assert len(load_rows("ptb_valid")[0]) == 3370
    assert len(load_rows("c4")[0]) == 30


def test_paper_and_gptq_windows(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows, _ = load_rows("wikitext2")
    ids = tok("\n\n".join(rows), add_special_tokens=False)["input_ids"]
    paper, facts = ppl_windows(rows, tok, dataset="wikitext2")
    assert facts["bos"] == "none"  # SmolLM2's tokenizer adds no BOS by itself
    assert paper.shape == (len(ids) // 128, 128) and paper.flatten().tolist() == ids[:paper.numel()]
    first, f1 = ppl_windows(rows, tok, dataset="wikitext2", bos="first")
    assert first[0, 0] == tok.bos_token_id and first[0, 1:].tolist() == ids[:127] and first[1, 0] != tok.bos_token_id
    every, _ = ppl_windows(rows, tok, dataset="wikitext2", bos="every")
    assert (every[:, 0] == tok.bos_token_id).all() and every[1, 1:].tolist() == ids[127:254]
    gptq, g = ppl_windows(rows, tok, dataset="wikitext2", protocol="gptq")
    assert gptq.shape == (len(ids) // 2048, 2048) and g["seq_len"] == 2048
    c4, c = ppl_windows(load_rows("c4")[0], tok, dataset="c4", protocol="gptq")
    assert c["joined_with"] == " "


def test_ppl_equals_a_hand_computation_and_is_deterministic(tiny, smollm2_tokenizer):
    res = evaluate_ppl(tiny, smollm2_tokenizer, "ptb", max_windows=6, batch_size=4, progress=False)
    windows, _ = ppl_windows(load_rows("ptb")[0], smollm2_tokenizer, dataset="ptb")
    with torch.no_grad():
        losses = [tiny(input_ids=w[None], labels=w[None]).loss.item() for w in windows[:6]]
    assert res["value"] == pytest.approx(math.exp(sum(losses) / 6), rel=1e-5)
    assert res["tokens_evaluated"] == 6 * 128 and res["windows"] == len(windows) and res["split"] == "test"
    again = evaluate_ppl(tiny, smollm2_tokenizer, "ptb", max_windows=6, batch_size=1, progress=False)
    assert again["value"] == pytest.approx(res["value"], rel=1e-6)


# -- zero-shot ----------------------------------------------------------------------------------------------------

def test_local_task_files_are_the_full_splits(data_dir):
    sizes = {t: len(load_docs(t)[0]) for t in TASKS}
    assert sizes == {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
                     "arc_challenge": 1172, "openbookqa": 500}
    boolq = load_docs("boolq")[0][0]
    assert boolq["query"].endswith("?\nAnswer:") and not boolq["query"].startswith("Passage:")
    assert boolq["choices"] == ["no", "yes"]
    for t in TASKS:
        for d in load_docs(t)[0][:50]:
            options = d.get("choices", d.get("contexts"))
            assert 0 <= d["gold"] < len(options)


def _loglik(model, tok, context: str, continuation: str) -> float:
    """lm-eval's scoring, independently: log p(continuation | context), trailing context spaces moved over."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_zero_shot_through_lm_eval_equals_a_hand_computation(tiny, smollm2_tokenizer):
    tok, n = smollm2_tokenizer, 6
    res = evaluate_zeroshot(tiny, tok, ["arc_easy", "winogrande", "piqa"], limit=n, batch_size=4)
    rows = {r["task"]: r for r in res["tasks"]}
    for task in ("arc_easy", "piqa"):
        acc = acc_norm = 0
        for d in load_docs(task)[0][:n]:
            ll = [_loglik(tiny, tok, d["query"], " " + c) for c in d["choices"]]
            norm = [x / len(c) for x, c in zip(ll, d["choices"])]
            acc += max(range(len(ll)), key=ll.__getitem__) == d["gold"]
            acc_norm += max(range(len(norm)), key=norm.__getitem__) == d["gold"]
        assert rows[task]["acc"] == pytest.approx(acc / n) and rows[task]["acc_norm"] == pytest.approx(acc_norm / n)
    acc = sum(max(range(2), key=lambda i: _loglik(tiny, tok, d["contexts"][i], " " + d["continuation"])) == d["gold"]
              for d in load_docs("winogrande")[0][:n])
    assert rows["winogrande"]["acc"] == pytest.approx(acc / n)
    assert rows["arc_easy"]["items"] == n and rows["arc_easy"]["items_total"] == 2376
    p = rows["piqa"]["value"]
    assert rows["piqa"]["stderr"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5)
    assert res["mean_stderr"] == pytest.approx(sum(r["stderr"] ** 2 for r in res["tasks"]) ** 0.5 / 3)
    assert all(not r["above_chance"] for r in res["tasks"])  # 6 items of a random model prove nothing
    assert res["mean"] == pytest.approx(sum(r["value"] for r in res["tasks"]) / 3) and not res["complete"]
    assert res["lm_eval_version"] == "0.4.13"


@pytest.mark.parametrize("value,chance,n,above", [
    (0.378, 0.5, 3270, False),  # a model answering "no" to every BoolQ item
    (0.55, 0.5, 3270, True),    # 5.7 standard errors above guessing
    (0.55, 0.5, 100, False),    # 1 standard error: could be luck
    (0.30, 0.25, 10042, True),  # HellaSwag-sized: 11.5 standard errors
    (0.25, 0.25, 10042, False),
])
def test_above_chance_is_a_two_standard_error_test(value, chance, n, above):
    assert above_chance(value, chance, n) is above


def test_zero_shot_response_cache_resumes_and_is_keyed_by_the_weights(tiny, smollm2_tokenizer, tmp_path):
    from sqlitedict import SqliteDict

    first = evaluate_zeroshot(tiny, smollm2_tokenizer, ["openbookqa"], limit=5, batch_size=4, cache_dir=str(tmp_path))
    (db,) = tmp_path.glob("lm-eval-*_rank0.db")
    with SqliteDict(str(db)) as cached:
        assert len(cached) == 5 * 4  # one response per (question, choice), committed as they come
        # an interrupted run left some responses behind: drop half, the next run recomputes only those
        for key in list(cached.keys())[:10]:
            del cached[key]
        cached.commit()
    again = evaluate_zeroshot(tiny, smollm2_tokenizer, ["openbookqa"], limit=5, batch_size=4, cache_dir=str(tmp_path))
    assert again["tasks"] == first["tasks"]
    with SqliteDict(str(db)) as cached:
        assert len(cached) == 20
    other = tiny_model("llama", vocab_size=len(smollm2_tokenizer), seed=1).eval()  # other weights, other file
    evaluate_zeroshot(other, smollm2_tokenizer, ["openbookqa"], limit=2, batch_size=4, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("lm-eval-*_rank0.db"))) == 2


# -- speed --------------------------------------------------------------------------------------------------------

def test_speed_forces_output_length_and_compares_models(tiny, smollm2_tokenizer):
    pruned = tiny_model("llama", vocab_size=len(smollm2_tokenizer)).eval()
    remove_blocks(pruned, [2, 3, 4, 5])
    rows = compare_speed({"baseline": (tiny, smollm2_tokenizer), "pruned": (pruned, smollm2_tokenizer)},
                         batch_sizes=[1, 3], new_tokens=[5, 9], repeats=2, warmup=1, progress=False)
    assert [(r["model"], r["batch_size"], r["new_tokens"]) for r in rows] == [
        (m, b, n) for b in (1, 3) for n in (5, 9) for m in ("baseline", "pruned")]
    for r in rows:
        assert len(r["latency_runs_s"]) == 2 and r["tokens_per_s"] == pytest.approx(r["batch_size"] *
                                                                                   r["new_tokens"] / r["latency_s"])
        assert r["memory_kind"] == "process_rss" and r["device_peak_mb"] > 100  # the process: torch, both models
        assert r["peak_memory_mb"] == pytest.approx(r["model_memory_mb"] + r["generation_peak_mb"])
        assert r["generation_peak_mb"] >= 0
        if r["model"] == "baseline":
            assert r["speedup_vs_baseline"] == 1.0


def test_speed_memory_is_each_models_own_not_the_devices(smollm2_tokenizer):
    """Two models of different sizes loaded in one process (as the sweep's speed stage holds the dense and the
    pruned model): each row's memory is that model's alone, so the smaller one's stored figure is smaller, and its
    weight figure is exactly the bytes of its parameters and buffers."""
    from shortened.evaluation.speed import model_memory_bytes, speed_table

    shape = dict(vocab_size=len(smollm2_tokenizer), hidden_size=256, intermediate_size=2048, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=12)
    big = tiny_model("llama", **shape).eval()
    small = tiny_model("llama", **shape).eval()
    remove_blocks(small, list(range(2, 12)))
    rows = compare_speed({"big": (big, smollm2_tokenizer), "small": (small, smollm2_tokenizer)}, new_tokens=[4],
                         repeats=2, warmup=1, progress=False)
    by = {r["model"]: r for r in rows}
    for name, model in (("big", big), ("small", small)):
        exact = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        assert model_memory_bytes(model) == exact
        assert by[name]["model_memory_mb"] == exact / 2**20
    assert by["big"]["model_memory_mb"] - by["small"]["model_memory_mb"] > 60  # 10 blocks of ~7 MiB
    stored = {(m["name"], m["protocol"]): m["value"] for m in metric_rows({"speed": [by["small"]]})}
    big_stored = {(m["name"], m["protocol"]): m["value"] for m in metric_rows({"speed": [by["big"]]})}
    key = ("peak_memory_mb", "params+buffers+process_rss")
    assert stored[key] < big_stored[key]
    assert stored[key] < by["big"]["model_memory_mb"]  # the big model's weights are not in the small one's figure
    assert stored[("model_memory_mb", "params+buffers")] == by["small"]["model_memory_mb"]
    assert ("generation_peak_mb", "process_rss") in stored
    # the process peak counts both models: the figure the rows used to store
    assert by["small"]["device_peak_mb"] > by["big"]["model_memory_mb"] + by["small"]["model_memory_mb"]
    assert "weights MiB" in speed_table(rows)


@pytest.mark.parametrize("eos,pad,expected", [([2, 0], None, 2), ([5, 7], 3, 3), (9, None, 9)])
def test_speed_pads_with_pad_else_the_first_eos_when_eos_is_a_list(smollm2_tokenizer, eos, pad, expected):
    """Llama-3.x-Instruct, Qwen2.5 and Gemma-3 ship ``eos_token_id`` as a list; generate() refuses a list as pad."""
    from shortened.evaluation.speed import generate_once
    from shortened.models import generation_pad_id

    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer), eos_token_id=eos, pad_token_id=pad).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
    assert generation_pad_id(model) == expected
    ids = smollm2_tokenizer(["a b c"], return_tensors="pt").input_ids
    assert generate_once(model, ids, 4)[1] == 4
    rows = compare_speed({"model": (model, smollm2_tokenizer)}, new_tokens=[3], repeats=1, warmup=0, progress=False)
    assert rows[0]["new_tokens"] == 3


# -- the command --------------------------------------------------------------------------------------------------

def test_cli_eval_writes_every_section(tiny_llama_dir, tmp_path, capsys):
    from shortened.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--ppl", "wikitext2,c4", "--ppl-windows", "3",
                 "--tasks", "openbookqa", "--limit", "3", "--speed", "--speed-new-tokens", "4", "--speed-repeats", "1",
                 "--baseline", str(tiny_llama_dir), "--out", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert [p["dataset"] for p in r["ppl"]] == ["wikitext2", "c4"] and r["ppl"][0]["protocol"] == "paper"
    assert r["zeroshot"]["tasks"][0]["items"] == 3 and r["zeroshot"]["lm_eval_version"] == "0.4.13"
    assert {s["model"] for s in r["speed"]} == {"baseline", "model"}
    assert r["model_info"]["blocks"] == 8 and r["versions"]["lm_eval"] == "0.4.13"
    names = {(m["name"], m["dataset"]) for m in metric_rows(r)}
    assert ("ppl", "c4") in names and ("acc_norm", "openbookqa") in names and ("latency_s", "gen-b1-n4") in names
    printed = capsys.readouterr()
    assert json.loads(printed.out) == r  # stdout: the result alone, for programs
    assert "| ppl | wikitext2 |" in printed.err  # the tables, for people
    (weak,) = [line for line in printed.err.splitlines() if line.startswith("not above chance")]
    assert "openbookqa" in weak  # 3 items of a random model


@pytest.mark.parametrize("args,message", [
    (["--ppl", "wikitext3"], "unknown perplexity dataset"),
    (["--tasks", "mmlu"], "unknown zero-shot task"),
    (["--speed", "--speed-batch-sizes", "1,x"], "--speed-batch-sizes: must be a list of integers >= 1, got '1,x'"),
    (["--ppl", "ptb", "--baseline", "x"], "--baseline is compared by --speed"),
    (["--speed", "--limit", "5"], "--limit would be ignored: it applies to zero-shot tasks (--tasks)"),
    (["--speed", "--zeroshot-cache", "c"], "--zeroshot-cache would be ignored"),
    (["--speed", "--zeroshot-batch-size", "auto"], "--zeroshot-batch-size would be ignored"),
    (["--tasks", "piqa", "--zeroshot-batch-size", "0"], "--zeroshot-batch-size: must be"),
    (["--tasks", "piqa", "--ppl-windows", "3"], "--ppl-windows would be ignored: it applies to perplexity (--ppl)"),
    (["--ppl", "", "--tasks", "piqa", "--ppl-seq-len", "64"], "--ppl-seq-len would be ignored"),
    (["--tasks", "piqa", "--zeroshot-cache", "{out}/below"], "--zeroshot-cache {out}/below: {out} is a file"),
])
def test_cli_eval_bad_input(tiny_llama_dir, tmp_path, capsys, args, message):
    from shortened.cli import main

    out, taken = tmp_path / "r.json", tmp_path / "taken"
    taken.write_text("a file")
    args = [a.replace("{out}", str(taken)) for a in args]
    assert main(["eval", "--model", str(tiny_llama_dir), *args, "--out", str(out)]) == 2
    assert message.replace("{out}", str(taken)) in capsys.readouterr().err and not out.exists()


def test_cli_eval_refuses_a_file_as_zeroshot_cache_before_loading(tiny_llama_dir, tmp_path, capsys):
    from shortened.cli import main

    out, not_a_folder = tmp_path / "r.json", tmp_path / "cache.db"
    not_a_folder.write_text("x")
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--tasks", "piqa", "--zeroshot-cache",
                 str(not_a_folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "argument --zeroshot-cache:" in err and "is not a folder" in err and not out.exists()


def test_zeroshot_batch_size_is_auto_on_a_gpu_and_the_cpu_setting_elsewhere(tiny, smollm2_tokenizer):
    from pydantic import ValidationError

    from shortened.errors import ShortenedError
    from shortened.evaluation.zeroshot import resolve_batch_size

    assert resolve_batch_size(None, torch.device("cuda:0")) == "auto" and resolve_batch_size(None, "cuda") == "auto"
    assert resolve_batch_size(None, torch.device("cpu")) == 8 and resolve_batch_size(None, "cpu", 3) == 3
    assert resolve_batch_size(16, "cuda") == 16 and resolve_batch_size("auto", "cpu") == "auto"
    for bad in (0, -2, "big", True, 2.5):
        with pytest.raises(ShortenedError, match="an integer >= 1 or 'auto'"):
            resolve_batch_size(bad, "cpu")
    assert EvalConfig().zeroshot_batch_size is None
    assert EvalConfig(zeroshot_batch_size="auto").zeroshot_batch_size == "auto"
    assert EvalConfig(zeroshot_batch_size=4).zeroshot_batch_size == 4
    for bad in (0, "big"):
        with pytest.raises(ValidationError):
            EvalConfig(zeroshot_batch_size=bad)
    # on this CPU: None runs with the config's batch_size (as before), an explicit size as given; both recorded
    cfg = EvalConfig(ppl=[], tasks=["openbookqa"], limit=2, batch_size=3, progress=False)
    assert evaluate(tiny, smollm2_tokenizer, cfg)["zeroshot"]["batch_size"] == 3
    cfg = cfg.model_copy(update={"zeroshot_batch_size": 2})
    assert evaluate(tiny, smollm2_tokenizer, cfg)["zeroshot"]["batch_size"] == 2


def test_evaluate_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown perplexity dataset"):
        EvalConfig(ppl=["wiki"])
    assert EvalConfig(tasks=["all"]).tasks == list(TASKS)


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity_is_sane(smollm2, smollm2_tokenizer):
    """A sanity number on the real model: first 64 paper windows of WikiText-2 (the full split is in the note)."""
    cfg = EvalConfig(ppl=["wikitext2"], ppl_max_windows=64, progress=False)
    dense = evaluate(smollm2, smollm2_tokenizer, cfg)["ppl"][0]["value"]
    assert 20 < dense < 120  # 64.0 measured; a broken model or protocol gives hundreds to thousands


def test_report_table_has_the_batch1_peak_memory_of_each_model_alone():
    from shortened.sweep.report import trial_table
    from shortened.sweep.selection import lower_is_better

    def trial(key, peak, ratio):
        return {"key": key, "status": "completed", "criterion": None if key == "dense" else "ppl", "method": "none",
                "ratio": None, "ratio_actual": ratio, "num_blocks": 8, "params": 10**6, "tokens_trained": 0,
                "total_s": 60.0, "blocks_requested": None,
                "metrics": [{"name": "peak_memory_mb", "dataset": "gen-b1-n128", "value": peak,
                             "protocol": "params+buffers+cuda_max_allocated"},
                            {"name": "peak_memory_mb", "dataset": "gen-b8-n128", "value": 2 * peak,
                             "protocol": "params+buffers+cuda_max_allocated"}]}

    headers, rows = trial_table([trial("dense", 300.0, 0.0), trial("ppl-r0.2-none", 250.0, 0.2)])
    assert headers.count("peak MiB b1-n128") == 1 and "peak MiB b8-n128" not in headers
    col = headers.index("peak MiB b1-n128")
    assert [r[col] for r in rows] == ["300", "250"]
    assert all(lower_is_better(m) for m in ("peak_memory_mb", "model_memory_mb", "generation_peak_mb"))
