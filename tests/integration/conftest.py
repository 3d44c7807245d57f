"""Fixtures for tests that use the real services started by ``python -m devstack.stack up``.

Isolation, so several test runs can share one local stack:

- Redis: each pytest session leases its own logical database (1..15) and ``redis`` flushes it
  before every test; ``redis_cluster`` uses a unique key prefix instead (a cluster has only db 0).
- PostgreSQL: ``pg_schema`` creates a fresh schema per test and drops it afterwards.
- Kafka: ``kafka_topics`` creates uniquely named topics (and a unique consumer group) per test.

``isolated_settings`` combines all of them into one ``Settings`` copy for end-to-end tests.
A service that does not answer fails every test that needs it; it never skips.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from devstack.stack import (
    check_services,
    delete_topics,
    ensure_topics,
    redis_url_with_db,
    topic_names,
)
from worker.config import DEFAULT_REDIS_CLUSTER_PORTS, Settings

if TYPE_CHECKING:
    from scenario_harness import PrivateRedis

STACK_HINT = (
    "start the local stack with `.venv/bin/python -m devstack.stack up` (or `make stack-up`)"
)
CLUSTER_HINT = (
    "start the Redis Cluster with `.venv/bin/python -m devstack.stack up --cluster` "
    "(`make stack-up` does)"
)
_LEASE_KEY = "metering:test:db-lease:{}"
_LEASE_SECONDS = 3600


def unique_name(prefix: str = "t") -> str:
    """A short unique identifier usable in topic, schema and key names."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session", autouse=True)
async def services_answer(settings: Settings) -> None:
    """Fail (never skip) the integration tests at once when a service does not answer."""
    problems = await check_services(settings, timeout_s=10.0)
    failed = {name: err for name, err in problems.items() if err is not None}
    if failed:
        lines = "\n".join(f"  {name}: {err}" for name, err in failed.items())
        pytest.fail(f"services not reachable:\n{lines}\n{STACK_HINT}", pytrace=False)


# --- Redis ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def redis_db(settings: Settings) -> AsyncIterator[int]:
    """A Redis logical database leased by this pytest session (concurrent runs get others)."""
    admin = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    owner = f"{socket.gethostname()}:{os.getpid()}"
    leased: int | None = None
    try:
        for db in range(1, 16):
            if await admin.set(_LEASE_KEY.format(db), owner, nx=True, ex=_LEASE_SECONDS):
                leased = db
                break
        if leased is None:
            pytest.fail(
                "all Redis test databases 1..15 are leased by other test runs; "
                f"delete the keys {_LEASE_KEY.format('*')} in db 0 if those runs are gone",
                pytrace=False,
            )
        yield leased
    finally:
        if leased is not None:
            await admin.delete(_LEASE_KEY.format(leased))
        await admin.aclose()


@pytest.fixture
def redis_url(settings: Settings, redis_db: int) -> str:
    """URL of this session's Redis test database."""
    return redis_url_with_db(settings.redis_url.get_secret_value(), redis_db)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """Client (``decode_responses=True``) on this session's test database, flushed first."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def redis_prefix() -> str:
    """A unique Redis key prefix (use as ``Settings.redis_key_prefix``)."""
    return unique_name("t")


@pytest.fixture(scope="session")
def redis_cluster_url(settings: Settings) -> str:
    """The Redis Cluster to test against: ``METERING_REDIS_URL`` when ``METERING_REDIS_CLUSTER``
    is set, else the local stack's cluster (``up --cluster``)."""
    if settings.redis_cluster:
        return settings.redis_url.get_secret_value()
    return f"redis://127.0.0.1:{DEFAULT_REDIS_CLUSTER_PORTS[0]}/0"


@pytest.fixture
async def redis_cluster(redis_cluster_url: str, redis_prefix: str) -> AsyncIterator[RedisCluster]:
    """Client (bytes, as the engine needs) on the Redis Cluster; keys under ``redis_prefix``
    are removed after the test."""
    client = RedisCluster.from_url(redis_cluster_url, decode_responses=False)
    try:
        await client.initialize()
    except Exception as exc:
        await client.aclose()
        pytest.fail(f"Redis Cluster {redis_cluster_url} not reachable: {exc}; {CLUSTER_HINT}")
    try:
        yield client
    finally:
        try:
            keys = [k async for k in client.scan_iter(match=f"{redis_prefix}*", count=1000)]
            for key in keys:  # one by one: a multi-key DEL must not span slots
                await client.delete(key)
        finally:
            await client.aclose()


@pytest.fixture
def cluster_settings(settings: Settings, redis_cluster_url: str, redis_prefix: str) -> Settings:
    """Settings pointing at the Redis Cluster with a unique key prefix."""
    return settings.model_copy(
        update={
            "redis_url": type(settings.redis_url)(redis_cluster_url),
            "redis_cluster": True,
            "redis_key_prefix": redis_prefix,
        }
    )


# --- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture
async def pg_schema(settings: Settings) -> AsyncIterator[str]:
    """A fresh, uniquely named schema, dropped (with everything in it) after the test."""
    schema = unique_name("t_")
    conn = await asyncpg.connect(settings.postgres_dsn.get_secret_value())
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        yield schema
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


@pytest.fixture
async def pg_pool(settings: Settings, pg_schema: str) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool whose connections have ``search_path`` set to ``pg_schema``."""
    pool = await asyncpg.create_pool(
        settings.postgres_dsn.get_secret_value(),
        min_size=1,
        max_size=4,
        server_settings={"search_path": pg_schema},
    )
    try:
        yield pool
    finally:
        await pool.close()


# --- Kafka ---------------------------------------------------------------------------------


@pytest.fixture
def topic_prefix() -> str:
    """A unique prefix for this test's Kafka topic names and consumer group."""
    return unique_name("t")


@pytest.fixture
async def kafka_topics(settings: Settings, topic_prefix: str) -> AsyncIterator[Settings]:
    """Settings whose seven SPEC topics are fresh ``<prefix>.credits.*`` topics on the broker.

    Created with ``Settings.topic_partitions`` partitions (control topic compacted), with a
    unique consumer group and client id; the topics are deleted after the test.
    """
    update: dict[str, object] = {
        field: f"{topic_prefix}.{name}" for field, name in topic_names(settings).items()
    }
    update["consumer_group"] = f"{topic_prefix}.{settings.consumer_group}"
    update["client_id"] = f"{topic_prefix}.{settings.client_id}"
    scoped = settings.model_copy(update=update)
    await ensure_topics(scoped)
    try:
        yield scoped
    finally:
        await delete_topics(scoped, list(topic_names(scoped).values()))


@pytest.fixture
def isolated_settings(
    kafka_topics: Settings, redis_url: str, redis: aioredis.Redis, pg_schema: str
) -> Settings:
    """One ``Settings`` for an end-to-end test: own topics and group, flushed Redis db, schema."""
    return kafka_topics.model_copy(
        update={
            "redis_url": type(kafka_topics.redis_url)(redis_url),
            "postgres_schema": pg_schema,
        }
    )


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    """A redis-server of the test's own (AOF everysec), to crash, restart or restore at will."""
    from scenario_harness import PrivateRedis

    redis = PrivateRedis(tmp_path)
    await redis.start()
    try:
        yield redis
    finally:
        redis.stop()
