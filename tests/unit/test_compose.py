"""docker-compose.yml and deploy/Dockerfile stay wired to real settings (Docker cannot run here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "KEY=value" list form
        return dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_every_metering_variable_is_a_real_setting(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    seen = []
    for name, service in compose["services"].items():
        for var in _environment(service):
            if var.startswith("METERING_"):
                seen.append(var)
                field = var.removeprefix("METERING_").lower()
                assert field in fields, f"{name}: {var} is not a Settings field"
    assert "METERING_KAFKA_BOOTSTRAP" in seen
    assert "METERING_REDIS_URL" in seen
    assert "METERING_POSTGRES_DSN" in seen


def test_worker_settings_from_compose_validate(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in _environment(compose["services"]["worker"]).items():
        monkeypatch.setenv(var, value)
    settings = Settings()
    assert settings.kafka_bootstrap == "kafka:9092"
    assert "@postgres:5432/" in settings.postgres_dsn.get_secret_value()
    assert settings.redis_url.get_secret_value().startswith("redis://redis:6379")


def test_worker_needs_kafka_redis_and_postgres(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker = services["worker"]
    depends = worker["depends_on"]
    deps = set(depends) if isinstance(depends, (list, dict)) else set()
    assert {"kafka", "redis", "postgres"} <= deps
    assert {"kafka", "redis", "postgres"} <= set(services)
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / worker["build"]["dockerfile"]).exists()


def test_kafka_is_official_kraft_image_and_redis_never_evicts(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    env = _environment(kafka)
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    redis_cmd = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in redis_cmd
    assert "--maxmemory-policy noeviction" in redis_cmd


def test_dockerfile_runs_worker_as_non_root() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0].startswith("FROM python:3.11-slim")
    users = [line.split(None, 1)[1] for line in lines if line.upper().startswith("USER ")]
    assert users, "the image must switch to an unprivileged USER"
    final_user = users[-1].split(":")[0]
    assert final_user not in ("root", "0")
    assert any(re.match(r"RUN .*pip install \.", line) for line in lines)
    entry = next(line for line in lines if line.startswith("ENTRYPOINT"))
    cmd = next(line for line in lines if line.startswith("CMD"))
    assert '"metering"' in entry and '"worker"' in cmd
