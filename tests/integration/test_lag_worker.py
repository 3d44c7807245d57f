"""Acceptance of the operations tooling against the real worker: admin commands published by
the CLI, usage produced to Kafka, ``metering lag`` before and after, ``/metrics`` lag falling to
0 once the worker has drained the topics, and the API showing what the worker computed."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import socket
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from schemas.encode import encode_usage_event
from worker import cli, metrics
from worker.config import Settings
from worker.connections import kafka_client_kwargs
from worker.lag import group_lag, postgres_offsets
from worker.runner import make_engine, run_worker

USAGE_PER_MEMBER = 40
MEMBERS = ("ann", "ben", "cat")
DRAIN_TIMEOUT = 90.0


@pytest.fixture
def env(isolated_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The CLI reads the same isolated topics, group, Redis db and schema from the environment."""
    s = isolated_settings
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
    ):
        monkeypatch.setenv(f"METERING_{field.upper()}", str(getattr(s, field)))
    monkeypatch.setenv("METERING_REDIS_URL", s.redis_url.get_secret_value())
    yield s


def _cli(*argv: str) -> dict[str, Any]:
    out = io.StringIO()
    status = cli.main([*argv, "--json"], out=out)
    assert status == 0, argv
    doc: dict[str, Any] = orjson.loads(out.getvalue())
    return doc


async def _produce_usage(settings: Settings, org_id: str) -> int:
    producer = AIOKafkaProducer(**kafka_client_kwargs(settings), acks="all")
    await producer.start()
    now_ms = int(time.time() * 1000)
    n = 0
    try:
        for i in range(USAGE_PER_MEMBER):
            for member in MEMBERS:
                value = encode_usage_event(
                    event_id=f"ev-{uuid.uuid4().hex}",
                    org_id=org_id,
                    member_id=member,
                    task_id=f"task-{i}",
                    credits_mc=12_500,
                    occurred_at_ms=now_ms - 60_000 + i,
                )
                # Random keys spread one org over every partition.
                await producer.send(settings.topic_usage, value, key=uuid.uuid4().bytes)
                n += 1
        await producer.flush()
    finally:
        await producer.stop()
    return n


def _lag_gauges(topic: str, partitions: int) -> list[float | None]:
    return [
        metrics.REGISTRY.get_sample_value(
            "metering_consumer_lag", {"topic": topic, "partition": str(p)}
        )
        for p in range(partitions)
    ]


async def test_lag_table_metrics_and_dashboard_with_the_running_worker(env: Settings) -> None:
    settings = env
    org = f"org-{uuid.uuid4().hex[:6]}"
    at = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)).isoformat()

    # Admin commands through the CLI's real publish path.
    created = await asyncio.to_thread(_cli, "org", "create", org, "--anchor-day", "1", "--at", at)
    assert created["published"]["topic"] == settings.topic_admin
    for member in MEMBERS:
        await asyncio.to_thread(_cli, "member", "add", org, member, "--tier", "pro", "--at", at)
    await asyncio.to_thread(_cli, "pool", "purchase", org, "250", "--at", at)
    produced = await _produce_usage(settings, org)

    # Before the worker runs, every message is lag (nothing committed anywhere).
    before = await asyncio.to_thread(_cli, "lag")
    by_topic: dict[str, int] = {}
    for row in before["partitions"]:
        by_topic[row["topic"]] = by_topic.get(row["topic"], 0) + row["lag"]
        assert row["committed"] is None and row["member"] is None
    assert by_topic == {settings.topic_usage: produced, settings.topic_admin: 2 + len(MEMBERS)}

    engine = make_engine(settings)
    stop = asyncio.Event()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    worker_settings = settings.model_copy(
        update={"http_port": free_port, "api_tokens": SecretStr('{"t": "*"}')}
    )
    worker = asyncio.create_task(run_worker(worker_settings, engine=engine, stop=stop))
    try:
        # Drained: the worker's own offsets reach the end of every partition.
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            assert not worker.done(), worker.exception() if worker.done() else None
            rows = await group_lag(settings, processed=await _pg_offsets(settings))
            if rows and all(r.lag == 0 for r in rows):
                break
            assert time.monotonic() < deadline, [r.as_dict() for r in rows if r.lag]
            await asyncio.sleep(0.5)

        # /metrics of the worker process falls to 0 without any new batch (refresh <= 5 s).
        deadline = time.monotonic() + 15
        while _lag_gauges(settings.topic_usage, settings.topic_partitions) != [0.0] * (
            settings.topic_partitions
        ):
            assert time.monotonic() < deadline, _lag_gauges(
                settings.topic_usage, settings.topic_partitions
            )
            await asyncio.sleep(0.25)
        # The worker process itself serves the probes, /metrics and the read API.
        base = f"http://127.0.0.1:{worker_settings.http_port}"
        async with ClientSession() as http:
            assert (await http.get(f"{base}/healthz")).status == 200
            ready = await http.get(f"{base}/readyz")
            assert (await ready.json())["checks"] == {
                "postgres": True,
                "redis": True,
                "kafka": True,
            }
            assert ready.status == 200
            body = await (await http.get(f"{base}/metrics")).text()
            for p in range(settings.topic_partitions):
                line = f'metering_consumer_lag{{partition="{p}",topic="{settings.topic_usage}"}}'
                assert f"{line} 0.0" in body
            assert "metering_worker_up 1.0" in body
            # Every effect the drained batches left in Redis has been acknowledged.
            assert "metering_outbox_depth 0.0" in body
            resp = await http.get(
                f"{base}/v1/orgs/{org}/credits", headers={"Authorization": "Bearer t"}
            )
            assert resp.status == 200
            doc = await resp.json()
            assert (await http.get(f"{base}/v1/orgs/{org}/credits")).status == 401

        # `metering org show` reads the same document from Redis.
        shown = await asyncio.to_thread(_cli, "org", "show", org)
        assert shown == doc

        # The table after draining, from the same CLI an operator runs.
        after = await asyncio.to_thread(_cli, "lag")
        assert after["total_lag"] == 0
        for r in after["partitions"]:
            # Partitions that never had a message have nothing to commit.
            assert r["committed"] == r["end"] or (r["end"] == 0 and r["committed"] is None), r

        # 40 x 12.5 = 500 credits each: first the pro allocation (prorated: they joined 10
        # minutes ago), then the 250 purchased pool credits, the rest becomes debt.
        members = {m["member_id"]: m for m in doc["members"]}
        assert set(members) == set(MEMBERS)
        for m in members.values():
            assert Decimal(m["used"]) + Decimal(m["negative_balance"]) == Decimal(500)
        assert doc["pool"]["balance"] == "0"
        assert doc["pool"]["used_this_cycle"] == "250"
        assert any(m["state"] == "paused" for m in members.values())
    finally:
        stop.set()
        await asyncio.wait_for(worker, 60)
        await engine.client.aclose()
        for p in range(settings.topic_partitions):
            metrics.forget_lag(settings.topic_usage, p)
            metrics.forget_lag(settings.topic_admin, p)


async def _pg_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    try:
        return await postgres_offsets(settings)
    except Exception:  # the schema is created by the worker's first migration
        return {}
