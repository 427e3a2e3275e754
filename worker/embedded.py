"""An embedded PostgreSQL server for ``analysis-executor dev`` and the tests.

The binaries come from the ``pgserver`` wheel, so a fresh machine needs no
PostgreSQL package. PostgreSQL refuses to run as root; when we are root the
server runs as the unprivileged system user ``pgserver`` (created on first
use, as pgserver itself does) and owns only its data folder.

The server listens on 127.0.0.1 only, with trust authentication: it is a
development and test database, never a production one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(".analysis-executor") / "pgdata"
SUPERUSER = "postgres"
_SYSTEM_USER = "pgserver"
_PORT_FILE = "analysis-executor.port"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


class EmbeddedPostgres:
    """A local PostgreSQL server living in ``data_dir``.

    ``start()`` initialises the folder on first use, starts the server (or
    attaches to one already running there) and returns its URL; ``stop()``
    stops it if this object started it. Usable as a context manager.
    """

    def __init__(
        self,
        data_dir: Path | str = DEFAULT_DATA_DIR,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.port = port
        self.settings = dict(settings or {})
        self._started_here = False

    @property
    def url(self) -> str:
        """The superuser URL of the maintenance database ``postgres``."""
        return self.url_for(SUPERUSER)

    def url_for(self, dbname: str) -> str:
        """The superuser URL of ``dbname`` on this server."""
        if self.port is None:
            raise EmbeddedPostgresError("the embedded server has not been started")
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> str:
        """Start (or attach to) the server and return its URL.

        Raises EmbeddedPostgresError with the server log's tail when it fails.
        """
        binaries = _binaries_dir()
        run_as = _prepare_for_root(self.data_dir, binaries) if os.geteuid() == 0 else None
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(binaries, run_as)
        running_port = self._running_port()
        if running_port is not None:
            self.port = running_port
            log.info("embedded PostgreSQL already running on port %s", running_port)
            return self.url
        self.port = self.port or self._saved_port() or _free_port()
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "",
            **self.settings,
        }
        option_string = " ".join(f"-c {key}={_quote_option(value)}" for key, value in options.items())
        log_file = self.data_dir / "server.log"
        self._pg_ctl(binaries, run_as, ["-w", "-t", "60", "-l", str(log_file), "-o", option_string, "start"])
        (self.data_dir / _PORT_FILE).write_text(f"{self.port}\n")
        self._started_here = True
        _wait_until_accepting(self.url)
        return self.url

    def stop(self) -> None:
        """Stop the server if this object started it (fast shutdown, waits)."""
        if not self._started_here:
            return
        binaries = _binaries_dir()
        run_as = _SYSTEM_USER if os.geteuid() == 0 else None
        self._pg_ctl(binaries, run_as, ["-w", "-t", "60", "-m", "fast", "stop"])
        self._started_here = False

    def create_database(self, dbname: str) -> str:
        """Create ``dbname`` unless it exists; return its URL."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        return self.url_for(dbname)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _initdb(self, binaries: Path, run_as: str | None) -> None:
        log.info("initialising embedded PostgreSQL in %s", self.data_dir)
        _run(
            [
                str(binaries / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            run_as,
            what="initdb",
        )

    def _pg_ctl(self, binaries: Path, run_as: str | None, args: list[str]) -> None:
        try:
            _run([str(binaries / "pg_ctl"), "-D", str(self.data_dir), *args], run_as, what="pg_ctl " + args[-1])
        except EmbeddedPostgresError as exc:
            raise EmbeddedPostgresError(f"{exc}\n--- server log ---\n{self._log_tail()}") from None

    def _running_port(self) -> int | None:
        """Port of a live server already using this folder, from postmaster.pid."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except FileNotFoundError:
            return None
        if len(lines) < 4 or not lines[0].strip().isdigit():
            return None
        try:
            os.kill(int(lines[0]), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by another user
        return int(lines[3])

    def _saved_port(self) -> int | None:
        try:
            port = int((self.data_dir / _PORT_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return port if _port_is_free(port) else None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.data_dir / "server.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no server log)"


def _binaries_dir() -> Path:
    # Located without importing pgserver: its import has side effects
    # (a lock file in the user's runtime folder) that we do not need.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded PostgreSQL needs the 'pgserver' package: pip install 'analysis-executor[embedded]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _prepare_for_root(data_dir: Path, binaries: Path) -> str:
    """Let the unprivileged ``pgserver`` user run the binaries and own ``data_dir``."""
    try:
        entry = pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--shell", "/usr/sbin/nologin", _SYSTEM_USER], check=True, capture_output=True
        )
        entry = pwd.getpwnam(_SYSTEM_USER)
    data_dir.mkdir(parents=True, exist_ok=True)
    install_root = binaries.parent
    for path in (data_dir.parent, install_root):
        _open_for_traversal(path)
    for path in install_root.rglob("*"):
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | (0o055 if path.is_dir() or os.access(path, os.X_OK) else 0o044))
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    data_dir.chmod(0o700)
    return _SYSTEM_USER


def _open_for_traversal(path: Path) -> None:
    """Make ``path`` and every folder above it traversable by other users."""
    for folder in (path, *path.parents):
        mode = folder.stat().st_mode
        if mode & 0o011 != 0o011:
            folder.chmod(mode | 0o011)


def _run(command: list[str], run_as: str | None, *, what: str) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    kwargs: dict[str, object] = {}
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        env["HOME"] = entry.pw_dir
    # Output goes to files, not pipes: pg_ctl's server inherits them and a
    # pipe would keep us waiting for an EOF that never comes.
    with _TempOutput() as output:
        completed = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd="/", **kwargs)
        if completed.returncode != 0:
            raise EmbeddedPostgresError(f"{what} failed (exit {completed.returncode}): {output.text().strip()}")


class _TempOutput:
    def __enter__(self) -> _TempOutput:
        import tempfile

        self._file = tempfile.TemporaryFile()
        return self

    def fileno(self) -> int:
        return self._file.fileno()

    def text(self) -> str:
        self._file.seek(0)
        return self._file.read().decode(errors="replace")

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _quote_option(value: str) -> str:
    if value == "":
        return "''"
    if any(ch.isspace() or ch in "'\"\\" for ch in value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return value


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as PostgreSQL binds it
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_until_accepting(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
