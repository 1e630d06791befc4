"""Where a training loop runs: inside Ray Train (:class:`RaySession`) or as plain processes (:class:`LocalSession`,
one process or ``torchrun``). The loop only sees rank, device, ``report`` and ``restore``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class Session:
    """``rank`` and ``world_size`` across all workers; ``local_rank`` and ``local_world_size`` on this node (ranks are
    numbered node by node: the node hosting rank 0 has ranks ``0 … local_world_size − 1``)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int = 1

    @property
    def device(self) -> torch.device:
        """Where this rank's model, batches and every tensor handed to a collective live (NCCL takes GPU tensors
        only, gloo CPU ones)."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def report(self, metrics: dict, checkpoint_dir: str | None = None, asynchronous: bool = False) -> bool:
        """Report ``metrics`` (and the checkpoint staged in ``checkpoint_dir``). ``asynchronous``: upload the
        checkpoint in the background if the session can, and then take the folder (delete it once uploaded).
        Returns whether the session took the folder; if not, the caller deletes it."""
        raise NotImplementedError

    @contextmanager
    def restore(self) -> Iterator[str | None]:
        """The latest checkpoint folder to resume from, or None."""
        raise NotImplementedError


class RaySession(Session):
    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = (ctx.get_world_rank(), ctx.get_world_size(),
                                                       ctx.get_local_rank())
        self.local_world_size = ctx.get_local_world_size()

    @property
    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def report(self, metrics: dict, checkpoint_dir: str | None = None, asynchronous: bool = False) -> bool:
        """``ray.train.report``; ``asynchronous``: with ``CheckpointUploadMode.ASYNC`` (Ray Train uploads the folder
        in a background thread and deletes it after; reports stay in order, so a metrics-only report is made the
        same way, else it would wait for a pending upload)."""
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        mode = ray.train.CheckpointUploadMode.ASYNC if asynchronous else ray.train.CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=mode)
        if self.rank == 0:  # the sweep's live view reads it (when the driver asked for it: SHORTENED_PROGRESS_DIR)
            from shortened.console import write_training_progress

            write_training_progress(ray.train.get_context().get_experiment_name(), metrics)
        return checkpoint is not None and asynchronous

    @contextmanager
    def restore(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d


class LocalSession(Session):
    """No Ray: checkpoints go to ``run_dir/checkpoints/NNNNNN`` (last ``keep`` kept), metrics to
    ``run_dir/metrics.jsonl``. Rank and world size come from torchrun's environment, else 0 of 1."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))  # torchrun sets it
        self.run_dir, self.keep = Path(run_dir), keep
        self.run_dir.mkdir(parents=True, exist_ok=True)
        existing = self._checkpoints()
        self.next_index = int(existing[-1].name) + 1 if existing else 0
        if "MASTER_ADDR" not in os.environ:  # a single process: a private rendezvous
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        self.metrics: list[dict] = []

    def _checkpoints(self) -> list[Path]:
        root = self.run_dir / "checkpoints"
        return sorted(p for p in root.glob("[0-9]*") if p.is_dir()) if root.is_dir() else []

    def report(self, metrics: dict, checkpoint_dir: str | None = None, asynchronous: bool = False) -> bool:
        """Copies the checkpoint folder while the caller waits (``asynchronous`` is not supported: False)."""
        self.metrics.append(metrics)
        if self.rank == 0:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if checkpoint_dir:
            dest = self.run_dir / "checkpoints" / f"{self.next_index:06d}"
            self.next_index += 1
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)  # ranks merge into one folder
            barrier(self.device)
            if self.rank == 0:
                for old in self._checkpoints()[:-self.keep]:
                    shutil.rmtree(old)
        return False

    @contextmanager
    def restore(self) -> Iterator[str | None]:
        existing = self._checkpoints()
        yield str(existing[-1]) if existing else None


def barrier(device: torch.device) -> None:
    """``torch.distributed.barrier`` (when a process group is up) on ``device``. NCCL's barrier is an all-reduce of
    a one-element tensor on a GPU: without ``device_ids`` it uses the current device or guesses one from the rank,
    with a warning, and hangs if the guess is another process's GPU. Gloo (CPU) takes no device."""
    if not torch.distributed.is_initialized():
        return
    if device.type == "cuda":
        torch.distributed.barrier(device_ids=[device.index if device.index is not None
                                              else torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
