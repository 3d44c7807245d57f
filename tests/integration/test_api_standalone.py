"""``metering api`` as its own process: serves the org's live document from Redis, reports the
group's lag on /metrics, is ready only with its dependencies, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import ClientError, ClientSession
from aiokafka import AIOKafkaProducer
from api_orgs import build_model, build_redis_engine
from pydantic import SecretStr

from worker import views
from worker.config import Settings
from worker.connections import kafka_client_kwargs

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-api-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(settings: Settings, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    for field in (
        "topic_usage",
        "topic_admin",
        "topic_control",
        "topic_notifications",
        "topic_billing",
        "topic_usage_dlq",
        "topic_admin_dlq",
        "consumer_group",
        "client_id",
        "postgres_schema",
        "kafka_bootstrap",
    ):
        env[f"METERING_{field.upper()}"] = str(getattr(settings, field))
    env["METERING_REDIS_URL"] = settings.redis_url.get_secret_value()
    env["METERING_POSTGRES_DSN"] = settings.postgres_dsn.get_secret_value()
    env["METERING_API_TOKENS"] = orjson.dumps({TOKEN: "acme"}).decode()
    env["METERING_HTTP_PORT"] = str(port)
    env["METERING_LOG_FORMAT"] = "json"
    return env


async def _wait_http(session: ClientSession, url: str, proc: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.returncode is None, "metering api exited early"
        try:
            resp = await session.get(url)
            if resp.status == 200:
                return
        except ClientError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer"
        await asyncio.sleep(0.2)


async def test_standalone_api_process(isolated_settings: Settings) -> None:
    settings = isolated_settings
    engine, _ = await build_redis_engine(
        settings.model_copy(update={"api_tokens": SecretStr("{}")})
    )
    await engine.client.aclose()
    producer = AIOKafkaProducer(**kafka_client_kwargs(settings))
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(settings.topic_usage, b"{}", partition=1, key=b"k%d" % i)
    finally:
        await producer.stop()

    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "api",
        cwd=ROOT,
        env=_env(settings, port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with ClientSession() as session:
            await _wait_http(session, f"{base}/healthz", proc)
            await _wait_http(session, f"{base}/readyz", proc)
            ready = await (await session.get(f"{base}/readyz")).json()
            assert ready["checks"] == {"redis": True, "postgres": True, "kafka": True}

            resp = await session.get(
                f"{base}/v1/orgs/acme/credits", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert resp.status == 200
            assert orjson.loads(await resp.read()) == views.dashboard(build_model()[0], "acme")
            forbidden = await session.get(
                f"{base}/v1/orgs/globex/credits", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert forbidden.status == 403

            # Nothing consumed by the group yet: partition 1 of the usage topic lags by 5.
            line = f'metering_consumer_lag{{partition="1",topic="{settings.topic_usage}"}} 5.0'
            deadline = time.monotonic() + 20
            while line not in (body := await (await session.get(f"{base}/metrics")).text()):
                assert time.monotonic() < deadline, body[-3000:]
                await asyncio.sleep(0.5)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-3000:]
    logs = [orjson.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert any(r["msg"] == "api listening" and r["port"] == port for r in logs)
    assert TOKEN not in err.decode()
