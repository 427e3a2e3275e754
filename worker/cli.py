"""The ``analysis-executor`` command line: argument parsing only.

Every subcommand validates its input, calls into the modules that do the
work, and maps failures to exit codes: 0 ok, 2 bad usage or input (with a
one-line reason), 1 runtime failure. Flag defaults come from environment
variables, and ``--help`` names them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from worker import __version__
from worker.config import ConfigError, Settings, load_settings
from worker.db import (
    CONNECT_TIMEOUT_SECONDS,
    DatabaseUnavailable,
    InvalidDatabaseURL,
    connect,
    redact_database_url,
    validate_database_url,
)
from worker.logs import configure_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("worker")


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every other bad input
        self.exit(EXIT_USAGE, f"analysis-executor: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    from worker.embedded import EmbeddedPostgresError
    from worker.jobs import InvalidJobRequest, JobAlreadyFinished, JobDataTooDeep, JobNotFound
    from worker.result_storage import ResultNotAvailable
    from worker.schedules import InvalidSchedule, ScheduleNotFound
    from worker.service import WorkerStartupError

    args = _build_parser().parse_args(argv)
    configure_logging(args.log_level, getattr(args, "log_format", None) or "text")
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except (
        UsageError,
        InvalidDatabaseURL,
        ConfigError,
        InvalidJobRequest,
        JobNotFound,
        JobAlreadyFinished,
        InvalidSchedule,
        ScheduleNotFound,
        ResultNotAvailable,
    ) as exc:
        print(f"analysis-executor: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (DatabaseUnavailable, WorkerStartupError, EmbeddedPostgresError, TimeoutError, JobDataTooDeep) as exc:
        print(f"analysis-executor: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="analysis-executor", description="Run analysis jobs stored in PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"analysis-executor {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser("run", help="run a worker")
    _add_database_url(run)
    _add_worker_options(run)
    run.set_defaults(command=_run)

    migrate = commands.add_parser("migrate", help="apply database migrations (safe to run from many replicas)")
    _add_database_url(migrate)
    _add_log_level(migrate)
    migrate.set_defaults(command=_migrate)

    dev = commands.add_parser("dev", help="zero-setup: embedded PostgreSQL, migrations, demo analyses and a worker")
    dev.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("ANALYSIS_EXECUTOR_DATA_DIR", ".analysis-executor/pgdata") or ""),
        help="embedded PostgreSQL data folder (env ANALYSIS_EXECUTOR_DATA_DIR; default %(default)s)",
    )
    dev.add_argument("--pg-port", type=int, default=None, help="port for the embedded PostgreSQL (default: any free)")
    _add_worker_options(dev)
    dev.set_defaults(command=_dev)

    submit = commands.add_parser("submit", help="submit a job")
    submit.add_argument("analysis_id", help="id of the analysis to run")
    submit.add_argument("--params", default="{}", help="job parameters as a JSON object (default {})")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    submit.add_argument("--run-at", default=None, help="earliest start, ISO 8601 timestamp (default now)")
    submit.add_argument("--max-attempts", type=int, default=None, help="attempts allowed (default 3)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish and print its result")
    submit.add_argument("--wait-timeout", type=float, default=None, help="give up waiting after N seconds")
    _add_database_url(submit)
    _add_log_level(submit)
    submit.set_defaults(command=_submit)

    status = commands.add_parser("status", help="queue counts by status and the workers holding jobs")
    _add_database_url(status)
    _add_log_level(status)
    status.set_defaults(command=_status)

    jobs = commands.add_parser("jobs", help="recent jobs, newest first")
    jobs.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    jobs.add_argument(
        "--status", choices=["pending", "running", "completed", "failed", "timeout", "cancelled"], default=None
    )
    _add_database_url(jobs)
    _add_log_level(jobs)
    jobs.set_defaults(command=_jobs)

    show = commands.add_parser("show", help="one job, every column (or, with --result, its whole result)")
    show.add_argument("job_id")
    show.add_argument(
        "--result",
        action="store_true",
        help="write the job's whole result to stdout, exactly as stored (inline or in the result storage)",
    )
    show.add_argument(
        "--result-storage-dir",
        type=Path,
        default=_env("RESULT_STORAGE_DIR"),
        help="folder of results stored as files (env RESULT_STORAGE_DIR); needed for those only",
    )
    _add_database_url(show)
    _add_log_level(show)
    show.set_defaults(command=_show)

    cancel = commands.add_parser("cancel", help="cancel a pending or running job")
    cancel.add_argument("job_id")
    _add_database_url(cancel)
    _add_log_level(cancel)
    cancel.set_defaults(command=_cancel)

    scripts = commands.add_parser("scripts", help="the whitelisted Python scripts")
    scripts.add_argument(
        "--scripts-dir",
        default=_env("ANALYTICS_SCRIPTS_DIR", "analytics"),
        help="scripts folder (env ANALYTICS_SCRIPTS_DIR; default %(default)s)",
    )
    _add_log_level(scripts)
    scripts.set_defaults(command=_scripts)

    _add_schedules_commands(commands)
    return parser


def _add_schedules_commands(commands: argparse._SubParsersAction) -> None:
    schedules = commands.add_parser("schedules", help="cron schedules: list, add, pause, resume, remove")
    actions = schedules.add_subparsers(title="actions", required=True, metavar="ACTION", parser_class=_Parser)

    listing = actions.add_parser("list", help="every schedule, its next and last run and last error")
    listing.set_defaults(command=_schedules_list)

    add = actions.add_parser("add", help="schedule an analysis; prints the new schedule's id")
    add.add_argument("analysis_id", help="id of the analysis to run")
    add.add_argument(
        "cron",
        help='5 fields ("0 6 * * MON-FRI"), 6 with seconds first ("*/10 * * * * *"), or @hourly, @daily, ...',
    )
    add.add_argument("--timezone", default="UTC", help="IANA time zone of the expression (default %(default)s)")
    add.add_argument("--parameters", "--params", default="{}", help="job parameters as a JSON object (default {})")
    add.add_argument(
        "--catch-up",
        choices=["once", "all"],
        default="once",
        help="after downtime: one job for the missed window (once, default) or one per missed tick (all)",
    )
    add.set_defaults(command=_schedules_add)

    for name, help_text, active in (
        ("pause", "stop enqueueing jobs for a schedule", False),
        ("resume", "enqueue again, from the next tick on", True),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("schedule_id")
        action.set_defaults(command=_schedules_set_active, active=active, done=f"{name}d")

    remove = actions.add_parser("remove", help="delete a schedule (its jobs stay)")
    remove.add_argument("schedule_id")
    remove.set_defaults(command=_schedules_remove)

    for action in (listing, add, remove, *(actions.choices[name] for name in ("pause", "resume"))):
        _add_database_url(action)
        _add_log_level(action)


def _add_database_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", default=None, help="PostgreSQL URL (env DATABASE_URL)")


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default=(_env("LOG_LEVEL", "info") or "info").lower(),
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="log level (env LOG_LEVEL; default %(default)s)",
    )


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    _add_log_level(parser)
    parser.add_argument("--port", type=int, default=None, help="HTTP port (env ANALYSIS_EXECUTOR_PORT; default 8002)")
    parser.add_argument(
        "--host", default=None, help="HTTP bind address (env ANALYSIS_EXECUTOR_HOST; default 127.0.0.1)"
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"], default=None, help="log format (env LOG_FORMAT; default text)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="jobs at once, one process each (env MAX_CONCURRENT_JOBS; default 5)",
    )
    parser.add_argument(
        "--pool-processes",
        type=int,
        default=None,
        help="pool child processes (env POOL_PROCESSES; default: one per concurrent job)",
    )
    parser.add_argument(
        "--pool-allocator",
        choices=("auto", "mimalloc", "system"),
        default=None,
        help="malloc of the pool children (env POOL_ALLOCATOR; default auto: mimalloc when installed)",
    )
    parser.add_argument(
        "--poll-interval-ms", type=int, default=None, help="fallback poll interval (env POLL_INTERVAL_MS; default 5000)"
    )
    parser.add_argument(
        "--scripts-dir",
        default=None,
        help="whitelisted Python scripts (env ANALYTICS_SCRIPTS_DIR; default ./analytics)",
    )
    parser.add_argument(
        "--python", dest="python_executable", default=None, help="interpreter for scripts (env ANALYTICS_PYTHON)"
    )
    parser.add_argument("--worker-id", default=None, help="worker id (env WORKER_ID; default host-pid-random)")
    parser.add_argument(
        "--no-listen",
        dest="listen",
        action="store_false",
        default=None,
        help="do not LISTEN for notifications; rely on polling only (diagnostics)",
    )


def _worker_settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    names = (
        "database_url", "port", "host", "log_level", "log_format", "concurrency", "pool_processes", "pool_allocator",
        "poll_interval_ms", "scripts_dir", "python_executable", "worker_id", "listen",
    )  # fmt: skip
    values = {name: getattr(args, name, None) for name in names}
    values.update(overrides)
    return load_settings(values)


def _database_url(args: argparse.Namespace) -> str:
    return validate_database_url(args.database_url or os.environ.get("DATABASE_URL"))


def _run(args: argparse.Namespace) -> int:
    from worker.service import run_worker

    settings = _worker_settings(args)
    configure_logging(settings.log_level, settings.log_format, settings.worker_id)
    return run_worker(settings)


def _migrate(args: argparse.Namespace) -> int:
    from worker.migrate import apply_migrations

    applied = apply_migrations(_database_url(args))
    if applied:
        print(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        print("database is up to date")
    return EXIT_OK


def _dev(args: argparse.Namespace) -> int:
    from worker.demo import DEMO_JS_TITLE, install_demo
    from worker.embedded import EmbeddedPostgres
    from worker.migrate import apply_migrations
    from worker.service import run_worker

    server = EmbeddedPostgres(args.data_dir, port=args.pg_port)
    server.start()
    try:
        url = server.create_database("analysis_executor")
        apply_migrations(url)
        scripts_dir = Path(args.scripts_dir or _env("ANALYTICS_SCRIPTS_DIR") or args.data_dir.parent / "scripts")
        with connect(url) as conn:
            demo_ids = install_demo(conn, scripts_dir)
        settings = _worker_settings(args, database_url=url, scripts_dir=str(scripts_dir))
        configure_logging(settings.log_level, settings.log_format, settings.worker_id)
        print(
            f"\nEmbedded PostgreSQL is ready. Connect with:\n  psql {url}\n\n"
            f'Submit a job:\n  psql {url} -c "INSERT INTO analysis_jobs (analysis_id, parameters) '
            f"VALUES ('{demo_ids[DEMO_JS_TITLE]}', '{{\\\"values\\\": [3, 5, 8]}}')\"\n"
            f"  analysis-executor submit {demo_ids[DEMO_JS_TITLE]} --params '{{\"values\": [3, 5, 8]}}' "
            f"--database-url {url} --wait\n\n"
            f"Python scripts folder: {scripts_dir}\n"
            f"Health: curl http://{settings.host}:{settings.port}/health\n",
            flush=True,
        )
        return run_worker(settings)
    finally:
        server.stop()


async def _connect(args: argparse.Namespace) -> psycopg.AsyncConnection:
    url = _database_url(args)
    try:
        return await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnavailable(f"cannot connect to the database at {redact_database_url(url)}: {first}") from None


def _submit(args: argparse.Namespace) -> int:
    from worker.jobs import parse_parameters, parse_timestamp, submit_job, wait_for_job

    parameters = parse_parameters(args.params)
    if args.max_attempts is not None and args.max_attempts < 1:
        raise UsageError("--max-attempts must be at least 1")
    run_at = parse_timestamp(args.run_at) if args.run_at is not None else None

    async def submit() -> dict[str, Any] | str:
        async with await _connect(args) as conn:
            job_id = await submit_job(
                conn,
                args.analysis_id,
                parameters,
                priority=args.priority,
                run_at=run_at,
                max_attempts=args.max_attempts,
            )
            if not args.wait:
                return job_id
            return await wait_for_job(conn, job_id, args.wait_timeout)

    job = asyncio.run(submit())
    if isinstance(job, str):
        print(job)
        return EXIT_OK
    print(
        json.dumps(
            {"id": str(job["id"]), "status": job["status"], "result": job["result"], "error": job["error_message"]}
        )
    )
    return EXIT_OK if job["status"] == "completed" else EXIT_FAILURE


def _cancel(args: argparse.Namespace) -> int:
    from worker.jobs import cancel_job

    async def cancel() -> dict[str, Any]:
        async with await _connect(args) as conn:
            return await cancel_job(conn, args.job_id)

    job = asyncio.run(cancel())
    print(f"job {job['id']} cancelled")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from worker.jobs import queue_summary

    async def summary() -> dict[str, Any]:
        async with await _connect(args) as conn:
            return await queue_summary(conn)

    summary_ = asyncio.run(summary())
    live = summary_["live"]
    print("queue now:")
    print(f"  pending (due)        {live['pending_due']}")
    print(f"  scheduled (future)   {live['pending_scheduled']}")
    print(f"  running              {live['running']}")
    age = live["oldest_pending_age_seconds"]
    print(f"  oldest pending age   {float(age):.1f}s" if age is not None else "  oldest pending age   -")
    print("last 24 hours by status:")
    for status, count in sorted(summary_["recent"].items()):
        print(f"  {status:<20} {count}")
    workers = summary_["workers"]
    print(f"workers alive: {len(workers)}")
    for w in workers:
        state = " (draining)" if w["draining"] else ""
        print(
            f"  {w['id']:<36} host {w['host']} pid {w['pid']} v{w['version']}  running {w['running_jobs']}/"
            f"{w['concurrency']}  processed {w['jobs_processed']}  started {w['started_at']:%Y-%m-%d %H:%M:%S}  "
            f"last seen {w['last_seen_at']:%H:%M:%S}{state}"
        )
    return EXIT_OK


def _jobs(args: argparse.Namespace) -> int:
    from worker.jobs import recent_jobs

    async def fetch() -> list[dict[str, Any]]:
        async with await _connect(args) as conn:
            return await recent_jobs(conn, args.limit, args.status)

    rows = asyncio.run(fetch())
    print(f"{'id':<36}  {'status':<9}  {'attempts':>8}  {'ms':>8}  {'created':<19}  analysis / error")
    for row in rows:
        duration = "" if row["duration_ms"] is None else str(row["duration_ms"])
        detail = row["title"] + (f" — {row['error']}" if row["error"] else "")
        created = row["created_at"].strftime("%Y-%m-%d %H:%M:%S")
        print(f"{row['id']!s:<36}  {row['status']:<9}  {row['attempts']:>8}  {duration:>8}  {created:<19}  {detail}")
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    from worker.jobs import get_attempts, get_job

    if args.result:
        return _show_result(args)

    async def fetch() -> dict[str, Any]:
        async with await _connect(args) as conn:
            job = await get_job(conn, args.job_id)
            job["attempts_history"] = await get_attempts(conn, job["id"])
            return job

    print(json.dumps(asyncio.run(fetch()), indent=2, default=str))
    return EXIT_OK


def _show_result(args: argparse.Namespace) -> int:
    """Stream the job's result to stdout; exit 2 when there is none, 1 when it cannot be read whole."""
    from worker.result_storage import StoredResultCorrupt, StoredResultGone, find_result, read_result

    async def stream() -> None:
        async with await _connect(args) as conn:

            @contextlib.asynccontextmanager
            async def same_connection() -> AsyncIterator[psycopg.AsyncConnection]:
                yield conn

            info = await find_result(conn, args.job_id)
            out = sys.stdout.buffer
            async for piece in read_result(info, same_connection, args.result_storage_dir):
                out.write(piece)
            out.flush()

    try:
        asyncio.run(stream())
    except (StoredResultCorrupt, StoredResultGone) as exc:
        print(f"analysis-executor: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _scripts(args: argparse.Namespace) -> int:
    from worker.runtimes.python import ScriptWhitelist

    whitelist = ScriptWhitelist(Path(args.scripts_dir))
    if not whitelist.folder.is_dir():
        raise UsageError(f"scripts folder {whitelist.folder} does not exist (set ANALYTICS_SCRIPTS_DIR)")
    for name in whitelist.names():
        print(name)
    return EXIT_OK


def _schedules_list(args: argparse.Namespace) -> int:
    from worker.schedules import list_schedules

    async def fetch() -> list[dict[str, Any]]:
        async with await _connect(args) as conn:
            return await list_schedules(conn)

    print(
        f"{'id':<36}  {'analysis':<20}  {'cron':<16}  {'timezone':<16}  {'catch-up':<8}  {'active':<6}  "
        f"{'next run (UTC)':<19}  {'last run (UTC)':<19}  {'last job':<36}  last error"
    )
    for row in asyncio.run(fetch()):
        next_run = _utc(row["next_run_at"]) if row["next_run_at"] or not row["is_active"] else "(computing)"
        print(
            f"{row['id']!s:<36}  {row['analysis'][:20]:<20}  {row['cron_expression']:<16}  {row['timezone']:<16}  "
            f"{row['catch_up']:<8}  {'yes' if row['is_active'] else 'no':<6}  {next_run:<19}  "
            f"{_utc(row['last_run_at']):<19}  {row['last_job_id'] or '-'!s:<36}  {row['last_error'] or ''}"
        )
    return EXIT_OK


def _utc(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _schedules_add(args: argparse.Namespace) -> int:
    from worker.jobs import parse_parameters
    from worker.schedules import add_schedule

    parameters = parse_parameters(args.parameters)

    async def add() -> str:
        async with await _connect(args) as conn:
            return await add_schedule(
                conn,
                args.analysis_id,
                args.cron,
                timezone=args.timezone,
                parameters=parameters,
                catch_up=args.catch_up,
            )

    print(asyncio.run(add()))
    return EXIT_OK


def _schedules_set_active(args: argparse.Namespace) -> int:
    from worker.schedules import set_schedule_active

    async def change() -> None:
        async with await _connect(args) as conn:
            await set_schedule_active(conn, args.schedule_id, args.active)

    asyncio.run(change())
    print(f"schedule {args.schedule_id} {args.done}")
    return EXIT_OK


def _schedules_remove(args: argparse.Namespace) -> int:
    from worker.schedules import remove_schedule

    async def remove() -> None:
        async with await _connect(args) as conn:
            await remove_schedule(conn, args.schedule_id)

    asyncio.run(remove())
    print(f"schedule {args.schedule_id} removed")
    return EXIT_OK
