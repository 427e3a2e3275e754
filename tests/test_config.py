"""Settings: flags over environment, validation, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import ConfigError, load_settings
from worker.db import InvalidDatabaseURL

URL = "postgresql://u@localhost/db"


def test_defaults_match_the_documented_ones() -> None:
    settings = load_settings({}, {"DATABASE_URL": URL})
    assert (settings.host, settings.port, settings.concurrency, settings.poll_interval_ms) == (
        "127.0.0.1",
        8002,
        5,
        5000,
    )
    assert settings.log_level == "info"
    assert settings.binds_loopback_only


def test_flags_win_over_environment() -> None:
    env = {"DATABASE_URL": "postgresql://env@h/d", "MAX_CONCURRENT_JOBS": "9", "ANALYSIS_EXECUTOR_PORT": "9000"}
    settings = load_settings({"database_url": URL, "concurrency": 3}, env)
    assert (settings.database_url, settings.concurrency, settings.port) == (URL, 3, 9000)


def test_environment_names_are_the_documented_ones() -> None:
    env = {
        "DATABASE_URL": URL,
        "ANALYSIS_EXECUTOR_HOST": "0.0.0.0",
        "LOG_LEVEL": "DEBUG",
        "POLL_INTERVAL_MS": "250",
        "ANALYTICS_SCRIPTS_DIR": "/opt/analytics",
        "ANALYTICS_PYTHON": "/opt/venv/bin/python",
    }
    settings = load_settings({}, env)
    assert settings.host == "0.0.0.0" and not settings.binds_loopback_only
    assert settings.log_level == "debug"
    assert settings.poll_interval_ms == 250
    assert settings.scripts_dir == Path("/opt/analytics")
    assert settings.python_executable == "/opt/venv/bin/python"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAX_CONCURRENT_JOBS": "0"}, "MAX_CONCURRENT_JOBS: 0 is outside"),
        ({"ANALYSIS_EXECUTOR_PORT": "http"}, "ANALYSIS_EXECUTOR_PORT: 'http' is not a whole number"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"JOB_TIMEOUT_MS": "-5"}, "JOB_TIMEOUT_MS"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({}, {"DATABASE_URL": URL, **env})


def test_missing_database_url_is_refused() -> None:
    with pytest.raises(InvalidDatabaseURL):
        load_settings({}, {})


def test_settings_are_frozen() -> None:
    settings = load_settings({}, {"DATABASE_URL": URL})
    with pytest.raises(AttributeError):
        settings.concurrency = 10  # type: ignore[misc]


def test_result_storage_settings_are_checked_at_start_up(tmp_path: Path) -> None:
    base = {"DATABASE_URL": URL}
    settings = load_settings({}, base)
    assert (settings.result_storage, settings.result_inline_max_bytes, settings.result_max_bytes) == (
        "postgres",
        256 * 1024,
        16 * 1024 * 1024,
    )
    for env, message in [
        ({"RESULT_STORAGE": "s3"}, "RESULT_STORAGE: unknown backend 's3'"),
        ({"RESULT_STORAGE": "filesystem"}, "RESULT_STORAGE_DIR is required when RESULT_STORAGE=filesystem"),
        ({"RESULT_STORAGE": "filesystem", "RESULT_STORAGE_DIR": str(tmp_path / "nope")}, "does not exist"),
        ({"RESULT_INLINE_MAX_BYTES": "4096", "RESULT_MAX_BYTES": "2048"}, "RESULT_INLINE_MAX_BYTES: 4096 is over"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_settings({}, {**base, **env})
    files = load_settings({}, {**base, "RESULT_STORAGE": "filesystem", "RESULT_STORAGE_DIR": str(tmp_path)})
    assert (files.result_storage, files.result_storage_dir) == ("filesystem", tmp_path)
    small_cap = load_settings({}, {**base, "RESULT_MAX_BYTES": "100000"})
    assert small_cap.result_inline_max_bytes == 100000  # a small cap lowers the default inline limit with it
