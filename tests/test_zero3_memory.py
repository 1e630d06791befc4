"""ZeRO-3 memory that scales down with workers: with 2 ranks (two processes on gloo, the real training loop under
:class:`LocalSession`, as ``torchrun`` runs it) every rank holds only its partition of the weights from the moment
the model is built, and the checkpoint exported from the partitions equals the one a ZeRO-0 run trained the same
way exports; LoRA merges from the partitions too. The benchmark of the real sizes is ``benchmarks/memory.py``."""

from __future__ import annotations

import json
import os
import platform
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from shortened.data import DataConfig
from shortened.training.config import TrainConfig
from shortened.training.phase import Phase

SEQ = 32
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, phase_json: str, run_dir: str, probe_file: str) -> None:
    """One rank: the real loop (``run``), with what ``build_model`` returned recorded per parameter."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    from shortened.training import loop
    from shortened.training.session import LocalSession

    real = loop.build_model
    built = []

    def probe(*args, **kw):
        model = real(*args, **kw)
        for name, p in model.named_parameters():
            ds = getattr(p, "ds_tensor", None)
            built.append({"name": name, "numel": p.numel(), "full": getattr(p, "ds_numel", p.numel()),
                          "partition": ds.numel() if ds is not None else None})
        return model

    loop.build_model = probe
    loop.run(Phase.model_validate_json(phase_json), LocalSession(run_dir))
    if rank in (0, 1):
        with open(f"{probe_file}.{rank}", "w") as f:
            json.dump(built, f)


def train(tmp_path, model_dir, name: str, **cfg) -> tuple:
    """Train ``model_dir`` on 2 ranks with the config ``cfg``; the export folder and each rank's parameters as
    built (before DeepSpeed's engine)."""
    c = TrainConfig(train_tokens=SEQ * 2 * WORLD * 3, micro_batch_size=2, data=DataConfig(seq_len=SEQ), lr=3e-3,
                    warmup_ratio=0.0, report_every_steps=3, checkpoint_every_tokens=None, **cfg)
    out = tmp_path / name
    phase = Phase(method=c.method, model=str(model_dir), out=str(out), tokens=c.train_tokens, train=c, run=name)
    probe = tmp_path / f"{name}.built"
    mp.start_processes(_rank, args=(_free_port(), phase.model_dump_json(), str(tmp_path / f"{name}-run"), str(probe)),
                       nprocs=WORLD, start_method="spawn")
    built = [json.loads((tmp_path / f"{name}.built.{r}").read_text()) for r in range(WORLD)]
    return out, built


def weights(folder) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(folder).state_dict())


@pytest.mark.timeout(300)
def test_zero3_partitions_at_load_and_exports_the_zero0_weights(tiny_llama_dir, tmp_path, monkeypatch):
    for name in ("SHORTENED_MALLOC_MMAP_THRESHOLD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)  # the default policy (host_memory), in the spawned ranks too
    z3, built3 = train(tmp_path, tiny_llama_dir, "z3", zero_stage=3)
    z0, built0 = train(tmp_path, tiny_llama_dir, "z0", zero_stage=0)
    # ZeRO-3: right after from_pretrained each rank holds an empty placeholder and a 1/2 partition of every
    # partitioned weight (tiny norm vectors stay whole: DeepSpeed's persistence threshold, 10 x hidden_size)
    for rank_params in built3:
        big = [p for p in rank_params if p["full"] > 10 * 32]
        assert big and all(p["numel"] == 0 and p["partition"] == -(-p["full"] // WORLD) for p in big), big[:3]
        held = sum(p["partition"] if p["partition"] is not None else p["numel"] for p in rank_params)
        assert held < 0.51 * sum(p["full"] for p in rank_params)
    assert all(p["partition"] is None and p["numel"] == p["full"] for p in built0[0])  # ZeRO-0: whole, as before
    a, b = weights(z3), weights(z0)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), k
    before = weights(tiny_llama_dir)
    assert any(not torch.equal(a[k], before[k]) for k in a)  # it trained
    r3 = json.loads((z3 / "retraining.json").read_text())
    assert r3["zero_stage"] == 3 and len(r3["phases"][0]["peak_rss_mb"]) == WORLD
    assert all(m > 100 for m in r3["phases"][0]["peak_rss_mb"])
    if platform.libc_ver()[0] == "glibc":  # set by mallopt in processes Ray did not start
        assert r3["phases"][0]["malloc_mmap_threshold"] == 128 * 1024
    assert json.loads((z0 / "retraining.json").read_text())["phases"][0]["malloc_mmap_threshold"] is None
    assert json.loads((z3 / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.timeout(300)
def test_lora_under_zero3_merges_from_the_partitions(tiny_llama_dir, tmp_path):
    out, built = train(tmp_path, tiny_llama_dir, "lora3", method="lora", lora={"zero_stage": 3, "lr": 1e-2})
    base = [p for p in built[0] if ".base_layer." in p["name"] and p["full"] > 320]
    assert base and all(p["numel"] == 0 for p in base)  # the frozen weights are partitioned too
    merged, before = weights(out), weights(tiny_llama_dir)
    assert merged.keys() == before.keys()  # a plain model: adapters merged and gone
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed), sorted(changed)[:5]
