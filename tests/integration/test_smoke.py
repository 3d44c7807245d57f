"""Each service of the local stack is the real thing and is configured as the worker needs."""

from __future__ import annotations

import asyncio

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from redis.asyncio.cluster import RedisCluster

from devstack.stack import ensure_topics
from worker.config import Settings
from worker.connections import kafka_client_kwargs

DEBIT = """
local left = tonumber(redis.call('GET', KEYS[1]) or ARGV[2]) - tonumber(ARGV[1])
redis.call('SET', KEYS[1], left)
return left
"""


async def test_kafka_produce_consume_with_committed_group_offsets(kafka_topics: Settings) -> None:
    s = kafka_topics
    topic = s.topic_usage
    producer = AIOKafkaProducer(**kafka_client_kwargs(s), enable_idempotence=True, acks="all")
    await producer.start()
    try:
        sent = [
            await producer.send_and_wait(topic, f"e{i}".encode(), key=b"org-1") for i in range(5)
        ]
    finally:
        await producer.stop()
    tp = TopicPartition(topic, sent[0].partition)
    assert {m.partition for m in sent} == {tp.partition}  # same key, same partition
    assert [m.offset for m in sent] == [0, 1, 2, 3, 4]

    consumer = AIOKafkaConsumer(
        topic,
        **kafka_client_kwargs(s),
        group_id=s.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        async with asyncio.timeout(60):
            while len(got) < 5:
                batch = await consumer.getmany(timeout_ms=1000)
                got += [r.value for records in batch.values() for r in records if r.value]
        await consumer.commit({tp: 5})
    finally:
        await consumer.stop()
    assert got == [f"e{i}".encode() for i in range(5)]

    # A second client sees the group's committed offset: a restarted worker resumes there.
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(s))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(s.consumer_group)
    finally:
        await admin.close()
    assert offsets[tp].offset == 5

    resumed = AIOKafkaConsumer(
        topic, **kafka_client_kwargs(s), group_id=s.consumer_group, enable_auto_commit=False
    )
    await resumed.start()
    try:
        async with asyncio.timeout(30):
            while not resumed.assignment():
                await resumed.getmany(timeout_ms=200)
        assert await resumed.committed(tp) == 5
        assert await resumed.position(tp) == 5
    finally:
        await resumed.stop()


async def test_topics_have_spec_partitions_and_compacted_control(kafka_topics: Settings) -> None:
    s = kafka_topics
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(s))
    await admin.start()
    try:
        described = await admin.describe_topics([s.topic_usage, s.topic_control])
        assert [len(t["partitions"]) for t in described] == [s.topic_partitions] * 2
        resp = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, s.topic_control)]
        )
        configs = {c[0]: c[1] for c in resp[0].resources[0][4]}
        assert configs["cleanup.policy"] == "compact"
        assert await ensure_topics(s) == []  # idempotent: nothing left to create
    finally:
        await admin.close()


async def test_redis_lua_evalsha_survives_script_flush(redis: aioredis.Redis) -> None:
    script = redis.register_script(DEBIT)
    assert await script(keys=["m:{org-1}:bal"], args=[300, 1000]) == 700
    await redis.script_flush()
    # redis-py reloads the script on NOSCRIPT, as it must after a Redis restart or failover.
    assert await script(keys=["m:{org-1}:bal"], args=[200, 1000]) == 500
    sha = await redis.script_load(DEBIT)
    assert await redis.evalsha(sha, 1, "m:{org-1}:bal", 100, 1000) == 400
    assert await redis.get("m:{org-1}:bal") == "400"


async def test_redis_keeps_writes_durable_and_never_evicts(redis: aioredis.Redis) -> None:
    config = await redis.config_get("*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["maxmemory-policy"] == "noeviction"


async def test_redis_cluster_runs_hash_tagged_lua(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    info = await redis_cluster.cluster_info()
    assert info["cluster_state"] == "ok"
    assert len(redis_cluster.get_primaries()) == 3
    keys = [f"{redis_prefix}:{{org-{i}}}:bal" for i in range(6)]
    script = redis_cluster.register_script(DEBIT)
    for key in keys:
        assert await script(keys=[key], args=[1, 10]) == 9
    slots = {redis_cluster.keyslot(k) for k in keys}
    nodes = {redis_cluster.get_node_from_key(k).name for k in keys}
    assert len(slots) == 6 and len(nodes) > 1  # the scripts really ran on several masters


async def test_postgres_write_read_in_own_schema(pg_pool: asyncpg.Pool, pg_schema: str) -> None:
    async with pg_pool.acquire() as conn:
        await conn.execute("CREATE TABLE ledger (id bigint PRIMARY KEY, amount_mc bigint NOT NULL)")
        await conn.executemany(
            "INSERT INTO ledger (id, amount_mc) VALUES ($1, $2)", [(1, -500_000), (2, 250)]
        )
        assert await conn.fetchval("SELECT sum(amount_mc) FROM ledger") == -499_750
        assert await conn.fetchval("SELECT current_schema()") == pg_schema
        assert await conn.fetchval("SHOW fsync") == "on"
    async with pg_pool.acquire() as other:  # committed, so visible from another connection
        assert await other.fetchval("SELECT count(*) FROM ledger") == 2
