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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from schemas.encode import (
    HEADER_ERROR_CODE,
    HEADER_ERROR_DETAIL,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    control_key,
    dlq_headers,
    encode_admin_command,
    encode_invoice,
    encode_notification,
    encode_refill_request,
    encode_task_control,
    encode_usage_event,
)
from worker import metrics
from worker.config import Settings
from worker.connections import kafka_client_kwargs
from worker.contract import Engine

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
HEADER_SEQ = "metering.seq"
"""Org-wide effect sequence number: the dedupe key for consumers of re-published effects."""
HEADER_TRUNCATED = "error.truncated"

# Bigger than any record the input topics accept, so a dead letter of an oversize input can
# still be sent (the broker's per-topic max.message.bytes has the last word).
_MAX_REQUEST_SIZE = 4 * 1024 * 1024


@dataclass(slots=True, frozen=True)
class OutMessage:
    """One record to publish."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()

    @property
    def is_dlq(self) -> bool:
        return any(h[0] == HEADER_ERROR_CODE for h in self.headers)


def _split_source(source: object) -> tuple[str, int]:
    text = str(source or "")
    topic, _, part = text.rpartition(":")
    try:
        return topic, int(part)
    except ValueError:
        return text, -1


def dlq_message(
    topic: str,
    *,
    key: bytes | None,
    value: bytes,
    code: str,
    detail: str,
    source_topic: str,
    source_partition: int,
    source_offset: int,
) -> OutMessage:
    """A dead letter: the original key and value with the SPEC section 6 headers."""
    return OutMessage(
        topic=topic,
        key=key,
        value=value,
        headers=tuple(
            dlq_headers(
                code=code,
                detail=detail,
                topic=source_topic,
                partition=source_partition,
                offset=source_offset,
            )
        ),
    )


class RawSource(NamedTuple):
    """Where a message came from, and its original bytes (for a dead letter); one per consumed
    record, so a named tuple (cheap to build) rather than a frozen dataclass."""

    key: bytes | None
    value: bytes
    topic: str
    partition: int
    offset: int


RawLookup = Callable[[str], RawSource | None]
"""``event_id``/``command_id`` -> the original message, when still at hand."""


class EffectEncoder:
    """Turns engine effects into the SPEC section 6 messages."""

    def __init__(self, settings: Settings) -> None:
        self._s = settings

    def messages(
        self,
        org_id: str,
        effects: Iterable[Mapping[str, Any]],
        raw: RawLookup | None = None,
    ) -> list[OutMessage]:
        """Messages for ``effects`` (ledger, usage and command records publish nothing, except
        rejected usage events and commands, which become dead letters)."""
        s = self._s
        out: list[OutMessage] = []
        org_key = org_id.encode()
        for e in effects:
            kind = e.get("kind")
            # A member's current state re-sent as such has no org-wide seq of its own; the
            # TaskControl's member seq is what its consumers order by.
            seq = e.get("seq")
            seq_header = ((HEADER_SEQ, str(seq).encode()),) if seq is not None else ()
            if kind == "signal":
                value = encode_task_control(
                    signal=str(e["signal"]),
                    org_id=org_id,
                    member_id=str(e["member_id"]),
                    reason=str(e.get("reason")),
                    seq=int(e["member_seq"]),
                    issued_at_ms=int(e["issued_at_ms"]),
                )
                key = control_key(org_id, str(e["member_id"]))
                out.append(OutMessage(s.topic_control, key, value, seq_header))
            elif kind == "notification":
                detail = e.get("detail") or {}
                value = encode_notification(
                    type=str(e["type"]),
                    org_id=org_id,
                    member_id=_opt(e.get("member_id")),
                    detail=detail if isinstance(detail, Mapping) else {"detail": detail},
                    at_ms=int(e["at_ms"]),
                )
                out.append(OutMessage(s.topic_notifications, org_key, value, seq_header))
            elif kind == "refill_request":
                value = encode_refill_request(
                    request_id=str(e["request_id"]),
                    org_id=org_id,
                    credits_mc=int(e["credits_mc"]),
                    amount_usd_cents=int(e["amount_usd_cents"]),
                )
                out.append(OutMessage(s.topic_billing, org_key, value, seq_header))
            elif kind == "invoice":
                value = encode_invoice(
                    org_id=org_id,
                    cycle_start_ms=int(e["cycle_start_ms"]),
                    cycle_end_ms=int(e["cycle_end_ms"]),
                    negative_balance_mc=int(e["negative_balance_mc"]),
                    amount_usd_cents=int(e["amount_usd_cents"]),
                )
                out.append(OutMessage(s.topic_billing, org_key, value, seq_header))
            elif kind == "usage" and e.get("status") == "rejected":
                out.append(self._engine_reject(org_id, e, raw, usage=True))
            elif kind == "command" and e.get("status") == "rejected":
                out.append(self._engine_reject(org_id, e, raw, usage=False))
        return out

    def _engine_reject(
        self,
        org_id: str,
        e: Mapping[str, Any],
        raw: RawLookup | None,
        *,
        usage: bool,
    ) -> OutMessage:
        ident = str(e.get("event_id") if usage else e.get("command_id"))
        original = raw(ident) if raw is not None else None
        code = str(e.get("code") or "rejected")
        topic = self._s.topic_usage_dlq if usage else self._s.topic_admin_dlq
        if original is not None:
            return dlq_message(
                topic,
                key=original.key,
                value=original.value,
                code=code,
                detail=str(e.get("detail") or code),
                source_topic=original.topic,
                source_partition=original.partition,
                source_offset=original.offset,
            )
        # Only on the crash-recovery path (outbox drained after a restart): the original bytes
        # are gone from memory, so the dead letter carries the decided input re-encoded.
        if usage:
            value = encode_usage_event(
                event_id=ident,
                org_id=org_id,
                member_id=str(e.get("member_id")),
                task_id=str(e.get("task_id")),
                credits_mc=int(e.get("credits_mc") or 0),
                occurred_at_ms=int(e.get("occurred_at_ms") or 0),
            )
        else:
            value = encode_admin_command(e.get("command") or {})
        source_topic, partition = _split_source(e.get("source"))
        offset = e.get("offset")
        return dlq_message(
            topic,
            key=org_id.encode(),
            value=value,
            code=code,
            detail=str(e.get("detail") or code),
            source_topic=source_topic,
            source_partition=partition,
            source_offset=offset if isinstance(offset, int) else -1,
        )


CURRENT_STATE_ROUNDS = 5
"""Rounds of :meth:`Publisher.ensure_current_signals` before it gives up (logged)."""


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


class Publisher:
    """Idempotent producer (``enable_idempotence=True``, ``acks="all"``)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.encoder = EffectEncoder(settings)
        self._producer = AIOKafkaProducer(
            **kafka_client_kwargs(settings),
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
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
                m.topic, value=m.value, key=m.key, headers=list(m.headers) or None
            )
            futures.append((m, fut))

        async def wait() -> None:
            if not futures:
                return
            results = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
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
                else:
                    metrics.PUBLISHED_MESSAGES.labels(topic=m.topic).inc()

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
            for org_id, members in todo.items():
                current = await engine.member_signals(org_id, list(members))
                for mid, state in current.items():
                    if int(state["member_seq"]) > members[mid]:
                        messages.extend(self.encoder.messages(org_id, [state]))
                        again.setdefault(org_id, {})[mid] = int(state["member_seq"])
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
