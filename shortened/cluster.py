"""Checks against a Ray cluster that turn would-be hangs into clear errors: an address nobody answers, a storage path
some node cannot write or does not share, workers the cluster can never place. Used by retraining and the sweep
before any work starts."""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shortened.errors import ShortenedError, validation_message

log = logging.getLogger(__name__)

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a `ray job submit` job
CONNECT_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 120.0
UNREACHABLE_HINT = "Is the cluster up (`ray status`, `cluster/local.sh status`), and its GCS port open from here?"


Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
WorkerCount = Annotated[int, Field(ge=1)]


class ScaleConfig(BaseModel):
    """How many Ray Train workers, what each holds and how Ray places them: the one model of worker scale (a
    retraining's flags, and a sweep's ``resources``, which extends it). Built directly, a bad value is a
    ShortenedError naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    num_workers: WorkerCount = 2
    """Ray Train workers (one process each; the world size)."""
    workers: tuple[WorkerCount, WorkerCount] | None = None
    """Elastic scaling, [MIN, MAX]: Ray Train starts with as many workers as the cluster has room for, at least MIN
    and at most MAX, and resizes the group from the latest checkpoint as nodes come and go (the run continues with
    the same global batch and data order; every count from MIN to MAX must divide the global batch). num_workers
    then defaults to MAX. None: a fixed num_workers."""
    use_gpu: bool = False
    """Give each worker GPUs (gpus_per_worker)."""
    cpus_per_worker: float = Field(1, gt=0, allow_inf_nan=False)
    """CPUs each worker holds."""
    gpus_per_worker: float = Field(1, gt=0, allow_inf_nan=False)
    """GPUs each worker holds when use_gpu."""
    placement_strategy: Placement = "PACK"
    """How Ray places the workers' bundles: PACK (few nodes, best effort), SPREAD (many nodes, best effort),
    STRICT_PACK (one node), STRICT_SPREAD (one node each)."""

    def __init__(self, **fields) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise ShortenedError(validation_message(exc, "worker scale")) from exc

    @field_validator("num_workers", "cpus_per_worker", "gpus_per_worker", mode="before")
    @classmethod
    def _not_bool(cls, v):
        if isinstance(v, bool):  # True is no worker count
            raise ValueError("needs a number, not a boolean")
        return v

    @field_validator("workers")
    @classmethod
    def _min_max(cls, v):
        if v is not None and v[0] > v[1]:
            raise ValueError(f"[MIN, MAX] with MIN <= MAX, got MIN {v[0]} > MAX {v[1]}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _count_from_range(cls, data):
        """With an elastic ``workers`` range, ``num_workers`` (or a sweep's ``workers_per_trial``) is its MAX."""
        if isinstance(data, dict) and isinstance(data.get("workers"), (list, tuple)) and len(data["workers"]) == 2:
            given = [k for k in ("num_workers", "workers_per_trial") if data.get(k) is not None]
            high = data["workers"][1]
            if not given:
                data = {**data, "num_workers": high}
            elif any(data[k] != high for k in given):
                raise ValueError(f"give workers [MIN, MAX] or {given[0]}, not both (workers {list(data['workers'])}, "
                                 f"{given[0]} {data[given[0]]})")
        return data

    @property
    def min_workers(self) -> int:
        return self.workers[0] if self.workers else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if self.workers else self.num_workers

    @property
    def ray_num_workers(self) -> int | tuple[int, int]:
        """Ray Train's ``ScalingConfig(num_workers=...)``: the count, or the elastic (MIN, MAX)."""
        return tuple(self.workers) if self.workers else self.num_workers

    def worker_bundle(self) -> dict[str, float]:
        """The resources one worker holds (Ray Train's ``resources_per_worker``)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}

    def worker_scale(self) -> ScaleConfig:
        """These fields alone, as a plain ScaleConfig (a sweep's ``resources`` carries more)."""
        return ScaleConfig.model_construct(**{f: getattr(self, f) for f in ScaleConfig.model_fields})

    def check_placement(self) -> None:
        """Fail fast when the cluster can never place these workers, at least MIN of an elastic range (see
        :func:`check_placement`)."""
        check_placement(self.min_workers, self.worker_bundle(), self.placement_strategy)


@dataclass(frozen=True)
class ClusterChecked:
    """What a driver verified once about the Ray cluster before starting work that retrains: it answered, every
    node writes and shares ``storage_path``, and it can place ``scale``'s workers. Retraining handed one that covers
    its run skips those checks (a sweep's trials would otherwise repeat them, a storage probe per node each)."""

    storage_path: str
    scale: ScaleConfig

    def covers(self, storage_path: str | Path, scale: ScaleConfig) -> bool:
        if scale.worker_scale() != self.scale.worker_scale():
            return False
        if "://" in str(storage_path) or "://" in str(self.storage_path):  # object-store URLs: compare as text
            return (str(storage_path).rstrip("/") + "/").startswith(str(self.storage_path).rstrip("/") + "/")
        return Path(storage_path).resolve().is_relative_to(Path(self.storage_path).resolve())


def in_ray_job() -> bool:
    """True when this process is the driver of a submitted Ray job (it runs in a temporary copy of --working-dir)."""
    return JOB_ENV in os.environ


def connect(address: str | None = None) -> bool:
    """``ray.init`` to ``address`` (else ``RAY_ADDRESS``, else a new local Ray). Returns True when this call started
    Ray. An address that does not answer within seconds is an error that names it, not a minute-long hang."""
    import ray

    if ray.is_initialized():
        return False
    source = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("auto", "local"):
        _check_reachable(address, source)
    from shortened import console

    runtime_env = console.ray_runtime_env()  # workers: libraries quiet unless --verbose
    if not address:  # a new local Ray of this process's own, whatever other instances run on this machine
        picked_port = not os.environ.get("RAY_GCS_SERVER_PORT")
        if picked_port:
            os.environ["RAY_GCS_SERVER_PORT"] = str(_free_port())
        address = "local"
        # its workers reach it by address (Ray Train's placement-group cleaner queries the State API, which would
        # otherwise pick the machine's latest instance, or fail with a traceback when it finds several)
        gcs = f"{ray.util.get_node_ip_address()}:{os.environ['RAY_GCS_SERVER_PORT']}"
        runtime_env["env_vars"]["RAY_ADDRESS"] = gcs
    else:
        picked_port = False
    try:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env,
                 logging_level=console.ray_logging_level())
    except ConnectionError as exc:
        raise ShortenedError(f"cannot connect to the Ray cluster at {address!r} (from {source}): {exc}. "
                             f"{UNREACHABLE_HINT}") from exc
    except Exception as exc:  # ray.exceptions.AuthenticationError and friends
        if type(exc).__name__ == "AuthenticationError":
            raise ShortenedError(
                f"the Ray cluster at {address!r} refused this client's token: set RAY_AUTH_MODE=token and the "
                f"cluster's token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token): {exc}") from exc
        raise
    finally:
        if picked_port:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _check_reachable(address: str, source: str) -> None:
    url = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = url.hostname, url.port
    if not host or not port:
        raise ShortenedError(f"Ray address {address!r} (from {source}) is not HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ShortenedError(f"cannot connect to the Ray cluster at {address!r} (from {source}): "
                             f"{exc or 'timed out'}. {UNREACHABLE_HINT}") from exc


# -- shared storage ----------------------------------------------------------------------------------------------

def node_id() -> str:
    """The Ray node this process runs on; "local" outside Ray."""
    try:
        import ray

        # (is_initialized first: get_runtime_context() would start a Ray of its own outside a cluster)
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:
        return "local"


def _probe(path: str, driver_file: str, token: str) -> dict:
    """On one node: can it create files under ``path``, and does it see the file the driver just wrote there?"""
    node = node_id()
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        mine = Path(path) / f".probe-{token}-{node[:12]}"
        mine.write_text(node)
        mine.unlink()
    except OSError as exc:
        return {"node": node, "error": f"cannot write: {exc}"}
    try:
        seen = Path(driver_file).read_text() == token
    except OSError:
        seen = False
    if not seen:
        return {"node": node, "error": "does not see files the driver writes there (not shared storage)"}
    return {"node": node, "error": None}


def write_probe(path: str | Path, token: str) -> Path:
    """Create ``path`` and write a probe file into it from the driver; ShortenedError naming the path if it cannot."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".probe-{token}"
        probe.write_text(token)
        return probe
    except OSError as exc:
        raise ShortenedError(f"storage path {str(path)!r} is not writable from the driver: {exc}") from exc


def check_driver_writable(path: str | Path) -> None:
    """The driver can create and write ``path`` (checked before anything else is written there)."""
    write_probe(path, uuid.uuid4().hex).unlink(missing_ok=True)


def check_shared_storage(path: str | Path) -> None:
    """Every alive node must be able to write ``path`` and see what the driver wrote: models, checkpoints and
    results move between trials and workers through it. One zero-CPU probe task per node, bounded in time."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = str(path)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    token = uuid.uuid4().hex
    driver_file = write_probe(path, token)
    try:
        if len(nodes) < 2:
            return  # one node: the driver's own write above is the check
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(path, str(driver_file), token) for n in nodes]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        where = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
        bad = []
        for ref in ready:
            try:
                result = ray.get(ref)
            except Exception as exc:  # the node died since ray.nodes() listed it: nothing to check there
                log.warning("storage probe: a node went away (%s)", type(exc).__name__)
                continue
            if result["error"]:
                bad.append(result)
        if bad:
            lines = "; ".join(f"node {b['node'][:12]} ({where.get(b['node'])}) {b['error']}" for b in bad)
            raise ShortenedError(f"storage path {path!r} must be shared storage, writable at the same path on every "
                                 f"node (NFS, EFS, a PVC...): {lines}")
        for ref in pending:
            ray.cancel(ref, force=True)
        if pending:
            log.warning("storage probe: %d node(s) did not answer within %.0f s; not checked", len(pending),
                        PROBE_TIMEOUT_S)
    finally:
        driver_file.unlink(missing_ok=True)


# -- placement ---------------------------------------------------------------------------------------------------

def _node_capacities() -> tuple[list[dict[str, float]], bool]:
    """Total resources of every alive node, plus those of every node the autoscaler may still add
    (as many copies as its ``max_count``, capped); second value: whether an autoscaler config was found."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # private API: absent or changed -> judge by the nodes that exist
        config = None
    groups = list(config.node_group_configs) if config is not None else []
    for g in groups:
        count = g.max_count if g.max_count >= 0 else 64
        nodes += [dict(g.resources)] * min(count, 64)
    return nodes, bool(groups)


def cluster_capacity() -> dict[str, float]:
    """Total resources of the cluster, counting the nodes its autoscaler may add."""
    total: dict[str, float] = {}
    for node in _node_capacities()[0]:
        for k, v in node.items():
            total[k] = total.get(k, 0.0) + v
    return total


def placement_problem(num: int, bundle: dict[str, float], strategy: str,
                      nodes: list[dict[str, float]]) -> str | None:
    """Why ``num`` identical bundles can never be placed on ``nodes`` with ``strategy``; None if they can."""
    def fits(node: dict[str, float]) -> int:
        counts = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
        return min(counts) if counts else num

    per_node = [fits(n) for n in nodes]
    what = " + ".join(f"{v:g} {k}" for k, v in bundle.items() if v > 0)
    shape = ", ".join("{" + ", ".join(f"{k}: {n.get(k, 0):g}" for k in bundle) + "}" for n in nodes) or "none"
    if strategy == "STRICT_SPREAD":
        ok = sum(c >= 1 for c in per_node)
        if ok < num:
            return (f"{num} workers × ({what}) with STRICT_SPREAD need {num} different nodes that each fit one "
                    f"worker; the cluster has {ok} (nodes: {shape})")
    elif strategy == "STRICT_PACK":
        if max(per_node, default=0) < num:
            return (f"{num} workers × ({what}) with STRICT_PACK need one node that fits them all; the largest fits "
                    f"{max(per_node, default=0)} (nodes: {shape})")
    elif sum(per_node) < num:
        plural = "s" if num != 1 else ""
        return (f"{num} worker{plural} × ({what}) can never be placed: the cluster's nodes fit {sum(per_node)} "
                f"(nodes: {shape})")
    return None


def check_placement(num: int, bundle: dict[str, float], strategy: str = "PACK") -> None:
    """Fail fast when the cluster (as it is, plus what its autoscaler may add) can never place the workers:
    Ray would wait for them forever."""
    nodes, autoscaling = _node_capacities()
    problem = placement_problem(num, bundle, strategy, nodes)
    if problem:
        hint = "" if autoscaling else " — no autoscaler config was found, so only the nodes that exist count"
        raise ShortenedError(problem + hint)


def check_job_paths(**paths: str) -> None:
    """Inside a submitted Ray job the working directory is a temporary copy: relative output paths would vanish."""
    if not in_ray_job():
        return
    for name, p in paths.items():
        if p and "://" not in str(p) and not Path(str(p)).is_absolute():
            raise ShortenedError(f"{name} {p!r} is relative, but this runs as a Ray job in a temporary copy of "
                                 f"--working-dir ({os.getcwd()}), so what it writes would be lost: pass an absolute "
                                 "path on shared storage (e.g. --storage-path /mnt/shared/runs)")


def describe() -> str:
    """One line about the cluster this process is connected to (for logs)."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    res = ray.cluster_resources()
    return (f"{len(nodes)} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs "
            f"(python {sys.version_info.major}.{sys.version_info.minor}, ray {ray.__version__})")
