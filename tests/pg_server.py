"""A real PostgreSQL server for tests: Debian's ``postgresql`` binaries (``initdb``, ``pg_ctl``) on a throw-away data
folder, listening on a free port of 127.0.0.1 only, with password (SCRAM) authentication, so that the results
store meets the server users run, not a mock.

The server refuses to run as root, so under root (CI, containers) every server command runs as the unprivileged
``postgres`` user the Debian package creates; as any other user it runs as that user. ``make test`` installs the
package when ``pg_ctl`` is missing. Use it through the session fixture ``postgres`` (``from pg_server import
postgres`` in a test module)::

    def test_x(postgres):
        url = postgres.url()            # postgresql+psycopg://shortened:PASSWORD@127.0.0.1:PORT/shortened
        postgres.stop(); postgres.start()   # take the database away mid-sweep and bring it back
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "shortened"  # the role and database the results store uses (not the superuser)
INSTALL_HINT = "install Debian's postgresql package (apt-get install postgresql); `make test` does it when missing"


def find_bindir() -> Path:
    """The folder of ``pg_ctl``/``initdb``: ``$PG_BINDIR``, else Debian's newest ``/usr/lib/postgresql/N/bin``,
    else where ``pg_ctl`` is on PATH. Raises RuntimeError naming what was searched when there is none."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if debian:
        return Path(debian[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    raise RuntimeError(f"no PostgreSQL server binaries (pg_ctl) in /usr/lib/postgresql/*/bin or on PATH: "
                       f"{INSTALL_HINT}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL server in a temporary folder. :meth:`start` after construction; :meth:`stop` and
    :meth:`start` again keep the data (a database going away and coming back); :meth:`destroy` stops it and
    removes the folder. ``password`` is the store role's, random per server."""

    def __init__(self, bindir: Path | None = None):
        self.bindir = bindir or find_bindir()
        self.port = free_port()
        self.password = "pw-" + secrets.token_hex(8)
        self.root = Path(tempfile.mkdtemp(prefix="shortened-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.run_as = "postgres" if os.geteuid() == 0 else None
        if self.run_as:
            try:
                pw = pwd.getpwnam(self.run_as)
            except KeyError as exc:
                raise RuntimeError(f"running as root, but there is no user {self.run_as!r} to run the server as: "
                                   f"{INSTALL_HINT}") from exc
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        superpass = self.root / "superuser.pw"
        self._superpassword = secrets.token_hex(8)
        superpass.write_text(self._superpassword + "\n")
        if self.run_as:
            os.chown(superpass, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={superpass}",
                  "--no-sync", "--encoding=UTF8", "--locale=C")
        superpass.unlink()
        self.running = False

    def _run(self, tool: str, *args) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.bindir / tool), *map(str, args)], user=self.run_as, capture_output=True,
                              text=True, cwd=self.root)
        if proc.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.is_file() else ""
            raise RuntimeError(f"{tool} {' '.join(map(str, args))} failed ({proc.returncode}): "
                               f"{proc.stdout}{proc.stderr}{log}")
        return proc

    def start(self) -> PostgresServer:
        """Start (or restart) the server and wait until it accepts connections; the first start creates the
        store's role and database. A running server is left as it is."""
        if self.running:
            return self
        opts = (f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=60")
        self._run("pg_ctl", "start", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", opts)
        self.running = True
        if not getattr(self, "_created", False):
            self._create_role()
            self._created = True
        return self

    def stop(self) -> None:
        """Stop the server at once (``-m fast``: open connections are cut, as when a database host goes away)."""
        if self.running:
            self._run("pg_ctl", "stop", "-D", self.data, "-m", "fast", "-w", "-t", "60")
            self.running = False

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _create_role(self) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", password=self._superpassword,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{self.password}'")
            conn.execute(f"CREATE DATABASE {USER} OWNER {USER}")

    def create_database(self, name: str) -> str:
        """A further empty database owned by the store role; returns its URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", password=self._superpassword,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {USER}")
        return self.url(database=name)

    def url(self, password: str | None = None, database: str = USER) -> str:
        """The store's SQLAlchemy URL; ``password`` replaces the real one (``""``: none in the URL, e.g. for an
        environment reference or ``PGPASSWORD``)."""
        pw = self.password if password is None else password
        auth = f"{USER}:{pw}" if pw else USER
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def query(self, sql: str, database: str = USER) -> list[tuple]:
        """Rows of one SQL statement, as the store role (read back what the store wrote, independently of it)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password,
                             dbname=database) as conn:
            return conn.execute(sql).fetchall()


def _fixture():
    import pytest

    @pytest.fixture(scope="session")
    def postgres():
        """A running :class:`PostgresServer` for the whole session, removed at its end."""
        try:
            server = PostgresServer()
        except RuntimeError as exc:
            pytest.fail(str(exc))
        try:
            yield server.start()
        finally:
            server.destroy()

    return postgres


postgres = _fixture()  # import it into a test module: ``from pg_server import postgres``
