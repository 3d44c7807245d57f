"""Idempotent Kafka producer for effects (control, notifications, billing) and dead letters.

Publishing is at-least-once: a crash after Kafka acknowledged a message but before the outbox
was acknowledged re-publishes it on restart. Every effect message carries the org-wide effect
sequence number in the ``metering.seq`` header (and TaskControl its per-member ``seq``), so a
consumer drops what it has seen. Dead letters carry their source coordinates, which identify
them the same way. See docs/delivery.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from schemas.encode import (
    HEADER_ERROR_CODE,
    HEADER_ERROR_DETAIL,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
)
from worker import metrics
from worker.config import Settings
from worker.connections import kafka_client_kwargs
from worker.contract import Engine
from worker.effects import Effect
from worker.messages import HEADER_SEQ, OutMessage, RawLookup, RawSource, dlq_message

log = logging.getLogger(__name__)

__all__ = [
    "HEADER_ERROR_CODE",
    "HEADER_ERROR_DETAIL",
    "HEADER_SEQ",
    "HEADER_SOURCE_OFFSET",
    "HEADER_SOURCE_PARTITION",
    "HEADER_SOURCE_TOPIC",
    "EffectEncoder",
    "OutMessage",
    "Publisher",
    "RawSource",
    "dlq_message",
]
HEADER_TRUNCATED = "error.truncated"

# Bigger than any record the input topics accept, so a dead letter of an oversize input can
# still be sent (the broker's per-topic max.message.bytes has the last word).
_MAX_REQUEST_SIZE = 4 * 1024 * 1024


class EffectEncoder:
    """Turns engine effects into the SPEC section 6 messages."""

    def __init__(self, settings: Settings) -> None:
        self._s = settings

    def messages(self, effects: Iterable[Effect], raw: RawLookup | None = None) -> list[OutMessage]:
        """Messages for ``effects`` (ledger, usage and command records publish nothing, except
        rejected usage events and commands, which become dead letters; ``raw`` finds their
        original bytes)."""
        topics = self._s
        out: list[OutMessage] = []
        for e in effects:
            m = e.message(topics, raw)
            if m is not None:
                out.append(m)
        return out


CURRENT_STATE_ROUNDS = 5
"""Rounds of :meth:`Publisher.ensure_current_signals` before it gives up (logged)."""


class Publisher:
    """Idempotent producer (``enable_idempotence=True``, ``acks="all"``)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.encoder = EffectEncoder(settings)
        self._producer = AIOKafkaProducer(
            **kafka_client_kwargs(settings),
            enable_idempotence=True,
            acks="all",
            linger_ms=settings.producer_linger_ms,
            max_batch_size=512 * 1024,
            max_request_size=_MAX_REQUEST_SIZE,
        )

    @property
    def producer(self) -> AIOKafkaProducer:
        return self._producer

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, messages: Sequence[OutMessage]) -> Callable[[], Any]:
        """Hand ``messages`` to the producer; returns an awaitable-maker that waits for acks.

        Splitting hand-over and acknowledgement lets the caller overlap Kafka's round trip with
        the PostgreSQL transaction of the same batch.
        """
        futures: list[tuple[OutMessage, asyncio.Future[Any]]] = []
        for m in messages:
            fut = await self._producer.send(
                m.topic,
                value=m.value,
                key=m.key,
                headers=list(m.headers) or None,
                partition=m.partition,
            )
            futures.append((m, fut))

        async def wait() -> None:
            if not futures:
                return
            results = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
            published: dict[str, int] = defaultdict(int)
            forwarded: dict[str, int] = defaultdict(int)
            for (m, _), res in zip(futures, results, strict=True):
                if isinstance(res, BaseException):
                    if (
                        isinstance(res, (MessageSizeTooLargeError, RecordTooLargeError))
                        and m.is_dlq
                    ):
                        await self._send_truncated(m)
                        continue
                    raise res
                if m.is_dlq:
                    metrics.dlq(m.topic)
                elif m.partition is not None:
                    forwarded[m.topic] += 1
                else:
                    published[m.topic] += 1
            # Counted once per topic, not per message (a batch publishes hundreds).
            for topic, n in published.items():
                metrics.PUBLISHED_MESSAGES.labels(topic=topic).inc(n)
            for topic, n in forwarded.items():
                metrics.FORWARDED_MESSAGES.labels(topic=topic).inc(n)

        return wait

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        """Send and wait until Kafka acknowledged every message."""
        wait = await self.send(messages)
        await wait()

    async def ensure_current_signals(
        self, engine: Engine, published: Mapping[str, Mapping[str, int]]
    ) -> int:
        """Make the compacted control topic end on each member's current state.

        ``published`` holds, per org and member, the highest ``seq`` of the signals just
        acknowledged by Kafka. Compaction keeps the last record by offset, not by ``seq``, and
        a signal can be sent again after a newer one (a resend after a Kafka error, an outbox
        drained at start-up, a gap filled from another worker's outbox). So after every
        acknowledged publish the member's current state is read back: where it is newer than
        what was published, that state (the member's latest signal, byte for byte) is published
        now, after whatever was there. Every publisher does this after every publish, so the
        last record per key is always the current state: a state newer than the read is
        published by whoever made it, after the read. Returns how many were sent.
        """
        sent = 0
        todo = {org: dict(members) for org, members in published.items() if members}
        for _ in range(CURRENT_STATE_ROUNDS):
            if not todo:
                return sent
            messages: list[OutMessage] = []
            again: dict[str, dict[str, int]] = {}
            states = await engine.member_signals({org: list(ms) for org, ms in todo.items()})
            for org_id, members in todo.items():
                for mid, state in states.get(org_id, {}).items():
                    if state.member_seq > members[mid]:
                        messages.extend(self.encoder.messages([state]))
                        again.setdefault(org_id, {})[mid] = state.member_seq
            if messages:
                await self.publish(messages)
                sent += len(messages)
            todo = again
        if todo:
            log.warning("control topic: members still changing after %d rounds", len(todo))
        return sent

    async def _send_truncated(self, m: OutMessage) -> None:
        # The broker refused the original value with our headers on top of it; keep the
        # evidence (headers, key, a prefix of the value) rather than lose the dead letter.
        limit = self._settings.max_message_bytes
        log.warning("dead letter too large for %s, truncating value to %d bytes", m.topic, limit)
        fut = await self._producer.send(
            m.topic,
            value=m.value[:limit],
            key=m.key,
            headers=[*m.headers, (HEADER_TRUNCATED, str(len(m.value)).encode())],
        )
        await fut
        metrics.dlq(m.topic)
