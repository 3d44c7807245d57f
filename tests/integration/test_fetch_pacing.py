"""Fetch pacing against the real broker and the installed aiokafka: the limits the pipeline
sets are the ones the next fetch request carries."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from worker.config import Settings
from worker.connections import kafka_client_kwargs
from worker.pipeline.pacing import (
    FLOWING_WAIT_MS,
    IDLE_MIN_BYTES,
    IDLE_WAIT_MS,
    FetchPacing,
)

# Long enough that a record held for company would be noticed, whatever the machine.
HELD_MS = 3000


async def test_an_idle_consumer_is_answered_on_the_first_record(kafka_topics: Settings) -> None:
    s = kafka_topics
    tp = TopicPartition(s.topic_usage, 0)
    # Built to hold every fetch for company (64 KiB or 3 s): only the pacing makes a lone
    # record come back at once.
    consumer = AIOKafkaConsumer(
        **kafka_client_kwargs(s),
        enable_auto_commit=False,
        fetch_max_wait_ms=HELD_MS,
        fetch_min_bytes=64 * 1024,
    )
    await consumer.start()
    producer = AIOKafkaProducer(**kafka_client_kwargs(s), acks="all")
    await producer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        pacing = FetchPacing(s.fetch_min_bytes)
        pacing.attach(consumer)
        assert not pacing.flowing
        assert FetchPacing.limits_of(consumer._fetcher) == (IDLE_WAIT_MS, IDLE_MIN_BYTES)
        # The request sent at start holds for HELD_MS; let it end, so that the one in flight
        # carries the idle limits.
        assert await consumer.getmany(timeout_ms=HELD_MS + 1000) == {}

        await producer.send_and_wait(s.topic_usage, b"one", partition=0)
        sent = time.monotonic()
        got = await consumer.getmany(tp, timeout_ms=HELD_MS * 2)
        waited_ms = (time.monotonic() - sent) * 1000
        assert [r.value for r in got.get(tp, [])] == [b"one"]
        assert waited_ms < HELD_MS / 2, f"a lone record waited {waited_ms:.0f} ms for company"

        # Traffic flows: the next requests wait a few milliseconds for more.
        pacing.observe(5)
        assert pacing.flowing
        assert FetchPacing.limits_of(consumer._fetcher) == (FLOWING_WAIT_MS, s.fetch_min_bytes)
        pacing.observe(1)  # a lone record: idle again
        assert not pacing.flowing
        assert FetchPacing.limits_of(consumer._fetcher) == (IDLE_WAIT_MS, IDLE_MIN_BYTES)
    finally:
        await producer.stop()
        await asyncio.wait_for(consumer.stop(), 10)


async def test_a_consumer_without_a_fetcher_is_refused(kafka_topics: Settings) -> None:
    consumer = AIOKafkaConsumer(**kafka_client_kwargs(kafka_topics))  # never started
    pacing = FetchPacing(kafka_topics.fetch_min_bytes)
    try:
        with pytest.raises(RuntimeError, match="fetch limits"):
            pacing.attach(consumer)
        pacing.observe(10)  # not attached: nothing to set, nothing raised
        assert not pacing.flowing
    finally:
        await consumer.stop()
