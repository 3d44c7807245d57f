"""Decoding usage events and admin commands: every SPEC section 5 rejection with its code."""

# One case per line keeps the tables scannable; the rows are longer than the usual limit.
# ruff: noqa: E501

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas import (
    ADMIN_COMMAND_ADAPTER,
    CommandRecord,
    ErrorCode,
    Rejection,
    UsageRecord,
    decode_admin,
    decode_usage,
)
from schemas.decode import reference_decode_usage

NOW_MS = 1_795_740_000_000  # 2026-11-27T00:40:00Z
SKEW_MS = 300_000
MAX_BYTES = 65_536
TIERS = frozenset({"pro", "max"})

EVENT: dict[str, Any] = {
    "event_id": "evt-1",
    "org_id": "org-1",
    "member_id": "mem-1",
    "task_id": "task-1",
    "credits": 12.5,
    "occurred_at": "2026-11-27T00:30:00.250Z",
}
MISSING = object()


def _event(**changes: Any) -> bytes:
    body = {k: v for k, v in {**EVENT, **changes}.items() if v is not MISSING}
    return json.dumps(body).encode()


def _raw_credits(token: str) -> bytes:
    """An event whose credits value is the literal JSON token (json.dumps would re-format it)."""
    return _event(credits="__C__").replace(b'"__C__"', token.encode())


def _decode(raw: bytes) -> UsageRecord | Rejection:
    fast = decode_usage(raw, now_ms=NOW_MS, max_bytes=MAX_BYTES, max_skew_ms=SKEW_MS)
    ref = reference_decode_usage(raw, now_ms=NOW_MS, max_bytes=MAX_BYTES, max_skew_ms=SKEW_MS)
    # Both paths must give the same verdict for every row of every table below.
    if isinstance(fast, Rejection):
        assert isinstance(ref, Rejection) and ref.code == fast.code
    else:
        assert fast == ref
    return fast


def test_valid_event_decodes_to_millicredits_and_epoch_ms() -> None:
    assert _decode(_event()) == UsageRecord(
        event_id="evt-1",
        org_id="org-1",
        member_id="mem-1",
        task_id="task-1",
        credits_mc=12_500,
        occurred_at_ms=1_795_739_400_250,
    )


@pytest.mark.parametrize(
    ("token", "mc"),
    [
        ("12", 12_000),
        ("12.5", 12_500),
        ('"0.125"', 125),
        ('"12.50"', 12_500),
        ("1000000", 1_000_000_000),
        ("0.001", 1),
        ('"\\u0031\\u0032"', 12_000),  # escaped digits are still the string "12"
    ],
)
def test_accepted_amount_forms(token: str, mc: int) -> None:
    record = _decode(_raw_credits(token))
    assert isinstance(record, UsageRecord)
    assert record.credits_mc == mc


def test_unknown_fields_are_ignored() -> None:
    raw = _event(region="eu", extra={"nested": [1, 2, {"x": None}]}, credits_mc=5)
    record = _decode(raw)
    assert isinstance(record, UsageRecord) and record.credits_mc == 12_500


def test_duplicate_key_last_one_wins() -> None:
    raw = _event().replace(b'"credits": 12.5', b'"credits": 1, "credits": 2')
    record = _decode(raw)
    assert isinstance(record, UsageRecord) and record.credits_mc == 2_000


def test_exactly_max_bytes_is_accepted_one_more_is_not() -> None:
    base = _event(pad="")
    fill = MAX_BYTES - len(base)
    assert isinstance(_decode(_event(pad="x" * fill)), UsageRecord)
    rejected = _decode(_event(pad="x" * (fill + 1)))
    assert isinstance(rejected, Rejection)
    assert rejected.code is ErrorCode.MESSAGE_TOO_LARGE


USAGE_REJECTIONS: list[tuple[str, bytes, ErrorCode]] = [
    ("over 64 KiB", _event(pad="x" * MAX_BYTES), ErrorCode.MESSAGE_TOO_LARGE),
    ("not UTF-8", _event(task_id="t").replace(b'"t"', b'"\xff\xfe"'), ErrorCode.INVALID_UTF8),
    ("UTF-8 error in an unknown field", _event(x="y").replace(b'"y"', b'"\xc3"'), ErrorCode.INVALID_UTF8),
    ("truncated JSON", _event()[:-5], ErrorCode.INVALID_JSON),
    ("empty message", b"", ErrorCode.INVALID_JSON),
    ("NaN literal", _raw_credits("NaN"), ErrorCode.INVALID_JSON),
    ("trailing comma", _event()[:-1] + b",}", ErrorCode.INVALID_JSON),
    ("UTF-16", json.dumps(EVENT).encode("utf-16"), ErrorCode.INVALID_UTF8),
    ("lone surrogate escape", _event(event_id="\ud800"), ErrorCode.INVALID_JSON),
    ("top-level array", json.dumps([EVENT]).encode(), ErrorCode.WRONG_TYPE),
    ("top-level string", b'"evt"', ErrorCode.WRONG_TYPE),
    ("missing event_id", _event(event_id=MISSING), ErrorCode.MISSING_FIELD),
    ("missing org_id", _event(org_id=MISSING), ErrorCode.MISSING_FIELD),
    ("missing member_id", _event(member_id=MISSING), ErrorCode.MISSING_FIELD),
    ("missing task_id", _event(task_id=MISSING), ErrorCode.MISSING_FIELD),
    ("missing credits", _event(credits=MISSING), ErrorCode.MISSING_FIELD),
    ("missing occurred_at", _event(occurred_at=MISSING), ErrorCode.MISSING_FIELD),
    ("numeric event_id", _event(event_id=42), ErrorCode.WRONG_TYPE),
    ("null org_id", _event(org_id=None), ErrorCode.WRONG_TYPE),
    ("bool member_id", _event(member_id=True), ErrorCode.WRONG_TYPE),
    ("object task_id", _event(task_id={"id": "t"}), ErrorCode.WRONG_TYPE),
    ("bool credits", _event(credits=True), ErrorCode.WRONG_TYPE),
    ("null credits", _event(credits=None), ErrorCode.WRONG_TYPE),
    ("array credits", _event(credits=[12]), ErrorCode.WRONG_TYPE),
    ("numeric occurred_at", _event(occurred_at=1_795_739_400), ErrorCode.WRONG_TYPE),
    ("empty event_id", _event(event_id=""), ErrorCode.INVALID_ID),
    ("129-char member_id", _event(member_id="m" * 129), ErrorCode.INVALID_ID),
    ("NUL in event_id", _event(event_id="e\x00"), ErrorCode.INVALID_ID),
    ("U+001F in org_id", _event(org_id="o\x1f"), ErrorCode.INVALID_ID),
    ("DEL in task_id", _event(task_id="t\x7f"), ErrorCode.INVALID_ID),
    ("U+0085 in member_id", _event(member_id="m\x85"), ErrorCode.INVALID_ID),
    ("129 two-byte characters", _event(event_id="é" * 129), ErrorCode.INVALID_ID),
    ("129 four-byte characters", _event(event_id="😀" * 129), ErrorCode.INVALID_ID),
    ("deeply nested extra field", _event(x="X").replace(b'"X"', b"[" * 5_000 + b"]" * 5_000), ErrorCode.INVALID_JSON),
    ("lone surrogate in an extra field", _event(x="\ud800"), ErrorCode.INVALID_JSON),
    ("credits 0", _event(credits=0), ErrorCode.AMOUNT_NOT_POSITIVE),
    ("credits -1", _event(credits=-1), ErrorCode.AMOUNT_NOT_POSITIVE),
    ('credits "-0.5"', _event(credits="-0.5"), ErrorCode.AMOUNT_NOT_POSITIVE),
    ("credits -0", _raw_credits("-0"), ErrorCode.AMOUNT_NOT_POSITIVE),
    ('credits "0.1234"', _event(credits="0.1234"), ErrorCode.AMOUNT_TOO_PRECISE),
    ("credits 0.0001", _raw_credits("0.0001"), ErrorCode.AMOUNT_TOO_PRECISE),
    ("credits 1000000.001", _raw_credits("1000000.001"), ErrorCode.AMOUNT_TOO_LARGE),
    ("credits 1000001", _event(credits=1_000_001), ErrorCode.AMOUNT_TOO_LARGE),
    ("credits 10^40", _raw_credits("1" + "0" * 40), ErrorCode.AMOUNT_TOO_LARGE),
    ("credits 1e3", _raw_credits("1e3"), ErrorCode.INVALID_FIELD),
    ('credits "1e3"', _event(credits="1e3"), ErrorCode.INVALID_FIELD),
    ('credits "abc"', _event(credits="abc"), ErrorCode.INVALID_FIELD),
    ('credits " 12"', _event(credits=" 12"), ErrorCode.INVALID_FIELD),
    ("occurred_at without offset", _event(occurred_at="2026-11-27T00:30:00"), ErrorCode.TIMESTAMP_WITHOUT_TIMEZONE),
    ("occurred_at a date", _event(occurred_at="2026-11-27"), ErrorCode.INVALID_FIELD),
    ("occurred_at Feb 30", _event(occurred_at="2026-02-30T00:00:00Z"), ErrorCode.INVALID_FIELD),
    ("occurred_at 5 min + 1 ms ahead", _event(occurred_at="2026-11-27T00:45:00.001Z"), ErrorCode.TIMESTAMP_IN_FUTURE),
    ("occurred_at ahead via offset", _event(occurred_at="2026-11-27T01:46:00+01:00"), ErrorCode.TIMESTAMP_IN_FUTURE),
    # Several problems: the first in the documented order wins.
    ("missing id beats bad credits", _event(event_id=MISSING, credits=0), ErrorCode.MISSING_FIELD),
    ("bad credits beat bad time", _event(credits=0, occurred_at="x"), ErrorCode.AMOUNT_NOT_POSITIVE),
    ("static check beats the clock", _event(credits=0, occurred_at="2030-01-01T00:00:00Z"), ErrorCode.AMOUNT_NOT_POSITIVE),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "code"), [(raw, code) for _, raw, code in USAGE_REJECTIONS],
    ids=[name for name, _, _ in USAGE_REJECTIONS],
)  # fmt: skip
def test_usage_rejection_table(raw: bytes, code: ErrorCode) -> None:
    result = _decode(raw)
    assert isinstance(result, Rejection), result
    assert result.code is code
    assert result.detail


def test_exactly_five_minutes_ahead_is_accepted() -> None:
    assert isinstance(_decode(_event(occurred_at="2026-11-27T00:45:00Z")), UsageRecord)


def test_old_events_are_accepted() -> None:
    # Lateness is the engine's business (charged to the current cycle and marked late).
    record = _decode(_event(occurred_at="2025-01-01T00:00:00Z"))
    assert isinstance(record, UsageRecord)


def test_error_codes_are_stable() -> None:
    # Dashboards and alerts key on these strings: renaming one is a breaking change.
    assert sorted(code.value for code in ErrorCode) == sorted(
        [
            "message_too_large",
            "invalid_utf8",
            "invalid_json",
            "wrong_type",
            "missing_field",
            "invalid_id",
            "invalid_field",
            "amount_not_positive",
            "amount_too_large",
            "amount_too_precise",
            "timestamp_without_timezone",
            "timestamp_in_future",
            "unknown_command_type",
            "unknown_tier",
            "unknown_org",
            "unknown_member",
            "member_removed",
            "duplicate",
            "member_exists",
            "promo_expired",
            "duplicate_grant",
            "balance_overflow",
            "invalid_amount",
            "invalid_command",
            "engine_failed",
            "storage_failed",
        ]
    )


def test_engine_codes_are_in_the_contract() -> None:
    # Every code the engine can put in an ``error.code`` header is a documented ErrorCode.
    from worker import constants

    engine_codes = {
        value
        for name, value in vars(constants).items()
        if name.startswith("E_") and name != "E_UNKNOWN_REQUEST"
    }
    assert engine_codes
    assert engine_codes <= {code.value for code in ErrorCode}


# --- admin commands ---------------------------------------------------------------------------

AT = "2026-11-27T00:30:00Z"
AT_MS = 1_795_739_400_000
HEAD: dict[str, Any] = {"command_id": "cmd-1", "org_id": "org-1", "at": AT}

VALID_COMMANDS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"type": "org_upsert", "billing_anchor_day": 31}, {"billing_anchor_day": 31}),
    ({"type": "member_add", "member_id": "m", "tier": "pro"}, {"member_id": "m", "tier": "pro"}),
    ({"type": "member_remove", "member_id": "m"}, {"member_id": "m"}),
    ({"type": "member_set_tier", "member_id": "m", "tier": "max"}, {"member_id": "m", "tier": "max"}),
    ({"type": "tier_limit_set", "tier": "pro", "limit": None}, {"tier": "pro", "limit_mc": None}),
    ({"type": "tier_limit_set", "tier": "pro", "limit": 120}, {"tier": "pro", "limit_mc": 120_000}),
    ({"type": "tier_limit_set", "tier": "pro", "limit": "0"}, {"tier": "pro", "limit_mc": 0}),
    ({"type": "member_limit_set", "member_id": "m", "limit": "inherit"}, {"member_id": "m", "limit_mc": "inherit"}),
    ({"type": "member_limit_set", "member_id": "m", "limit": None}, {"member_id": "m", "limit_mc": None}),
    ({"type": "member_limit_set", "member_id": "m", "limit": "250.5"}, {"member_id": "m", "limit_mc": 250_500}),
    ({"type": "pool_purchase", "credits": 5_000_000}, {"credits_mc": 5_000_000_000}),
    (
        {"type": "auto_refill_set", "enabled": True, "threshold": 1000, "amount": "2500.5", "monthly_limit": 0},
        {"enabled": True, "threshold_mc": 1_000_000, "amount_mc": 2_500_500, "monthly_limit_mc": 0},
    ),
    ({"type": "refill_result", "request_id": "r1", "status": "succeeded"}, {"request_id": "r1", "status": "succeeded"}),
    ({"type": "refill_result", "request_id": "r1", "status": "failed"}, {"request_id": "r1", "status": "failed"}),
    (
        {"type": "promo_grant", "member_id": "m", "grant_id": "g", "credits": 50, "expires_at": "2027-01-01T00:00:00+01:00"},
        {"member_id": "m", "grant_id": "g", "credits_mc": 50_000, "expires_at_ms": 1_798_758_000_000},
    ),
    ({"type": "credit_request", "member_id": "m", "credits": 100}, {"member_id": "m", "credits_mc": 100_000, "note": None}),
    (
        {"type": "credit_request", "member_id": "m", "credits": "0.5", "note": "deadline {Friday}"},
        {"member_id": "m", "credits_mc": 500, "note": "deadline {Friday}"},
    ),
    ({"type": "tick"}, {}),
]  # fmt: skip


def _command(body: dict[str, Any]) -> bytes:
    return json.dumps({**HEAD, **body}).encode()


def _admin(raw: bytes) -> CommandRecord | Rejection:
    return decode_admin(raw, now_ms=NOW_MS, max_bytes=MAX_BYTES, max_skew_ms=SKEW_MS, tiers=TIERS)


@pytest.mark.parametrize(
    ("body", "extra"), VALID_COMMANDS, ids=[f"{b['type']}-{i}" for i, (b, _) in enumerate(VALID_COMMANDS)]
)  # fmt: skip
def test_valid_admin_commands_give_the_engine_dict(
    body: dict[str, Any], extra: dict[str, Any]
) -> None:
    record = _admin(_command({**body, "unknown_field": [1]}))
    assert isinstance(record, CommandRecord), record
    assert record.type == body["type"]
    assert (record.command_id, record.org_id, record.at_ms) == ("cmd-1", "org-1", AT_MS)
    assert record.command == {
        "type": body["type"],
        "command_id": "cmd-1",
        "org_id": "org-1",
        "at_ms": AT_MS,
        **extra,
    }
    # The discriminated-union adapter (what other code validates with) agrees with the decoder.
    model = ADMIN_COMMAND_ADAPTER.validate_python({**HEAD, **body})
    assert model.to_engine() == record.command


def test_every_command_type_is_covered() -> None:
    from schemas.models import COMMAND_TYPES

    assert {body["type"] for body, _ in VALID_COMMANDS} == COMMAND_TYPES


ADMIN_REJECTIONS: list[tuple[str, bytes, ErrorCode]] = [
    ("not JSON", b"{type: tick}", ErrorCode.INVALID_JSON),
    ("not UTF-8", _command({"type": "tick", "x": "\u00e9"}).replace(b"\\u00e9", b"\xe9"), ErrorCode.INVALID_UTF8),
    ("too large", _command({"type": "tick", "pad": "x" * MAX_BYTES}), ErrorCode.MESSAGE_TOO_LARGE),
    ("array", b"[]", ErrorCode.WRONG_TYPE),
    ("missing type", _command({}), ErrorCode.MISSING_FIELD),
    ("numeric type", _command({"type": 3}), ErrorCode.WRONG_TYPE),
    ("unknown type", _command({"type": "pool_refund"}), ErrorCode.UNKNOWN_COMMAND_TYPE),
    ("missing command_id", json.dumps({"type": "tick", "org_id": "o", "at": AT}).encode(), ErrorCode.MISSING_FIELD),
    ("missing at", json.dumps({"type": "tick", "org_id": "o", "command_id": "c"}).encode(), ErrorCode.MISSING_FIELD),
    ("empty org_id", _command({"type": "tick", "org_id": ""}), ErrorCode.INVALID_ID),
    ("naive at", _command({"type": "tick", "at": "2026-11-27T00:30:00"}), ErrorCode.TIMESTAMP_WITHOUT_TIMEZONE),
    ("at 5 min + 1 s ahead", _command({"type": "tick", "at": "2026-11-27T00:45:01Z"}), ErrorCode.TIMESTAMP_IN_FUTURE),
    ("anchor day 0", _command({"type": "org_upsert", "billing_anchor_day": 0}), ErrorCode.INVALID_FIELD),
    ("anchor day 32", _command({"type": "org_upsert", "billing_anchor_day": 32}), ErrorCode.INVALID_FIELD),
    ("anchor day 1.0", _command({"type": "org_upsert", "billing_anchor_day": 1.0}), ErrorCode.WRONG_TYPE),
    ('anchor day "5"', _command({"type": "org_upsert", "billing_anchor_day": "5"}), ErrorCode.WRONG_TYPE),
    ("anchor day true", _command({"type": "org_upsert", "billing_anchor_day": True}), ErrorCode.WRONG_TYPE),
    ("member_add without tier", _command({"type": "member_add", "member_id": "m"}), ErrorCode.MISSING_FIELD),
    ("unknown tier", _command({"type": "member_add", "member_id": "m", "tier": "gold"}), ErrorCode.UNKNOWN_TIER),
    ("unknown tier on set", _command({"type": "member_set_tier", "member_id": "m", "tier": "gold"}), ErrorCode.UNKNOWN_TIER),
    ("unknown tier on limit", _command({"type": "tier_limit_set", "tier": "gold", "limit": 5}), ErrorCode.UNKNOWN_TIER),
    ("fractional tier limit", _command({"type": "tier_limit_set", "tier": "pro", "limit": 1.5}), ErrorCode.AMOUNT_TOO_PRECISE),
    ('tier limit "inherit"', _command({"type": "tier_limit_set", "tier": "pro", "limit": "inherit"}), ErrorCode.INVALID_FIELD),
    ("tier limit missing", _command({"type": "tier_limit_set", "tier": "pro"}), ErrorCode.MISSING_FIELD),
    ("negative member limit", _command({"type": "member_limit_set", "member_id": "m", "limit": -1}), ErrorCode.AMOUNT_NOT_POSITIVE),
    ('member limit "INHERIT"', _command({"type": "member_limit_set", "member_id": "m", "limit": "INHERIT"}), ErrorCode.INVALID_FIELD),
    ("purchase of 0", _command({"type": "pool_purchase", "credits": 0}), ErrorCode.AMOUNT_NOT_POSITIVE),
    ("purchase too precise", _command({"type": "pool_purchase", "credits": "1.0001"}), ErrorCode.AMOUNT_TOO_PRECISE),
    ("purchase above 10^9", _command({"type": "pool_purchase", "credits": 1_000_000_001}), ErrorCode.AMOUNT_TOO_LARGE),
    ('enabled "true"', _command({"type": "auto_refill_set", "enabled": "true", "threshold": 1, "amount": 1, "monthly_limit": 1}), ErrorCode.WRONG_TYPE),
    ("enabled 1", _command({"type": "auto_refill_set", "enabled": 1, "threshold": 1, "amount": 1, "monthly_limit": 1}), ErrorCode.WRONG_TYPE),
    ("refill amount 0", _command({"type": "auto_refill_set", "enabled": True, "threshold": 1, "amount": 0, "monthly_limit": 1}), ErrorCode.AMOUNT_NOT_POSITIVE),
    ("refill status maybe", _command({"type": "refill_result", "request_id": "r", "status": "maybe"}), ErrorCode.INVALID_FIELD),
    ("promo without expiry", _command({"type": "promo_grant", "member_id": "m", "grant_id": "g", "credits": 1}), ErrorCode.MISSING_FIELD),
    ("promo naive expiry", _command({"type": "promo_grant", "member_id": "m", "grant_id": "g", "credits": 1, "expires_at": "2027-01-01T00:00:00"}), ErrorCode.TIMESTAMP_WITHOUT_TIMEZONE),
    ("note with NUL", _command({"type": "credit_request", "member_id": "m", "credits": 1, "note": "a\x00"}), ErrorCode.INVALID_FIELD),
    ("deep nesting", _command({"type": "tick", "x": "X"}).replace(b'"X"', b"[" * 5_000 + b"]" * 5_000), ErrorCode.INVALID_JSON),
    ("credit request note 5", _command({"type": "credit_request", "member_id": "m", "credits": 1, "note": 5}), ErrorCode.WRONG_TYPE),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "code"), [(raw, code) for _, raw, code in ADMIN_REJECTIONS],
    ids=[name for name, _, _ in ADMIN_REJECTIONS],
)  # fmt: skip
def test_admin_rejection_table(raw: bytes, code: ErrorCode) -> None:
    result = _admin(raw)
    assert isinstance(result, Rejection), result
    assert result.code is code
    assert result.detail


def test_far_future_promo_expiry_is_fine() -> None:
    # Only `at` is checked against the wall clock; an expiry is naturally in the future.
    raw = _command(
        {
            "type": "promo_grant",
            "member_id": "m",
            "grant_id": "g",
            "credits": 1,
            "expires_at": "2030-01-01T00:00:00Z",
        }
    )
    assert isinstance(_admin(raw), CommandRecord)


def test_tiers_are_not_checked_without_a_catalogue() -> None:
    raw = _command({"type": "member_add", "member_id": "m", "tier": "gold"})
    record = decode_admin(raw, now_ms=NOW_MS)
    assert isinstance(record, CommandRecord) and record.command["tier"] == "gold"


# --- the models used directly -----------------------------------------------------------------


def test_from_wire_reads_fractional_numbers_exactly() -> None:
    from schemas.models import UsageEvent

    raw = _raw_credits("0.1")
    assert UsageEvent.from_wire(raw).credits_mc == 100


def test_model_validate_json_refuses_rather_than_rounds() -> None:
    # pydantic's JSON parser yields a binary float for 0.1; the amount field refuses it instead
    # of guessing. This is why callers go through from_wire (documented in schemas.models).
    from pydantic import ValidationError

    from schemas.models import UsageEvent

    with pytest.raises(ValidationError) as info:
        UsageEvent.model_validate_json(_raw_credits("0.1"))
    assert info.value.errors()[0]["type"] == "wrong_type"


def test_parse_admin_command_returns_the_typed_model() -> None:
    from schemas.errors import WireError
    from schemas.models import PoolPurchase, parse_admin_command

    command = parse_admin_command(_command({"type": "pool_purchase", "credits": 2.5}))
    assert isinstance(command, PoolPurchase) and command.credits_mc == 2_500
    with pytest.raises(WireError) as info:
        parse_admin_command(_command({"type": "pool_purchase", "credits": 2.5001}))
    assert info.value.code is ErrorCode.AMOUNT_TOO_PRECISE
