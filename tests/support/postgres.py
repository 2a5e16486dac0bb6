"""A real, throwaway PostgreSQL server for the tests, from Debian's ``postgresql`` binaries.

``PostgresCluster.start()`` runs ``initdb`` into a fresh temporary directory and starts the
server on 127.0.0.1 at a free port, with its unix socket inside that directory, ``trust``
authentication on loopback and ``fsync`` left on (the store's durability is what the tests are
about). Running as root, every server command goes through ``runuser -u postgres --`` because
``initdb`` and ``postgres`` refuse to run as root.

Each test gets its own database (``create_database`` / ``drop_database``), so no test sees
another's rows; the cluster itself lives for the whole session.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.processes import free_port

# Where Debian puts each major version's server binaries.
DEBIAN_POSTGRES_GLOB = "/usr/lib/postgresql/*/bin"

# The database every cluster starts with; per-test databases are made beside it.
DEFAULT_DATABASE = "ks_test"

INSTALL_HINT = (
    "PostgreSQL server binaries were not found under /usr/lib/postgresql/*/bin. "
    "Install Debian's PostgreSQL: `apt-get install -y --no-install-recommends postgresql` "
    "(scripts/test does this on a fresh machine)."
)


class PostgresUnavailable(RuntimeError):
    """The server cannot be set up on this machine; the message says what to install or fix."""


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/N/bin`` that has ``initdb``, ``pg_ctl`` and ``postgres``."""
    candidates = []
    for bin_dir in Path("/").glob(DEBIAN_POSTGRES_GLOB.lstrip("/")):
        version = bin_dir.parent.name
        needed = ("initdb", "pg_ctl", "postgres")
        if version.isdigit() and all((bin_dir / name).is_file() for name in needed):
            candidates.append((int(version), bin_dir))
    if not candidates:
        raise PostgresUnavailable(INSTALL_HINT)
    return max(candidates)[1]


class PostgresCluster:
    """One ``initdb``-made cluster in a temporary directory, started and stopped by us."""

    def __init__(self) -> None:
        self.bin_dir = find_bin_dir()
        self.port: int | None = None
        self.root: Path | None = None
        self._as_postgres: list[str] = []
        self._database_numbers = itertools.count(1)

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    def url(self, database: str = DEFAULT_DATABASE) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/database``."""
        if self.port is None:
            raise RuntimeError("the cluster has not been started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> str:
        """Create and start the cluster and its ``ks_test`` database; returns that URL."""
        self._as_postgres = self._run_as_postgres_prefix()
        self.root = Path(tempfile.mkdtemp(prefix="ks-postgres-", dir=_traversable_temp_dir()))
        socket_dir = self.root / "socket"
        socket_dir.mkdir()
        if self._as_postgres:
            for path in (self.root, socket_dir):
                shutil.chown(path, "postgres", "postgres")

        self._server_command(
            "initdb",
            "--pgdata", str(self.data_dir),
            "--username", "postgres",
            "--auth", "trust",
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-instructions",
        )  # fmt: skip
        with open(self.data_dir / "postgresql.auto.conf", "a", encoding="utf-8") as conf:
            conf.write(
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{socket_dir}'\n"
                "fsync = on\n"
                "synchronous_commit = on\n"
                "max_connections = 300\n"
            )

        atexit.register(self.stop)
        for attempt in range(3):
            self.port = free_port()
            try:
                self._server_command(
                    "pg_ctl",
                    "start",
                    "--pgdata", str(self.data_dir),
                    "--log", str(self.log_file),
                    "--options", f"-p {self.port}",
                    "--wait",
                    "--timeout", "60",
                )  # fmt: skip
                break
            except PostgresUnavailable:
                # Another process may have taken the port between our probe and the bind.
                if attempt == 2 or "could not bind" not in self.server_log():
                    raise

        self.execute(f"CREATE DATABASE {DEFAULT_DATABASE}", database="postgres")
        return self.url()

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``) and delete its directory; safe to repeat."""
        if self.root is None:
            return
        root, self.root = self.root, None
        data_dir = root / "data"
        if (data_dir / "postmaster.pid").exists():
            pg_ctl = str(self.bin_dir / "pg_ctl")
            stop = ["stop", "--pgdata", str(data_dir), "--mode", "fast", "--wait"]
            subprocess.run(
                [*self._as_postgres, pg_ctl, *stop], capture_output=True, timeout=60, check=False
            )
        shutil.rmtree(root, ignore_errors=True)
        atexit.unregister(self.stop)

    def create_database(self, name: str) -> str:
        """A new, empty database (a copy of ``template1``); returns its URL."""
        self.execute(f'CREATE DATABASE "{name}"', database="postgres")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting whatever is still connected to it."""
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', database="postgres")

    def fresh_database_name(self, hint: str = "") -> str:
        """A database name not used before in this session, readable in the server log."""
        slug = re.sub(r"[^a-z0-9]+", "_", hint.lower()).strip("_")[:40]
        return f"ks_t{next(self._database_numbers)}_{slug}".rstrip("_")

    def execute(self, sql: str, database: str = DEFAULT_DATABASE) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE need that)."""
        import psycopg  # here, so SQLite-only runs need no PostgreSQL driver

        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def server_log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    def _server_command(self, program: str, *args: str) -> None:
        command = [*self._as_postgres, str(self.bin_dir / program), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{program} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}\n"
                f"server log:\n{self.server_log()[-4000:]}"
            )

    @staticmethod
    def _run_as_postgres_prefix() -> list[str]:
        """``runuser -u postgres --`` when we are root (initdb refuses root), else nothing."""
        if os.geteuid() != 0:
            return []
        if shutil.which("runuser") is None:
            raise PostgresUnavailable(
                "running as root needs `runuser` (util-linux) to drop to the postgres user"
            )
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable(
                "running as root needs the `postgres` OS user, which Debian's postgresql package "
                "creates: " + INSTALL_HINT
            ) from None
        return ["runuser", "-u", "postgres", "--"]


def _traversable_temp_dir() -> str:
    """A temporary directory the postgres user can reach (TMPDIR may be private to root)."""
    candidate = tempfile.gettempdir()
    path = Path(candidate)
    while path != path.parent:
        if not path.stat().st_mode & 0o001:
            return "/tmp"
        path = path.parent
    return candidate
