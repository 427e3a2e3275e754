"""The worker's HTTP server: health, metrics and the job API.

- ``GET /health``, ``/health/live``, ``/health/ready``, ``GET /metrics``: open.
- ``POST /jobs``, ``GET /jobs/{id}``, ``GET /jobs/{id}/result``, ``POST /jobs/{id}/cancel``: need
  ``Authorization: Bearer $ANALYSIS_EXECUTOR_API_TOKEN`` when a token is
  configured, and are refused (403) on a non-loopback bind without one.

Every error is a JSON ``{"error": "..."}`` with a 4xx status; bodies are
capped at ``HTTP_MAX_BODY_BYTES``. Run inside the worker's own event loop
with ``AppRunner`` + ``TCPSite`` on an explicit host, never ``run_app``,
which would take over signal handling.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

import psycopg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from worker import jobs, result_storage
from worker.config import Settings
from worker.metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HealthSource(Protocol):
    """What the HTTP layer needs to know about the running worker."""

    def health(self) -> dict[str, Any]:
        """The /health document; ``status`` is healthy or unhealthy."""
        ...

    def ready(self) -> tuple[bool, str]:
        """Whether to receive traffic, and why not."""
        ...


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def json_response(document: object, status: int = 200) -> web.Response:
    """A JSON response that knows timestamps and UUIDs."""
    return web.json_response(document, status=status, dumps=lambda d: json.dumps(d, default=_json_default))


def _error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason if exc.status != 413 else "request body too large")
    except (psycopg.OperationalError, PoolTimeout):
        return _error(503, "the database is unavailable; try again")
    except jobs.JobDataTooDeep as exc:
        return _error(500, str(exc))


def build_app(
    state: HealthSource,
    metrics: Metrics,
    *,
    settings: Settings,
    db_pool: AsyncConnectionPool | None = None,
    before_scrape: Callable[[], None] | None = None,
) -> web.Application:
    """Create the aiohttp application."""

    async def health(_: web.Request) -> web.Response:
        document = state.health()
        return json_response(document, status=200 if document["status"] == "healthy" else 503)

    async def live(_: web.Request) -> web.Response:
        # Liveness only proves the event loop answers: a database outage must
        # not make Kubernetes restart every replica.
        return json_response({"status": "alive"})

    async def ready(_: web.Request) -> web.Response:
        is_ready, reason = state.ready()
        return json_response(
            {"status": "ready" if is_ready else "not ready", "reason": reason}, 200 if is_ready else 503
        )

    async def metrics_endpoint(_: web.Request) -> web.Response:
        if before_scrape is not None:
            before_scrape()
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[_json_errors], client_max_size=settings.http_max_body_bytes)
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/metrics", metrics_endpoint)
    if db_pool is not None:
        _add_job_api(app, settings, db_pool)
    return app


def _add_job_api(app: web.Application, settings: Settings, db_pool: AsyncConnectionPool) -> None:
    def refusal(request: web.Request) -> web.Response | None:
        if settings.api_token is None:
            if settings.binds_loopback_only:
                return None
            return _error(
                403,
                f"the job API is disabled: this worker listens on {settings.host} and "
                "ANALYSIS_EXECUTOR_API_TOKEN is not set",
            )
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_token.encode()):
            response = _error(401, "missing or wrong bearer token")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return None

    async def read_json(request: web.Request) -> object:
        raw = await request.read()
        try:
            return json.loads(raw or b"{}")
        except ValueError as exc:
            raise jobs.InvalidJobRequest(f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise jobs.InvalidJobRequest(f"the request body is {jobs.NESTED_TOO_DEEPLY}") from None

    async def create_job(request: web.Request) -> web.Response:
        if (refused := refusal(request)) is not None:
            return refused
        try:
            job_request = jobs.validate_job_request(await read_json(request))
            # One transaction: the response shows the job as created, before a worker can claim it.
            async with db_pool.connection() as conn, conn.transaction():
                job_id = await jobs.submit_job(conn, **job_request)
                job = await jobs.get_job(conn, job_id)
        except jobs.InvalidJobRequest as exc:
            return _error(400, str(exc))
        except jobs.JobNotFound as exc:
            return _error(404, str(exc))
        return json_response(job, status=201)

    async def show_job(request: web.Request) -> web.Response:
        if (refused := refusal(request)) is not None:
            return refused
        try:
            async with db_pool.connection() as conn:
                job = await jobs.get_job(conn, request.match_info["job_id"])
                job["attempts_history"] = await jobs.get_attempts(conn, job["id"])
        except jobs.JobNotFound as exc:
            return _error(404, str(exc))
        return json_response(job)

    async def cancel_job(request: web.Request) -> web.Response:
        if (refused := refusal(request)) is not None:
            return refused
        try:
            async with db_pool.connection() as conn:
                job = await jobs.cancel_job(conn, request.match_info["job_id"])
        except jobs.JobNotFound as exc:
            return _error(404, str(exc))
        except jobs.JobAlreadyFinished as exc:
            return _error(409, str(exc))
        return json_response(job)

    async def show_result(request: web.Request) -> web.StreamResponse:
        if (refused := refusal(request)) is not None:
            return refused
        job_id = request.match_info["job_id"]
        try:
            async with db_pool.connection() as conn:
                info = await result_storage.find_result(conn, job_id)
        except result_storage.ResultNotAvailable as exc:
            return _error(404, str(exc))
        body = result_storage.read_result(info, db_pool.connection, settings.result_storage_dir)
        try:
            try:
                first = await anext(body, b"")  # a missing file or row is still a clean 404
            except result_storage.ResultNotAvailable as exc:
                if isinstance(exc, result_storage.StoredResultGone):  # the storage lost it: tell the operator
                    log.warning("Job %s: %s", info.job_id, exc, extra={"job_id": info.job_id})
                return _error(404, str(exc))
            except result_storage.StoredResultCorrupt as exc:
                log.error("Job %s: %s", info.job_id, exc, extra={"job_id": info.job_id})
                return _error(500, str(exc))
            response = web.StreamResponse(headers=result_headers(info))
            response.content_length = info.size_bytes
            await response.prepare(request)
            try:
                await response.write(first)
                async for piece in body:
                    await response.write(piece)
            except (result_storage.StoredResultCorrupt, result_storage.ResultNotAvailable) as exc:
                # The status line is sent already: cut the connection short of
                # Content-Length, so the client sees an incomplete body.
                log.error("Job %s: %s", info.job_id, exc, extra={"job_id": info.job_id})
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            return response
        finally:
            await body.aclose()

    app.router.add_post("/jobs", create_job)
    app.router.add_get("/jobs/{job_id}", show_job)
    app.router.add_get("/jobs/{job_id}/result", show_result)
    app.router.add_post("/jobs/{job_id}/cancel", cancel_job)


def result_headers(info: result_storage.ResultInfo) -> dict[str, str]:
    """Content type and checksum headers of a result response (``Repr-Digest`` as in RFC 9530)."""
    digest = base64.b64encode(bytes.fromhex(info.checksum.removeprefix("sha256:"))).decode()
    return {
        "Content-Type": info.content_type,
        "Repr-Digest": f"sha-256=:{digest}:",
        "ETag": f'"{info.checksum}"',
        "X-Result-Storage": info.backend or "inline",
    }


async def start_http(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve the app on host:port; returns the runner to clean up at shutdown."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host=host, port=port, reuse_address=True)
    await site.start()
    return runner
