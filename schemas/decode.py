"""Decoders for incoming messages: raw Kafka value bytes -> engine records or a rejection.

``decode_usage`` is the hot path. It decodes with a typed msgspec struct (a fraction of the
cost of pydantic) and parses ``credits`` from the raw JSON token text and ``occurred_at`` with
integer arithmetic. Whenever msgspec itself refuses a message (a missing field, a wrong type, bad
syntax), the message is handed to :func:`reference_decode_usage`, the pydantic model path, which
decides the code. Rejections are rare, so their codes come from one place by construction; the
accepted set, the parsed values and the amount/timestamp codes of the fast path are checked
against the models by a hypothesis differential test. Two bounded caches (credit tokens and
date-time prefixes already found valid) let the values that repeat from event to event skip
their parse; errors are never cached. Measured at about 1.3-1.9 us per 170-byte event on the
2-core reference machine (0.2 us of it in msgspec), against about 7 us for the model path.

``decode_admin`` always uses the pydantic models: admin traffic is small.

Checks run in this order, and the first failure is the rejection: size (``max_bytes``), UTF-8,
JSON syntax, top-level object, fields in SPEC order (admin: ``type`` first), configured tiers
(admin, when ``tiers`` is given), then ``occurred_at``/``at`` against ``now_ms + max_skew_ms``.
Unknown extra fields are ignored (only their JSON syntax is checked, since the message must be
valid JSON). With a duplicated key the last occurrence wins, as in most JSON parsers.

Engine dict of an admin command (``CommandRecord.command``). Every command has::

    {"type": str, "command_id": str, "org_id": str, "at_ms": int}

plus, per ``type`` (amounts are integer millicredits, times epoch milliseconds):

====================  ===========================================================================
type                  extra keys
====================  ===========================================================================
``org_upsert``        ``billing_anchor_day: int`` (1-31)
``member_add``        ``member_id: str``, ``tier: str``
``member_remove``     ``member_id: str``
``member_set_tier``   ``member_id: str``, ``tier: str``
``tier_limit_set``    ``tier: str``, ``limit_mc: int | None`` (None: no limit; whole credits)
``member_limit_set``  ``member_id: str``, ``limit_mc: int | None | "inherit"``
``pool_purchase``     ``credits_mc: int`` (> 0)
``auto_refill_set``   ``enabled: bool``, ``threshold_mc: int`` (>= 0), ``amount_mc: int`` (> 0),
                      ``monthly_limit_mc: int`` (>= 0)
``refill_result``     ``request_id: str``, ``status: "succeeded" | "failed"``
``promo_grant``       ``member_id: str``, ``grant_id: str``, ``credits_mc: int`` (> 0),
                      ``expires_at_ms: int``
``credit_request``    ``member_id: str``, ``credits_mc: int`` (> 0), ``note: str | None``
``tick``              nothing more
====================  ===========================================================================

Admin amounts are bounded by :data:`schemas.amounts.MAX_ADMIN_MC` (10^9 credits); usage credits
by :data:`schemas.amounts.MAX_USAGE_MC` (10^6 credits).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated, Any, Final

import msgspec

from schemas.amounts import MAX_USAGE_MC, parse_credits_text
from schemas.errors import ErrorCode, WireError
from schemas.ids import ID_MAX_LENGTH, is_valid_id
from schemas.jsonwire import NUMBER_START, QUOTE, VALUE_DECODER, check_utf8, json_value
from schemas.models import (
    COMMAND_TYPES,
    MemberAdd,
    MemberSetTier,
    TierLimitSet,
    UsageEvent,
    parse_admin_command,
)
from schemas.timestamps import datetime_to_ms, parse_timestamp_ms

DEFAULT_MAX_BYTES: Final = 65_536
DEFAULT_MAX_SKEW_MS: Final = 300_000


class UsageRecord(msgspec.Struct, frozen=True, gc=False):
    """A valid usage event, amounts in millicredits, time in epoch milliseconds."""

    event_id: str
    org_id: str
    member_id: str
    task_id: str
    credits_mc: int
    occurred_at_ms: int


class CommandRecord(msgspec.Struct, frozen=True):
    """A valid admin command; ``command`` is the engine dict described in the module doc."""

    type: str
    command_id: str
    org_id: str
    at_ms: int
    command: dict[str, Any]


class Rejection(msgspec.Struct, frozen=True, gc=False):
    """Why a message is dead-lettered: a stable code and a human-readable detail."""

    code: ErrorCode
    detail: str


_FastId = Annotated[str, msgspec.Meta(min_length=1, max_length=ID_MAX_LENGTH)]


class _UsageWire(msgspec.Struct, gc=False):
    event_id: _FastId
    org_id: _FastId
    member_id: _FastId
    task_id: _FastId
    credits: msgspec.Raw
    occurred_at: str


_USAGE_DECODER: Final = msgspec.json.Decoder(_UsageWire)
_BACKSLASH: Final = ord("\\")
_BACKSLASH_BYTE: Final = b"\\"
_ZERO: Final = ord("0")
_DEL: Final = b"\x7f"
_TIERED: Final = (MemberAdd, MemberSetTier, TierLimitSet)
_CREDITS_MC: dict[bytes, int] = {}
"""Raw ``credits`` token -> millicredits, for tokens already parsed as valid. Producers send a
small set of distinct amounts, so most events skip the parse; cleared when full."""
_CREDITS_CACHE_MAX: Final = 65_536


class _Defer(Exception):
    """The fast path cannot decide; the reference path will."""


def _precheck(raw: bytes, max_bytes: int) -> Rejection | None:
    if len(raw) > max_bytes:
        return Rejection(
            ErrorCode.MESSAGE_TOO_LARGE, f"message is {len(raw)} bytes, limit {max_bytes}"
        )
    # Checked up front because msgspec does not look inside the fields it skips.
    try:
        check_utf8(raw)
    except WireError as err:
        return Rejection(err.code, err.detail)
    return None


def _fast_credits(token: bytes) -> int:
    first = token[0]
    if first == QUOTE:
        if _BACKSLASH in token:
            try:
                text = VALUE_DECODER.decode(token)
            except msgspec.DecodeError:
                raise _Defer from None
            return parse_credits_text(text, max_mc=MAX_USAGE_MC)
        token = token[1:-1]
    elif first not in NUMBER_START:
        raise WireError(ErrorCode.WRONG_TYPE, "amount must be a number or a decimal string")
    # Common shapes ("12", "12.5") are computed here; anything unusual, and every error, goes
    # through parse_credits_text, which owns the rules. bytes.isdigit() is ASCII-only.
    whole, dot, frac = token.partition(b".")
    if (
        0 < len(whole) <= 7
        and whole.isdigit()
        and (whole[0] != _ZERO or len(whole) == 1)
        and (not dot or frac.isdigit())
    ):
        frac = frac.rstrip(b"0")
        if len(frac) <= 3:
            mc = int(whole) * 1000 + (int(frac.ljust(3, b"0")) if frac else 0)
            if 0 < mc <= MAX_USAGE_MC:
                return mc
    return parse_credits_text(token.decode(), max_mc=MAX_USAGE_MC)


def fast_decode_usage(
    raw: bytes, *, now_ms: int, max_skew_ms: int = DEFAULT_MAX_SKEW_MS
) -> UsageRecord | Rejection | None:
    """The msgspec path alone: a record, a rejection, or None when it cannot decide.

    Assumes the size and UTF-8 checks passed. Exposed for the differential tests.
    """
    try:
        wire = _USAGE_DECODER.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    # JSON strings cannot hold a raw control character below U+0020, so an ASCII message
    # without escapes and without DEL has ids in the alphabet; anything else is checked, and
    # a bad id is left to the models (which give the code).
    if (_BACKSLASH_BYTE in raw or _DEL in raw or not raw.isascii()) and not (
        is_valid_id(wire.event_id)
        and is_valid_id(wire.org_id)
        and is_valid_id(wire.member_id)
        and is_valid_id(wire.task_id)
    ):
        return None
    token = bytes(wire.credits)
    credits_mc = _CREDITS_MC.get(token)
    if credits_mc is None:
        try:
            credits_mc = _fast_credits(token)
        except WireError as err:
            return Rejection(err.code, f"credits: {err.detail}")
        except _Defer:
            return None
        if len(_CREDITS_MC) >= _CREDITS_CACHE_MAX:
            _CREDITS_MC.clear()
        _CREDITS_MC[token] = credits_mc
    try:
        occurred_at_ms = parse_timestamp_ms(wire.occurred_at)
    except WireError as err:
        return Rejection(err.code, f"occurred_at: {err.detail}")
    if occurred_at_ms > now_ms + max_skew_ms:
        return _future("occurred_at", occurred_at_ms, now_ms)
    return UsageRecord(
        wire.event_id, wire.org_id, wire.member_id, wire.task_id, credits_mc, occurred_at_ms
    )


def decode_usage(
    raw: bytes,
    *,
    now_ms: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
) -> UsageRecord | Rejection:
    """Decode and validate one usage event (SPEC sections 5 and 6)."""
    if len(raw) > max_bytes or not raw.isascii():
        rejection = _precheck(raw, max_bytes)
        if rejection is not None:
            return rejection
    result = fast_decode_usage(raw, now_ms=now_ms, max_skew_ms=max_skew_ms)
    if result is None:
        return _reference_usage(raw, now_ms=now_ms, max_skew_ms=max_skew_ms)
    return result


def reference_decode_usage(
    raw: bytes,
    *,
    now_ms: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
) -> UsageRecord | Rejection:
    """Decode a usage event with the pydantic model only (the reference for the fast path)."""
    rejection = _precheck(raw, max_bytes)
    if rejection is not None:
        return rejection
    return _reference_usage(raw, now_ms=now_ms, max_skew_ms=max_skew_ms)


def _reference_usage(raw: bytes, *, now_ms: int, max_skew_ms: int) -> UsageRecord | Rejection:
    try:
        event = UsageEvent.from_wire(raw)
    except WireError as err:
        return Rejection(err.code, err.detail)
    occurred_at_ms = datetime_to_ms(event.occurred_at)
    if occurred_at_ms > now_ms + max_skew_ms:
        return _future("occurred_at", occurred_at_ms, now_ms)
    return UsageRecord(
        event.event_id,
        event.org_id,
        event.member_id,
        event.task_id,
        event.credits_mc,
        occurred_at_ms,
    )


def decode_admin(
    raw: bytes,
    *,
    now_ms: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
    tiers: Collection[str] | None = None,
) -> CommandRecord | Rejection:
    """Decode and validate one admin command; ``tiers`` (if given) is the tier catalogue."""
    rejection = _precheck(raw, max_bytes)
    if rejection is not None:
        return rejection
    try:
        command = parse_admin_command(raw)
    except WireError as err:
        return Rejection(err.code, err.detail)
    if tiers is not None and isinstance(command, _TIERED) and command.tier not in tiers:
        return Rejection(ErrorCode.UNKNOWN_TIER, f"tier: {command.tier[:40]!r} is not known")
    at_ms = datetime_to_ms(command.at)
    if at_ms > now_ms + max_skew_ms:
        return _future("at", at_ms, now_ms)
    return CommandRecord(
        command.type, command.command_id, command.org_id, at_ms, command.to_engine()
    )


_READABLE_IDS: Final = ("event_id", "command_id", "org_id", "member_id", "task_id")


def readable_ids(raw: bytes) -> dict[str, str]:
    """The ids a rejected message still names, read exactly as the decoders read them.

    The rejection path records a rejected message's ``event_id`` (or ``command_id``) as decided
    (SPEC section 5), so it must read with the decoders' own reader (msgspec, raw tokens): a
    message they cannot parse as a JSON object names no id, and only values in the id alphabet
    are returned, so whatever is returned can be stored and keyed. ``type`` is returned only
    when it is a known command type. The size limit does not apply: an oversized message that
    still names its id decides that id like any other malformed message.
    """
    from schemas.jsonwire import raw_fields

    try:
        fields = raw_fields(raw)
    except WireError:
        return {}
    found: dict[str, str] = {}
    for name in _READABLE_IDS:
        token = fields.get(name)
        if token is None:
            continue
        try:
            value = json_value(token)
        except WireError:
            continue
        if is_valid_id(value):
            found[name] = value  # type: ignore[assignment]
    token = fields.get("type")
    if token is not None:
        try:
            typ = json_value(token)
        except WireError:
            typ = None
        if isinstance(typ, str) and typ in COMMAND_TYPES:
            found["type"] = typ
    return found


def _future(field: str, at_ms: int, now_ms: int) -> Rejection:
    return Rejection(
        ErrorCode.TIMESTAMP_IN_FUTURE,
        f"{field}: {at_ms - now_ms} ms ahead of the worker clock",
    )
