"""Apply the yoyo migrations in ``migrations/`` to a database.

Several replicas may run ``analysis-executor migrate`` at the same moment
(a Kubernetes rollout does exactly that). They queue on a PostgreSQL
advisory lock, which the server releases when its holder's connection dies,
so a killed pod can never leave the database locked. yoyo's own lock row,
which would outlive a killed pod, is cleared while we hold the advisory lock:
any such row belongs to a migrator that no longer exists.
"""

from __future__ import annotations

import logging
from pathlib import Path

from yoyo import get_backend, read_migrations

from worker.db import connect, yoyo_database_uri

log = logging.getLogger(__name__)

# Arbitrary constant shared by every replica: "analysis-executor migrations".
MIGRATION_LOCK_KEY = 0x616E_616C_7973_6973 & 0x7FFF_FFFF_FFFF_FFFF


def migrations_dir() -> Path:
    """Return the folder holding the migrations.

    Installed wheels carry them inside the package; a source checkout keeps
    them at the top of the repository.
    """
    packaged = Path(__file__).parent / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def shipped_migration_ids() -> list[str]:
    """Ids of the migrations this version ships, in order (file names without ``.sql``)."""
    return sorted(
        path.name.removesuffix(".sql")
        for path in migrations_dir().glob("*.sql")
        if not path.name.endswith(".rollback.sql")
    )


def apply_migrations(database_url: str) -> list[str]:
    """Apply every pending migration; return the ids applied (empty when up to date).

    Raises DatabaseUnavailable when the database cannot be reached, and lets
    a failing migration's database error propagate after yoyo rolled it back.
    """
    with connect(database_url, application_name="analysis-executor migrate") as lock_conn:
        lock_conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            backend = get_backend(yoyo_database_uri(database_url))
            try:
                backend.break_lock()
                migrations = read_migrations(str(migrations_dir()))
                with backend.lock():
                    pending = backend.to_apply(migrations)
                    backend.apply_migrations(pending)
                applied = [m.id for m in pending]
            finally:
                backend.connection.close()
        finally:
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    for migration_id in applied:
        log.info("applied migration %s", migration_id)
    return applied


def pending_migrations(database_url: str) -> list[str]:
    """Return the ids of migrations not yet applied to the database."""
    backend = get_backend(yoyo_database_uri(database_url))
    try:
        return [m.id for m in backend.to_apply(read_migrations(str(migrations_dir())))]
    finally:
        backend.connection.close()
