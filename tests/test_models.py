"""Model loading: GGUF file, folder + GGUF name, folder with one GGUF, HF folder, hub id (offline here)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from shortened.errors import ShortenedError
from shortened.models import SMOLLM2_GGUF, ModelSource, load_model, resolve_source, smollm2_dir


def test_resolve_source_forms(tmp_path, smollm2_hf_dir):
    d = smollm2_dir()
    assert resolve_source("smollm2") == ModelSource(str(d), SMOLLM2_GGUF)
    assert resolve_source(str(d / SMOLLM2_GGUF)) == ModelSource(str(d), SMOLLM2_GGUF)
    assert resolve_source(str(d), SMOLLM2_GGUF) == ModelSource(str(d), SMOLLM2_GGUF)
    assert resolve_source(str(d)) == ModelSource(str(d), SMOLLM2_GGUF)  # the only .gguf in the folder
    assert resolve_source(str(smollm2_hf_dir)) == ModelSource(str(smollm2_hf_dir))
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ModelSource("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(ShortenedError, match="does not exist"):
        resolve_source(str(tmp_path / "x.gguf"))
    with pytest.raises(ShortenedError, match="not found in folder"):
        resolve_source(str(d), "other.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShortenedError, match="no config.json and no .gguf"):
        resolve_source(str(tmp_path / "empty"))


def test_gguf_load_matches_converted_folder(smollm2, tmp_path):
    """The GGUF path (dequantized, quantizer dropped) gives the same weights as the cached HF folder."""
    gguf = tmp_path / "copy"
    gguf.mkdir()
    shutil.copy(smollm2_dir() / SMOLLM2_GGUF, gguf / "m.gguf")
    model = load_model(str(gguf / "m.gguf"), device="cpu", dtype="float32")
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert getattr(model, "hf_quantizer", None) is None
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, smollm2(ids).logits, atol=1e-5)
    model.save_pretrained(tmp_path / "saved")  # refuses while the GGUF quantizer is attached
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(ShortenedError, match="'no-such-org/no-such-model' could not be read"):
        load_model("no-such-org/no-such-model", device="cpu")


@pytest.mark.parametrize("bf16, scoring, training", [(True, torch.bfloat16, "bf16"), (False, torch.float32, "fp16")])
def test_one_precision_policy_for_scoring_and_training(monkeypatch, bf16, scoring, training):
    """device.auto_dtype is what ``auto`` means everywhere: bf16 on a GPU with bf16; on an older GPU fp16 for
    training (loss-scaled) but fp32 for scoring and evaluation; fp32 on CPU."""
    from shortened.device import auto_dtype, resolve_dtype
    from shortened.training.config import TrainConfig
    from shortened.training.deepspeed_config import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cuda, cpu, cfg = torch.device("cuda"), torch.device("cpu"), TrainConfig(train_tokens=1)
    assert resolve_dtype("auto", cuda) == auto_dtype(cuda) == scoring
    assert resolve_precision(cfg, cuda) == training
    assert auto_dtype(cuda, training=True) == {"bf16": torch.bfloat16, "fp16": torch.float16}[training]
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_precision(cfg, cpu) == "fp32"
    assert resolve_precision(cfg.model_copy(update={"precision": "fp32"}), cuda) == "fp32"  # set: as it is


def test_bad_device_and_dtype():
    from shortened.device import resolve_dtype, resolve_device
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ShortenedError, match="dtype: 'float8'"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ShortenedError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_folder_without_tokenizer_files_is_not_given_a_blank_tokenizer(tmp_path):
    """transformers builds the config's tokenizer class with no vocabulary for such a folder (Qwen2, GPT-2): it
    would encode calibration text as nothing. It is refused as having no tokenizer."""
    from tiny_models import tiny_model

    from shortened.errors import ShortenedError
    from shortened.models import load_tokenizer

    for arch in ("qwen2", "gpt2"):
        tiny_model(arch).save_pretrained(tmp_path / arch)
        with pytest.raises(ShortenedError, match="is empty .*holds no tokenizer files"):
            load_tokenizer(str(tmp_path / arch))


def test_a_missing_path_under_an_existing_folder_is_local(tmp_path, monkeypatch):
    from shortened.errors import ShortenedError
    from shortened.models import resolve_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "afile").write_text("")
    for spec in ("models/nope", "afile/x"):
        with pytest.raises(ShortenedError, match=f"no such folder '{spec}'"):
            resolve_source(spec)
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").path == "HuggingFaceTB/SmolLM2-135M"  # a hub id stays one


def test_attn_implementation_resolution(monkeypatch):
    """auto: flash_attention_2 only on CUDA in half precision with flash_attn importable, else sdpa; explicit values
    pass through; an explicit flash-attention without its package is refused naming the option."""
    from shortened import device
    from shortened.device import resolve_attn_implementation

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attn_implementation("auto", cpu, torch.float32) == "sdpa"
    assert resolve_attn_implementation("auto", cpu, torch.bfloat16) == "sdpa"
    for explicit in ("eager", "sdpa", "flex_attention"):
        assert resolve_attn_implementation(explicit, cpu, torch.float32) == explicit
    monkeypatch.setattr(device, "package_importable", lambda name: False)
    with pytest.raises(ShortenedError, match="attn_implementation 'flash_attention_2': the flash_attn package"):
        resolve_attn_implementation("flash_attention_2", cuda, torch.bfloat16)
    assert resolve_attn_implementation("auto", cuda, torch.bfloat16) == "sdpa"  # no flash_attn: sdpa
    monkeypatch.setattr(device, "package_importable", lambda name: name == "flash_attn")
    assert resolve_attn_implementation("auto", cuda, torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", cuda, torch.float16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", cuda, torch.float32) == "sdpa"  # flash runs in half precision only
    assert resolve_attn_implementation("auto", cpu, torch.bfloat16) == "sdpa"
    with pytest.raises(ShortenedError, match="attn_implementation 'flash_attention_2' runs in float16/bfloat16"):
        resolve_attn_implementation("flash_attention_2", cuda, torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(ShortenedError, match="attn_implementation 'flash_attention_2' needs a CUDA device"):
            resolve_attn_implementation("flash_attention_2", cpu, torch.bfloat16)
    with pytest.raises(ShortenedError, match="attn_implementation: '' is not"):
        resolve_attn_implementation("", cpu, torch.float32)


def test_load_model_attn_implementation(tmp_path):
    """auto loads Llama with sdpa and Gemma-2 (no sdpa support in transformers) with eager; explicit values are used
    as they are, and one the architecture refuses is an error naming the option."""
    from tiny_models import tiny_model

    from shortened.models import attn_used

    for arch in ("llama", "gemma2"):
        tiny_model(arch).save_pretrained(tmp_path / arch)
    assert attn_used(load_model(str(tmp_path / "llama"), device="cpu")) == "sdpa"
    assert attn_used(load_model(str(tmp_path / "gemma2"), device="cpu")) == "eager"
    assert attn_used(load_model(str(tmp_path / "llama"), device="cpu", attn_implementation="eager")) == "eager"
    with pytest.raises(ShortenedError, match="attn_implementation 'sdpa': model .*gemma2.* could not be loaded"):
        load_model(str(tmp_path / "gemma2"), device="cpu", attn_implementation="sdpa")
    with pytest.raises(ShortenedError, match="attn_implementation 'nonsense'"):
        load_model(str(tmp_path / "llama"), device="cpu", attn_implementation="nonsense")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ShortenedError, match="attn_implementation 'flash_attention_2': the flash_attn package"):
            load_model(str(tmp_path / "llama"), device="cpu", attn_implementation="flash_attention_2")


def test_cli_attn_implementation_flag(tmp_path):
    """Every verb that loads a model takes --attn-implementation (default auto); score records what was used."""
    import json

    from tiny_models import tiny_model

    from shortened.cli import build_parser, main

    parser = build_parser()
    for verb in (["score", "--criterion", "ppl", "--out", "o.json"], ["prune", "--criterion", "ppl", "--blocks", "1",
                 "--out", "o"], ["prune-width", "--ratio", "0.1", "--out", "o"], ["eval", "--out", "o.json"]):
        assert parser.parse_args([*verb, "--model", "m"]).attn_implementation == "auto"
        assert parser.parse_args([*verb, "--model", "m", "--attn-implementation", "eager"]).attn_implementation == \
            "eager"
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    out = tmp_path / "scores.json"
    assert main(["score", "--model", str(tmp_path / "tiny"), "--criterion", "magnitude", "--device", "cpu",
                 "--dtype", "float32", "--attn-implementation", "eager", "--out", str(out), "--quiet"]) == 0
    record = json.loads(out.read_text())
    assert (record["dtype"], record["device"], record["attn_implementation"]) == ("float32", "cpu", "eager")
    assert main(["score", "--model", str(tmp_path / "tiny"), "--criterion", "magnitude", "--device", "cpu",
                 "--attn-implementation", "flash_attention_2", "--out", str(tmp_path / "no.json")]) == 2
    assert not (tmp_path / "no.json").exists()
