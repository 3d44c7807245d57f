"""Structured logs: JSON lines in production, readable lines in a terminal, no secrets in
either."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest
from pydantic import SecretStr

from worker.config import Settings
from worker.connections import kafka_client_kwargs, pg_connect_kwargs, redis_client
from worker.logging import redact_text, setup_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _log(fmt: str) -> str:
    stream = io.StringIO()
    setup_logging(fmt=fmt, level="INFO", stream=stream)
    log = logging.getLogger("worker.test")
    log.info(
        "connected to %s",
        "redis://:hunter2@cache:6379/0",
        extra={
            "org_id": "acme",
            "batch": 12,
            "postgres_dsn": "postgresql://m:pg-pass@db/metering",
            "api_tokens": '{"tok-secret": "*"}',
            "sasl_password": SecretStr("kafka-pass"),
            "url": "rediss://metering:redis-pass@cache:6380/0",
        },
    )
    try:
        raise RuntimeError("cannot reach postgresql://m:exc-pass@db/metering")
    except RuntimeError:
        log.exception("flush failed")
    return stream.getvalue()


@pytest.mark.usefixtures("restore_root")
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_secret_reaches_the_log(fmt: str) -> None:
    out = _log(fmt)
    for secret in ("hunter2", "pg-pass", "tok-secret", "kafka-pass", "redis-pass", "exc-pass"):
        assert secret not in out, secret
    assert "acme" in out and "12" in out


@pytest.mark.usefixtures("restore_root")
def test_json_lines_carry_level_logger_message_and_extras() -> None:
    lines = _log("json").strip().splitlines()
    first = orjson.loads(lines[0])
    assert first["level"] == "info"
    assert first["logger"] == "worker.test"
    assert first["msg"] == "connected to redis://:**********@cache:6379/0"
    assert first["org_id"] == "acme" and first["batch"] == 12
    assert first["ts"].endswith("+00:00")
    # The traceback stays inside the JSON object of its record (one record per line).
    records = [orjson.loads(line) for line in lines]
    assert len(records) == 2
    assert records[1]["level"] == "error" and "RuntimeError" in records[1]["exc"]


@pytest.mark.usefixtures("restore_root")
def test_console_lines_are_readable() -> None:
    first = _log("console").splitlines()[0]
    assert " INFO " in first and "worker.test: connected to" in first
    assert "org_id=acme" in first


def test_redact_text_masks_url_passwords_only() -> None:
    assert redact_text("postgresql://u:p@h/db") == "postgresql://u:**********@h/db"
    assert redact_text("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_text("no urls here") == "no urls here"


def test_security_settings_reach_the_clients() -> None:
    settings = Settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="metering",
        kafka_sasl_password=SecretStr("kafka-pass"),
        postgres_sslmode="verify-full",
        postgres_dsn=SecretStr("postgresql://m:pg@db/metering"),
    )
    kafka = kafka_client_kwargs(settings)
    assert kafka["security_protocol"] == "SASL_PLAINTEXT"
    assert kafka["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kafka["sasl_plain_username"] == "metering"
    assert kafka["sasl_plain_password"] == "kafka-pass"
    pg = pg_connect_kwargs(settings)
    assert pg["ssl"] == "verify-full"
    assert pg["dsn"] == "postgresql://m:pg@db/metering"


def test_rediss_url_gives_a_tls_client_with_auth() -> None:
    from redis.asyncio.connection import SSLConnection

    client = redis_client(Settings(redis_url=SecretStr("rediss://metering:pw@cache:6380/2")))
    pool = client.connection_pool
    assert pool.connection_class is SSLConnection
    assert pool.connection_kwargs["username"] == "metering"
    assert pool.connection_kwargs["password"] == "pw"
    assert pool.connection_kwargs["db"] == 2


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("postgresql://u:p@ss@db:5432/metering", "p@ss"),
        ("rediss://default:a@b@c@redis:6380/0", "a@b@c"),
        ("postgresql://db/metering?user=u&password=hunter2&sslmode=require", "hunter2"),
        ("postgresql://u@db/metering?sslpassword=keypass", "keypass"),
        ("host=db port=5432 password=hunter2 dbname=metering", "hunter2"),
        ("host=db password='hunter 2' dbname=metering", "hunter 2"),
    ],
)
def test_passwords_are_masked_in_every_dsn_form(text: str, secret: str) -> None:
    from worker.logging import MASK, redact_text

    masked = redact_text(text)
    assert secret not in masked and MASK in masked, masked


def test_text_without_passwords_is_left_alone() -> None:
    from worker.logging import redact_text

    for text in ("http://host:8080/path?email=a@b.com", "org a/b member c", "user@host"):
        assert redact_text(text) == text
