"""Outgoing Kafka records and the input records they may come from: plain data, no I/O.

``OutMessage`` is what the publisher sends; ``RawSource`` is a consumed record kept for its
dead letter; ``dlq_message`` builds the dead letter of SPEC section 6 (original key and value,
``error.*`` and ``source.*`` headers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from schemas.encode import HEADER_ERROR_CODE, dlq_headers

HEADER_SEQ = "metering.seq"
"""Org-wide effect sequence number: the dedupe key for consumers of re-published effects."""

HEADER_FORWARDED_FROM = "forwarded.from"
"""On a record forwarded to its org's home partition: ``<topic>:<partition>:<offset>`` of the
record it copies (for people and tools; the worker never trusts it)."""


@dataclass(slots=True, frozen=True)
class OutMessage:
    """One record to publish."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None  # None: the producer's partitioner (by key)

    @property
    def is_dlq(self) -> bool:
        return any(h[0] == HEADER_ERROR_CODE for h in self.headers)


class RawSource(NamedTuple):
    """Where a message came from, and its original bytes (for a dead letter); one per consumed
    record, so a named tuple (cheap to build) rather than a frozen dataclass."""

    key: bytes | None
    value: bytes
    topic: str
    partition: int
    offset: int


RawLookup = Callable[[str], RawSource | None]
"""``e|<event_id>`` / ``c|<command_id>`` (the namespaced id) -> the original message, when
still at hand."""


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


def dlq_of(topic: str, raw: RawSource, code: str, detail: str | None = None) -> OutMessage:
    """The dead letter of a consumed record."""
    return dlq_message(
        topic,
        key=raw.key,
        value=raw.value,
        code=code,
        detail=detail or code,
        source_topic=raw.topic,
        source_partition=raw.partition,
        source_offset=raw.offset,
    )


def forward_of(raw: RawSource, home: int) -> OutMessage:
    """A consumed record sent on to its org's home partition: same topic, key and value."""
    origin = f"{raw.topic}:{raw.partition}:{raw.offset}".encode()
    return OutMessage(
        topic=raw.topic,
        key=raw.key,
        value=raw.value,
        headers=((HEADER_FORWARDED_FROM, origin),),
        partition=home,
    )
