"""Settings: environment overrides, masked secrets, clear errors for bad values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55"


def run_check_config(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    return subprocess.run(
        [sys.executable, "-m", "worker", "--check-config", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_KAFKA_BOOTSTRAP", "broker-1:9092,broker-2:9092")
    monkeypatch.setenv("METERING_TOPIC_PARTITIONS", "12")
    monkeypatch.setenv("METERING_TIERS", '{"pro": 600, "max": 20000, "team": 1000}')
    monkeypatch.setenv("METERING_REDIS_CLUSTER", "true")
    s = Settings()
    assert s.kafka_bootstrap == "broker-1:9092,broker-2:9092"
    assert s.topic_partitions == 12
    assert s.tiers == {"pro": 600, "max": 20000, "team": 1000}
    assert s.redis_cluster is True


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.topic_partitions = 3  # type: ignore[misc]


def test_redacted_masks_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_REDIS_URL", f"redis://:{SECRET}@redis:6379/0")
    monkeypatch.setenv("METERING_POSTGRES_DSN", f"postgresql://m:{SECRET}@pg/metering")
    monkeypatch.setenv("METERING_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("METERING_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("METERING_KAFKA_SASL_USERNAME", "metering")
    monkeypatch.setenv("METERING_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("METERING_API_TOKENS", json.dumps({SECRET: "*"}))
    s = Settings()
    red = s.redacted()
    assert SECRET not in repr(red)
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert red["kafka_sasl_password"] == "**********"
    assert red["kafka_sasl_username"] == "metering"
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == SECRET


def test_check_config_prints_settings_with_secrets_masked() -> None:
    proc = run_check_config(
        METERING_POSTGRES_DSN=f"postgresql://m:{SECRET}@pg/metering",
        METERING_REDIS_URL=f"redis://:{SECRET}@redis:6379/0",
        METERING_KAFKA_BOOTSTRAP="broker-9:9092",
    )
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert "broker-9:9092" in proc.stdout
    assert "configuration OK" in proc.stdout


def test_check_config_json_is_parseable_and_masked() -> None:
    proc = run_check_config("--json", METERING_API_TOKENS=json.dumps({SECRET: "org-1"}))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["api_tokens"] == "**********"
    assert data["topic_usage"] == "credits.usage.v1"


@pytest.mark.parametrize(
    ("var", "value", "reported"),
    [
        ("METERING_TOPIC_PARTITIONS", "0", "METERING_TOPIC_PARTITIONS"),
        ("METERING_TOPIC_PARTITIONS", "many", "METERING_TOPIC_PARTITIONS"),
        ("METERING_KAFKA_SECURITY_PROTOCOL", "CARRIER_PIGEON", "METERING_KAFKA_SECURITY_PROTOCOL"),
        ("METERING_TIERS", "{}", "METERING_TIERS"),
        ("METERING_TIERS", '{"pro": -5}', "METERING_TIERS"),
        ("METERING_HTTP_PORT", "70000", "METERING_HTTP_PORT"),
        ("METERING_STACK_EXTERNAL", "perhaps", "METERING_STACK_EXTERNAL"),
    ],
)
def test_bad_value_is_a_clear_error_and_nonzero_exit(var: str, value: str, reported: str) -> None:
    proc = run_check_config(**{var: value})
    assert proc.returncode != 0
    assert "invalid configuration" in proc.stderr
    assert reported in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cross_field_errors_are_reported() -> None:
    proc = run_check_config(METERING_TOPIC_ADMIN="credits.usage.v1")
    assert proc.returncode != 0
    assert "topic names must be distinct" in proc.stderr

    proc = run_check_config(METERING_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT")
    assert proc.returncode != 0
    assert "SASL needs" in proc.stderr


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"METERING_API_TOKENS": "not json"}, "METERING_API_TOKENS: Value error, must be JSON"),
        ({"METERING_API_TOKENS": "[1, 2]"}, "must be a JSON object"),
        ({"METERING_API_TOKENS": '{"t": 7}'}, 'every entry must be "token"'),
        ({"METERING_API_TOKENS": '{"t": "a\\u0000"}'}, "valid id"),
        ({"METERING_TIERS": '{"pro": '}, "METERING_TIERS: not valid JSON"),
        ({"METERING_REDIS_KEY_PREFIX": "m{x}"}, "METERING_REDIS_KEY_PREFIX"),
    ],
)
def test_check_config_rejects_bad_json_settings_readably(env: dict[str, str], needle: str) -> None:
    done = run_check_config(**env)
    assert done.returncode == 2, done.stdout
    assert needle in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert "configuration OK" not in done.stdout


def test_check_config_never_echoes_a_malformed_token_value() -> None:
    done = run_check_config(METERING_API_TOKENS=f"{{{SECRET}")
    assert done.returncode == 2
    assert SECRET not in done.stderr + done.stdout
