"""Calibration windows: seeded, reproducible, from any local corpus; clear errors for bad sources."""

from __future__ import annotations

import json

import pytest
import torch
import zstandard

from shortened.data.calibration import CalibrationConfig, calibration_windows, describe
from shortened.data import DocumentStream, iter_texts
from shortened.data.sources import resolve_shards
from shortened.errors import ShortenedError


def test_windows_are_seeded_and_from_the_corpus(smollm2_tokenizer, data_dir):
    cfg = CalibrationConfig(n_samples=10, seq_len=128, seed=0)
    a = calibration_windows(smollm2_tokenizer, cfg)
    assert a.shape == (10, 128) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(smollm2_tokenizer, cfg))
    b = calibration_windows(smollm2_tokenizer, cfg.model_copy(update={"seed": 1}))
    assert not torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) == 10  # distinct windows
    info = describe(cfg, a)
    assert info["num_tokens"] == 1280 and len(info["sha256"]) == 64
    # each window's text really occurs in the corpus
    corpus = "".join(iter_texts(str(data_dir / "slimpajama-sample" / "train")))
    text = smollm2_tokenizer.decode(a[0, 8:40])
    assert text.strip()[:40] in corpus


def test_local_jsonl_zst_and_txt_sources(tmp_path, smollm2_tokenizer):
    shard = tmp_path / "c" / "part_0.jsonl.zst"
    shard.parent.mkdir()
    lines = [json.dumps({"text": f"document number {i} " * 20}) for i in range(30)] + ["not json", '{"x": 1}']
    shard.write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    (tmp_path / "c" / "extra.txt").write_text("plain text file " * 50)
    assert [p.rsplit("/", 1)[1] for p in resolve_shards(str(tmp_path / "c")).paths] == ["extra.txt",
                                                                                         "part_0.jsonl.zst"]
    texts = list(iter_texts(str(tmp_path / "c"), max_bad_fraction=0.1))
    assert len(texts) == 31 and texts[0].startswith("plain text")  # bad lines skipped
    with pytest.raises(ShortenedError, match="2 of 33 lines read were bad"):
        list(iter_texts(str(tmp_path / "c")))  # 6% bad lines is above the default 1%
    (tmp_path / "c" / "part_0.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("\n".join(lines[:30]).encode()))
    w = calibration_windows(smollm2_tokenizer, CalibrationConfig(source=str(tmp_path / "c" / "*.zst"),
                                                                 n_samples=4, seq_len=16))
    assert w.shape == (4, 16)


def test_calibration_from_a_mixture_and_from_instructions(tmp_path, smollm2_tokenizer):
    wiki = calibration_windows(smollm2_tokenizer, CalibrationConfig(mixture={"RedPajamaWikipedia": 1},
                                                                    n_samples=4, seq_len=64))
    wiki_docs = "".join(d.record["text"] for d in DocumentStream(CalibrationConfig(
        mixture={"RedPajamaWikipedia": 1}).data_config()))
    for row in wiki:
        assert smollm2_tokenizer.decode(row[4:24]).strip()[:30] in wiki_docs
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}"})
                                                for i in range(40)))
    inst = calibration_windows(smollm2_tokenizer, CalibrationConfig(source=str(tmp_path / "a.jsonl"),
                                                                    format="alpaca", n_samples=2, seq_len=32))
    assert "### Instruction:" in smollm2_tokenizer.decode(inst.flatten())


def test_bad_sources(tmp_path, smollm2_tokenizer):
    with pytest.raises(ShortenedError, match="does not exist"):
        list(iter_texts(str(tmp_path / "missing")))
    with pytest.raises(ShortenedError, match="glob matches no file"):
        list(iter_texts(str(tmp_path / "*.jsonl")))
    (tmp_path / "small.txt").write_text("too short")
    with pytest.raises(ShortenedError, match="fewer than n_samples × seq_len = 1280"):
        calibration_windows(smollm2_tokenizer, CalibrationConfig(source=str(tmp_path / "small.txt")))
    # the seam patch sizes its own set: the error names the option that asked for it
    with pytest.raises(ShortenedError, match="fewer than --patch_samples × seq_len = 1280"):
        calibration_windows(smollm2_tokenizer, CalibrationConfig(source=str(tmp_path / "small.txt")),
                            what="--patch_samples")
