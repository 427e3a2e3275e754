"""Wake-ups: everything that tells the executor "there may be jobs to claim".

The same LISTEN connection also hears cancellations of running jobs.

- ``JobListener`` keeps one dedicated connection LISTENing on the jobs
  channel; every notification is a wake-up. After each (re)connect it LISTENs
  first and then wakes the executor, so jobs inserted while it was away are
  claimed at once instead of waiting for the slow poll.
- ``Wakeups.run_poller`` wakes the executor every ``POLL_INTERVAL_MS`` as a
  safety net for anything a notification missed.
- ``Wakeups.wake_at`` is the timer for the earliest future ``run_at``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import psycopg

from worker.errors import one_line
from worker.metrics import Metrics
from worker.queries import JOBS_CANCEL_CHANNEL, JOBS_PENDING_CHANNEL

log = logging.getLogger(__name__)

_KEEPALIVE_SECONDS = 10.0
_MAX_BACKOFF_SECONDS = 5.0
# A job due in years is looked at again tomorrow (the poll would anyway).
_LONGEST_TIMER_SECONDS = 86_400.0


class Wakeups:
    """A level-triggered "claim now" signal with counted sources.

    ``announce_idle`` tells the executor that, should its next claim leave it
    with free slots, it must (re)announce itself as waiting: after a
    notification (the submitter that sent it cleared the flag), a (re)connect
    (a notification may have been missed) or a poll (belt and braces).
    """

    def __init__(self, metrics: Metrics) -> None:
        self._event = asyncio.Event()
        self._metrics = metrics
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None
        self.announce_idle = True

    @property
    def pending(self) -> bool:
        """A wake-up arrived that the executor has not acted on yet."""
        return self._event.is_set()

    def wake(self, source: str) -> None:
        """Ask the executor to claim (source: notify, poll, timer, startup, slot)."""
        self._metrics.wakeups.labels(source).inc()
        if source in ("notify", "startup", "poll"):
            self.announce_idle = True
        self._event.set()

    async def wait(self) -> None:
        """Wait for the next wake-up, then reset the signal."""
        await self._event.wait()
        self._event.clear()

    def wake_at(self, delay_seconds: float) -> None:
        """Wake once ``delay_seconds`` from now (at most a day), unless an earlier timer is set."""
        loop = asyncio.get_running_loop()
        due = loop.time() + min(max(0.0, delay_seconds), _LONGEST_TIMER_SECONDS)
        if self._timer is not None and self._timer_due is not None and self._timer_due <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = loop.call_at(due, self._fire_timer)

    def _fire_timer(self) -> None:
        self._timer = self._timer_due = None
        self.wake("timer")

    async def run_poller(self, interval_seconds: float) -> None:
        """Wake the executor every interval, forever."""
        while True:
            await asyncio.sleep(interval_seconds)
            self.wake("poll")


class JobListener:
    """The LISTEN connection; reconnects with backoff, forever."""

    def __init__(self, database_url: str, wakeups: Wakeups, metrics: Metrics) -> None:
        self._url = database_url
        self._wakeups = wakeups
        self._metrics = metrics
        self.on_cancel: Callable[[str], object] | None = None
        self.connected = False
        self.connected_since: float | None = None

    async def run(self) -> None:
        """Listen until cancelled."""
        backoff = 0.1
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError) as exc:
                self._set_connected(False)
                self._metrics.database_errors.labels("listen").inc()
                delay = backoff * (1 + random.random())
                log.warning("job listener lost its connection (%s); reconnecting in %.1fs", one_line(exc), delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
            else:
                backoff = 0.1

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, application_name="analysis-executor listener", connect_timeout=10
        )
        async with conn:
            await conn.execute(f"LISTEN {JOBS_PENDING_CHANNEL}")
            await conn.execute(f"LISTEN {JOBS_CANCEL_CHANNEL}")
            self._set_connected(True)
            self._wakeups.wake("startup")
            while True:
                async for notification in conn.notifies(timeout=_KEEPALIVE_SECONDS):
                    if notification.channel == JOBS_PENDING_CHANNEL:
                        self._wakeups.wake("notify")
                    elif self.on_cancel is not None:
                        self.on_cancel(notification.payload)
                # Quiet for a while: prove the connection is still alive.
                await asyncio.wait_for(conn.execute("SELECT 1"), _KEEPALIVE_SECONDS)

    def _set_connected(self, connected: bool) -> None:
        if connected and not self.connected:
            log.info("job listener connected; listening on channel %s", JOBS_PENDING_CHANNEL)
        self.connected = connected
        self.connected_since = time.monotonic() if connected else None
        self._metrics.listener_connected.set(1 if connected else 0)
