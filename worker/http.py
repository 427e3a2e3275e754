"""The worker's HTTP server: /health, /health/live, /health/ready, /metrics.

Run inside the worker's own event loop with ``AppRunner`` + ``TCPSite`` on an
explicit host (default 127.0.0.1), never ``run_app``, which would take over
signal handling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.metrics import Metrics


class HealthSource(Protocol):
    """What the HTTP layer needs to know about the running worker."""

    def health(self) -> dict[str, Any]:
        """The /health document; ``status`` is healthy or unhealthy."""
        ...

    def ready(self) -> tuple[bool, str]:
        """Whether to receive traffic, and why not."""
        ...


def build_app(
    state: HealthSource, metrics: Metrics, *, before_scrape: Callable[[], None] | None = None
) -> web.Application:
    """Create the aiohttp application."""

    async def health(_: web.Request) -> web.Response:
        document = state.health()
        return web.json_response(document, status=200 if document["status"] == "healthy" else 503)

    async def live(_: web.Request) -> web.Response:
        # Liveness only proves the event loop answers: a database outage must
        # not make Kubernetes restart every replica.
        return web.json_response({"status": "alive"})

    async def ready(_: web.Request) -> web.Response:
        is_ready, reason = state.ready()
        return web.json_response(
            {"status": "ready" if is_ready else "not ready", "reason": reason}, status=200 if is_ready else 503
        )

    async def metrics_endpoint(_: web.Request) -> web.Response:
        if before_scrape is not None:
            before_scrape()
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


async def start_http(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve the app on host:port; returns the runner to clean up at shutdown."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host=host, port=port, reuse_address=True)
    await site.start()
    return runner
