"""Ratio → block count, the keep rule, pruning.json, atomic output and bad-input errors (library and CLI)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny_models import LAYERS, random_tokens, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

from shortened.cli import main
from shortened.criteria import BlockScores
from shortened.errors import ShortenedError
from shortened.pruning import (allowed_blocks, blocks_for_ratio, prune, resolve_block_count, save_pruned,
                               score_blocks)


def test_paper_example_llama7b_20_percent_is_6_of_32_blocks():
    with torch.device("meta"):  # shapes only: no memory for 6.7B parameters
        model = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                                             num_hidden_layers=32, num_attention_heads=32,
                                                             vocab_size=32000))
    assert blocks_for_ratio(model, 0.20) == 6
    assert blocks_for_ratio(model, 0.35) == 11
    assert blocks_for_ratio(model, 0.0) == 0


def test_keep_rule_defaults_have_one_home():
    """pruning.KEEP_FIRST/KEEP_LAST (the paper's 4 and 2) are the defaults of the library, the CLI and a sweep."""
    import inspect

    from shortened.cli import build_parser
    from shortened.pruning import KEEP_FIRST, KEEP_LAST, prune_and_save, score_with_calibration
    from shortened.sweep.config import SweepConfig

    assert (KEEP_FIRST, KEEP_LAST) == (4, 2)
    for fn in (allowed_blocks, score_blocks, score_with_calibration, prune, prune_and_save):
        params = inspect.signature(fn).parameters
        assert (params["keep_first"].default, params["keep_last"].default) == (KEEP_FIRST, KEEP_LAST), fn
    args = build_parser().parse_args(["score", "--model", "m", "--criterion", "ppl", "--out", "o"])
    assert (args.keep_first, args.keep_last) == (KEEP_FIRST, KEEP_LAST)
    fields = SweepConfig.model_fields
    assert (fields["keep_first"].default, fields["keep_last"].default) == (KEEP_FIRST, KEEP_LAST)


def test_keep_rule_and_block_count_errors():
    assert allowed_blocks(8, 4, 2) == [4, 5]
    assert allowed_blocks(8, 0, 0) == list(range(8))
    with pytest.raises(ShortenedError, match="protect all 8 blocks"):
        allowed_blocks(8, 5, 3)
    model = tiny_model("llama")
    with pytest.raises(ShortenedError, match="more than the 2 blocks"):
        resolve_block_count(model, ratio=None, blocks=3, keep_first=4, keep_last=2)
    with pytest.raises(ShortenedError, match=r"ratio 0.9 \(\d+ of 8 blocks\) removes more"):
        resolve_block_count(model, ratio=0.9, blocks=None, keep_first=4, keep_last=2)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ShortenedError, match="must be in \\[0, 1\\)"):
            resolve_block_count(model, ratio=bad, blocks=None, keep_first=0, keep_last=0)
    assert resolve_block_count(model, ratio=None, blocks=3, keep_first=0, keep_last=0) == 3


def test_prune_report_and_saved_checkpoint(tmp_path):
    model = tiny_model("qwen2", max_window_layers=3, use_sliding_window=True, sliding_window=8)
    types_before = list(model.config.layer_types)
    assert len(set(types_before)) == 2  # mixed full/sliding layers, so the subsetting is visible
    calib = random_tokens(4, 24)
    scores = score_blocks(model, "ppl", calib, keep_first=1, keep_last=1, batch_size=4, progress=False)
    n = blocks_for_ratio(model, 0.3)
    result = prune(model, scores, n, keep_first=1, keep_last=1, ratio_requested=0.3, model_name="tiny")
    r = result.report
    expected_removed = sorted(sorted(range(1, 7), key=lambda i: scores.scores[i])[:n])
    assert r["removed_blocks"] == expected_removed
    assert r["kept_blocks"] == [i for i in range(LAYERS) if i not in expected_removed]
    assert r["num_blocks_before"] == LAYERS and r["num_blocks_after"] == LAYERS - n
    assert r["params_after"] < r["params_before"]
    assert r["ratio_actual"] == pytest.approx(1 - r["params_after"] / r["params_before"])
    assert r["ratio_actual"] <= 0.3
    out = save_pruned(result, tmp_path / "out")
    saved = json.loads((out / "pruning.json").read_text())
    assert saved["scores"] == pytest.approx(scores.scores) and saved["removed_blocks"] == expected_removed
    assert set(saved) >= {"model", "criterion", "scores", "removed_blocks", "kept_blocks", "num_blocks_before",
                          "num_blocks_after", "params_before", "params_after", "ratio_requested", "ratio_actual",
                          "keep_first", "keep_last", "calibration"}
    assert saved["scoring"] == {"dtype": "float32", "device": "cpu", "attn_implementation": "sdpa",
                                "torch_version": torch.__version__}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == LAYERS - n
    assert list(reloaded.config.layer_types) == [types_before[i] for i in r["kept_blocks"]]
    with pytest.raises(ShortenedError, match="exists and is not empty"):
        save_pruned(result, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    result = prune(model, BlockScores("magnitude", [1.0] * LAYERS), 1, keep_first=0, keep_last=0)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- CLI -------------------------------------------------------------------------------------------------------


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_cli_score_then_prune_reuses_scores(tiny_llama_dir, tmp_path, capsys):
    scores = tmp_path / "scores.json"
    assert run_cli("score", "--model", tiny_llama_dir, "--criterion", "ppl", "--calib-samples", 4,
                   "--calib-seq-len", 32, "--keep-first", 1, "--keep-last", 1, "--quiet", "--out", scores) == 0
    data = json.loads(scores.read_text())
    assert data["criterion"] == "ppl" and len(data["scores"]) == LAYERS
    assert data["calibration"]["n_samples"] == 4 and data["calibration"]["seq_len"] == 32
    assert data["calibration"]["resolved_source"].endswith("slimpajama-sample/train")
    # With --scores nothing is scored: an unreadable calibration source is never touched.
    out = tmp_path / "pruned"
    assert run_cli("prune", "--model", tiny_llama_dir, "--criterion", "ppl", "--blocks", 2, "--keep-first", 1,
                   "--keep-last", 1, "--scores", scores, "--calib-source", tmp_path / "missing", "--out", out) == 0
    report = json.loads((out / "pruning.json").read_text())
    assert report["scores"] == pytest.approx(data["scores"])
    assert report["calibration"] == data["calibration"]
    assert report["removed_blocks"] == sorted(sorted(range(1, 7), key=lambda i: data["scores"][i])[:2])
    assert (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == LAYERS - 2


def test_sweep_and_cli_score_through_one_path(tiny_llama_dir, tmp_path):
    """A sweep's shared scores and ``shortened score`` run the same code (pruning.score_with_calibration): the
    same settings give the same scores and the same calibration record; a window longer than the model's positions
    is refused in the sweep too, naming its field."""
    from shortened.sweep.config import SweepConfig
    from shortened.sweep.trial import compute_scores

    cli_out = tmp_path / "cli.json"
    assert run_cli("score", "--model", tiny_llama_dir, "--criterion", "ppl", "--calib-samples", 2,
                   "--calib-seq-len", 16, "--keep-first", 1, "--keep-last", 1, "--device", "cpu", "--dtype", "float32",
                   "--quiet", "--out", cli_out) == 0
    fields = dict(name="one", model=str(tiny_llama_dir), criteria=["ppl"], blocks=[1], keep_first=1, keep_last=1,
                  calibration={"n_samples": 2, "seq_len": 16}, train={"train_tokens": 8}, device="cpu",
                  dtype="float32", storage_path=str(tmp_path / "runs"))
    cfg = SweepConfig.model_validate(fields)
    sweep = BlockScores.load(compute_scores(cfg.model_dump(mode="json"), "ppl", 1, str(tmp_path / "s" / "ppl.json")))
    cli = BlockScores.load(cli_out)
    assert sweep.scores == pytest.approx(cli.scores)
    assert sweep.calibration == cli.calibration and sweep.model == cli.model == str(tiny_llama_dir)
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["ppl.json"]  # written atomically, nothing beside it
    long = SweepConfig.model_validate({**fields, "calibration": {"n_samples": 2, "seq_len": 257}})
    with pytest.raises(ShortenedError, match="calibration.seq_len: 257 tokens per sequence"):
        compute_scores(long.model_dump(mode="json"), "ppl", 1, str(tmp_path / "s" / "long.json"))


@pytest.mark.parametrize("args, message", [
    (["--criterion", "nope", "--ratio", "0.2"], "criterion 'nope' is unknown"),
    (["--criterion", "magnitude", "--ratio", "1.0"], r"ratio 1.0 must be in \[0, 1\)"),
    (["--criterion", "magnitude", "--blocks", "3"], "removes more than the 2 blocks"),
    (["--criterion", "magnitude", "--blocks", "1", "--keep-first", "6", "--keep-last", "2"], "protect all 8"),
])
def test_cli_bad_input_fails_clearly_and_writes_nothing(tiny_llama_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert run_cli("prune", "--model", tiny_llama_dir, *args, "--out", out) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_unreadable_model_and_non_empty_output(tiny_llama_dir, tmp_path, capsys):
    assert run_cli("prune", "--model", tmp_path / "nowhere", "--criterion", "magnitude", "--blocks", 1,
                   "--out", tmp_path / "o") == 2
    assert "nowhere" in capsys.readouterr().err
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text("{broken")
    assert run_cli("prune", "--model", bad, "--criterion", "magnitude", "--blocks", 1, "--out", tmp_path / "o") == 2
    assert "could not be read" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    assert run_cli("prune", "--model", tiny_llama_dir, "--criterion", "magnitude", "--blocks", 1,
                   "--out", full) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert run_cli("prune", "--model", tiny_llama_dir, "--criterion", "magnitude", "--blocks", 1,
                   "--out", full, "--overwrite") == 0
    assert (full / "pruning.json").is_file() and not (full / "keep.txt").exists()
    assert not (tmp_path / "o").exists()


# --- the saved dtype ---------------------------------------------------------------------------------------------

def _saved_dtypes(folder) -> dict[str, str]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_slice(k).get_dtype() for k in st.keys()})
    return out


@pytest.fixture()
def bf16_source(tmp_path, smollm2_tokenizer):
    """A tiny Llama stored in bf16 (config.json dtype bfloat16), tied embeddings, with a tokenizer."""
    src = tmp_path / "bf16-src"
    tiny_model("llama", vocab_size=len(smollm2_tokenizer), tie_word_embeddings=True).to(torch.bfloat16
                                                                                       ).save_pretrained(src)
    smollm2_tokenizer.save_pretrained(src)
    assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
    return src


def test_pruned_checkpoint_is_saved_in_the_source_dtype_and_the_scored_model_is_untouched(bf16_source, tmp_path):
    from shortened.io import resolve_save_dtype
    from shortened.models import load_model

    model = load_model(str(bf16_source), device="cpu", dtype="float32")  # as a CPU sweep holds it
    result = prune(model, score_blocks(model, "magnitude", None, keep_first=1, keep_last=1), 2, keep_first=1,
                   keep_last=1)
    ids = random_tokens(2, 12)
    with torch.no_grad():
        before = model(ids).logits
    dtype = resolve_save_dtype("auto", str(bf16_source))
    assert dtype == torch.bfloat16
    out = save_pruned(result, tmp_path / "out", dtype=dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    saved = _saved_dtypes(out)
    assert saved and set(saved.values()) == {"BF16"}
    assert "lm_head.weight" not in saved  # tied weights stay one tensor
    assert json.loads((out / "pruning.json").read_text())["saved_dtype"] == "bfloat16"
    assert result.report["saved_dtype"] == "bfloat16"
    # the model in memory, the one that was scored, is unchanged: fp32, same logits, its config still fp32
    assert {p.dtype for p in model.parameters()} == {torch.float32} and model.config.dtype in (torch.float32,
                                                                                               "float32")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16 and reloaded.config.num_hidden_layers == LAYERS - 2
    live = model.state_dict()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, live[k].to(torch.bfloat16)), k
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_cli_prune_saves_the_source_dtype_unless_save_dtype_says_otherwise(bf16_source, tmp_path):
    common = ["--criterion", "magnitude", "--blocks", 2, "--keep-first", 1, "--keep-last", 1, "--device", "cpu"]
    assert run_cli("prune", "--model", bf16_source, *common, "--out", tmp_path / "auto") == 0
    assert set(_saved_dtypes(tmp_path / "auto").values()) == {"BF16"}
    assert json.loads((tmp_path / "auto" / "pruning.json").read_text())["saved_dtype"] == "bfloat16"
    assert run_cli("prune", "--model", bf16_source, *common, "--save-dtype", "float32", "--out", tmp_path / "f32") == 0
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    assert set(_saved_dtypes(tmp_path / "f32").values()) == {"F32"}
    assert json.loads((tmp_path / "f32" / "pruning.json").read_text())["saved_dtype"] == "float32"
    # both hold the same values: bf16 widened exactly
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in ("auto", "f32"))
    assert all(torch.equal(a[k].float(), b[k]) for k in a)
    assert run_cli("prune", "--model", bf16_source, *common, "--save-dtype", "int8", "--out", tmp_path / "x") == 2


def test_resolve_save_dtype_reads_the_source(tmp_path, bf16_source, smollm2_hf_dir):
    import numpy as np
    from gguf import GGUFWriter

    from shortened.errors import ShortenedError
    from shortened.io import resolve_save_dtype, source_dtype

    assert resolve_save_dtype("auto", str(bf16_source)) == torch.bfloat16
    assert resolve_save_dtype("float16", str(bf16_source)) == torch.float16
    assert resolve_save_dtype("float32") == torch.float32 and resolve_save_dtype("bfloat16") == torch.bfloat16
    old = tmp_path / "old-config"  # transformers 4's key
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16"}))
    assert source_dtype(str(old)) == torch.float16
    silent = tmp_path / "no-dtype"
    silent.mkdir()
    (silent / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert source_dtype(str(silent)) is None
    assert resolve_save_dtype("auto", str(silent)) == torch.float32  # nothing known: lossless
    assert resolve_save_dtype("auto", str(silent), fallback=torch.bfloat16) == torch.bfloat16  # the training dtype
    assert resolve_save_dtype("auto", str(bf16_source), fallback=torch.float32) == torch.bfloat16  # the source wins
    assert resolve_save_dtype("auto", "smollm2") == torch.float32  # Q4_1 GGUF: dequantized to fp32
    assert json.loads((smollm2_hf_dir / "config.json").read_text())["dtype"] == "float32"

    def gguf(name, weight_type):
        w = GGUFWriter(str(tmp_path / name), "llama")
        w.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), dtype=np.float16 if weight_type == "F16" else
                                                     np.float32))
        w.add_tensor("blk.0.attn_norm.weight", np.ones(4, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(tmp_path / name)

    assert source_dtype(gguf("half.gguf", "F16")) == torch.float16
    assert source_dtype(gguf("full.gguf", "F32")) == torch.float32
    with pytest.raises(ShortenedError, match="choose one of auto, float32, bfloat16, float16"):
        resolve_save_dtype("int8", str(bf16_source))


def test_save_pretrained_as_keeps_fp32_modules_and_casts_in_place_only_when_asked(tmp_path):
    from shortened.io import save_pretrained_as

    model = tiny_model("llama")
    model._keep_in_fp32_modules_strict = {"norm"}  # as MoE router biases are kept (transformers' own flag)
    assert save_pretrained_as(model, tmp_path / "copy", torch.bfloat16) == "bfloat16"
    saved = _saved_dtypes(tmp_path / "copy")
    assert {v for k, v in saved.items() if "norm" in k} == {"F32"}
    assert {v for k, v in saved.items() if "norm" not in k} == {"BF16"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert save_pretrained_as(model, tmp_path / "inplace", torch.bfloat16, in_place=True) == "bfloat16"
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # the throwaway copy was cast
    assert model.model.norm.weight.dtype == torch.float32
    assert _saved_dtypes(tmp_path / "inplace") == saved
    assert save_pretrained_as(model, tmp_path / "as-held") == "bfloat16"  # None: the dtype the model holds


def test_retrained_export_is_saved_in_the_trained_models_dtype(bf16_source, tmp_path):
    """LoRA on a bf16 model, trained in fp32 on this CPU: the export (merged in fp32) is written in bf16, the
    model folder's dtype; ``save_dtype: float32`` keeps fp32. retraining.json records it."""
    from shortened.data.config import DataConfig
    from shortened.training.config import TrainConfig
    from shortened.training.loop import Phase, run
    from shortened.training.session import LocalSession

    for save_dtype, want, stored in (("auto", "bfloat16", "BF16"), ("float32", "float32", "F32")):
        c = TrainConfig(method="lora", train_tokens=64 * 2 * 2, micro_batch_size=2, data=DataConfig(seq_len=64),
                        report_every_steps=2, save_dtype=save_dtype)
        out = tmp_path / f"lora-{save_dtype}"
        run(Phase(method="lora", model=str(bf16_source), out=str(out), tokens=c.train_tokens, train=c),
            LocalSession(tmp_path / f"run-{save_dtype}"))
        assert json.loads((out / "config.json").read_text())["dtype"] == want
        assert set(_saved_dtypes(out).values()) == {stored}
        assert json.loads((out / "retraining.json").read_text())["saved_dtype"] == want
    assert TrainConfig(train_tokens=1).save_dtype == "auto"


def test_sweep_prune_stage_and_retrain_take_the_configs_save_dtype(bf16_source, tmp_path):
    from shortened.criteria import BlockScores
    from shortened.sweep.config import SweepConfig
    from shortened.sweep.trial import TrialSpec, prune_stage

    base = dict(name="dt", model=str(bf16_source), criteria=["magnitude"], blocks=[2], keep_first=1, keep_last=1,
                train={"train_tokens": 64}, storage_path=str(tmp_path / "runs"), device="cpu")
    scores = tmp_path / "magnitude.json"
    BlockScores("magnitude", [float(i) for i in range(LAYERS)]).save(scores)
    spec = TrialSpec(method="none", criterion="magnitude", blocks=2).model_dump()
    for save_dtype, stored in (("auto", "BF16"), ("float32", "F32")):
        cfg = SweepConfig.model_validate({**base, "save_dtype": save_dtype})
        report = prune_stage(cfg.model_dump(mode="json"), spec, str(scores), str(tmp_path / save_dtype))
        assert set(_saved_dtypes(tmp_path / save_dtype).values()) == {stored}
        assert report["saved_dtype"] == {"BF16": "bfloat16", "F32": "float32"}[stored]
    assert SweepConfig.model_validate(base).save_dtype == "auto"
    with pytest.raises(ValueError, match="set save_dtype at the top level"):
        SweepConfig.model_validate({**base, "train": {"train_tokens": 64, "save_dtype": "float32"}})
    with pytest.raises(ValueError, match="save_dtype"):
        SweepConfig.model_validate({**base, "save_dtype": "int8"})


def test_materialize_keeps_the_source_dtype(bf16_source, tmp_path):
    from shortened.models import materialize

    assert set(_saved_dtypes(materialize(str(bf16_source), tmp_path / "auto")).values()) == {"BF16"}
    f32 = materialize(str(bf16_source), tmp_path / "f32", save_dtype="float32")
    assert json.loads((f32 / "config.json").read_text())["dtype"] == "float32"
    assert set(_saved_dtypes(f32).values()) == {"F32"}
