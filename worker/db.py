"""Database URLs and connections: the one place that knows about DSNs.

Users give a libpq URL (``postgres://``, ``postgresql://``) or a key=value
string; everything here validates it once and hands out what each consumer
needs (psycopg keeps the user's string, yoyo wants ``postgresql+psycopg://``,
logs get a copy without the password).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
from psycopg.abc import AdaptContext
from psycopg.adapt import AdaptersMap, Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Format

from worker.errors import one_line

CONNECT_TIMEOUT_SECONDS = 10


class InvalidDatabaseURL(ValueError):
    """The database URL is missing or cannot be parsed."""


class DatabaseUnavailable(RuntimeError):
    """The database could not be reached."""


def validate_database_url(url: str | None) -> str:
    """Return the URL in a form psycopg accepts, or raise InvalidDatabaseURL.

    ``postgresql+psycopg://`` (SQLAlchemy/yoyo style) is accepted and
    translated, since users copy URLs between tools.
    """
    if url is None or not url.strip():
        raise InvalidDatabaseURL("no database URL: set DATABASE_URL or pass --database-url")
    url = url.strip()
    for prefix in ("postgresql+psycopg://", "postgres+psycopg://"):
        if url.startswith(prefix):
            url = "postgresql://" + url[len(prefix) :]
    if "://" in url and not url.startswith(("postgresql://", "postgres://")):
        scheme = url.split("://", 1)[0]
        raise InvalidDatabaseURL(f"invalid database URL: unsupported scheme {scheme!r} (use postgresql://)")
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        # libpq quotes the offending token, which may be the password: never echo it.
        reason = re.sub(r'"[^"]*"', "(hidden)", one_line(exc))
        raise InvalidDatabaseURL(f"invalid database URL: {reason}") from None
    port = str(params.get("port", ""))
    if port and not all(part.isdigit() for part in port.split(",")):
        raise InvalidDatabaseURL(f"invalid database URL: port {port!r} is not a number")
    return url


def redact_database_url(url: str) -> str:
    """Return a description of the URL fit for logs: no password, ever."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable database URL>"
    user = params.get("user", "")
    host = params.get("host", "localhost")
    port = params.get("port", "5432")
    dbname = params.get("dbname", user)
    at = f"{user}@" if user else ""
    return f"postgresql://{at}{host}:{port}/{dbname}"


def yoyo_database_uri(url: str) -> str:
    """Translate a libpq URL or DSN into the URI yoyo needs for psycopg 3."""
    params = {k: str(v) for k, v in conninfo_to_dict(url).items()}
    user = params.pop("user", None)
    password = params.pop("password", None)
    host = params.pop("host", None)
    port = params.pop("port", None)
    dbname = params.pop("dbname", "")
    netloc = ""
    if user:
        netloc = quote(user, safe="")
        if password:
            netloc += ":" + quote(password, safe="")
        netloc += "@"
    if host and not host.startswith("/") and "," not in host:
        netloc += f"[{host}]" if ":" in host else host
    elif host:
        params["host"] = host  # a socket directory or a host list: pass it through as a parameter
    if port and "," not in port:
        netloc += f":{port}"
    elif port:
        params["port"] = port
    query = f"?{urlencode(params)}" if params else ""
    return f"postgresql+psycopg://{netloc}/{quote(dbname, safe='')}{query}"


def connect(url: str, *, autocommit: bool = True, application_name: str = "analysis-executor") -> psycopg.Connection:
    """Open a connection, or raise DatabaseUnavailable with a one-line reason."""
    try:
        return psycopg.connect(
            url,
            autocommit=autocommit,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            application_name=application_name,
        )
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database at {redact_database_url(url)}: {one_line(exc)}"
        ) from None


class DedicatedConnection:
    """One long-lived async connection for a hot path, reopened after a failure.

    Cheaper than a pool checkout per use (no health-check round trip); a
    caller that sees ``psycopg.OperationalError`` calls ``discard()`` and the
    next ``get()`` reconnects.
    """

    def __init__(self, url: str, application_name: str, session_settings: dict[str, str] | None = None) -> None:
        self._url = url
        self._application_name = application_name
        self._session_settings = session_settings or {}
        self._conn: psycopg.AsyncConnection | None = None

    async def get(self) -> psycopg.AsyncConnection:
        """The open connection, connecting first if needed (raises OperationalError)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            conn = await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                application_name=self._application_name,
            )
            try:
                for name, value in self._session_settings.items():
                    await conn.execute("SELECT set_config(%s, %s, false)", (name, value))
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    def abandon(self) -> None:
        """Close the connection at once, without a word to the server (which rolls back what is open)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.pgconn.finish()

    async def discard(self) -> None:
        """Drop the connection after an error; the next get() opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            await conn.close()

    async def close(self) -> None:
        """Close for good."""
        await self.discard()


def _tolerant_loader(type_name: str) -> type[Loader]:
    """A text loader for ``type_name`` that gives PostgreSQL's own text for values Python cannot hold."""
    oid = psycopg.adapters.types[type_name].oid
    standard = psycopg.adapters.get_loader(oid, Format.TEXT)
    assert standard is not None

    class TolerantLoader(Loader):
        format = Format.TEXT

        def __init__(self, oid: int, context: AdaptContext | None = None) -> None:
            super().__init__(oid, context)
            self._load = standard(oid, context).load

        def load(self, data: Any) -> Any:
            try:
                return self._load(data)
            except psycopg.DataError:  # infinity, or a year outside 1..9999
                return bytes(data).decode("utf-8", "replace")

    TolerantLoader.__name__ = TolerantLoader.__qualname__ = f"Tolerant{standard.__name__}"
    return TolerantLoader


def tolerate_unloadable_dates(adapters: AdaptersMap) -> None:
    """Load dates and timestamps that Python's datetime cannot hold as their text ('infinity', '12000-01-01 ...').

    PostgreSQL stores +-infinity and years up to 294276; ``datetime`` stops at
    9999 and psycopg raises for anything beyond, which would make a single
    odd row fail every query that reads it. Applied to psycopg's global
    adapters when this module is imported, so every connection of the
    worker, the CLI and the HTTP API reads such a row instead of failing.
    """
    for type_name in ("timestamptz", "timestamp", "date"):
        adapters.register_loader(type_name, _tolerant_loader(type_name))


tolerate_unloadable_dates(psycopg.adapters)
