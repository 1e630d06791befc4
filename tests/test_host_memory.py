"""Host memory freed by a training worker goes back to the OS (issue 19 §2: ZeRO-3 memory that scales down with
workers): glibc's allocator thresholds, set in the workers' environment as they start or by ``mallopt``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from shortened.errors import ShortenedError
from shortened.host_memory import (ENV, FIXED_THRESHOLD, GLIBC_ENV, allocator_env, forwarded_env, mmap_threshold,
                                   return_freed_host_memory)

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")

# 4 MiB blocks with small live blocks between them, after a freed 8 MiB block has raised glibc's dynamic mmap
# threshold (as a loaded layer's cast weights do): prints the MiB still resident after the 4 MiB blocks are freed
FRAGMENT = """
import json, sys, psutil, torch
if sys.argv[1] == "mallopt":
    from shortened.host_memory import return_freed_host_memory
    return_freed_host_memory(128 * 1024)
rss = lambda: psutil.Process().memory_info().rss / 2**20
base = rss()
big = torch.ones(8 * 2**20, dtype=torch.uint8); del big
blocks, keep = [], []
for _ in range(100):
    blocks.append(torch.ones(4 * 2**20, dtype=torch.uint8))
    keep.append(torch.ones(64 * 2**10, dtype=torch.uint8))
peak = rss() - base
del blocks
print(json.dumps({"peak": peak, "after": rss() - base}))
"""


def resident_after_free(env: dict[str, str], how: str = "env") -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in GLIBC_ENV}
    out = subprocess.run([sys.executable, "-c", FRAGMENT, how], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_blocks_are_returned_with_the_workers_environment_or_mallopt(monkeypatch):
    for name in (*GLIBC_ENV, ENV):
        monkeypatch.delenv(name, raising=False)
    default = resident_after_free({})
    assert default["peak"] > 380 and default["after"] > 0.9 * default["peak"], default  # glibc keeps them
    fixed = resident_after_free(allocator_env(FIXED_THRESHOLD))
    assert fixed["peak"] > 380 and fixed["after"] < 50, fixed
    assert resident_after_free({}, how="mallopt")["after"] < 50  # in-process, from the main thread


def test_the_threshold_is_fixed_for_zero3_and_offload_phases_unless_the_environment_says(monkeypatch):
    from shortened.training.config import TrainConfig
    from shortened.training.deepspeed_config import phase_mmap_threshold

    for name in (*GLIBC_ENV, ENV):
        monkeypatch.delenv(name, raising=False)
    cfg = TrainConfig(train_tokens=1024, method="cpt+lora", zero_stage=3)  # CPT at ZeRO-3, LoRA at lora.zero_stage 2
    assert (phase_mmap_threshold(cfg, "cpt"), phase_mmap_threshold(cfg, "lora")) == (FIXED_THRESHOLD, 0)
    assert FIXED_THRESHOLD == 128 * 1024 and mmap_threshold(2) == 0 and mmap_threshold(2, offload=True) > 0
    offload = TrainConfig(train_tokens=1024, zero_stage=2, offload_optimizer=True)
    assert phase_mmap_threshold(offload, "cpt") == FIXED_THRESHOLD
    # the workers get the decision, and glibc's variables with it
    expected = {ENV: "131072", **dict.fromkeys(GLIBC_ENV, "131072")} if platform.libc_ver()[0] == "glibc" \
        else {ENV: "131072"}
    assert allocator_env(FIXED_THRESHOLD) == expected
    assert allocator_env(0) == {ENV: "0"} and return_freed_host_memory(0) is None
    assert forwarded_env() == {}
    # a sweep driver's variable reaches the trial's decision through the worker env it passes on
    assert phase_mmap_threshold(cfg, "lora", {ENV: "4194304"}) == 4194304
    monkeypatch.setenv(ENV, "4194304")  # every phase
    assert phase_mmap_threshold(cfg, "lora") == mmap_threshold(0) == 4194304 and forwarded_env() == {ENV: "4194304"}
    monkeypatch.setenv(ENV, "0")  # no phase
    assert phase_mmap_threshold(cfg, "cpt") == 0
    # the user's own glibc setting rules: passed on as it is, and reported
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    assert allocator_env(FIXED_THRESHOLD) == {ENV: "131072", "MALLOC_TRIM_THRESHOLD_": "65536"}
    if platform.libc_ver()[0] == "glibc":
        assert return_freed_host_memory(FIXED_THRESHOLD) is None  # only the trim threshold set: mmap's is dynamic
        monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
        assert return_freed_host_memory(FIXED_THRESHOLD) == 65536
    for bad in ("-1", "1MB", str(32 * 2**20 + 1)):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ShortenedError, match=f"{ENV}: expected a number of bytes from 0 .* got '{bad}'"):
            mmap_threshold(3)
        with pytest.raises(ShortenedError, match=ENV):
            forwarded_env()


def test_a_bad_threshold_fails_retrain_before_workers_start(monkeypatch, tiny_llama_dir, tmp_path):
    from shortened.training.config import TrainConfig
    from shortened.training.retrain import retrain

    monkeypatch.setenv(ENV, "lots")
    with pytest.raises(ShortenedError, match=ENV):
        retrain(str(tiny_llama_dir), str(tmp_path / "out"), TrainConfig(train_tokens=1024), storage_path=str(tmp_path / "s"),
                name="bad-threshold")
    assert not (tmp_path / "out").exists() and not (tmp_path / "s").exists()
