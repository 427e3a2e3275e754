"""Datasource dependencies: the read-only queries an analysis declares.

An analysis may declare named queries (rows of ``analysis_dependencies``)
against named datasources. Before its script runs, the worker runs each one
and hands the rows to the script: ``ctx.datasets.<name>`` in JavaScript, a
``datasets`` object in the stdin JSON of a Python script.

Each query runs in its own READ ONLY transaction that is always rolled back,
on a connection whose session state is discarded before it is reused (so
even a ``SET`` or an advisory lock in it leaves nothing behind),
under a statement timeout, and its rows are streamed with caps on their
count (per query) and size (per job), so a query that returns millions of
rows, or a few huge ones, fails fast instead of filling the worker's memory. Job
parameters are bound as query parameters (``%(name)s``), never formatted
into the SQL.

Datasources are configured on the worker (``DATASOURCE_<NAME>_URL`` or a
``DATASOURCES_FILE``), never stored in a table; ``main`` is the executor's
own database unless configured otherwise. One small connection pool per
datasource, opened on first use and reused by every job after it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import decimal
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq.abc import PGresult
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from worker.db import redact_database_url
from worker.errors import one_line
from worker.jobs import NESTED_TOO_DEEPLY
from worker.metrics import Metrics
from worker.runtimes.protocol import format_size

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
# How long a job waits for a connection to a datasource (never longer than its own time limit).
_CONNECTION_WAIT_SECONDS = 10.0
# Rows fetched per round trip while streaming (libpq >= 17), 1 otherwise.
_CHUNK_ROWS = 500 if psycopg.capabilities.has_stream_chunked() else 1


@dataclass(frozen=True, slots=True)
class Dependency:
    """One declared query: rows of ``query`` on ``datasource`` become dataset ``name``."""

    name: str
    datasource: str
    query: str


class DependencyError(Exception):
    """A dependency could not be fetched; the message names it and says why.

    ``retryable`` is True when the datasource itself was unreachable (not the
    query's fault), so the job is worth another attempt.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def parse_dependencies(dependencies_json: str | None) -> list[Dependency]:
    """The claim statement's JSON array of dependencies, as Dependency objects."""
    if not dependencies_json:
        return []
    return [Dependency(d["name"], d["datasource"], d["query"]) for d in json.loads(dependencies_json)]


class Datasources:
    """The datasources this worker can query, with one lazily opened pool each."""

    def __init__(
        self,
        urls: Mapping[str, str],
        metrics: Metrics,
        *,
        pool_size: int,
        statement_timeout_ms: int,
        max_rows: int,
        max_bytes: int,
    ) -> None:
        self._urls = {name.lower(): url for name, url in urls.items()}
        self._metrics = metrics
        self._pool_size = pool_size
        self._statement_timeout_ms = statement_timeout_ms
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._pools: dict[str, AsyncConnectionPool] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        for name in self._urls:
            metrics.dependency_duration.labels(name)
            metrics.dependency_errors.labels(name)

    @property
    def names(self) -> list[str]:
        """Configured datasource names."""
        return sorted(self._urls)

    async def fetch(
        self, dependencies: list[Dependency], parameters: Mapping[str, Any], timeout_ms: int
    ) -> dict[str, list[dict[str, Any]]]:
        """Run every dependency (one after another); return rows by dependency name.

        ``timeout_ms`` (the job's time limit) caps each query's statement
        timeout and the wait for a connection: a job never waits on its data
        longer than it may run. Their rows together may take up to
        ``max_bytes`` (as sent by the server). Raises DependencyError naming
        the first dependency that failed.
        """
        datasets: dict[str, list[dict[str, Any]]] = {}
        budget = _Budget(self._max_bytes)
        for dependency in dependencies:
            datasets[dependency.name] = await self._fetch_one(dependency, parameters, timeout_ms, budget)
        return datasets

    async def _fetch_one(
        self, dependency: Dependency, parameters: Mapping[str, Any], job_timeout_ms: int, budget: _Budget
    ) -> list[dict[str, Any]]:
        label = f"dependency {dependency.name!r} (datasource {dependency.datasource!r})"
        bound = _bind(dependency, parameters)
        pool = await self._pool(dependency)
        wait_seconds = min(_CONNECTION_WAIT_SECONDS, job_timeout_ms / 1000)
        timeout_ms = min(job_timeout_ms, self._statement_timeout_ms)
        started = time.monotonic()
        try:
            rows = await self._run(pool, dependency.query, bound, timeout_ms, wait_seconds, label, budget)
        except DependencyError:
            self._metrics.dependency_errors.labels(dependency.datasource.lower()).inc()
            raise
        self._metrics.dependency_duration.labels(dependency.datasource.lower()).observe(time.monotonic() - started)
        return rows

    async def _run(
        self,
        pool: AsyncConnectionPool,
        query: str,
        bound: dict[str, Any],
        timeout_ms: int,
        wait_seconds: float,
        label: str,
        budget: _Budget,
    ) -> list[dict[str, Any]]:
        try:
            async with pool.connection(timeout=wait_seconds) as conn:
                try:
                    return await _read_only_rows(conn, query, bound, timeout_ms, self._max_rows, budget)
                except (_TooManyRows, _TooMuchData) as exc:
                    # Stop the server producing rows nobody will read, and do not
                    # give the pool back a connection that is still draining them.
                    await conn.cancel_safe()
                    await conn.close()
                    if isinstance(exc, _TooMuchData):
                        message = (
                            f"{label} brought the job's datasets over {format_size(self._max_bytes)} "
                            "(DEPENDENCY_MAX_BYTES)"
                        )
                    else:
                        message = f"{label} returned more than {self._max_rows} rows (DEPENDENCY_MAX_ROWS)"
                    raise DependencyError(f"{message}; narrow the query or aggregate in SQL") from None
        except PoolTimeout:
            raise DependencyError(
                f"{label}: no connection to the datasource within {wait_seconds:g} s", retryable=True
            ) from None
        except RecursionError:  # a json/jsonb value PostgreSQL accepts but Python's json module cannot load
            raise DependencyError(f"{label} returned a JSON value {NESTED_TOO_DEEPLY}") from None
        except psycopg.errors.QueryCanceled:
            raise DependencyError(f"{label} exceeded its {timeout_ms} ms statement timeout") from None
        except psycopg.OperationalError as exc:
            if exc.sqlstate is None or exc.sqlstate.startswith(("08", "57P")):
                raise DependencyError(f"{label}: datasource unreachable: {one_line(exc)}", retryable=True) from None
            raise DependencyError(f"{label} failed: {one_line(exc)}") from None
        except psycopg.Error as exc:
            raise DependencyError(f"{label} failed: {one_line(exc)}") from None

    async def _pool(self, dependency: Dependency) -> AsyncConnectionPool:
        name = dependency.datasource.lower()
        pool = self._pools.get(name)
        if pool is not None:
            return pool
        url = self._urls.get(name)
        if url is None:
            raise DependencyError(
                f"dependency {dependency.name!r} uses datasource {dependency.datasource!r}, which this worker "
                f"does not have (configure DATASOURCE_{name.upper()}_URL or DATASOURCES_FILE; "
                f"configured: {', '.join(self.names)})"
            )
        async with self._opening.setdefault(name, asyncio.Lock()):
            if name not in self._pools:
                pool = AsyncConnectionPool(
                    url,
                    min_size=0,
                    max_size=self._pool_size,
                    name=f"datasource-{name}",
                    kwargs={"application_name": f"analysis-executor datasource {name}", "autocommit": True},
                    reset=_discard_session_state,
                    open=False,
                )
                await pool.open(wait=False)
                self._pools[name] = pool
        return self._pools[name]

    async def close(self) -> None:
        """Close every datasource pool."""
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()

    def describe(self) -> dict[str, str]:
        """Datasource name -> URL without its password, for logs and ``status``."""
        return {name: redact_database_url(url) for name, url in sorted(self._urls.items())}


class _TooManyRows(Exception):
    pass


class _TooMuchData(Exception):
    pass


class _Budget:
    """Bytes the rows of one job's dependencies may still take."""

    __slots__ = ("left",)

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes

    def spend_on(self, result: PGresult) -> None:
        """Count a batch of rows as the server sent them; _TooMuchData once over."""
        fields = range(result.nfields)
        for row in range(result.ntuples):
            self.left -= sum(len(result.get_value(row, field) or b"") for field in fields)
        if self.left < 0:
            raise _TooMuchData


async def _discard_session_state(conn: psycopg.AsyncConnection) -> None:
    """Before a connection goes back to the pool: drop what outlives a rolled-back transaction.

    Advisory locks, prepared statements and the like survive the rollback;
    a query must not leave them to the next job (nor hold a lock the
    executor's own submitters need).
    """
    await conn.execute("DISCARD ALL")


async def _read_only_rows(
    conn: psycopg.AsyncConnection,
    query: str,
    bound: dict[str, Any],
    timeout_ms: int,
    max_rows: int,
    budget: _Budget,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with conn.transaction(force_rollback=True):
        await conn.execute("SET TRANSACTION READ ONLY")
        await conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(timeout_ms),))
        cur = conn.cursor()
        columns: list[str] | None = None
        counted: PGresult | None = None
        async for row in cur.stream(query, bound, size=_CHUNK_ROWS):
            if columns is None:
                columns = [column.name for column in cur.description or ()]
            if len(rows) >= max_rows:
                raise _TooManyRows
            if cur.pgresult is not counted:  # a new batch of rows arrived
                counted = cur.pgresult
                if counted is not None:
                    budget.spend_on(counted)
            rows.append(dict(zip(columns, row, strict=True)))
    return rows


def _bind(dependency: Dependency, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The job parameters the query names, adapted for psycopg; DependencyError if one is missing.

    psycopg reads every ``%`` of the query, string literals included: only
    ``%(name)s`` and ``%%`` (a literal ``%``) may appear, so that no other use
    of ``%`` is silently taken for a placeholder.
    """
    bound: dict[str, Any] = {}
    for name in placeholders(dependency):
        if name not in parameters:
            raise DependencyError(
                f"dependency {dependency.name!r}: the query uses %({name})s but the job has no parameter {name!r}"
            )
        value = parameters[name]
        bound[name] = Jsonb(value) if isinstance(value, dict) else value
    return bound


def placeholders(dependency: Dependency) -> list[str]:
    """The parameter names a dependency's query uses; DependencyError for any other ``%``."""
    names: list[str] = []
    query = dependency.query
    position = query.find("%")
    while position >= 0:
        if query.startswith("%%", position):
            position = query.find("%", position + 2)
            continue
        match = _PLACEHOLDER.match(query, position)
        if match is None:
            found = query[position : position + 12].split("\n")[0]
            raise DependencyError(
                f"dependency {dependency.name!r}: {found!r} at character {position + 1} of the query is not a "
                "parameter: write %(name)s for a job parameter and %% for a literal %"
            )
        names.append(match.group(1))
        position = query.find("%", match.end())
    return names


def unrepresentable_value(datasets: Mapping[str, list[dict[str, Any]]]) -> str:
    """Say which dependency, column and row hold a number JSON cannot represent (NaN, Infinity)."""
    for name, rows in datasets.items():
        for number, row in enumerate(rows, start=1):
            for column, value in row.items():
                if isinstance(value, float) and not math.isfinite(value):
                    return (
                        f"dependency {name!r} returned {value} in column {column!r} (row {number}), which JSON "
                        "cannot represent: turn it into NULL or text in the query (e.g. NULLIF(col, 'NaN'))"
                    )
    return "a dependency returned a value JSON cannot represent (NaN or Infinity)"


def rows_to_json_value(value: Any) -> Any:
    """``json.dumps`` default for database values JSON has no type for."""
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return str(value)
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)  # uuid, inet, range, ...
