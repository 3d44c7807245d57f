"""Consumer lag against the real broker: the ``metering lag`` table and the /metrics gauges."""

from __future__ import annotations

import asyncio
import io
import time

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from worker import cli, metrics
from worker.api import create_app
from worker.config import Settings
from worker.connections import kafka_client_kwargs
from worker.lag import LagMonitor, consumer_lag_source, group_lag, group_lag_source

# Messages produced per partition of the usage topic, and offsets the group commits.
PRODUCED = {0: 7, 1: 3, 2: 0, 3: 12, 4: 5, 5: 1}
COMMITTED = {0: 2, 1: 3, 3: 10, 4: 0}  # partitions 2 and 5: nothing committed


async def _produce(settings: Settings) -> None:
    producer = AIOKafkaProducer(**kafka_client_kwargs(settings), acks="all")
    await producer.start()
    try:
        for partition, n in PRODUCED.items():
            for i in range(n):
                await producer.send(
                    settings.topic_usage, f'{{"i": {i}}}'.encode(), partition=partition
                )
        await producer.flush()
    finally:
        await producer.stop()


async def _joined_consumer(settings: Settings) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        settings.topic_usage,
        **kafka_client_kwargs(settings),
        group_id=settings.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    deadline = time.monotonic() + 30
    while not consumer.assignment():
        assert time.monotonic() < deadline, "consumer never got an assignment"
        await consumer.getmany(timeout_ms=200)
    return consumer


def _gauge(topic: str, partition: int) -> float | None:
    return metrics.REGISTRY.get_sample_value(
        "metering_consumer_lag", {"topic": topic, "partition": str(partition)}
    )


async def test_lag_table_reports_end_minus_committed_per_partition(
    kafka_topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = kafka_topics
    assert settings.topic_partitions == len(PRODUCED)
    await _produce(settings)
    consumer = await _joined_consumer(settings)
    try:
        await consumer.commit(
            {TopicPartition(settings.topic_usage, p): off for p, off in COMMITTED.items()}
        )
        rows = await group_lag(settings)

        usage = {r.partition: r for r in rows if r.topic == settings.topic_usage}
        assert set(usage) == set(PRODUCED)
        for partition, produced in PRODUCED.items():
            row = usage[partition]
            assert row.end == produced
            assert row.committed == COMMITTED.get(partition)
            # Nothing committed: the group starts from the earliest offset, all is lag.
            assert row.lag == produced - COMMITTED.get(partition, 0)
            assert row.member is not None and settings.client_id in row.member
        admin_rows = [r for r in rows if r.topic == settings.topic_admin]
        assert len(admin_rows) == settings.topic_partitions
        assert all(r.lag == 0 and r.end == 0 for r in admin_rows)

        # The CLI prints the same table (Settings come from the environment).
        monkeypatch.setenv("METERING_TOPIC_USAGE", settings.topic_usage)
        monkeypatch.setenv("METERING_TOPIC_ADMIN", settings.topic_admin)
        monkeypatch.setenv("METERING_CONSUMER_GROUP", settings.consumer_group)
        monkeypatch.setenv("METERING_POSTGRES_SCHEMA", "no_such_schema_for_lag_test")
        out = io.StringIO()
        status = await asyncio.to_thread(
            cli.main,
            ["lag", "--json", "--offsets", "kafka", "--topic", settings.topic_usage],
            out=out,
        )
        assert status == 0
        doc = orjson.loads(out.getvalue())
        assert doc["group"] == settings.consumer_group
        assert {p["partition"]: p["lag"] for p in doc["partitions"]} == {
            p: n - COMMITTED.get(p, 0) for p, n in PRODUCED.items()
        }
        assert doc["total_lag"] == sum(PRODUCED.values()) - sum(COMMITTED.values())

        text = io.StringIO()
        assert await asyncio.to_thread(cli.main, ["lag", "--offsets", "kafka"], out=text) == 0
        lines = text.getvalue().splitlines()
        assert lines[1].split() == ["TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "MEMBER"]
        row3 = next(
            ln.split()
            for ln in lines
            if ln.startswith(settings.topic_usage + "  ") and ln.split()[1] == "3"
        )
        assert row3[2:5] == ["10", "12", "2"]
    finally:
        await consumer.stop()


async def test_metrics_lag_drops_to_zero_when_drained(kafka_topics: Settings) -> None:
    settings = kafka_topics
    await _produce(settings)
    consumer = await _joined_consumer(settings)
    processed: dict[TopicPartition, int] = {}
    monitor = LagMonitor(consumer_lag_source(consumer, lambda: processed), interval=0.2)
    app = create_app(settings)
    try:
        # Before anything is processed the whole topic is lag.
        for tp in consumer.assignment():
            processed[tp] = 0
        lags = await monitor.refresh_once()
        assert {p: lags[(settings.topic_usage, p)] for p in PRODUCED} == PRODUCED
        assert _gauge(settings.topic_usage, 3) == 12

        # Drain, recording processed offsets the way the pipeline does (last offset + 1).
        remaining = sum(PRODUCED.values())
        deadline = time.monotonic() + 30
        while remaining:
            assert time.monotonic() < deadline, "could not drain the topic"
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                processed[tp] = records[-1].offset + 1
                remaining -= len(records)

        async with monitor:
            await asyncio.sleep(0.6)  # the background refresh runs even with no new batch
        assert all(_gauge(settings.topic_usage, p) == 0 for p in PRODUCED)
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/metrics")
            body = await resp.text()
        for p in PRODUCED:
            line = f'metering_consumer_lag{{partition="{p}",topic="{settings.topic_usage}"}} 0.0'
            assert line in body
        assert metrics.REGISTRY.get_sample_value(
            "metering_consumer_lag_updated_timestamp_seconds"
        ) == pytest.approx(time.time(), abs=10)

        # A process without the consumer (standalone API) sees the same once offsets are committed.
        await consumer.commit({tp: off for tp, off in processed.items()})
        lags = await group_lag_source(settings, topics=[settings.topic_usage])()
        assert lags == {(settings.topic_usage, p): 0 for p in PRODUCED}
    finally:
        await monitor.stop()
        await consumer.stop()
        for p in PRODUCED:
            metrics.forget_lag(settings.topic_usage, p)
