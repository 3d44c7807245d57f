"""Encoders for the messages the worker writes, plus wire helpers for producers and tests.

Every encoder takes engine units (millicredits, epoch milliseconds) and writes the SPEC field
names with amounts as decimal strings (:func:`~schemas.amounts.format_credits`) and times as
RFC 3339 UTC strings with ``Z`` (:func:`~schemas.timestamps.format_timestamp`). The output
validates against the outgoing models in :mod:`schemas.models` (tested).

Key convention for free-form dicts (:func:`to_wire_fields`, used for a notification's
``detail`` and for :func:`encode_admin_command`): a key ending in ``_mc`` holding an int is
written without the suffix as a credit string (``{"credits_mc": 1500}`` ->
``{"credits": "1.5"}``); a key ending in ``_ms`` holding an int is written without the suffix as
a timestamp (``{"expires_at_ms": 0}`` -> ``{"expires_at": "1970-01-01T00:00:00Z"}``). Other
values, including ``None`` and ``"inherit"`` under an ``_mc`` key, pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from schemas.amounts import format_credits
from schemas.errors import ErrorCode
from schemas.ids import key_part
from schemas.timestamps import format_timestamp

HEADER_ERROR_CODE: Final = "error.code"
HEADER_ERROR_DETAIL: Final = "error.detail"
HEADER_SOURCE_TOPIC: Final = "source.topic"
HEADER_SOURCE_PARTITION: Final = "source.partition"
HEADER_SOURCE_OFFSET: Final = "source.offset"

MAX_DETAIL_BYTES: Final = 1_024
"""``error.detail`` is cut to this size: it may echo producer input."""

_ENCODER: Final = msgspec.json.Encoder()


def _encode(message: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(message)


def control_key(org_id: str, member_id: str) -> bytes:
    """Key of a member's record on the compacted control topic (SPEC section 6).

    ``org_id/member_id`` with ``%`` and ``/`` percent-encoded in each part
    (:func:`schemas.ids.key_part`), so that two members never share a key: org ``a/b`` member
    ``c`` is ``a%2Fb/c``, org ``a`` member ``b/c`` is ``a/b%2Fc``.
    """
    return f"{key_part(org_id)}/{key_part(member_id)}".encode()


def encode_task_control(
    *, signal: str, org_id: str, member_id: str, reason: str, seq: int, issued_at_ms: int
) -> bytes:
    """A TaskControl value (``pause``/``resume`` for one member)."""
    return _encode(
        {
            "signal": signal,
            "org_id": org_id,
            "member_id": member_id,
            "reason": reason,
            "seq": seq,
            "issued_at": format_timestamp(issued_at_ms),
        }
    )


def encode_notification(
    *, type: str, org_id: str, member_id: str | None, detail: Mapping[str, Any], at_ms: int
) -> bytes:
    """A Notification value; ``detail`` follows the ``_mc``/``_ms`` key convention."""
    return _encode(
        {
            "type": type,
            "org_id": org_id,
            "member_id": member_id,
            "detail": to_wire_fields(detail),
            "at": format_timestamp(at_ms),
        }
    )


def encode_refill_request(
    *, request_id: str, org_id: str, credits_mc: int, amount_usd_cents: int
) -> bytes:
    """A RefillRequest value for the payment system."""
    return _encode(
        {
            "type": "refill_request",
            "request_id": request_id,
            "org_id": org_id,
            "credits": format_credits(credits_mc),
            "amount_usd_cents": amount_usd_cents,
        }
    )


def encode_invoice(
    *,
    org_id: str,
    cycle_start_ms: int,
    cycle_end_ms: int,
    negative_balance_mc: int,
    amount_usd_cents: int,
) -> bytes:
    """An Invoice value for one closed cycle."""
    return _encode(
        {
            "type": "invoice",
            "org_id": org_id,
            "cycle_start": format_timestamp(cycle_start_ms),
            "cycle_end": format_timestamp(cycle_end_ms),
            "negative_balance_credits": format_credits(negative_balance_mc),
            "amount_usd_cents": amount_usd_cents,
        }
    )


def dlq_headers(
    *, code: ErrorCode | str, detail: str, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """Headers of a dead-lettered message (aiokafka's ``headers`` format)."""
    return [
        (HEADER_ERROR_CODE, str(code).encode()),
        (HEADER_ERROR_DETAIL, detail.encode()[:MAX_DETAIL_BYTES].decode(errors="ignore").encode()),
        (HEADER_SOURCE_TOPIC, topic.encode()),
        (HEADER_SOURCE_PARTITION, str(partition).encode()),
        (HEADER_SOURCE_OFFSET, str(offset).encode()),
    ]


def to_wire_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Apply the ``_mc``/``_ms`` key convention (see the module doc)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if key.endswith("_mc") and is_int:
            out[key[:-3]] = format_credits(value)
        elif key.endswith("_ms") and is_int:
            out[key[:-3]] = format_timestamp(value)
        elif key.endswith("_mc") and (value is None or value == "inherit"):
            out[key[:-3]] = value
        else:
            out[key] = value
    return out


def encode_usage_event(
    *,
    event_id: str,
    org_id: str,
    member_id: str,
    task_id: str,
    credits_mc: int,
    occurred_at_ms: int,
) -> bytes:
    """A UsageEvent as the agent runtime would send it (for producers, tools and tests)."""
    return _encode(
        {
            "event_id": event_id,
            "org_id": org_id,
            "member_id": member_id,
            "task_id": task_id,
            "credits": format_credits(credits_mc),
            "occurred_at": format_timestamp(occurred_at_ms),
        }
    )


def encode_admin_command(command: Mapping[str, Any]) -> bytes:
    """An admin command from its engine dict (the inverse of ``decode_admin``).

    Used by the tick scheduler, tools and tests: ``{"type": "tick", "command_id": ...,
    "org_id": ..., "at_ms": ...}``.
    """
    return _encode(to_wire_fields(command))
