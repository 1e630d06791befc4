"""Small file helpers: atomic writes, so a failure never leaves a half-written result behind; model folders staged
and published in one step, their weights written in the dtype asked for (the source model's by default).

The two ways to write atomically, used everywhere: a file through :func:`write_text_atomic` (or
:func:`write_json_atomic`), a folder through :func:`staged_dir` (written in a staging folder beside it, then
:func:`publish_dir`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from shortened.errors import ShortenedError


def umask() -> int:
    """The process umask: from /proc on Linux (no change to it, so safe beside other threads), else set and reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 less the umask (0o644 under umask 022)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder: 0o777 less the umask (0o755 under umask 022)."""
    return 0o777 & ~umask()


def write_text_atomic(path: str | Path, text: str, *, parents: bool = True) -> None:
    """Write text through a temporary file beside ``path``, renamed into place, so an interruption leaves the old
    file or the new one, never half of one; the file gets the umask's mode (``mkstemp`` alone would leave it
    0600, unreadable by the rest of a team on shared storage). ``parents``: create the folders above ``path``
    (False: a missing folder is an OSError, as for ``open``). At an object-store URL (see :mod:`shortened.storage`)
    the one PUT is atomic already: the object is written directly."""
    from shortened import storage

    if storage.is_url(path):
        storage.path(path).write_text(text, encoding="utf-8")
        return
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: object) -> None:
    """JSON (indented, newline-terminated) through :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_yaml(path: str | Path):
    """A YAML file's content, refusing what PyYAML lets through silently: a key written twice in one mapping (the
    last value would win). Raises :class:`ShortenedError` with one line naming the file, line and problem (a
    syntax error, a duplicate key, an unreadable file)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise ShortenedError(f"{path}: line {key_node.start_mark.line + 1}: key {key!r} appears twice "
                                         f"in one mapping (first on line {seen[key]})")
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ShortenedError(f"{path}: {exc.strerror or exc}") from exc
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ShortenedError(f"{path}: {where}{exc.problem or exc.context or 'not valid YAML'}") from exc
    except yaml.YAMLError as exc:
        raise ShortenedError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc


def chmod_tree(folder: Path) -> None:
    """Give every file and folder under ``folder`` the umask's mode: libraries that write through ``mkstemp``
    (safetensors' writers do) leave 0600 files that a team's shared storage could not read."""
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(Path(root) / d, dir_mode())
        for f in files:
            os.chmod(Path(root) / f, file_mode())


def make_staging_dir(final: Path) -> Path:
    """A hidden staging folder beside ``final`` with the umask's mode (``mkdtemp`` alone makes it 0700)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(staging, dir_mode())
    return staging


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as anything)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path) -> None:
    """Create and remove a hidden file in ``folder``: the one check that also holds for root, ACLs and read-only
    mounts. Raises OSError when the folder cannot take new files."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".shortened-write-check-")
    os.close(fd)
    os.unlink(probe)


# Folders check_output created for the work at hand: removed again when the work fails (remove_created_if_empty).
CREATED: list[Path] = []


def remove_created_if_empty() -> None:
    """Remove the folders :func:`check_output` created that are still empty (deepest first): a refused or
    interrupted command leaves nothing behind."""
    for folder in sorted(set(CREATED), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # only succeeds on an empty folder
        except OSError:
            pass
    CREATED.clear()


def check_output(path: str | Path, *, kind: str, overwrite: bool = False, flag: str = "output",
                 create: bool = True) -> Path:
    """Check an output location before any work starts, so a bad ``--out`` fails in a second instead of after
    scoring, evaluation or training; then create the folders above it (``create``).

    ``kind`` is ``"file"`` (written atomically beside itself), ``"dir"`` (a model folder, staged beside itself
    and moved into place: must not exist or be empty, unless ``overwrite``) or ``"folder"`` (files are written
    into it, existing or not: a cache or report folder). Refused, with ``flag`` and the path named: a file where
    a folder is needed (or a folder where a file is), an existing result without ``overwrite``, a path below a
    file, and a folder that cannot take new files. The message is a :class:`ShortenedError`; nothing is created
    unless every check passes."""
    if kind not in ("file", "dir", "folder"):
        raise ValueError(f"kind {kind!r}: choose file, dir or folder")
    raw = str(path)
    if not raw.strip():
        raise ShortenedError(f"{flag}: an empty path")
    from shortened import storage

    raw = storage.local_path(raw)
    if storage.is_url(raw):  # an object store: the bucket must take writes; what is there is judged as locally
        storage.check_writable(raw, flag)
        if kind != "file":
            storage.check_folder_url(raw)
        there, objects = storage.describe_prefix(raw)
        if kind == "file" and there == "folder":
            raise ShortenedError(f"{flag} {raw}: is a folder ({objects} object(s) below it), expected a file path")
        if kind != "file" and there == "file":
            raise ShortenedError(f"{flag} {raw}: exists and is not a folder")
        if kind == "dir" and objects and not overwrite:
            what = "a model folder is there already" if storage.is_complete(raw) else \
                f"the prefix holds {objects} object(s)"
            raise ShortenedError(f"{flag} {raw}: {what} (use --overwrite to replace it)")
        if kind == "file" and there == "file" and not overwrite:
            raise ShortenedError(f"{flag} {raw}: the file exists (use --overwrite to replace it)")
        return storage.path(raw)
    path = Path(raw).expanduser()
    where = f"{flag} {raw}"
    if kind == "file":
        if raw.endswith(("/", "\\")):
            raise ShortenedError(f"{where}: ends with a slash (a folder), expected a file path")
        if path.is_dir():
            raise ShortenedError(f"{where}: is a folder, expected a file path")
        if path.exists() and not overwrite:
            raise ShortenedError(f"{where}: the file exists (use --overwrite to replace it)")
    else:
        if path.exists() and not path.is_dir():
            raise ShortenedError(f"{where}: exists and is not a folder")
        if kind == "dir" and path.is_dir() and any(path.iterdir()) and not overwrite:
            raise ShortenedError(f"{where}: the folder exists and is not empty (use --overwrite to replace it)")
    anchor = _first_existing(path.parent.absolute())
    if not anchor.is_dir():
        raise ShortenedError(f"{where}: {anchor} is a file, not a folder, so nothing can be written below it")
    probes = [anchor] + ([path] if kind == "folder" and path.is_dir() else [])
    for folder in probes:
        try:
            _probe_writable(folder)
        except OSError as exc:
            raise ShortenedError(f"{where}: cannot write in {folder} ({exc.strerror or exc})") from exc
    if create:
        missing = [p for p in [*([path] if kind == "folder" else []), path.parent, *path.parent.parents]
                   if not p.exists()]
        CREATED.extend(reversed(missing))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "folder":
                path.mkdir(exist_ok=True)
        except OSError as exc:
            raise ShortenedError(f"{where}: cannot create {exc.filename or path.parent} "
                                 f"({exc.strerror or exc})") from exc
    return path


# -- the dtype a checkpoint is saved in ------------------------------------------------------------------------------

SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _torch_dtype(name):
    """``float32``/``bfloat16``/``float16`` (a string, with or without ``torch.``, or a torch dtype) as a torch dtype;
    None for anything else (``auto``, None, integer or 8-bit types)."""
    import torch

    floats = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if isinstance(name, torch.dtype):
        return name if name in floats.values() else None
    return floats.get(str(name).removeprefix("torch.")) if name is not None else None


def source_dtype(spec, gguf_file: str | None = None):
    """The dtype a source model is stored in, or None when it does not say. An HF folder or hub id: its config's
    ``dtype`` (``torch_dtype`` in older configs). A GGUF file: ``float16``/``bfloat16`` when its weight tensors are
    all stored so (F32 norms aside), else ``float32`` (quantized or F32 weights are dequantized to fp32); a GGUF file
    that is not on this machine (a hub id) is ``float32``. ``spec`` is what :func:`shortened.models.resolve_source`
    takes, or a :class:`~shortened.models.ModelSource`. Raises :class:`ShortenedError` when the config cannot be
    read."""
    import torch

    from shortened.models import ModelSource, resolve_source

    source = spec if isinstance(spec, ModelSource) else resolve_source(spec, gguf_file)
    if source.gguf_file:
        path = Path(source.path) / source.gguf_file
        if not path.is_file():
            return torch.float32
        from gguf import GGMLQuantizationType, GGUFReader

        stored = {GGMLQuantizationType(t.tensor_type) for t in GGUFReader(path).tensors}
        stored.discard(GGMLQuantizationType.F32)
        if stored == {GGMLQuantizationType.F16}:
            return torch.float16
        if stored == {GGMLQuantizationType.BF16}:
            return torch.bfloat16
        return torch.float32
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path)
    except Exception as exc:  # OSError, ValueError, KeyError, depending on what is wrong
        raise ShortenedError(f"model {source.describe()!r}: its config could not be read for its dtype: {exc}") from exc
    for c in (config, getattr(config, "get_text_config", lambda: config)()):
        found = _torch_dtype(getattr(c, "dtype", None))
        if found is not None:
            return found
    return None


def resolve_save_dtype(save_dtype: str, source=None, gguf_file: str | None = None, *, fallback=None):
    """The torch dtype to write a checkpoint in. ``save_dtype`` is one of :data:`SAVE_DTYPES`: an explicit dtype is
    taken as it is; ``auto`` is the source model's (:func:`source_dtype` of ``source``/``gguf_file``), else
    ``fallback`` (the export of a retrained model passes its training dtype), else float32. Raises
    :class:`ShortenedError` for another ``save_dtype``."""
    import torch

    if save_dtype not in SAVE_DTYPES:
        raise ShortenedError(f"save dtype {save_dtype!r}: choose one of {', '.join(SAVE_DTYPES)}")
    if save_dtype != "auto":
        return _torch_dtype(save_dtype)
    found = source_dtype(source, gguf_file) if source is not None else None
    return found or _torch_dtype(fallback) or torch.float32


def _keep_fp32(model, dtype) -> Callable[[str], bool]:
    """Whether a state-dict key is one that transformers keeps in fp32 when loading in ``dtype``
    (``_keep_in_fp32_modules``, ``_keep_in_fp32_modules_strict``: MoE router biases and the like)."""
    import re

    try:
        patterns = list(model._get_dtype_plan(dtype))
    except (AttributeError, TypeError):
        patterns = []
    if not patterns:
        return lambda key: False
    # matched as transformers matches them when it loads (core_model_loading.build_glob_alternation): "*" is ".*",
    # searched anywhere in the key
    rx = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns))
    return lambda key: rx.search(key) is not None


def save_pretrained_as(model, folder: str | Path, dtype=None, *, in_place: bool = False) -> str:
    """``model.save_pretrained(folder)`` with its floating-point weights written in ``dtype`` (None: as the model
    holds them), and ``config.json``'s ``dtype`` saying so. Returns the dtype name written (``"bfloat16"``).

    The live model is not changed: a cast copy of its state dict is written (tied weights stay one tensor), which
    costs host memory of the saved size while it is written; ``in_place=True`` casts the model itself instead (for a
    throwaway copy, such as the export of a retrained model: no extra memory). Integer buffers, and tensors the
    architecture keeps in fp32 when loaded in ``dtype`` (``_keep_in_fp32_modules``), are written as they are."""
    import torch

    folder = Path(folder)
    held = model.dtype
    dtype = dtype or held
    keep = _keep_fp32(model, dtype)
    if dtype == held and all(t.dtype == dtype or not t.is_floating_point() for t in model.state_dict().values()):
        model.save_pretrained(folder)
    elif in_place:
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if t.is_floating_point() and t.dtype != dtype and not keep(name):
                    t.data = t.data.to(dtype)
        model.save_pretrained(folder)
    else:
        cast, state = {}, {}
        for key, t in model.state_dict().items():
            if t.is_floating_point() and t.dtype != dtype and not keep(key):
                ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                         t.dtype, str(t.device))  # tied weights: one storage, one cast tensor
                if ident not in cast:
                    cast[ident] = t.detach().to(device="cpu", dtype=dtype)
                state[key] = cast[ident]
            else:
                state[key] = t
        model.save_pretrained(folder, state_dict=state)  # (it stamps the live config with the live dtype: right)
    return stamp_config_dtype(folder, dtype)


def stamp_config_dtype(folder: Path, dtype) -> str:
    """Set ``dtype`` (a ``torch.dtype``) in ``folder/config.json`` — its ``dtype`` (and ``torch_dtype`` where
    present), and those of its sub-configs that name one — which ``save_pretrained`` takes from the live parameters
    rather than from the tensors written. Returns the dtype name written (``"bfloat16"``)."""
    name = str(dtype).removeprefix("torch.")
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())

    def stamp(d: dict, top: bool) -> None:
        for key in ("dtype", "torch_dtype"):
            if key in d or (top and key == "dtype"):
                d[key] = name
        for key, value in d.items():
            if key.endswith("_config") and isinstance(value, dict) and ("dtype" in value or "torch_dtype" in value):
                stamp(value, False)

    stamp(config, True)
    write_text_atomic(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return name


def save_model_dir(out: str | Path, model, tokenizer=None, *, report_name: str, report: dict,
                   overwrite: bool = False, verify: Callable[[Path], None] | None = None, dtype=None) -> Path:
    """Write an HF model (``save_pretrained``), its tokenizer and a JSON report to a staging folder beside ``out``,
    then move it into place in one step; a failure leaves no partial folder.

    ``dtype``: the torch dtype the weights are written in (None: as the model holds them), recorded in the report as
    ``saved_dtype``; the model in memory is not changed (:func:`save_pretrained_as`).
    ``verify(staging)`` runs on the complete staging folder before it is published; whatever it raises removes
    the staging folder and propagates, so a folder that fails the check never appears at ``out``."""
    out = check_output(out, kind="dir", overwrite=overwrite, create=False)
    with staged_dir(out) as staging:
        saved = save_pretrained_as(model, staging, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_json_atomic(staging / report_name, {**report, "saved_dtype": saved})
        if verify is not None:
            verify(staging)
    return out


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """``with staged_dir(out) as staging:`` write a folder's contents into ``staging``, a fresh folder beside
    ``out`` (:func:`make_staging_dir`); when the block ends it is published as ``out`` in one step
    (:func:`publish_dir`), and when the block raises it is removed: a failure leaves no partial folder at ``out``.
    At an object-store URL the folder is uploaded when the block ends, its completion marker last
    (:func:`shortened.storage.staged_upload`)."""
    from shortened import storage

    if storage.is_url(final):
        with storage.staged_upload(str(final)) as staging:
            yield staging
        return
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(final)
    try:
        yield staging
        chmod_tree(staging)
        publish_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written staging folder into place, replacing ``final`` only once the new one is complete."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(final)
