"""The ``analysis-executor`` command line: argument parsing only.

Every subcommand validates its input, calls into the modules that do the
work, and maps failures to exit codes: 0 ok, 2 bad usage or input (with a
one-line reason), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from worker import __version__
from worker.db import DatabaseUnavailable, InvalidDatabaseURL, validate_database_url

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("worker")


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except (UsageError, InvalidDatabaseURL) as exc:
        print(f"analysis-executor: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DatabaseUnavailable as exc:
        print(f"analysis-executor: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="analysis-executor",
        description="Run analysis jobs stored in PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"analysis-executor {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="apply database migrations (safe to run from many replicas)")
    _add_database_url(migrate)
    _add_log_level(migrate)
    migrate.set_defaults(command=_migrate)

    dev = commands.add_parser("dev", help="zero-setup: embedded PostgreSQL, migrations, demo analysis")
    dev.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("ANALYSIS_EXECUTOR_DATA_DIR", ".analysis-executor/pgdata")),
        help="embedded PostgreSQL data folder (env ANALYSIS_EXECUTOR_DATA_DIR; default %(default)s)",
    )
    dev.add_argument("--pg-port", type=int, default=None, help="port for the embedded PostgreSQL (default: any free)")
    _add_log_level(dev)
    dev.set_defaults(command=_dev)
    return parser


def _add_database_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="PostgreSQL URL (env DATABASE_URL)",
    )


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
        help="log level (env LOG_LEVEL; default %(default)s)",
    )


def _migrate(args: argparse.Namespace) -> int:
    from worker.migrate import apply_migrations

    url = validate_database_url(args.database_url)
    applied = apply_migrations(url)
    if applied:
        print(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        print("database is up to date")
    return EXIT_OK


def _dev(args: argparse.Namespace) -> int:
    from worker.embedded import EmbeddedPostgres, EmbeddedPostgresError
    from worker.migrate import apply_migrations

    server = EmbeddedPostgres(args.data_dir, port=args.pg_port)
    try:
        server.start()
    except EmbeddedPostgresError as exc:
        print(f"analysis-executor: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        url = server.create_database("analysis_executor")
        apply_migrations(url)
        print(f"Embedded PostgreSQL is ready. Connect with:\n  psql {url}\n", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        server.stop()
    return EXIT_OK
