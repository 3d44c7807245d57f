"""Service failures under load: Redis crashed and restarted from its AOF, Redis emptied and
rebuilt from PostgreSQL, PostgreSQL stopped for 20 s, the Kafka broker restarted.

Each scenario runs the service it hurts as a private instance on a free port (built with the
stack's own classes: same flags as ``python -m devstack.stack up``), so crashing it never
disturbs anything else using the shared stack; the other services are the shared ones. Every
scenario restores its service, lets a worker finish, and checks the books like the crash
scenarios do.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from scenario_harness import (
    PrivateKafka,
    PrivatePostgres,
    PrivateRedis,
    Scenario,
    verify,
    wait_progress,
)

from bench.workload import WorkloadSpec
from devstack.stack import ensure_topics
from worker.config import Settings

pytestmark = pytest.mark.timeout(240)


def spec(events: int = 6_000) -> WorkloadSpec:
    return WorkloadSpec(
        orgs=4,
        members_per_org=5,
        events=events,
        prefix=f"v{uuid.uuid4().hex[:6]}",
        span_seconds=3 * 3600,
        pool_credits=4_000,
        duplicate_every=97,
    )


def tuned(settings: Settings, **extra: object) -> Settings:
    update: dict[str, object] = {
        "batch_max_records": 200,
        "batch_timeout_ms": 50,
        "shutdown_grace_seconds": 10.0,
        "unknown_grace_seconds": 60,
        "retry_backoff_max_seconds": 1.0,
    }
    update.update(extra)
    return settings.model_copy(update=update)


async def test_redis_crash_and_restart_from_aof(
    isolated_settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """Redis is SIGKILLed under load and restarted on its AOF (it may come back up to ~1 s
    behind PostgreSQL): the worker waits, recovers and the books are exact."""
    settings = tuned(isolated_settings, redis_url=SecretStr(private_redis.url))
    sc = Scenario(settings, tmp_path, spec())
    try:
        await sc.apply_setup()
        producing = asyncio.create_task(sc.stream_usage(chunks=12, pause=0.4))
        w = await sc.worker().start()
        await wait_progress(settings, sc.input_topics, len(sc.setup) + 1_000, [w])
        private_redis.crash()
        await asyncio.sleep(2)
        await private_redis.start()
        await producing
        await sc.drain(timeout=120)
        await sc.stop_all()
        await verify(sc)
    finally:
        await sc.kill_all()


async def test_redis_emptied_is_rebuilt_from_postgres_on_restart(
    isolated_settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """Redis loses everything between two worker runs: the next worker sees Redis behind
    PostgreSQL, rebuilds the orgs from the ledger and carries on with exact balances."""
    settings = tuned(isolated_settings, redis_url=SecretStr(private_redis.url))
    sc = Scenario(settings, tmp_path, spec())
    try:
        await sc.apply_setup()
        half = len(sc.usage) // 2
        await sc.produce_usage(sc.usage[:half])
        w = await sc.worker().start()
        await sc.drain()
        assert await w.terminate() == 0, w.log_tail()
        client = Redis.from_url(private_redis.url)
        try:
            await client.flushall()
            assert await client.dbsize() == 0
        finally:
            await client.aclose()
        await sc.produce_usage(sc.usage[half:])
        await sc.worker().start()
        await sc.drain()
        await sc.stop_all()
        await verify(sc)
    finally:
        await sc.kill_all()


async def test_redis_restarted_empty_under_load(
    isolated_settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """Redis crashes under load and comes back with no data at all (a lost volume) while the
    worker keeps running: the worker must notice and rebuild, not treat the orgs as unknown."""
    settings = tuned(isolated_settings, redis_url=SecretStr(private_redis.url))
    sc = Scenario(settings, tmp_path, spec())
    try:
        await sc.apply_setup()
        producing = asyncio.create_task(sc.stream_usage(chunks=12, pause=0.4))
        w = await sc.worker().start()
        await wait_progress(settings, sc.input_topics, len(sc.setup) + 1_000, [w])
        private_redis.crash()
        private_redis.wipe()
        await asyncio.sleep(1)
        await private_redis.start()
        await producing
        await sc.drain(timeout=120)
        await sc.stop_all()
        await verify(sc)
    finally:
        await sc.kill_all()


async def test_postgres_stopped_for_20_seconds_under_load(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    """PostgreSQL goes away for 20 s while events keep arriving: consumption pauses with
    backoff, resumes when it is back, and nothing is lost or charged twice."""
    pg = PrivatePostgres(tmp_path)
    await pg.start()
    try:
        settings = tuned(
            isolated_settings,
            postgres_dsn=SecretStr(pg.dsn),
            postgres_schema=f"s_{uuid.uuid4().hex[:8]}",
            postgres_sslmode="disable",
        )
        sc = Scenario(settings, tmp_path, spec())
        try:
            await sc.apply_setup()
            producing = asyncio.create_task(sc.stream_usage(chunks=12, pause=0.5))
            w = await sc.worker().start()
            await wait_progress(settings, sc.input_topics, len(sc.setup) + 500, [w])
            await pg.stop()
            await asyncio.sleep(20)
            assert w.alive, f"the worker died while PostgreSQL was down:\n{w.log_tail()}"
            await pg.start()
            await producing
            await sc.drain(timeout=120)
            await sc.stop_all()
            await verify(sc)
        finally:
            await sc.kill_all()
    finally:
        await pg.stop()


async def test_kafka_broker_restarted_under_load(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    """The broker restarts under load: the worker reconnects, rejoins and finishes exactly."""
    kafka = PrivateKafka(tmp_path, isolated_settings)
    await kafka.start()
    try:
        settings = tuned(
            isolated_settings.model_copy(update={"kafka_bootstrap": kafka.settings.kafka_bootstrap})
        )
        await ensure_topics(settings)
        sc = Scenario(settings, tmp_path, spec())
        try:
            await sc.apply_setup()
            await sc.produce_usage(sc.usage[: len(sc.usage) // 2])
            w = await sc.worker().start()
            await wait_progress(settings, sc.input_topics, len(sc.setup) + 500, [w])
            await kafka.stop()
            await asyncio.sleep(2)
            await kafka.start()
            await sc.produce_usage(sc.usage[len(sc.usage) // 2 :])
            await sc.drain(timeout=120)
            assert w.alive, f"the worker died with the broker:\n{w.log_tail()}"
            await sc.stop_all()
            await verify(sc)
        finally:
            await sc.kill_all()
    finally:
        kafka.cleanup()
