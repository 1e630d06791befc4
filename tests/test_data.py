"""The streaming data layer: rank splits, packing, exact resume (also in a new process), mixtures, Alpaca
masking, object-store URLs, bad input, and flat memory."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from collections import Counter

import fsspec
import psutil
import pytest
import torch
import zstandard

from shortened.data import DataConfig, DocumentStream, PackedStream, take
from shortened.data.formats import IGNORE_INDEX, alpaca_prompt, encode
from shortened.errors import ShortenedError
from shortened.paths import REPO_ROOT


def sample(**kw) -> DataConfig:
    return DataConfig(source="slimpajama-sample", **kw)


def write_zst(path, records, frames: int = 1, checksum: bool = True) -> None:
    """JSON lines compressed as ``frames`` zstd frames (line-aligned), like a shard written in parts."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    per = -(-len(lines) // frames)
    c = zstandard.ZstdCompressor(write_checksum=checksum)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(c.compress(("\n".join(lines[i:i + per]) + "\n").encode())
                              for i in range(0, len(lines), per)))


def small_corpus(root, n_shards=3, docs=25):
    """Shards of documents of very different lengths (1 word to many blocks) from three sets."""
    sets = ["RedPajamaWikipedia", "RedPajamaC4", "RedPajamaGithub"]
    for s in range(n_shards):
        write_zst(root / f"chunk1/part_{s}.jsonl.zst",
                  [{"text": f"shard {s} doc {i}: " + "word " * (((i * 7 + s * 3) % 40) ** 2 // 10),
                    "meta": {"redpajama_set_name": sets[(i + s) % 3]}} for i in range(docs)])
    return root


# -- rank splits --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_see_every_document_exactly_once_per_epoch(world):
    everything = Counter(d.key for d in DocumentStream(sample(epochs=1)))
    assert len(everything) == 545 and max(everything.values()) == 1
    seen: Counter = Counter()
    for rank in range(world):
        stream = DocumentStream(sample(epochs=1), rank, world)
        assert stream.split_mode == ("shard" if 8 % world == 0 else "document")
        keys = [d.key for d in stream]
        assert len(keys) >= 545 // world - 1  # balanced within one document (documents) or a shard's share
        seen.update(keys)
    assert seen == everything


def test_shard_split_gives_whole_shards_and_document_split_reads_all():
    two = DocumentStream(sample(), 1, 2)
    assert [p.rsplit("_", 1)[1] for p in two.rank_shards(0)] == ["1.jsonl.zst", "3.jsonl.zst", "5.jsonl.zst",
                                                                 "7.jsonl.zst"]
    assert len(DocumentStream(sample(), 1, 3).rank_shards(0)) == 8
    forced = DocumentStream(sample(split_by="document"), 0, 2)
    assert forced.split_mode == "document"
    with pytest.raises(ShortenedError, match="8 shards, fewer than 16 ranks"):
        DocumentStream(sample(split_by="shard"), 0, 16)
    with pytest.raises(ShortenedError, match="rank 3 is not in a world of size 3"):
        DocumentStream(sample(), 3, 3)


def test_shuffled_shard_order_is_seeded_and_changes_per_epoch():
    s = DocumentStream(sample(shuffle_shards=True, seed=1), 0, 1)
    assert s.rank_shards(0) == DocumentStream(sample(shuffle_shards=True, seed=1)).rank_shards(0)
    assert s.rank_shards(0) != s.rank_shards(1)
    assert sorted(s.rank_shards(0)) == sorted(s.rank_shards(1)) == list(s.shards.paths)


# -- packing ------------------------------------------------------------------------------------------------------

def test_packing_is_the_token_stream_cut_into_blocks(tmp_path, smollm2_tokenizer):
    cfg = DataConfig(source=str(small_corpus(tmp_path)), seq_len=32, epochs=1)
    expected = []
    for doc in DocumentStream(cfg):
        ids, labels = encode(doc.record, cfg, smollm2_tokenizer)
        assert ids[-1] == smollm2_tokenizer.eos_token_id and labels == ids
        expected += ids
    blocks = list(PackedStream(cfg, smollm2_tokenizer))
    assert len(blocks) == len(expected) // 32  # no padding: only the last partial block is dropped
    flat = torch.cat([b["input_ids"] for b in blocks]).tolist()
    assert flat == expected[:len(flat)]
    assert all(torch.equal(b["labels"], b["input_ids"]) and b["input_ids"].dtype == torch.long for b in blocks)
    batch = take(iter(PackedStream(cfg, smollm2_tokenizer)), 4)
    assert batch["input_ids"].shape == (4, 32) and torch.equal(batch["input_ids"][1], blocks[1]["input_ids"])


def test_document_positions_restart_at_each_document_and_block(tmp_path, smollm2_tokenizer):
    """``document_positions``: ``position_ids`` count from 0 at each document's first token and at each block's first
    token; the token stream and the cursor are the plain packing's, and a resumed stream gives the same positions."""
    texts = ["one", "two three four", "five six", "seven eight nine ten eleven twelve thirteen", "x y"]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = DataConfig(source=str(tmp_path / "a"), seq_len=8, epochs=1, document_positions=True)
    assert [len(encode({"text": t}, cfg, smollm2_tokenizer)[0]) for t in texts] == [2, 4, 3, 8, 3]  # EOS included
    blocks = list(PackedStream(cfg, smollm2_tokenizer))
    assert [b["position_ids"].tolist() for b in blocks] == [
        [0, 1, 0, 1, 2, 3, 0, 1],  # documents 1, 2 and the start of 3
        [0, 0, 1, 2, 3, 4, 5, 6],  # the end of 3 (restarted: the block's first token), then 4
    ]
    # a corpus of documents from 1 word to several blocks: the rule, the unchanged stream, resume
    cfg = DataConfig(source=str(small_corpus(tmp_path / "b")), seq_len=32, epochs=1, document_positions=True)
    plain = list(PackedStream(cfg.model_copy(update={"document_positions": False}), smollm2_tokenizer))
    stream = PackedStream(cfg, smollm2_tokenizer)
    blocks, states = [], []
    for b in stream:
        blocks.append(b)
        states.append(stream.state_dict())
    assert "position_ids" not in plain[0] and len(blocks) == len(plain) > 20
    assert all(torch.equal(b["input_ids"], p["input_ids"]) and torch.equal(b["labels"], p["labels"])
               for b, p in zip(blocks, plain))
    within = []  # each token's position in its document, over the whole stream
    for doc in DocumentStream(cfg):
        within += range(len(encode(doc.record, cfg, smollm2_tokenizer)[0]))
    for k, b in enumerate(blocks):
        w = within[k * 32:(k + 1) * 32]
        first = next((i for i in range(1, 32) if w[i] == 0), 32)  # the leading fragment restarts at 0
        assert b["position_ids"].tolist() == [v - w[0] for v in w[:first]] + w[first:], k
        assert b["position_ids"].dtype == torch.long
    for k in (0, 5, len(blocks) - 2):
        resumed = PackedStream(cfg, smollm2_tokenizer)
        resumed.load_state_dict(states[k])
        assert torch.equal(next(iter(resumed))["position_ids"], blocks[k + 1]["position_ids"])
    assert take(iter(PackedStream(cfg, smollm2_tokenizer)), 3)["position_ids"].shape == (3, 32)


# -- resume -------------------------------------------------------------------------------------------------------

def test_cursor_resumes_exactly_after_every_block(tmp_path, smollm2_tokenizer):
    """Across document, shard and epoch boundaries, with a mixture that repeats and drops documents."""
    cfg = DataConfig(source=str(small_corpus(tmp_path)), seq_len=48, seed=3,
                     mixture={"RedPajamaWikipedia": 1.5, "RedPajamaC4": 1, "RedPajamaGithub": 0.25})
    ref = PackedStream(cfg, smollm2_tokenizer, rank=1, world_size=2)
    assert ref.docs.split_mode == "document"
    blocks, states = [], []
    it = iter(ref)
    for _ in range(90):
        blocks.append(next(it)["input_ids"])
        states.append(json.loads(json.dumps(ref.state_dict())))  # as a checkpoint stores it
    assert states[-1]["position"]["epoch"] >= 1  # the reference crossed an epoch boundary
    assert {s["position"]["copy"] for s in states} == {0, 1}  # and repeated documents
    for k in range(len(blocks) - 1):
        resumed = PackedStream(cfg, smollm2_tokenizer, rank=1, world_size=2)
        resumed.load_state_dict(states[k])
        got = next(iter(resumed))["input_ids"]
        assert torch.equal(got, blocks[k + 1]), f"resuming after block {k} gave a different block"
        assert resumed.state_dict() == states[k + 1]


RESUME = """
import json, sys, torch
from shortened.data import DataConfig, PackedStream
from shortened.models import load_tokenizer
cfg = DataConfig.model_validate_json(sys.argv[1])
s = PackedStream(cfg, load_tokenizer(sys.argv[2]), rank=int(sys.argv[3]), world_size=int(sys.argv[4]))
s.load_state_dict(json.load(open(sys.argv[5])))
it = iter(s)
torch.save(torch.stack([next(it)["input_ids"] for _ in range(int(sys.argv[6]))]), sys.argv[7])
"""


@pytest.mark.parametrize("rank,world", [(1, 2), (2, 3)])
def test_resume_in_a_new_process_continues_with_the_exact_next_token(tmp_path, smollm2_tokenizer, smollm2_hf_dir,
                                                                     rank, world):
    cfg = sample(seq_len=512)
    k, m = 900, 40  # 900 blocks = 461k tokens: past the first shard of this rank's share
    ref = PackedStream(cfg, smollm2_tokenizer, rank=rank, world_size=world)
    it = iter(ref)
    for _ in range(k):
        next(it)
    cursor = tmp_path / "cursor.json"
    cursor.write_text(json.dumps(ref.state_dict()))
    assert ref.state_dict()["position"]["shard" if world == 2 else "line"] > 0
    expected = torch.stack([next(it)["input_ids"] for _ in range(m)])
    out = tmp_path / "next.pt"
    subprocess.run([sys.executable, "-c", RESUME, cfg.model_dump_json(), str(smollm2_hf_dir), str(rank), str(world),
                    str(cursor), str(m), str(out)], check=True, cwd=REPO_ROOT, timeout=300)
    assert torch.equal(torch.load(out), expected)


def test_cursor_from_another_stream_is_refused(smollm2_tokenizer):
    a = PackedStream(sample(seq_len=64), smollm2_tokenizer, rank=0, world_size=2)
    next(iter(a))
    b = PackedStream(sample(seq_len=64), smollm2_tokenizer, rank=0, world_size=3)
    with pytest.raises(ShortenedError, match="world_size=2.*world_size=3"):
        b.load_state_dict(a.state_dict())
    c = PackedStream(sample(seq_len=128), smollm2_tokenizer, rank=0, world_size=2)
    with pytest.raises(ShortenedError, match="seq_len=64"):
        c.load_state_dict(a.state_dict())


# -- mixture ------------------------------------------------------------------------------------------------------

def test_mixture_keeps_weights_and_drops_sets():
    def counts(**kw):
        return Counter(d.record["meta"]["redpajama_set_name"] for d in DocumentStream(sample(epochs=1, **kw)))

    full = counts()
    assert full == {"RedPajamaGithub": 462, "RedPajamaWikipedia": 56, "RedPajamaC4": 27}
    mix = {"RedPajamaWikipedia": 1, "RedPajamaC4": 2, "RedPajamaGithub": 0.5}
    got = counts(mixture=mix)
    assert got["RedPajamaWikipedia"] == 56 and got["RedPajamaC4"] == 54
    assert 200 < got["RedPajamaGithub"] < 262  # Binomial(462, 0.5): mean 231, sd 10.7
    assert counts(mixture=mix) == got  # seeded
    assert counts(mixture=mix, seed=1)["RedPajamaGithub"] != got["RedPajamaGithub"]
    assert counts(mixture={"RedPajamaC4": 1}) == {"RedPajamaC4": 27}  # sets not named are dropped
    with pytest.raises(ShortenedError, match="got no documents.*mixture"):
        counts(mixture={"RedPajamaBook": 1})
    with pytest.raises(ValueError, match="weights must be >= 0"):
        sample(mixture={"RedPajamaC4": -1})
    with pytest.raises(ValueError, match="keeps no set"):
        sample(mixture={"RedPajamaC4": 0})


# -- instruction data ---------------------------------------------------------------------------------------------

def test_alpaca_prompt_is_masked_out_of_the_loss(tmp_path, smollm2_tokenizer):
    records = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
               {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "no output here"}]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(records))
    cfg = DataConfig(source=str(tmp_path / "alpaca_data.json"), format="alpaca", seq_len=16, epochs=1,
                     max_bad_fraction=0.5)
    docs = list(DocumentStream(cfg))
    assert len(docs) == 2
    for rec in records[:2]:
        ids, labels = encode(rec, cfg, smollm2_tokenizer)
        n_prompt = len(smollm2_tokenizer(alpaca_prompt(rec), add_special_tokens=False)["input_ids"])
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        assert smollm2_tokenizer.decode(ids[n_prompt:]) == rec["output"] + smollm2_tokenizer.eos_token
    assert "### Input:\n2 and 3" in alpaca_prompt(records[1]) and "### Input" not in alpaca_prompt(records[0])
    blocks = list(PackedStream(cfg, smollm2_tokenizer))
    labels = torch.cat([b["labels"] for b in blocks])
    ids = torch.cat([b["input_ids"] for b in blocks])
    assert (labels == IGNORE_INDEX).any() and torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    # JSONL works the same, and plain text corpora can feed LoRA too (format "text")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records[:2]))
    assert [d.record for d in DocumentStream(cfg.model_copy(update={"source": str(tmp_path / "a.jsonl")}))] == \
        records[:2]


# -- sources ------------------------------------------------------------------------------------------------------

def test_object_store_url_through_fsspec(smollm2_tokenizer):
    root = f"memory://bucket-{uuid.uuid4().hex}/slimpajama/train"
    fs = fsspec.filesystem("memory")
    for s in range(4):
        c = zstandard.ZstdCompressor()
        with fs.open(f"{root}/chunk1/example_train_{s}.jsonl.zst", "wb") as f:
            f.write(c.compress("\n".join(json.dumps({"text": f"object {s}.{i} " * 30}) for i in range(10)).encode()))
    for world in (2, 3):
        keys = Counter(d.key for r in range(world) for d in DocumentStream(DataConfig(source=root, epochs=1), r, world))
        assert len(keys) == 40 and set(keys.values()) == {1}
        assert next(iter(keys)).startswith("memory:///bucket-")
    glob_cfg = DataConfig(source=root + "/chunk1/*_[01].jsonl.zst", seq_len=64, epochs=1)
    assert len(DocumentStream(glob_cfg).shards.paths) == 2
    assert len(list(PackedStream(glob_cfg, smollm2_tokenizer))) > 0


def test_hub_dataset_stream_splits_and_resumes(data_dir):
    """``hf:`` goes through datasets streaming; the json builder over local shards stands in for the hub."""
    files = sorted(str(p) for p in (data_dir / "slimpajama-sample/train/chunk1").glob("*.zst"))[:3]
    cfg = DataConfig(source="hf:json", epochs=1, hub_options={"data_files": files})
    whole = Counter(d.record["text"] for d in DocumentStream(cfg))
    parts = [list(DocumentStream(cfg, r, 2)) for r in range(2)]
    assert Counter(d.record["text"] for p in parts for d in p) == whole
    docs = parts[1]
    again = list(DocumentStream(cfg, 1, 2).iter_from(docs[30].position))
    assert [d.record["text"] for d in again] == [d.record["text"] for d in docs[30:]]


# -- bad input ----------------------------------------------------------------------------------------------------

def test_missing_sources_fail_before_reading(tmp_path, smollm2_tokenizer):
    with pytest.raises(ShortenedError, match="does not exist"):
        PackedStream(DataConfig(source=str(tmp_path / "missing")), smollm2_tokenizer)
    with pytest.raises(ShortenedError, match="glob matches no file"):
        DocumentStream(DataConfig(source=str(tmp_path / "*.jsonl.zst")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShortenedError, match="folder has no"):
        DocumentStream(DataConfig(source=str(tmp_path / "empty")))
    if "s3" not in fsspec.available_protocols() or not _has("s3fs"):
        with pytest.raises(ShortenedError, match="s3fs"):
            DocumentStream(DataConfig(source="s3://bucket/slimpajama/train"))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_bad_lines_are_counted_and_a_high_share_stops(tmp_path, caplog):
    good = [{"text": f"doc {i}"} for i in range(95)]
    lines = good[:40] + ["not json", '{"no_text": 1}', "[1, 2]", '{"text": 5}', "{broken"] + good[40:]
    write_zst(tmp_path / "s.jsonl.zst", lines)
    with caplog.at_level(logging.WARNING, logger="shortened.data.sources"):
        s = DocumentStream(DataConfig(source=str(tmp_path), epochs=1, max_bad_fraction=0.1))
        assert len(list(s)) == 95
    assert (s.bad.lines, s.bad.bad) == (100, 5)
    assert f"{tmp_path / 's.jsonl.zst'}:41: not JSON" in caplog.text
    assert f"s.jsonl.zst:42: no string 'text' field" in caplog.text
    with pytest.raises(ShortenedError, match=r"5 of 100 lines read were bad \(5.0%\), above max_bad_fraction=0.01; "
                                             r"first: .*s.jsonl.zst:41"):
        list(DocumentStream(DataConfig(source=str(tmp_path), epochs=1)))


def test_corrupt_zstd_frame_costs_only_its_own_lines(tmp_path, caplog):
    path = tmp_path / "s.jsonl.zst"
    records = [{"text": f"doc {i} " + "lorem ipsum " * (i % 13)} for i in range(100)]
    write_zst(path, records, frames=5)
    raw = bytearray(path.read_bytes())
    frames = zstandard.ZstdCompressor(write_checksum=True)
    third = sum(len(frames.compress(("\n".join(json.dumps(r) for r in records[i:i + 20]) + "\n").encode()))
                for i in (0, 20))
    for i in range(third + 20, third + 40):  # inside the third frame's compressed data
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="shortened.data.sources"):
        s = DocumentStream(DataConfig(source=str(path), epochs=1, max_bad_fraction=0.05))
        texts = [d.record["text"] for d in s]
    assert texts == [r["text"] for r in records[:40] + records[60:]]
    assert s.bad.bad == 1 and "corrupt zstd frame" in caplog.text and f"{path}:41" in caplog.text
    path.write_bytes(bytes(raw[:third]) + bytes(raw[third:third + 30]))  # truncated inside the third frame
    s = DocumentStream(DataConfig(source=str(path), epochs=1, max_bad_fraction=0.05))
    assert len(list(s)) == 40 and s.bad.bad == 1 and "truncated" in s.bad.examples[0]


# -- memory -------------------------------------------------------------------------------------------------------

def test_memory_stays_flat_over_a_million_tokens(smollm2_tokenizer):
    stream = PackedStream(sample(seq_len=1024), smollm2_tokenizer)
    proc = psutil.Process()
    it = iter(stream)
    for _ in range(100):  # warm up: 100k tokens
        next(it)
    before = proc.memory_info().rss
    peak = before
    for i in range(900):  # to 1M tokens (a third of an epoch, shards and long documents included)
        next(it)
        if i % 50 == 0:
            peak = max(peak, proc.memory_info().rss)
    assert stream.state_dict()["tokens"] == 1000 * 1024
    grown = (max(peak, proc.memory_info().rss) - before) / 2**20
    assert grown < 32, f"RSS grew {grown:.1f} MB while streaming 900k tokens"


def test_cli_data_reports_the_corpus_and_fails_clearly(tmp_path, capsys):
    from shortened.cli import main

    assert main(["data", "slimpajama-sample", "--world-size", "2", "--mixture", '{"RedPajamaC4": 1}']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split_mode"] == "shard" and report["shards"] == 8 and report["documents"] == 27
    assert sum(report["documents_per_rank"]) == 27 and report["sets"] == {"RedPajamaC4": 27}
    assert report["lines"] == 545 and report["bad_lines"] == 0
    assert main(["data", str(tmp_path / "nothing-*.jsonl")]) == 2
    assert "glob matches no file" in capsys.readouterr().err


# -- damaged shards (issue 16) -------------------------------------------------------------------------------------
# Each kind of damage costs exactly what it destroys and is counted once; reading goes on within max_bad_fraction.

_WORDS = [f"w{i:x}{'abcdefghij'[i % 10]}" for i in range(4096)]


def texts(n: int, seed: int = 0, words: int = 40) -> list[str]:
    """Documents of pseudo-random words: they compress poorly, so a .zst holds several blocks."""
    import random

    r = random.Random(seed)
    return [f"doc {seed}.{i} " + " ".join(r.choice(_WORDS) for _ in range(words)) for i in range(n)]


def jsonl(docs: list[str]) -> bytes:
    return ("\n".join(json.dumps({"text": t}) for t in docs) + "\n").encode()


def compress(data: bytes, suffix: str) -> bytes:
    import gzip

    if suffix.endswith(".zst"):
        return zstandard.ZstdCompressor().compress(data)
    if suffix.endswith(".gz"):
        return gzip.compress(data)
    return data


def read_all(source, **kw) -> tuple[list[str], DocumentStream]:
    stream = DocumentStream(DataConfig(source=str(source), epochs=1, **kw))
    return [d.record.get("text") for d in stream], stream


BAD_LINES = {  # a line that is one bad line, nothing more
    "lone high surrogate": b'{"text": "emoji cut in half \\ud83d here"}',
    "lone low surrogate": b'{"text": "tail only \\udc00"}',
    "surrogate in another field": b'{"text": "fine", "meta": {"title": "\\uDBFF!"}}',
    "surrogate in a key": b'{"text": "fine", "\\ud800": 1}',
    "raw latin-1 byte": b'{"text": "caf\xe9 latin-1"}',
    "UTF-8 encoded surrogate": b'{"text": "\xed\xa0\xbd cesu-8"}',
    "raw garbage": bytes(range(128, 256)) + b"\x00\x01",
}


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz", ".jsonl"])
@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_a_damaged_line_costs_exactly_that_line(tmp_path, suffix, kind, caplog):
    docs = texts(300)
    data = jsonl(docs[:150]) + BAD_LINES[kind] + b"\n" + jsonl(docs[150:])
    (tmp_path / f"s{suffix}").write_bytes(compress(data, suffix))
    with caplog.at_level(logging.WARNING, logger="shortened.data.sources"):
        got, s = read_all(tmp_path, max_bad_fraction=0.01)
    assert got == docs  # every good line, the 150 after the damaged one included
    assert (s.bad.lines, s.bad.bad) == (301, 1)
    assert f"s{suffix}:151: " in s.bad.examples[0]
    why = "invalid Unicode" if "surrogate" in kind and "UTF-8" not in kind else "not UTF-8"
    assert why in s.bad.examples[0] and why in caplog.text


def test_a_valid_surrogate_pair_is_text_not_damage(tmp_path):
    (tmp_path / "s.jsonl").write_bytes(b'{"text": "smile \\ud83d\\ude00 and \\uD83C\\uDF89"}\n')
    got, s = read_all(tmp_path)
    assert got == ["smile \U0001F600 and \U0001F389"] and s.bad.bad == 0


def _truncated_zst(docs):
    """Three whole frames, then a fourth cut short: the 150 documents of the whole frames survive."""
    c = zstandard.ZstdCompressor()
    return b"".join(c.compress(jsonl(docs[i:i + 50])) for i in range(0, 150, 50)) + c.compress(jsonl(docs[150:]))[:60]


def _corrupt_middle_zst(docs):
    """Four frames cut at arbitrary bytes (not at line ends), the second one corrupt: the lines wholly inside it
    are gone (uncountable), the line joining the first frame's tail to the third frame's head is one bad line."""
    raw = jsonl(docs)
    cuts = [0, len(raw) // 4 + 7, len(raw) // 2 + 11, 3 * len(raw) // 4, len(raw)]
    c = zstandard.ZstdCompressor(write_checksum=True)
    frames = [c.compress(raw[a:b]) for a, b in zip(cuts, cuts[1:])]
    second = bytearray(frames[1])
    for i in range(20, 60):
        second[i] ^= 0xFF
    return frames[0] + bytes(second) + frames[2] + frames[3], cuts[1], cuts[2]


def _truncated_gz(docs):
    import gzip

    return gzip.compress(jsonl(docs))[:-len(jsonl(docs)) // 5]


def _lines_in(raw: bytes, keep) -> list[str]:
    """The texts of the whole lines ``[a, b)`` of ``raw`` for which ``keep(a, b)``."""
    out, at = [], 0
    for line in raw.split(b"\n")[:-1]:
        if keep(at, at + len(line) + 1):
            out.append(json.loads(line)["text"])
        at += len(line) + 1
    return out


def damaged_shard(kind: str, docs: list[str]) -> tuple[str, bytes, list[str]]:
    """``(file name, bytes, the documents a correct reader keeps)`` for one kind of damaged shard."""
    import random
    import zlib

    garbage = random.Random(5).randbytes(20_000)
    if kind == "empty .jsonl.zst":
        return "a.jsonl.zst", b"", []
    if kind == "empty .jsonl.gz":
        return "a.jsonl.gz", b"", []
    if kind == "empty .jsonl":
        return "a.jsonl", b"", []
    if kind == "empty .txt":
        return "a.txt", b"", []
    if kind == "empty .json":
        return "a.json", b"", []
    if kind == "non-UTF-8 .txt":
        return "a.txt", b"caf\xe9 au lait", []
    if kind == "all-garbage .jsonl.zst":
        return "a.jsonl.zst", garbage, []
    if kind == "all-garbage .jsonl.gz":
        return "a.jsonl.gz", garbage, []
    if kind == "truncated .jsonl.zst (frames)":
        return "a.jsonl.zst", _truncated_zst(docs), docs[:150]
    if kind == "truncated .jsonl.zst (one frame)":
        docs = texts(1200, seed=1)  # 290 kB: zstd blocks are 128 kB, and only whole blocks decode
        data = zstandard.ZstdCompressor().compress(jsonl(docs))
        cut = data[:2 * len(data) // 3]
        prefix = zstandard.ZstdDecompressor().decompressobj().decompress(cut)  # what zstd can decode of it
        assert 0 < prefix.count(b"\n") < len(docs)
        return "a.jsonl.zst", cut, docs[:prefix.count(b"\n")]
    if kind == "truncated .jsonl.gz":
        cut = _truncated_gz(docs)
        prefix = zlib.decompressobj(wbits=31).decompress(cut)
        assert 0 < prefix.count(b"\n") < len(docs)
        return "a.jsonl.gz", cut, docs[:prefix.count(b"\n")]
    if kind == "truncated .json.gz":
        import gzip

        return "a.json.gz", gzip.compress(json.dumps([{"text": t} for t in docs]).encode())[:500], []
    if kind == "corrupt middle zstd frame":
        data, a, b = _corrupt_middle_zst(docs)
        return "a.jsonl.zst", data, _lines_in(jsonl(docs), lambda s, e: e <= a or s >= b)
    if kind == "garbage between zstd frames":
        c = zstandard.ZstdCompressor()
        return "a.jsonl.zst", c.compress(jsonl(docs[:100])) + garbage[:300] + c.compress(jsonl(docs[100:])), docs
    raise KeyError(kind)


DAMAGED_SHARDS = ["empty .jsonl.zst", "empty .jsonl.gz", "empty .jsonl", "empty .txt", "empty .json",
                  "non-UTF-8 .txt", "all-garbage .jsonl.zst", "all-garbage .jsonl.gz", "truncated .jsonl.zst (frames)",
                  "truncated .jsonl.zst (one frame)", "truncated .jsonl.gz", "truncated .json.gz",
                  "corrupt middle zstd frame", "garbage between zstd frames"]


@pytest.mark.parametrize("kind", DAMAGED_SHARDS)
def test_a_damaged_shard_counts_once_and_keeps_what_decoded(tmp_path, kind):
    """The damaged shard sorts first (a small first shard's damage must not stop a corpus within the limit), a
    good shard of 200 documents follows."""
    docs, more = texts(200, seed=1), texts(200, seed=2)
    name, data, kept = damaged_shard(kind, docs)
    (tmp_path / name).write_bytes(data)
    (tmp_path / "b.jsonl.zst").write_bytes(compress(jsonl(more), ".zst"))
    got, s = read_all(tmp_path, max_bad_fraction=0.01)
    assert got == kept + more
    assert s.bad.bad == 1 and s.bad.lines == len(kept) + len(more) + 1, s.bad.examples
    assert s.bad.examples[0].startswith(str(tmp_path / name))


def test_a_corrupt_frame_cutting_a_line_is_named_at_that_line(tmp_path):
    docs = texts(200, seed=1)
    data, a, _ = _corrupt_middle_zst(docs)
    (tmp_path / "s.jsonl.zst").write_bytes(data)
    _, s = read_all(tmp_path, max_bad_fraction=0.01)
    cut_line = jsonl(docs)[:a].count(b"\n") + 1  # the line the first frame ends inside
    assert s.bad.examples == [f"{tmp_path / 's.jsonl.zst'}:{cut_line}: corrupt zstd frame (zstd decompressor error: "
                              f"Data corruption detected); this line is cut by it, skipped"]


def test_damaged_shards_within_the_limit_and_beyond(tmp_path):
    (tmp_path / "a.jsonl.zst").write_bytes(b"")
    (tmp_path / "b.jsonl.gz").write_bytes(b"")
    (tmp_path / "c.jsonl").write_bytes(jsonl(texts(98)))
    got, s = read_all(tmp_path, max_bad_fraction=0.02)
    assert len(got) == 98 and (s.bad.lines, s.bad.bad) == (100, 2)
    with pytest.raises(ShortenedError, match=r"2 of 100 lines read were bad \(2.0%\), above max_bad_fraction=0.01; "
                                             r"first: .*a.jsonl.zst:1: empty file \(0 bytes\)"):
        read_all(tmp_path, max_bad_fraction=0.01)


def _long_window_zst(data: bytes) -> bytes:
    """A frame whose header asks for zstd's largest window (2 GiB; ``zstd --long=31``), written by a streaming
    compressor with long-distance matching: valid, but beyond the decoder's default window limit (128 MiB)."""
    import io

    params = zstandard.ZstdCompressionParameters(window_log=31, enable_ldm=True)
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False) as w:
        w.write(data)
    frame = out.getvalue()
    assert zstandard.get_frame_parameters(frame).window_size == 2**31
    with pytest.raises(zstandard.ZstdError, match="too much memory"):  # what a default decoder says
        zstandard.ZstdDecompressor().decompressobj().decompress(frame)
    return frame


VALID_SHARDS = {
    "long window (window_log 31, LDM)": lambda d: ("s.jsonl.zst", _long_window_zst(jsonl(d))),
    "long window, several frames": lambda d: ("s.jsonl.zst", _long_window_zst(jsonl(d[:120])) +
                                              _long_window_zst(jsonl(d[120:]))),
    "concatenated frames, not at line ends": lambda d: (
        "s.jsonl.zst", b"".join(zstandard.ZstdCompressor().compress(jsonl(d)[i:i + 3001])
                                for i in range(0, len(jsonl(d)), 3001))),
    "skippable and empty frames": lambda d: (
        "s.jsonl.zst", b"\x50\x2a\x4d\x18" + (6).to_bytes(4, "little") + b"pzstd!" +
        zstandard.ZstdCompressor().compress(b"") + zstandard.ZstdCompressor().compress(jsonl(d))),
    "gzip members and zero padding": lambda d: (
        "s.jsonl.gz", compress(jsonl(d[:50]), ".gz") + compress(jsonl(d[50:]), ".gz") + b"\0" * 64),
    "a frame holding no data": lambda d: ("s.jsonl.zst", zstandard.ZstdCompressor().compress(b"")),
}


@pytest.mark.parametrize("kind", list(VALID_SHARDS))
def test_a_valid_shard_the_decoder_needs_settings_for_is_read_in_full(tmp_path, kind):
    docs = texts(300, seed=3)
    name, data = VALID_SHARDS[kind](docs)
    (tmp_path / name).write_bytes(data)
    (tmp_path / "t.jsonl").write_bytes(jsonl(["a good shard beside it"]))
    got, s = read_all(tmp_path, max_bad_fraction=0)
    expected = [] if kind == "a frame holding no data" else docs
    assert got == expected + ["a good shard beside it"]
    assert (s.bad.lines, s.bad.bad) == (len(expected) + 1, 0)


def test_alpaca_records_with_invalid_unicode_are_bad_lines(tmp_path, smollm2_tokenizer):
    from shortened.data.formats import record_problem

    good = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(60)]
    bad = [{"instruction": "Say \ud83d.", "output": "x"}, {"instruction": "x", "input": "\udc00", "output": "y"},
           {"instruction": "x", "output": "\udfff"}]
    records = good[:20] + bad + good[20:]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(records))  # ensure_ascii: lone surrogates as \u escapes
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = DataConfig(source=str(tmp_path), format="alpaca", seq_len=16, epochs=1, max_bad_fraction=0.05)
    stream = PackedStream(cfg, smollm2_tokenizer)
    blocks = list(stream)
    assert (stream.bad.lines, stream.bad.bad) == (126, 6)
    expected = [t for r in good + good for t in encode(r, cfg, smollm2_tokenizer)[0]]
    assert torch.cat([b["input_ids"] for b in blocks]).tolist() == expected[:len(expected) // 16 * 16]
    # records that never pass through the JSON reader (hub datasets) are checked on the fields tokenized
    assert "lone UTF-16 surrogate in 'input'" in record_problem(bad[1], cfg)
    assert "lone UTF-16 surrogate in 'text'" in record_problem({"text": "a\ud800"}, DataConfig())
    assert record_problem({"text": "ok", "meta": "\ud800"}, DataConfig()) is None


def case08_corpus(root):
    """Issue 16's corpus, every kind of damage in each format, and the good documents in reading order."""
    import gzip

    good = texts(900, seed=7, words=30)
    g = iter(good)
    take_ = lambda n: [next(g) for _ in range(n)]  # noqa: E731
    a, b, d, e, f, h = take_(150), take_(150), take_(150), take_(150), take_(150), take_(150)
    sur = b'{"text": "emoji cut in half \\ud83d here"}\n'
    (root / "a.jsonl.zst").write_bytes(compress(jsonl(a[:100]) + sur + jsonl(a[100:]), ".zst"))
    (root / "b.jsonl.zst").write_bytes(compress(jsonl(b[:75]) + b'{"text": "caf\xe9 latin-1"}\n' + jsonl(b[75:]),
                                                ".zst"))
    (root / "c.jsonl.zst").write_bytes(b"")
    (root / "d.jsonl.zst").write_bytes(_truncated_zst(d + texts(50, seed=8)))  # keeps d, the cut frame is lost
    (root / "e.jsonl.gz").write_bytes(gzip.compress(jsonl(e[:10]) + b'{"text": "\\udc00"}\n' + jsonl(e[10:])) +
                                      gzip.compress(jsonl(["a line cut short"]))[:-10])  # a truncated member
    (root / "f.jsonl").write_bytes(jsonl(f[:1]) + b"\x80\x81\n" + jsonl(f[1:]))
    (root / "g.txt").write_bytes(b"")
    (root / "h.jsonl.zst").write_bytes(_long_window_zst(jsonl(h)))
    # damage: a surrogate, a raw line, an empty shard, a truncated frame, a surrogate + a truncated member, a raw
    # line, an empty .txt = 8 bad lines among 908 read (0.9%, within calibration's default 1%)
    return a + b + d + e + f + h, 908, 8


def test_case08_damaged_corpus_packs_calibrates_and_reports(tmp_path, smollm2_tokenizer, smollm2_hf_dir, capsys):
    from shortened.cli import main
    from shortened.data.calibration import CalibrationConfig, calibration_windows

    docs, lines, bad = case08_corpus(tmp_path)
    cfg = DataConfig(source=str(tmp_path), seq_len=128, epochs=1, max_bad_fraction=0.01)
    expected = [t for d in docs for t in encode({"text": d}, cfg, smollm2_tokenizer)[0]]
    stream = PackedStream(cfg, smollm2_tokenizer)
    blocks, cursors = [], {}
    for b in stream:
        blocks.append(b["input_ids"])
        cursors[len(blocks)] = stream.state_dict()
    assert (stream.bad.lines, stream.bad.bad) == (lines, bad)
    assert len(blocks) == len(expected) // 128
    assert torch.cat(blocks).tolist() == expected[:len(blocks) * 128]
    for k in (len(blocks) * 4 // 9, len(blocks) * 5 // 9):  # the cursor resumes exactly past the damaged shards
        resumed = PackedStream(cfg, smollm2_tokenizer)
        resumed.load_state_dict(cursors[k])
        assert torch.equal(next(iter(resumed))["input_ids"], blocks[k])
    windows = calibration_windows(smollm2_tokenizer, CalibrationConfig(source=str(tmp_path), n_samples=8, seq_len=64,
                                                                       pool_factor=1000))
    assert windows.shape == (8, 64)
    starts = {tuple(expected[i:i + 64]) for i in range(0, len(expected) - 63, 64)}
    assert all(tuple(w.tolist()) in starts for w in windows)  # windows of the good tokens only
    assert main(["data", str(tmp_path), "--tokenizer", str(smollm2_hf_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["documents"], report["lines"], report["bad_lines"], report["tokens"]) == \
        (len(docs), lines, bad, len(expected))
    assert report["shards"] == 8 and "a.jsonl.zst:101: invalid Unicode" in report["bad_examples"][0]


def test_two_streams_read_the_same_shards_interleaved(tmp_path):
    """Each open shard decodes in its own zstd context (calibration and a training stream may be open at once)."""
    docs = texts(400, seed=4)
    (tmp_path / "s.jsonl.zst").write_bytes(_truncated_zst(docs) + _long_window_zst(jsonl(docs[150:])))
    one, two = (DocumentStream(DataConfig(source=str(tmp_path), epochs=1, max_bad_fraction=0.01)) for _ in range(2))
    pairs = list(zip(one, two))
    assert [a.record["text"] for a, _ in pairs] == [b.record["text"] for _, b in pairs] == docs[:150] + docs[150:]
    assert one.bad.bad == two.bad.bad == 1


def test_raw_bytes_inside_a_json_array_cost_only_their_record(tmp_path):
    records = [{"text": t} for t in texts(30, seed=6)]
    data = json.dumps(records[:10]).encode()[:-1] + b', {"text": "caf\xe9"}, ' + json.dumps(records[10:]).encode()[1:]
    (tmp_path / "a.json").write_bytes(data)
    got, s = read_all(tmp_path, max_bad_fraction=0.05)
    assert got == [r["text"] for r in records] and (s.bad.lines, s.bad.bad) == (31, 1)
    assert s.bad.examples[0].startswith(f"{tmp_path / 'a.json'}:[11]: invalid Unicode")


def test_a_damaged_file_in_a_hub_dataset_stops_with_a_clear_error(tmp_path):
    """datasets cannot skip a line its reader rejects; the stream says so instead of dying with a traceback."""
    (tmp_path / "a.jsonl").write_bytes(jsonl(["fine"] * 5) + b'{"text": "caf\xe9"}\n')
    cfg = DataConfig(source="hf:json", epochs=1, hub_options={"data_files": [str(tmp_path / "a.jsonl")]})
    with pytest.raises(ShortenedError, match="hub dataset 'json' .* failed after record #.*read them as a file source"):
        list(DocumentStream(cfg))
    assert len(read_all(tmp_path / "a.jsonl", max_bad_fraction=0.2)[0]) == 5  # as a file source it reads on


def test_a_mistyped_split_of_the_offline_sample_is_refused_not_sent_to_the_hub():
    from pydantic import ValidationError

    from shortened.training.config import TrainConfig

    with pytest.raises(ValidationError, match="split 'valdation': the offline slimpajama-sample has train, validation"):
        DataConfig(split="valdation")
    with pytest.raises(ValidationError, match="split 'valdation'"):
        TrainConfig(train_tokens=64, data={"split": "valdation"})
    assert DataConfig(split="validation").split == "validation"
    assert DataConfig(source="hf:cerebras/SlimPajama-627B", split="valdation").split == "valdation"  # the hub's own
