"""Database URL handling: validation, redaction, translation for yoyo."""

from __future__ import annotations

import pytest
from yoyo.connections import parse_uri

from worker.db import InvalidDatabaseURL, redact_database_url, validate_database_url, yoyo_database_uri


@pytest.mark.parametrize(
    "url",
    [
        "postgres://user:pass@db:5432/app",
        "postgresql://user@db/app?sslmode=require",
        "host=db port=5432 dbname=app user=u",
    ],
)
def test_libpq_urls_and_dsns_are_accepted(url: str) -> None:
    assert validate_database_url(url) == url


def test_sqlalchemy_style_scheme_is_translated() -> None:
    assert validate_database_url("postgresql+psycopg://u@h/d") == "postgresql://u@h/d"


@pytest.mark.parametrize("url", [None, "", "   ", "mysql://u@h/d", "garbage", "postgresql://h:port/d"])
def test_bad_urls_are_refused(url: str | None) -> None:
    with pytest.raises(InvalidDatabaseURL):
        validate_database_url(url)


def test_redaction_drops_the_password() -> None:
    redacted = redact_database_url("postgresql://app:s3cr%40t@db.example:6543/prod")
    assert redacted == "postgresql://app@db.example:6543/prod"


def test_yoyo_uri_keeps_special_characters_and_socket_hosts() -> None:
    parsed = parse_uri(yoyo_database_uri("postgresql://us%40er:p%3Ass%2Fw@db:5433/my-db?sslmode=require"))
    assert (parsed.scheme, parsed.username, parsed.password, parsed.hostname, parsed.port, parsed.database) == (
        "postgresql+psycopg",
        "us@er",
        "p:ss/w",
        "db",
        5433,
        "my-db",
    )
    assert parsed.args == {"sslmode": "require"}
    socket_uri = parse_uri(yoyo_database_uri("host=/var/run/postgresql dbname=app user=u"))
    assert socket_uri.args == {"host": "/var/run/postgresql"}
    assert socket_uri.database == "app"


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:pa%zzsecret@h/d", "postgresql://u:pa secret@h/d", "host=h password=se cret"],
)
def test_a_malformed_url_is_refused_without_echoing_its_password(url: str) -> None:
    with pytest.raises(InvalidDatabaseURL) as caught:
        validate_database_url(url)
    assert "secret" not in str(caught.value) and "cret" not in str(caught.value)
