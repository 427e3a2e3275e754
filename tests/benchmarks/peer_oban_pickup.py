#!/usr/bin/env python3
"""Pickup latency of oban-py: from a job's INSERT COMMIT to the first line of
the JavaScript script that the job runs.

The peer's side of our pickup workload (``tests.benchmarks.run --only pickup``),
to compare the two on the same machine and the same server. It is not part of
the suite: oban 0.5 and later need Python 3.12 or newer, so it runs in a venv
of its own:

    python3.12 -m venv /tmp/oban-venv
    /tmp/oban-venv/bin/pip install oban quickjs "psycopg[binary]" pgserver
    BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:PORT/postgres \
        /tmp/oban-venv/bin/python tests/benchmarks/peer_oban_pickup.py

What is measured
----------------
* Oban (PyPI ``oban``, the Python port of Elixir's Oban) runs embedded in this
  process with one queue, using its defaults.  Its default notifier is
  PostgreSQL LISTEN/NOTIFY: the stager listens on the ``<prefix>.oban_insert``
  channel and wakes the queue's producer when a notification for that queue
  arrives.  Without a notification, a job is found by the stager's poll, which
  runs every 1.0 s by default (``stager={"interval": 1.0}``).
* The worker creates a fresh ``quickjs.Context()`` per job and evaluates a
  script whose first line is ``Date.now()``; that value (ms since the epoch) is
  the script's result and is kept in memory, keyed by job id.
* A separate process with a plain, synchronous psycopg connection in
  autocommit mode does N single-row INSERTs, 20 ms apart, each its own
  transaction, and records ``committed = time.time()`` right after each INSERT
  returns.  Oban's own insert API (``Oban.enqueue``) is async-only, so the
  INSERT is plain SQL with the columns Oban's insert uses.  Oban has no insert
  trigger: its own insert statement calls ``pg_notify(<prefix>.oban_insert,
  '{"queue": ...}')`` in the same statement, and so does ours.  The inserter is
  a separate process so that it does not share the GIL with the event loop.

Per job:
    first_line_ms    = max(0, (js_date_now_ms + 0.5) - committed * 1000)
                       (Date.now() has 1 ms resolution; +0.5 ms centres it)
    perform_entry_ms = (time.time() at the worker's first line - committed) * 1000

Database: BENCH_DATABASE_URL if set (a fresh database ``oban_bench`` is created
in it for every run and dropped afterwards); otherwise an embedded PostgreSQL
from the ``pgserver`` package, started in a temporary directory (under
BENCH_TMPDIR, default ``oban-pickup`` in the system's temporary directory) and
removed at the end.
Only loopback / Unix-socket servers are accepted.

Usage:
    python peer_oban_pickup.py [--runs 3] [--jobs 200] [--concurrency 10] [--uvloop]
                          [--synchronous-commit off] [--no-notify]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import psycopg
import quickjs
from oban import Oban, worker
from oban.schema import install as install_oban_schema
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

# The same percentile as our own benchmark (a module with no dependencies).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.benchmarks.stats import percentile

# ---------------------------------------------------------------------------
# Parameters of the measurement (the same as our own benchmark).
# ---------------------------------------------------------------------------
QUEUE = "bench"
DB_NAME = "oban_bench"
INSERT_INTERVAL_S = 0.020  # 20 ms between INSERTs
IDLE_AFTER_START_S = 0.5  # Oban idles this long before the first INSERT
RUN_TIMEOUT_S = 60.0  # give up waiting for the jobs of a run after this
READY_TIMEOUT_S = 30.0  # bound on waiting for the inserter process to connect
PREFIX = "public"  # Oban's default schema prefix
# Oban's notifier listens on "<prefix>.oban_<channel>"; its insert statement
# notifies "<prefix>.oban_insert" with the payload {"queue": <queue>}.
INSERT_CHANNEL = f"{PREFIX}.oban_insert"

# The job's script.  Its first line reads the clock; that value is the result.
JS_SCRIPT = """\
const firstLine = Date.now();
firstLine;
"""

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

# ---------------------------------------------------------------------------
# The worker.  It runs inside this process, in Oban's event loop.
# ---------------------------------------------------------------------------
# job id -> (time.time() at process() entry, Date.now() of the script's first line)
RESULTS: dict[int, tuple[float, float]] = {}
_expected_jobs = 0
_all_done: asyncio.Event | None = None


@worker(queue=QUEUE)
class JsWorker:
    async def process(self, job):
        entered = time.time()  # first line of the Python perform function
        ctx = quickjs.Context()  # a fresh context per job, as the product does
        js_now_ms = ctx.eval(JS_SCRIPT)
        RESULTS[job.id] = (entered, float(js_now_ms))
        if _all_done is not None and len(RESULTS) >= _expected_jobs:
            _all_done.set()


# ---------------------------------------------------------------------------
# The inserter: a separate process with a plain psycopg connection.
# ---------------------------------------------------------------------------
# Same columns and values as Oban's own insert (oban/queries/insert_job.sql),
# including the pg_notify in the same statement, which PostgreSQL delivers to
# listeners when the transaction commits.  ({{ and }} are literal braces for
# sql.SQL.format.)
INSERT_SQL = sql.SQL(
    """
    WITH inserted AS (
        INSERT INTO {jobs} (args, inserted_at, max_attempts, meta, priority,
                            queue, scheduled_at, state, tags, worker)
        VALUES (%(args)s, timezone('UTC', now()), %(max_attempts)s, %(meta)s,
                %(priority)s, %(queue)s, timezone('UTC', now()),
                'available', %(tags)s, %(worker)s)
        RETURNING id, queue, state
    )
    SELECT id,
           CASE WHEN state = 'available' AND %(notify)s
                THEN pg_notify(%(channel)s, '{{"queue":"' || queue || '"}}')
           END
    FROM inserted
    """
).format(jobs=sql.Identifier(PREFIX, "oban_jobs"))


def inserter_main(dsn: str, template: dict, n_jobs: int, notify: bool, pipe) -> None:
    """Connect, say "ready", wait for "go", then do n_jobs paced INSERTs and
    send back [(job_id, committed_epoch_s), ...]."""
    from psycopg.types.json import Jsonb

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        pipe.send("ready")
        if not pipe.poll(READY_TIMEOUT_S + RUN_TIMEOUT_S):
            return
        pipe.recv()  # "go"

        committed_at: list[tuple[int, float]] = []
        start = time.monotonic()
        for i in range(n_jobs):
            # Absolute schedule, so slow INSERTs don't make the pacing drift.
            delay = start + i * INSERT_INTERVAL_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            params = {
                **template,
                "args": Jsonb({"n": i}),
                "meta": Jsonb(template["meta"]),
                "notify": notify,
                "channel": INSERT_CHANNEL,
            }
            cur = conn.execute(INSERT_SQL, params)  # autocommit: returns after COMMIT
            committed = time.time()
            committed_at.append((cur.fetchone()[0], committed))
        pipe.send(committed_at)


# ---------------------------------------------------------------------------
# Statistics and output.
# ---------------------------------------------------------------------------
def fmt(x: float) -> str:
    return f"{x:.2f}"


# ---------------------------------------------------------------------------
# Database server and per-run database.
# ---------------------------------------------------------------------------
def ensure_local(url: str) -> None:
    """Refuse any server that is not on loopback or a Unix socket."""
    info = conninfo_to_dict(url)
    hosts = [h for h in (info.get("host") or os.environ.get("PGHOST", "")).split(",") if h]
    addrs = [a for a in (info.get("hostaddr") or os.environ.get("PGHOSTADDR", "")).split(",") if a]
    for h in hosts:
        if not (h.startswith("/") or h.startswith("@") or h in LOOPBACK_HOSTS):
            sys.exit(f"refusing non-local database host {h!r}; use 127.0.0.1")
    for a in addrs:
        if a not in ("127.0.0.1", "::1"):
            sys.exit(f"refusing non-local database address {a!r}; use 127.0.0.1")


@contextlib.contextmanager
def database_server():
    """Yield (admin_url, description) for the server to benchmark against."""
    url = os.environ.get("BENCH_DATABASE_URL")
    if url:
        ensure_local(url)
        yield url, "BENCH_DATABASE_URL"
        return

    base = Path(os.environ.get("BENCH_TMPDIR") or Path(tempfile.gettempdir()) / "oban-pickup")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="oban_pickup_", dir=base))
    # pgserver keeps a lock file in the user runtime dir (and re-creates it at
    # exit); keep it under BENCH_TMPDIR rather than /tmp/runtime-<uid>.  Must be
    # set before pgserver is imported.
    run_dir = base / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = str(run_dir)
    import pgserver  # imported late on purpose, see above

    server = pgserver.get_server(tmp / "pgdata", cleanup_mode="stop")
    try:
        # pgserver listens on a Unix socket only (no TCP at all).
        yield server.get_uri(), f"pgserver (Unix socket in {tmp})"
    finally:
        server.cleanup()  # stops the server
        shutil.rmtree(tmp, ignore_errors=True)


def recreate_database(admin_url: str, synchronous_commit: str | None) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB_NAME)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB_NAME)))
        if synchronous_commit:
            # Oban's fetch of a job commits before the job starts, so a durable
            # (WAL-flushing) commit is on the pickup path.
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET synchronous_commit = {}").format(
                    sql.Identifier(DB_NAME), sql.Literal(synchronous_commit)
                )
            )
    return make_conninfo(admin_url, dbname=DB_NAME)


def drop_database(admin_url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB_NAME)))


# ---------------------------------------------------------------------------
# One run.
# ---------------------------------------------------------------------------
async def run_once(dsn: str, args) -> dict:
    global _expected_jobs, _all_done
    RESULTS.clear()
    _expected_jobs = args.jobs
    _all_done = asyncio.Event()

    # The same pool settings as Oban.create_pool's defaults (min 1, max 10),
    # built directly so that no oban.toml / OBAN_* environment is picked up.
    pool = AsyncConnectionPool(conninfo=dsn, min_size=1, max_size=10, open=False)
    await pool.open()
    await pool.wait(timeout=30)
    await install_oban_schema(pool, prefix=PREFIX)  # what `oban install` runs

    # Values exactly as the worker's own Job builder would insert them.
    job = JsWorker.new({})
    template = {
        "worker": job.worker,
        "queue": job.queue,
        "max_attempts": job.max_attempts,
        "priority": job.priority,
        "meta": job.meta,
        "tags": job.tags,
    }

    # Start the inserter first, so its start-up is over before Oban starts.
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(
        target=inserter_main,
        args=(dsn, template, args.jobs, not args.no_notify, child_end),
        daemon=True,
    )
    proc.start()
    oban = None
    try:
        if not await asyncio.to_thread(parent_end.poll, READY_TIMEOUT_S):
            raise RuntimeError("inserter process did not become ready")
        parent_end.recv()

        # Oban with one queue, otherwise defaults (postgres notifier, stager
        # polling every 1.0 s, leadership on).
        oban = Oban(pool=pool, queues={QUEUE: args.concurrency})
        await oban.start()
        await asyncio.sleep(IDLE_AFTER_START_S)

        parent_end.send("go")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_all_done.wait(), timeout=RUN_TIMEOUT_S)

        if not await asyncio.to_thread(parent_end.poll, 10.0):
            raise RuntimeError("inserter process did not report its commit times")
        committed_at: list[tuple[int, float]] = parent_end.recv()
    finally:
        if oban is not None:
            await oban.stop()
        await pool.close()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)

    first_line, entry = [], []
    for job_id, committed in committed_at:
        if job_id not in RESULTS:
            continue
        entered, js_ms = RESULTS[job_id]
        first_line.append(max(0.0, (js_ms + 0.5) - committed * 1000.0))
        entry.append((entered - committed) * 1000.0)
    return {"inserted": len(committed_at), "ran": len(first_line), "first_line": first_line, "entry": entry}


def describe_run(i: int, r: dict) -> str:
    fl, en = r["first_line"], r["entry"]
    if not fl:
        return f"run {i}: jobs 0/{r['inserted']}: none ran"
    line = (
        f"run {i}: jobs {r['ran']}/{r['inserted']} | commit->JS first line ms: "
        f"p50 {fmt(percentile(fl, 0.5))} p95 {fmt(percentile(fl, 0.95))} "
        f"p99 {fmt(percentile(fl, 0.99))} max {fmt(max(fl, default=math.nan))} | "
        f"commit->perform entry ms: p50 {fmt(percentile(en, 0.5))} "
        f"p95 {fmt(percentile(en, 0.95))} p99 {fmt(percentile(en, 0.99))}"
    )
    negatives = sum(1 for x in en if x < 0)
    if negatives:
        line += f" ({negatives} job(s) entered perform before the inserter read its clock)"
    return line


async def main_async(args) -> int:
    with database_server() as (admin_url, where):
        with psycopg.connect(admin_url, autocommit=True) as conn:
            pg_version = conn.execute("SHOW server_version").fetchone()[0]
            sync_commit = conn.execute("SHOW synchronous_commit").fetchone()[0]
        loop = "uvloop" if args.uvloop else "asyncio"
        print(
            f"oban {version('oban')} | quickjs {version('quickjs')} | psycopg {psycopg.__version__} | "
            f"Python {platform.python_version()} ({loop} event loop)"
        )
        print(
            f"PostgreSQL {pg_version} via {where}; synchronous_commit "
            f"{args.synchronous_commit or sync_commit}{'' if args.synchronous_commit else ' (server setting)'}"
        )
        print(
            f"queue {QUEUE!r} limit {args.concurrency}; notifier: postgres LISTEN/NOTIFY on "
            f"{INSERT_CHANNEL!r} ({'sent by each INSERT' if not args.no_notify else 'DISABLED: poll only'}); "
            f"stager poll interval 1.0 s (oban default)"
        )
        print(
            f"{args.jobs} INSERTs {INSERT_INTERVAL_S * 1000:.0f} ms apart, each its own transaction, "
            f"from a separate process; {args.runs} runs, fresh database {DB_NAME!r} per run"
        )

        p50s = []
        complete = True
        try:
            for i in range(1, args.runs + 1):
                dsn = recreate_database(admin_url, args.synchronous_commit)
                r = await run_once(dsn, args)
                print(describe_run(i, r), flush=True)
                complete = complete and r["ran"] == r["inserted"] == args.jobs
                if r["first_line"]:
                    p50s.append(percentile(r["first_line"], 0.5))
        finally:
            drop_database(admin_url)

        if p50s:
            print(f"median of the runs' commit->JS first line p50: {fmt(statistics.median(p50s))} ms")
        return 0 if complete else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10, help="queue limit (oban's default is 10)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as `oban start` does")
    parser.add_argument(
        "--no-notify", action="store_true", help="diagnostic: INSERT without pg_notify (stager polling only)"
    )
    parser.add_argument(
        "--synchronous-commit",
        choices=["on", "off", "local", "remote_write", "remote_apply"],
        help="set synchronous_commit on the benchmark database (default: leave the server's setting)",
    )
    args = parser.parse_args()
    if not (1 <= args.runs <= 20 and 1 <= args.jobs <= 10_000 and 1 <= args.concurrency <= 1000):
        parser.error("runs 1..20, jobs 1..10000, concurrency 1..1000")

    if args.uvloop:
        import uvloop  # an oban dependency

        return uvloop.run(main_async(args))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
