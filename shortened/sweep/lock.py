"""One driver per experiment: ``driver.lock`` in the experiment folder (``ExperimentLayout.lock``), created
atomically (``O_EXCL``).

It says who holds the experiment (host, pid, when it started) and carries a heartbeat the holder refreshes every few
seconds. A second driver — a job submitted twice, a retried RayJob while the old driver still lives — is refused
with the holder named. A holder that died is taken over: on the same host when its pid is gone (or is another
process now), on another host when its heartbeat is older than ``stale_after_s``; so ``--resume`` after a crash works.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from shortened.errors import ShortenedError
from shortened.io import write_text_atomic

log = logging.getLogger(__name__)
HEARTBEAT_S = float(os.environ.get("SHORTENED_LOCK_HEARTBEAT_S", 10))
STALE_AFTER_S = float(os.environ.get("SHORTENED_LOCK_STALE_S", 120))


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of a process (Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _proc_start(pid)
    return start is None or now is None or now == start


class ExperimentLock:
    """``with ExperimentLock(layout.lock, "experiment 'x'"):`` — held for the block, heartbeat in a daemon thread.
    ``path`` is the lock file; the files it moves aside or writes first lie beside it."""

    def __init__(self, path: Path, what: str, *, heartbeat_s: float | None = None,
                 stale_after_s: float | None = None):
        self.path = Path(path)
        self.what = what
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.since = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None

    # -- the record ---------------------------------------------------------------------------------------------

    def _record(self) -> dict:
        return {"host": self.host, "pid": self.pid, "pid_start": _proc_start(self.pid), "since": self.since,
                "since_utc": _iso(self.since), "heartbeat": time.time(), "token": self.token}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # being written, or damaged: judged by the file's age below

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
        return True

    def _stale(self, holder: dict) -> str | None:
        """Why the holder is dead, or None while it may live."""
        if not holder:  # unreadable: stale only once nobody has touched the file for a while
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return "gone"
            return f"unreadable lock file untouched for {age:.0f} s" if age > self.stale_after_s else None
        if holder.get("host") == self.host:
            if not _alive(int(holder.get("pid", -1)), holder.get("pid_start")):
                return f"its process {holder.get('pid')} on this host is gone"
            return None
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (limit {self.stale_after_s:g} s)"
        return None

    def describe(self, holder: dict) -> str:
        if not holder:
            return f"an unreadable lock {self.path}"
        beat = time.time() - float(holder.get("heartbeat", 0))
        return (f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since_utc')} "
                f"(last heartbeat {beat:.0f} s ago)")

    # -- acquire / release --------------------------------------------------------------------------------------

    def acquire(self) -> ExperimentLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue  # released meanwhile: try again
            why = self._stale(holder)
            if why is None:
                raise ShortenedError(
                    f"{self.what} is being run by another driver ({self.describe(holder)}; lock file {self.path}). "
                    "Two drivers would run the same trials at once: wait for it to finish, or stop it first "
                    f"(a driver that died is taken over: on the same host at once, on another host after "
                    f"{self.stale_after_s:g} s without a heartbeat)")
            # take over: move the dead holder's file aside (only one taker's rename succeeds), check it was the one
            # judged dead, then create ours
            tomb = self.path.with_name(f"{self.path.name}.dead-{self.token}")
            try:
                os.rename(self.path, tomb)
            except FileNotFoundError:
                continue
            moved = json.loads(tomb.read_text() or "{}") if tomb.stat().st_size else {}
            if holder and moved.get("token") != holder.get("token"):  # a new holder came in between: put it back
                try:
                    os.link(tomb, self.path)
                except FileExistsError:
                    pass
                tomb.unlink(missing_ok=True)
                continue
            tomb.unlink(missing_ok=True)
            log.warning("%s: taking over from a driver that died (%s: %s)", self.what, self.describe(holder), why)
            self.took_over = {**holder, "why": why}
        else:
            raise ShortenedError(f"{self.what}: could not take the lock {self.path} (other drivers keep racing for it)")
        self._thread = threading.Thread(target=self._beat, name="shortened-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self._read()
            if current and current.get("token") != self.token:
                log.error("%s: the lock %s was taken over by %s; this driver no longer holds it", self.what,
                          self.path, self.describe(current))
                return
            try:
                write_text_atomic(self.path, json.dumps(self._record()), parents=False)
            except OSError as exc:
                log.warning("%s: could not refresh the lock heartbeat: %s", self.what, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self._read()
        if current and current.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> ExperimentLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
