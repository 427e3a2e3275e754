"""Settings: read once from flags and environment, validated, then frozen.

Flags win over environment variables; every setting has a default that
works for ``analysis-executor dev``. Nothing else in the package reads
``os.environ``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from worker.allocator import ALLOCATORS
from worker.db import InvalidDatabaseURL, validate_database_url

DEFAULT_RESULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_RESULT_INLINE_MAX_BYTES = 256 * 1024


class ConfigError(ValueError):
    """A setting has an invalid value; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a worker needs to know, fixed at start-up."""

    database_url: str
    host: str = "127.0.0.1"
    port: int = 8002
    log_level: str = "info"
    log_format: str = "text"
    concurrency: int = 5
    pool_processes: int | None = None
    pool_allocator: str = "auto"
    poll_interval_ms: int = 5000
    default_timeout_ms: int = 300_000
    default_memory_limit_mb: int = 256
    js_stack_limit_kb: int = 1024
    output_max_bytes: int = 1024 * 1024
    result_max_bytes: int = DEFAULT_RESULT_MAX_BYTES
    result_inline_max_bytes: int = DEFAULT_RESULT_INLINE_MAX_BYTES
    result_storage: str = "postgres"
    result_storage_dir: Path | None = None
    scripts_dir: Path = Path("analytics")
    python_executable: str = sys.executable
    # Who Python scripts run as (a worker running as root only): None means nobody, falling back to root
    script_user: str | None = None
    metrics_refresh_seconds: float = 10.0
    worker_id: str = field(default_factory=lambda: default_worker_id())
    listen: bool = True
    job_lease_seconds: float = 30.0
    shutdown_grace_seconds: float = 25.0
    job_retention_days: int = 30
    scheduler_interval_seconds: float = 1.0
    scheduler_misfire_grace_seconds: float = 60.0
    api_token: str | None = field(default=None, repr=False)
    http_max_body_bytes: int = 1024 * 1024
    # Datasource name -> URL; "main" is the executor's own database unless configured.
    datasources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    dependency_timeout_ms: int = 30_000
    dependency_max_rows: int = 10_000
    dependency_max_bytes: int = 64 * 1024 * 1024
    datasource_pool_size: int = 4

    @property
    def processes(self) -> int:
        """Pool processes: POOL_PROCESSES, or one per concurrent job, never more than the concurrency."""
        return min(self.pool_processes or self.concurrency, self.concurrency)

    @property
    def binds_loopback_only(self) -> bool:
        """True when the HTTP server is reachable from this machine only."""
        if self.host in ("localhost",):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def default_worker_id() -> str:
    """``host-pid-xxxx``: unique across replicas and restarts, readable in logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


_ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "host": "ANALYSIS_EXECUTOR_HOST",
    "port": "ANALYSIS_EXECUTOR_PORT",
    "log_level": "LOG_LEVEL",
    "log_format": "LOG_FORMAT",
    "concurrency": "MAX_CONCURRENT_JOBS",
    "pool_processes": "POOL_PROCESSES",
    "pool_allocator": "POOL_ALLOCATOR",
    "poll_interval_ms": "POLL_INTERVAL_MS",
    "default_timeout_ms": "JOB_TIMEOUT_MS",
    "default_memory_limit_mb": "JOB_MEMORY_LIMIT_MB",
    "js_stack_limit_kb": "JS_STACK_LIMIT_KB",
    "output_max_bytes": "JOB_OUTPUT_MAX_BYTES",
    "result_max_bytes": "RESULT_MAX_BYTES",
    "result_inline_max_bytes": "RESULT_INLINE_MAX_BYTES",
    "result_storage": "RESULT_STORAGE",
    "result_storage_dir": "RESULT_STORAGE_DIR",
    "scripts_dir": "ANALYTICS_SCRIPTS_DIR",
    "python_executable": "ANALYTICS_PYTHON",
    "script_user": "ANALYTICS_RUN_AS_USER",
    "metrics_refresh_seconds": "METRICS_REFRESH_SECONDS",
    "worker_id": "WORKER_ID",
    "job_lease_seconds": "JOB_LEASE_SECONDS",
    "shutdown_grace_seconds": "SHUTDOWN_GRACE_SECONDS",
    "job_retention_days": "JOB_RETENTION_DAYS",
    "scheduler_interval_seconds": "SCHEDULER_INTERVAL_SECONDS",
    "scheduler_misfire_grace_seconds": "SCHEDULER_MISFIRE_GRACE_SECONDS",
    "api_token": "ANALYSIS_EXECUTOR_API_TOKEN",
    "http_max_body_bytes": "HTTP_MAX_BODY_BYTES",
    "datasources_file": "DATASOURCES_FILE",
    "dependency_timeout_ms": "DEPENDENCY_TIMEOUT_MS",
    "dependency_max_rows": "DEPENDENCY_MAX_ROWS",
    "dependency_max_bytes": "DEPENDENCY_MAX_BYTES",
    "datasource_pool_size": "DATASOURCE_POOL_SIZE",
}

ENV_VARIABLES: Mapping[str, str] = _ENV_NAMES
"""Setting name -> environment variable, for ``--help`` texts and docs."""

_POSITIVE_INTS = {
    "port": (1, 65535),
    "concurrency": (1, 1000),
    "pool_processes": (1, 1000),
    "poll_interval_ms": (10, 3_600_000),
    "default_timeout_ms": (1, 86_400_000),
    "default_memory_limit_mb": (8, 1_048_576),
    "js_stack_limit_kb": (64, 1_048_576),
    "output_max_bytes": (1024, 1 << 30),
    "result_max_bytes": (1024, 1 << 31),
    "result_inline_max_bytes": (1024, 1 << 30),
    "job_retention_days": (0, 36500),
    "http_max_body_bytes": (1024, 1 << 30),
    "dependency_timeout_ms": (1, 86_400_000),
    "dependency_max_rows": (1, 10_000_000),
    "dependency_max_bytes": (1024, 1 << 40),
    "datasource_pool_size": (1, 100),
}

_POSITIVE_FLOATS = (
    "metrics_refresh_seconds",
    "job_lease_seconds",
    "shutdown_grace_seconds",
    "scheduler_interval_seconds",
    "scheduler_misfire_grace_seconds",
)


def load_settings(overrides: Mapping[str, object], environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from flag values (``None`` = not given) over the environment.

    Raises ConfigError (or InvalidDatabaseURL) naming the first bad setting.
    """
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name, env_name in _ENV_NAMES.items():
        flag_value = overrides.get(name)
        if flag_value is not None:
            values[name] = flag_value
        elif env.get(env_name, "").strip():
            values[name] = env[env_name].strip()
    for name in ("listen",):
        if overrides.get(name) is not None:
            values[name] = overrides[name]

    values["database_url"] = validate_database_url(values.get("database_url"))  # type: ignore[arg-type]
    for name, (low, high) in _POSITIVE_INTS.items():
        if name in values:
            values[name] = _int_setting(name, values[name], low, high)
    for name in _POSITIVE_FLOATS:
        if name in values:
            values[name] = _float_setting(name, values[name])
    if "scripts_dir" in values:
        values["scripts_dir"] = Path(str(values["scripts_dir"]))
    level = str(values.get("log_level", "info")).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{_ENV_NAMES['log_level']}: unknown log level {level!r} (debug, info, warning, error)")
    values["log_level"] = level
    log_format = str(values.get("log_format", "text")).lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"{_ENV_NAMES['log_format']}: unknown log format {log_format!r} (text, json)")
    values["log_format"] = log_format
    allocator = str(values.get("pool_allocator", "auto")).lower()
    if allocator not in ALLOCATORS:
        raise ConfigError(f"{_ENV_NAMES['pool_allocator']}: unknown allocator {allocator!r} ({', '.join(ALLOCATORS)})")
    values["pool_allocator"] = allocator
    values["datasources"] = load_datasources(
        str(values["database_url"]), env, str(values.pop("datasources_file", "")) or None
    )
    _result_storage_settings(values)
    return Settings(**values)  # type: ignore[arg-type]


_DATASOURCE_ENV = re.compile(r"^DATASOURCE_([A-Z0-9_]+)_URL$")
_DATASOURCE_NAME = re.compile(r"^[a-z0-9_]+$")


def load_datasources(database_url: str, environ: Mapping[str, str], path: str | None) -> Mapping[str, str]:
    """Datasource name -> URL from ``DATASOURCES_FILE`` and ``DATASOURCE_<NAME>_URL`` (the latter win).

    The file is a JSON object ``{"name": "postgresql://..."}`` (or
    ``{"name": {"url": "..."}}``), e.g. a mounted Kubernetes Secret. ``main``
    is ``DATABASE_URL`` unless configured. Names are case-insensitive.
    Raises ConfigError naming the bad entry (never its password).
    """
    found: dict[str, str] = {}
    if path:
        found.update(_datasources_file(Path(path)))
    for env_name, value in environ.items():
        match = _DATASOURCE_ENV.match(env_name)
        if match and value.strip():
            found[match.group(1).lower()] = value.strip()
    datasources = {"main": database_url}
    for name, url in found.items():
        if not _DATASOURCE_NAME.match(name):
            raise ConfigError(f"datasource {name!r}: names are letters, digits and underscores")
        try:
            datasources[name] = validate_database_url(url)
        except InvalidDatabaseURL as exc:
            raise ConfigError(f"datasource {name!r}: {exc}") from None
    return MappingProxyType(datasources)


def _datasources_file(path: Path) -> dict[str, str]:
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"DATASOURCES_FILE: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"DATASOURCES_FILE: {path} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ConfigError(f'DATASOURCES_FILE: {path} must hold a JSON object {{"name": "postgresql://..."}}')
    entries: dict[str, str] = {}
    for name, entry in document.items():
        url = entry.get("url") if isinstance(entry, dict) else entry
        if not isinstance(url, str):
            raise ConfigError(f"DATASOURCES_FILE: datasource {name!r} needs a URL string")
        entries[str(name).lower()] = url
    return entries


def _result_storage_settings(values: dict[str, object]) -> None:
    """Check the large-result settings together: backend, its folder, inline limit within the hard cap."""
    cap = int(str(values.get("result_max_bytes", DEFAULT_RESULT_MAX_BYTES)))
    if "result_inline_max_bytes" not in values:  # a small cap lowers the default inline limit with it
        values["result_inline_max_bytes"] = min(DEFAULT_RESULT_INLINE_MAX_BYTES, cap)
    inline = int(str(values["result_inline_max_bytes"]))
    if inline > cap:
        raise ConfigError(
            f"{_ENV_NAMES['result_inline_max_bytes']}: {inline} is over {_ENV_NAMES['result_max_bytes']} ({cap}); "
            "results between the two are the ones stored outside the job row"
        )
    backend = str(values.get("result_storage", "postgres")).lower()
    if backend not in ("postgres", "filesystem"):
        raise ConfigError(f"{_ENV_NAMES['result_storage']}: unknown backend {backend!r} (postgres, filesystem)")
    values["result_storage"] = backend
    folder = values.get("result_storage_dir")
    if folder is not None:
        values["result_storage_dir"] = folder = Path(str(folder)).expanduser().absolute()
    if backend != "filesystem":
        return
    if folder is None:
        raise ConfigError(
            f"{_ENV_NAMES['result_storage_dir']} is required when {_ENV_NAMES['result_storage']}=filesystem"
        )
    assert isinstance(folder, Path)
    if not folder.is_dir():
        raise ConfigError(f"{_ENV_NAMES['result_storage_dir']}: {folder} does not exist or is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{_ENV_NAMES['result_storage_dir']}: {folder} is not writable by this process")


def _int_setting(name: str, raw: object, low: int, high: int) -> int:
    try:
        value = int(str(raw))
    except ValueError:
        raise ConfigError(f"{_ENV_NAMES[name]}: {raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{_ENV_NAMES[name]}: {value} is outside {low}..{high}")
    return value


def _float_setting(name: str, raw: object) -> float:
    try:
        value = float(str(raw))
    except ValueError:
        raise ConfigError(f"{_ENV_NAMES[name]}: {raw!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{_ENV_NAMES[name]}: must be positive")
    return value
