"""Shared fixtures: tiny random models, the real SmolLM2 (converted from GGUF once and cached), data paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# One intra-op thread for the tests and every process they start (CLI runs, Ray workers; set before torch loads):
# tiny models gain nothing from a second thread, and with other processes on the 2 cores OpenMP's spinning threads
# made a tiny model's prune-save-reload-generate 16-25x slower (llama 0.56 s with one thread, 11.7 s with two).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from shortened.paths import REPO_ROOT, shared_data_dir  # noqa: E402

CACHE = Path(os.environ.get("SHORTENED_TEST_CACHE", REPO_ROOT / ".cache" / "tests"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.fail("the offline data (../shared/data or $SHORTENED_DATA_DIR) is missing")
    return d


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (GGUF dequantization takes ~15 s; do it once per machine)."""
    from shortened.models import materialize

    return materialize("smollm2", CACHE / "smollm2-135m-instruct-hf")


@pytest.fixture(scope="session")
def smollm2(smollm2_hf_dir):
    from shortened.models import load_model

    return load_model(str(smollm2_hf_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_hf_dir):
    from shortened.models import load_tokenizer

    return load_tokenizer(str(smollm2_hf_dir))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer saved beside it, for CLI tests that read real text."""
    from tiny_models import tiny_model

    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for one test module, shut down after it."""
    import ray

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    ray.init(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()
