"""The worker process: wires listener, executor, pool, recorder, duties and HTTP together.

Start-up order: database pool (fail fast with a clear error), schema check,
process pool, HTTP, registry row, then the loops. Shutdown (SIGTERM/SIGINT):
readiness turns 503, claiming stops, running jobs get
``SHUTDOWN_GRACE_SECONDS`` to finish, the rest are killed and handed back
to ``pending`` without spending an attempt, the registry row is removed;
exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import warnings
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from worker import __version__
from worker.allocator import AllocatorUnavailable, child_preload
from worker.boundary import ScriptUser, ScriptUserUnusable, make_undumpable, resolve_script_user
from worker.cancellation import Cancellations
from worker.config import Settings
from worker.datasources import Datasources
from worker.db import CONNECT_TIMEOUT_SECONDS, redact_database_url
from worker.executor import Executor
from worker.http import build_app, start_http
from worker.lifecycle import JobLifecycle
from worker.listener import JobListener, Wakeups
from worker.maintenance import run_periodically
from worker.maintenance.heartbeat import Heartbeat
from worker.maintenance.pruner import Pruner
from worker.maintenance.rescuer import Rescuer
from worker.maintenance.scheduler import Scheduler
from worker.metrics import Metrics
from worker.migrate import shipped_migration_ids
from worker.pool import MAX_PREFETCH, ProcessPool
from worker.queries import QUERIES
from worker.recorder import Recorder
from worker.result_storage import ResultStore
from worker.runtimes.python import ScriptWhitelist

log = logging.getLogger("worker")

_DB_OPEN_TIMEOUT_SECONDS = 15.0


class WorkerStartupError(RuntimeError):
    """The worker could not start; the message says why in one line."""


class Worker:
    """One ``analysis-executor run`` process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.lifecycle = JobLifecycle(self.metrics)
        self.wakeups = Wakeups(self.metrics)
        self.whitelist = ScriptWhitelist(settings.scripts_dir)
        self.script_user: ScriptUser | None = None  # resolved at start-up
        self.listener = JobListener(settings.database_url, self.wakeups, self.metrics)
        self.datasources = Datasources(
            settings.datasources,
            self.metrics,
            pool_size=settings.datasource_pool_size,
            statement_timeout_ms=settings.dependency_timeout_ms,
            max_rows=settings.dependency_max_rows,
            max_bytes=settings.dependency_max_bytes,
        )
        self.draining = False
        self._started_at = time.monotonic()
        self._serving = False
        self._stats_ok = True
        self._executor: Executor | None = None
        self._recorder: Recorder | None = None
        self._pool: ProcessPool | None = None

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Run until ``stop`` is set or SIGTERM/SIGINT arrives; return the exit code.

        Raises WorkerStartupError when the database, the schema, the pool or
        the HTTP port is not usable.
        """
        settings = self.settings
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info(
            "Analysis Executor starting... version %s, worker %s, concurrency %d (%d processes), database %s",
            __version__,
            settings.worker_id,
            settings.concurrency,
            settings.processes,
            redact_database_url(settings.database_url),
        )
        self.metrics.build_info.info({"version": __version__, "worker_id": settings.worker_id})
        if len(settings.datasources) > 1:
            log.info(
                "Datasources: %s",
                ", ".join(f"{name}={url}" for name, url in self.datasources.describe().items()),
            )
        self.metrics.pool_size.set(settings.concurrency)
        self.metrics.pool_processes.set(settings.processes)

        await self._check_database_reachable()
        db_pool = AsyncConnectionPool(
            settings.database_url,
            min_size=2,
            max_size=6,
            open=False,
            check=AsyncConnectionPool.check_connection,
            kwargs={"autocommit": True, "application_name": "analysis-executor worker"},
            name="analysis-executor",
        )
        try:
            await db_pool.open(wait=True, timeout=_DB_OPEN_TIMEOUT_SECONDS)
        except PoolTimeout:
            await db_pool.close()
            raise WorkerStartupError(
                f"cannot connect to the database at {redact_database_url(settings.database_url)}"
            ) from None
        tasks: list[asyncio.Task[Any]] = []
        runner = None
        heartbeat = None
        cancellations = None
        try:
            await self._check_schema(db_pool)
            try:
                preload = child_preload(settings.pool_allocator)
            except AllocatorUnavailable as exc:
                raise WorkerStartupError(str(exc)) from None
            try:
                self.script_user = await asyncio.to_thread(
                    resolve_script_user,
                    settings.script_user,
                    settings.python_executable,
                    settings.scripts_dir.expanduser().absolute(),
                )
            except ScriptUserUnusable as exc:
                raise WorkerStartupError(str(exc)) from None
            log.info("Python scripts run as %s", self.script_user.name)
            self._pool = ProcessPool(
                settings.processes,
                # One process per concurrent job (the default) needs no queue in the
                # children; fewer processes than jobs do, to stay busy.
                prefetch=1 if settings.processes >= settings.concurrency else MAX_PREFETCH,
                on_respawn=lambda reason: self.metrics.pool_restarts.labels(reason).inc(),
                preload=preload,
                script_user=self.script_user,
            )
            await self._pool.start()
            self.metrics.watch_pool(self._pool.slot_pids)
            if settings.pool_allocator == "mimalloc" and self._pool.allocator != "mimalloc":
                raise WorkerStartupError(
                    f"POOL_ALLOCATOR=mimalloc, but the pool children could not preload {preload} "
                    "(their stderr says why)"
                )
            results = ResultStore(settings)
            self._recorder = Recorder(settings.database_url, settings.worker_id, self.metrics, results)
            executor = self._executor = Executor(
                settings,
                db_pool,
                self._pool,
                self._recorder,
                results,
                self.whitelist,
                self.datasources,
                self.wakeups,
                self.lifecycle,
                self.metrics,
            )
            cancellations = Cancellations(db_pool, executor)
            self.listener.on_cancel = cancellations.hint
            app = build_app(
                self, self.metrics, settings=settings, db_pool=db_pool, before_scrape=self._refresh_in_flight
            )
            try:
                runner = await start_http(app, settings.host, settings.port)
            except OSError as exc:
                raise WorkerStartupError(
                    f"cannot serve HTTP on {settings.host}:{settings.port}: {exc.strerror}"
                ) from None
            log.info("HTTP server listening on http://%s:%d (/health, /metrics, /jobs)", settings.host, settings.port)
            heartbeat = Heartbeat(settings, db_pool, executor, self.lifecycle, lambda: self.draining)
            await heartbeat.register()
            rescuer = Rescuer(settings, db_pool, self.wakeups, self.metrics.jobs_rescued)
            pruner = Pruner(settings, db_pool, results)
            scheduler = Scheduler(settings, db_pool, self.metrics)

            tasks.append(asyncio.create_task(self._recorder.run(), name="recorder"))
            if settings.listen:
                tasks.append(asyncio.create_task(self.listener.run(), name="listener"))
            else:
                self.wakeups.wake("startup")
            tasks.append(asyncio.create_task(self.wakeups.run_poller(settings.poll_interval_ms / 1000), name="poller"))
            tasks.append(asyncio.create_task(self._refresh_queue_stats(db_pool), name="queue-stats"))
            for name, interval, duty in (
                ("heartbeat", heartbeat.interval_seconds, heartbeat.beat),
                ("rescuer", rescuer.interval_seconds, rescuer.rescue_orphaned_jobs),
                ("pruner", pruner.interval_seconds, pruner.prune_finished_jobs),
                ("scheduler", scheduler.interval_seconds, scheduler.enqueue_due_jobs),
            ):
                tasks.append(asyncio.create_task(run_periodically(name, interval, duty, self.metrics), name=name))
            executor_task = asyncio.create_task(executor.run(), name="executor")
            tasks.append(executor_task)
            self._serving = True
            self.metrics.up.set(1)
            log.info(
                "Job poller started (LISTEN %s, poll every %d ms)",
                "on" if settings.listen else "off",
                settings.poll_interval_ms,
            )

            stop_wait = asyncio.create_task(stop.wait())
            await asyncio.wait([stop_wait, executor_task], return_when=asyncio.FIRST_COMPLETED)
            if executor_task.done() and executor_task.exception() is not None:
                raise executor_task.exception()  # type: ignore[misc]
            stop_wait.cancel()
            await self._shutdown(executor)
            return 0
        finally:
            self._serving = False
            self.metrics.up.set(0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if heartbeat is not None:
                with contextlib.suppress(psycopg.Error, PoolTimeout):
                    await heartbeat.deregister()
            if cancellations is not None:
                await cancellations.close()
            if self._pool is not None:
                await self._pool.close()
            if self._executor is not None:
                await self._executor.close()
            if self._recorder is not None:
                await self._recorder.close()
            await self.datasources.close()
            if runner is not None:
                await runner.cleanup()
            await db_pool.close()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            log.info("Analysis Executor stopped")

    async def _shutdown(self, executor: Executor) -> None:
        self.draining = True
        log.info("shutting down: no new claims; running jobs get %.0fs to finish", self.settings.shutdown_grace_seconds)
        executor.stop_claiming()
        await executor.drain(self.settings.shutdown_grace_seconds)

    async def _check_database_reachable(self) -> None:
        """Fail fast, with the server's reason, instead of waiting for the pool to time out."""
        url = self.settings.database_url
        try:
            conn = await psycopg.AsyncConnection.connect(url, connect_timeout=CONNECT_TIMEOUT_SECONDS)
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WorkerStartupError(
                f"cannot connect to the database at {redact_database_url(url)}: {reason}"
            ) from None
        await conn.close()

    async def _check_schema(self, db_pool: AsyncConnectionPool) -> None:
        """Refuse to start unless every migration this version ships has been applied."""
        async with db_pool.connection() as conn:
            row = await (await conn.execute("SELECT to_regclass('_yoyo_migration') IS NOT NULL")).fetchone()
            applied: set[str] = set()
            if row and row[0]:
                cur = await conn.execute("SELECT migration_id FROM _yoyo_migration")
                applied = {migration_id for (migration_id,) in await cur.fetchall()}
        missing = [m for m in shipped_migration_ids() if m not in applied]
        if missing:
            raise WorkerStartupError(
                "the database schema is missing or out of date: run `analysis-executor migrate` first"
                f" (not applied: {', '.join(missing)})"
            )

    async def _refresh_queue_stats(self, db_pool: AsyncConnectionPool) -> None:
        while True:
            try:
                async with db_pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                    await cur.execute(QUERIES["queue_stats"])
                    stats = await cur.fetchone()
                assert stats is not None
                self.metrics.queue_depth.labels("pending").set(stats["pending_due"])
                self.metrics.queue_depth.labels("scheduled").set(stats["pending_scheduled"])
                self.metrics.queue_depth.labels("running").set(stats["running"])
                self.metrics.oldest_pending_age.set(float(stats["oldest_pending_age_seconds"] or 0))
                self.metrics.queue_stats_refreshed.set_to_current_time()
                self._stats_ok = True
            except (psycopg.Error, PoolTimeout) as exc:
                self._stats_ok = False
                self.metrics.database_errors.labels("queue_stats").inc()
                log.warning("could not refresh queue statistics: %s", str(exc).strip().splitlines()[0])
            self.metrics.up.set(1 if self.database_ok else 0)
            await asyncio.sleep(self.settings.metrics_refresh_seconds)

    def _refresh_in_flight(self) -> None:
        if self._executor is not None:
            self.metrics.jobs_in_flight.set(self._executor.in_flight)

    @property
    def database_ok(self) -> bool:
        """False once any recent database operation failed."""
        parts = [self._stats_ok]
        if self._executor is not None:
            parts.append(self._executor.database_ok)
        if self._recorder is not None:
            parts.append(self._recorder.database_ok)
        return all(parts)

    def health(self) -> dict[str, Any]:
        """The /health document."""
        if not self.settings.listen:
            listener = "disabled"
        else:
            listener = "connected" if self.listener.connected else "disconnected"
        healthy = self._serving and self.database_ok and listener != "disconnected"
        return {
            "status": "healthy" if healthy else "unhealthy",
            "version": __version__,
            "jobs_processed": self.lifecycle.jobs_processed,
            "jobs_in_flight": self._executor.in_flight if self._executor else 0,
            "pool_size": self.settings.concurrency,
            "listener": listener,
            "database": "ok" if self.database_ok else "unreachable",
            "draining": self.draining,
            "uptime_seconds": round(time.monotonic() - self._started_at, 3),
            "worker_id": self.settings.worker_id,
            "script_user": self.script_user.name if self.script_user else None,
        }

    def ready(self) -> tuple[bool, str]:
        """Readiness: serving, database reachable, listener up, not draining."""
        if self.draining:
            return False, "draining"
        if not self._serving:
            return False, "starting"
        if not self.database_ok:
            return False, "database unreachable"
        if self.settings.listen and not self.listener.connected:
            return False, "listener disconnected"
        return True, "ok"


def _use_pidfd_child_watcher() -> None:
    """Python 3.11's default child watcher can lose a child's exit status when another
    child is spawned at the same moment (it then reports 255 instead of the signal);
    the pidfd watcher, the default from 3.12 on, does not."""
    if sys.version_info < (3, 12) and hasattr(os, "pidfd_open"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def run_worker(settings: Settings) -> int:
    """Run a worker in a fresh event loop; return the exit code."""
    _use_pidfd_child_watcher()
    make_undumpable()  # its environ holds DATABASE_URL: closed to scripts of the same uid
    worker = Worker(settings)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(worker.run())
    return 0
