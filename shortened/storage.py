"""Where outputs live: a local folder or an object store (``s3://bucket/prefix``, ``gs://…``, any URL that fsspec
knows), one way for both.

On a cluster the shared place is usually an object store, and nodes share no disk. So every path that a user gives
(``storage_path``, ``--out``) may be a URL, and a URL is never turned into a local path:

- :func:`path` gives a ``pathlib.Path`` for a local path and a ``upath.UPath`` (universal_pathlib, the pathlib API
  over fsspec) for a URL, so ``/``, ``read_text``, ``write_text``, ``is_file``, ``glob`` read the same either way;
- model folders that move between steps (pruned → retrained → evaluated) are written locally and published by
  :func:`publish_dir`: to a URL, every file is uploaded, the JSON reports last (readers that check
  ``pruning.json``/``retraining.json`` never see weights still uploading), then a :data:`COMPLETE` marker; a folder
  without the marker is not there (nothing half-written is ever read);
- whichever node needs such a folder reads it through :func:`local_copy`, a node-local cache keyed by the URL and
  the marker's id (a republished folder is fetched again);
- Ray Train and Tune get the store as a pyarrow filesystem (:func:`pyarrow_filesystem`) built from the same fsspec
  one, so checkpoints and every other file see one set of credentials.

Credentials and endpoints come from the standard environment of each backend (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, instance roles; ``GOOGLE_APPLICATION_CREDENTIALS``
for ``gs://``), plus ``SHORTENED_STORAGE_OPTIONS``, a JSON object of fsspec options (``{"endpoint_url": …}``) that
Ray workers inherit with the rest of the job's environment.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shortened.errors import ShortenedError

log = logging.getLogger(__name__)

COMPLETE = ".complete"  # the marker a published folder gets last: {"id": ..., "files": N}
OPTIONS_ENV = "SHORTENED_STORAGE_OPTIONS"
CACHE_ENV = "SHORTENED_CACHE_DIR"
# where the store is (never its secrets): a driver passes these on to its Ray tasks and workers; credentials stay
# each node's own (instance roles, the node's environment), so they never land in a job's runtime_env
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", OPTIONS_ENV)
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs"}


def is_url(p: Any) -> bool:
    """True for ``scheme://…`` other than ``file://`` (a UPath of a remote filesystem counts too)."""
    s = str(p)
    return "://" in s and not s.startswith("file://")


def local_path(p: str) -> str:
    """A ``file:`` URL as the local path it names (``file:///data/x``, ``file://localhost/data/x`` and
    ``file:/data/x`` are ``/data/x``); anything else unchanged. Local folders are handled as paths (atomic
    renames, the shared-storage check), never through fsspec's ``file`` filesystem."""
    s = str(p)
    if not s.startswith("file:"):
        return s
    from urllib.parse import unquote, urlparse

    parts = urlparse(s)
    if parts.netloc not in ("", "localhost"):
        raise ShortenedError(f"{s!r}: a file:// URL names a path on this machine (file:///path), not on host "
                             f"{parts.netloc!r}")
    return unquote(parts.path) or "/"


def protocol(url: str) -> str:
    return str(url).split("://", 1)[0].lower()


def storage_options(url: str | None = None) -> dict:
    """fsspec options from ``SHORTENED_STORAGE_OPTIONS`` (a JSON object), plus what the environment says that the
    backend does not read itself (s3fs ignores ``AWS_ENDPOINT_URL`` in some versions: it is passed explicitly)."""
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    try:
        opts = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise ShortenedError(f"{OPTIONS_ENV} is not a JSON object: {exc}") from exc
    if not isinstance(opts, dict):
        raise ShortenedError(f"{OPTIONS_ENV} is not a JSON object: {raw[:80]!r}")
    if url is not None and protocol(url) in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in opts.get("client_kwargs", {}):
            opts["endpoint_url"] = endpoint
    return opts


def filesystem(url: str):
    """The fsspec filesystem of ``url`` and the path inside it (``bucket/prefix``). ShortenedError naming the package
    when the backend is not installed."""
    import fsspec

    proto = protocol(url)
    try:
        fs = fsspec.filesystem(proto, **storage_options(url))
    except (ImportError, ValueError) as exc:
        pkg = _PACKAGES.get(proto)
        hint = f" (pip install {pkg})" if pkg else ""
        raise ShortenedError(f"{url}: no filesystem for {proto}://{hint}: {exc}") from exc
    return fs, fs._strip_protocol(str(url)).rstrip("/")


def path(p: str | os.PathLike):
    """``p`` as a path object: ``pathlib.Path`` (``~`` expanded, not resolved) for local paths, ``upath.UPath`` for
    URLs (same options as :func:`filesystem`)."""
    if is_url(p):
        from upath import UPath

        if not isinstance(p, str) and type(p).__module__.startswith("upath"):
            return p
        return UPath(str(p), **storage_options(str(p)))
    return Path(local_path(p)).expanduser()


def absolute(p: str | os.PathLike) -> str:
    """A local path made absolute (``~`` expanded, resolved); a URL as it is, without a trailing slash."""
    if is_url(p):
        return str(p).rstrip("/")
    return str(Path(local_path(p)).expanduser().resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/…`` as a string, for URLs and local paths alike."""
    return str(path(base).joinpath(*parts))


def pyarrow_filesystem(url: str):
    """For Ray Train/Tune's ``storage_filesystem``: ``(pyarrow filesystem, path inside it)``. The pyarrow side wraps
    the same fsspec filesystem as :func:`filesystem`, so Ray's checkpoints and our files use one configuration."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, inner = filesystem(url)
    return PyFileSystem(FSSpecHandler(fs)), inner


# -- checks --------------------------------------------------------------------------------------------------------

def check_writable(url: str, what: str = "storage path") -> None:
    """Before any work: the store answers, the bucket exists, and these credentials may write and delete there.
    Each failure is a ShortenedError naming the URL and what is wrong (unreachable endpoint, no such bucket, access
    denied), instead of a worker failing minutes later."""
    fs, inner = filesystem(url)
    bucket = inner.split("/", 1)[0]
    probe = f"{inner}/.probe-{uuid.uuid4().hex}"
    endpoint = storage_options(url).get("endpoint_url") or "the default endpoint"
    _check_endpoint(url, what)  # a dead endpoint would be retried for long, then called "no such bucket"
    try:  # the write itself tells the cases apart (exists() answers False to a refused request as well)
        fs.pipe_file(probe, b"probe")
        fs.rm_file(probe)
    except FileNotFoundError as exc:
        raise ShortenedError(f"{what} {url!r}: bucket {bucket!r} does not exist at {endpoint} (create it first, or "
                             f"check the name and AWS_ENDPOINT_URL): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - botocore's errors are not OSErrors
        raise store_error(exc, url, what, "writing to") from exc
    finally:
        with contextlib.suppress(Exception):
            fs.invalidate_cache()


def store_error(exc: BaseException, url: str, what: str, doing: str = "reading") -> ShortenedError:
    """The named error for an object store's refusal ``exc`` while ``doing`` at ``url``: access denied, no
    credentials, an invalid bucket name, or a store that cannot be reached."""
    bucket = str(url).split("://", 1)[-1].split("/", 1)[0]
    endpoint = storage_options(url).get("endpoint_url") or "the default endpoint"
    name, text = type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return ShortenedError(f"{what} {url!r}: access denied {doing} bucket {bucket!r} at {endpoint} (check the "
                              f"credentials in AWS_ACCESS_KEY_ID/AWS_PROFILE and the bucket policy): {text}")
    if "Credential" in name:
        return ShortenedError(f"{what} {url!r}: no credentials for {endpoint} (set AWS_ACCESS_KEY_ID and "
                              f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role): {text}")
    if "bucket name" in text.lower() or name == "ParamValidationError":
        return ShortenedError(f"{what} {url!r}: {bucket!r} is not a valid bucket name (lowercase letters, digits, "
                              f"'.', '-'; 3 to 63 characters)")
    return ShortenedError(f"{what} {url!r}: cannot reach the object store at {endpoint} ({name}: {text})")


def _check_endpoint(url: str, what: str) -> None:
    endpoint = storage_options(url).get("endpoint_url") or ""
    if endpoint.startswith(("http://", "https://")):  # the client retries a dead endpoint for long: ask the socket
        _check_answers(url, endpoint, what)


def _check_answers(url: str, endpoint: str, what: str) -> None:
    import socket
    from urllib.parse import urlparse

    parts = urlparse(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=5):
            pass
    except OSError as exc:
        raise ShortenedError(f"{what} {url!r}: cannot reach the object store at {endpoint} ({exc}); check "
                             "AWS_ENDPOINT_URL and that the server is up") from exc


def check_folder_url(url: str, inner: str | None = None) -> None:
    """A folder of outputs at a URL needs a prefix inside the bucket: publishing replaces what is at the prefix, and
    at a bucket's root that would be the whole bucket. ShortenedError otherwise."""
    inner = inner if inner is not None else filesystem(url)[1]
    if "/" not in inner.strip("/"):
        raise ShortenedError(f"{url}: a bucket's root cannot take a folder of outputs (publishing replaces what is "
                             f"at its prefix: here the whole bucket); give a prefix, e.g. {url.rstrip('/')}/pruned")


def describe_prefix(url: str) -> tuple[str, int]:
    """What is at ``url``: ``("folder", objects below it)``, ``("file", 1)``, or ``("none", 0)``."""
    fs, inner = filesystem(url)
    fs.invalidate_cache()
    if fs.isfile(inner):
        return "file", 1
    try:
        return ("folder", len(fs.find(inner))) if fs.isdir(inner) else ("none", 0)
    except FileNotFoundError:
        return "none", 0


# -- folders that move between steps ---------------------------------------------------------------------------

def is_complete(folder: str | os.PathLike) -> bool:
    """A published folder: locally, a folder that exists (local publishing renames in one step); at a URL, one whose
    :data:`COMPLETE` marker is there."""
    if not is_url(folder):
        return Path(folder).expanduser().is_dir()
    fs, inner = filesystem(str(folder))
    _check_endpoint(str(folder), "folder")
    try:
        return fs.exists(f"{inner}/{COMPLETE}")
    except Exception as exc:  # noqa: BLE001 - botocore's errors are not OSErrors
        raise store_error(exc, str(folder), "folder") from exc


def publish_dir(local: Path, url: str, *, replace: bool = True) -> None:
    """Upload the finished local folder ``local`` to ``url``, replacing what was there (``replace``; else the files
    are added to the prefix, whose other objects stay, as files written into a local folder): the old marker goes
    first, then the files (the JSON reports at the top last), then a new marker. Readers (:func:`is_complete`,
    :func:`local_copy`) never take the folder before the marker is there. ShortenedError for a bucket's root."""
    fs, inner = filesystem(url)
    check_folder_url(url, inner)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(f"{inner}/{COMPLETE}")
    if replace and fs.exists(inner):
        fs.rm(inner, recursive=True)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    top_json = [p for p in files if p.parent == local and p.suffix == ".json"]
    for p in [p for p in files if p not in top_json] + top_json:
        fs.put_file(str(p), f"{inner}/{p.relative_to(local).as_posix()}")
    marker = {"id": uuid.uuid4().hex, "files": len(files)}
    fs.pipe_file(f"{inner}/{COMPLETE}", json.dumps(marker).encode())
    fs.invalidate_cache()


def cache_root() -> Path:
    """This node's cache of folders read from an object store: ``$SHORTENED_CACHE_DIR``, else
    ``~/.cache/shortened/store``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "shortened" / "store").expanduser()


def local_copy(url: str) -> Path:
    """A node-local copy of the published folder at ``url`` (downloaded once per node and publication; concurrent
    readers on one node share one download). ShortenedError when ``url`` holds no complete folder."""
    fs, inner = filesystem(url)
    _check_endpoint(url, "folder")
    try:
        marker = json.loads(fs.cat_file(f"{inner}/{COMPLETE}"))
    except FileNotFoundError:
        raise ShortenedError(f"{url}: no complete folder there (no {COMPLETE} marker: missing, or still being "
                             "written)") from None
    except Exception as exc:  # noqa: BLE001 - botocore's errors are not OSErrors
        raise store_error(exc, url, "folder") from exc
    key = hashlib.sha256(f"{url.rstrip('/')}\n{marker['id']}".encode()).hexdigest()[:24]
    dest = cache_root() / f"{Path(inner).name}-{key}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(dest) + ".lock"):
        if dest.is_dir():
            return dest
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            for remote in fs.find(inner):
                rel = remote[len(inner) + 1:]
                if rel == COMPLETE:
                    continue
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(target))
            staging.rename(dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info("fetched %s into the node cache %s", url, dest)
    return dest


@contextlib.contextmanager
def staged_upload(url: str, *, replace: bool = True) -> Iterator[Path]:
    """``with staged_upload(url) as folder:`` write a folder locally; when the block ends it is published to ``url``
    (:func:`publish_dir`, ``replace`` as there); when it raises, nothing is uploaded."""
    staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=_scratch()))
    try:
        yield staging
        publish_dir(staging, url, replace=replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@functools.cache
def _scratch() -> Path:
    folder = cache_root().parent / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def worker_env() -> dict[str, str]:
    """The object-storage environment of this process (:data:`ENV_KEYS` that are set), for Ray tasks and workers."""
    return {k: os.environ[k] for k in ENV_KEYS if os.environ.get(k)}
