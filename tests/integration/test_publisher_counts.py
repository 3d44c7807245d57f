"""What ops read about published messages: the counters move by what Kafka acknowledged."""

from __future__ import annotations

from worker import metrics
from worker.config import Settings
from worker.effects import Signal
from worker.publisher import OutMessage, Publisher


def _count(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_published_forwarded_and_signal_counters(kafka_topics: Settings) -> None:
    s = kafka_topics
    before = (
        _count("metering_published_messages_total", topic=s.topic_control),
        _count("metering_forwarded_messages_total", topic=s.topic_usage),
        _count("metering_signals_total", signal="pause", reason="pool_exhausted"),
    )
    publisher = Publisher(s)
    await publisher.start()
    try:
        control = [OutMessage(s.topic_control, f"o|m{i}".encode(), b"{}") for i in range(3)]
        forward = [OutMessage(s.topic_usage, b"o", b"{}", partition=0)]
        await publisher.publish([*control, *forward])
    finally:
        await publisher.stop()
    for _ in range(2):
        Signal(1, "o", "m0", "pause", "pool_exhausted", 1, 0).count()
    after = (
        _count("metering_published_messages_total", topic=s.topic_control),
        _count("metering_forwarded_messages_total", topic=s.topic_usage),
        _count("metering_signals_total", signal="pause", reason="pool_exhausted"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 1, 2]
