"""Outgoing messages: encoders produce the SPEC fields and validate against the models;
producer helpers round-trip through the decoders; the JSON Schema files match the models."""

# One case per line keeps the tables scannable; the rows are longer than the usual limit.
# ruff: noqa: E501

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import (
    CommandRecord,
    Invoice,
    Notification,
    RefillRequest,
    TaskControl,
    UsageEvent,
    UsageRecord,
    control_key,
    decode_admin,
    decode_usage,
    dlq_headers,
    encode_admin_command,
    encode_invoice,
    encode_notification,
    encode_refill_request,
    encode_task_control,
    encode_usage_event,
)
from schemas.errors import ErrorCode
from schemas.generate import SCHEMA_DIR, drift, render

CYCLE_START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
CYCLE_END_MS = 1_796_083_200_000  # 2026-12-01T00:00:00Z


def test_task_control_fields() -> None:
    raw = encode_task_control(
        signal="pause",
        org_id="org-1",
        member_id="mem-1",
        reason="pool_exhausted",
        seq=7,
        issued_at_ms=CYCLE_START_MS + 1_250,
    )
    assert json.loads(raw) == {
        "signal": "pause",
        "org_id": "org-1",
        "member_id": "mem-1",
        "reason": "pool_exhausted",
        "seq": 7,
        "issued_at": "2026-11-01T00:00:01.250Z",
    }
    TaskControl.model_validate_json(raw)
    assert control_key("org-1", "mem-1") == b"org-1/mem-1"


def test_invoice_fields() -> None:
    raw = encode_invoice(
        org_id="org-1",
        cycle_start_ms=CYCLE_START_MS,
        cycle_end_ms=CYCLE_END_MS,
        negative_balance_mc=1_234_500,
        amount_usd_cents=1_235,
    )
    assert json.loads(raw) == {
        "type": "invoice",
        "org_id": "org-1",
        "cycle_start": "2026-11-01T00:00:00Z",
        "cycle_end": "2026-12-01T00:00:00Z",
        "negative_balance_credits": "1234.5",
        "amount_usd_cents": 1_235,
    }
    Invoice.model_validate_json(raw)


def test_zero_invoice() -> None:
    raw = encode_invoice(
        org_id="o",
        cycle_start_ms=CYCLE_START_MS,
        cycle_end_ms=CYCLE_END_MS,
        negative_balance_mc=0,
        amount_usd_cents=0,
    )
    assert Invoice.model_validate_json(raw).negative_balance_credits == "0"


def test_refill_request_fields() -> None:
    raw = encode_refill_request(
        request_id="rr-1", org_id="org-1", credits_mc=2_500_500, amount_usd_cents=2_501
    )
    assert json.loads(raw) == {
        "type": "refill_request",
        "request_id": "rr-1",
        "org_id": "org-1",
        "credits": "2500.5",
        "amount_usd_cents": 2_501,
    }
    RefillRequest.model_validate_json(raw)


def test_notification_detail_convention() -> None:
    raw = encode_notification(
        type="credit_request",
        org_id="org-1",
        member_id="mem-1",
        detail={
            "credits_mc": 100_500,
            "expires_at_ms": CYCLE_END_MS,
            "limit_mc": None,
            "note": "please",
            "enabled": True,
        },
        at_ms=CYCLE_START_MS,
    )
    message = json.loads(raw)
    assert message["detail"] == {
        "credits": "100.5",
        "expires_at": "2026-12-01T00:00:00Z",
        "limit": None,
        "note": "please",
        "enabled": True,
    }
    assert message["at"] == "2026-11-01T00:00:00Z"
    Notification.model_validate_json(raw)


def test_org_wide_notification_has_null_member() -> None:
    raw = encode_notification(
        type="pool_expired", org_id="o", member_id=None, detail={}, at_ms=CYCLE_START_MS
    )
    assert Notification.model_validate_json(raw).member_id is None


@pytest.mark.parametrize(
    ("model", "raw"),
    [
        (TaskControl, b'{"signal":"stop","org_id":"o","member_id":"m","reason":"funded","seq":1,"issued_at":"2026-11-01T00:00:00Z"}'),
        (TaskControl, b'{"signal":"pause","org_id":"o","member_id":"m","reason":"funded","seq":1,"issued_at":"2026-11-01T00:00:00Z"}'),
        (TaskControl, b'{"signal":"resume","org_id":"o","member_id":"m","reason":"member_removed","seq":1,"issued_at":"2026-11-01T00:00:00Z"}'),
        (TaskControl, b'{"signal":"pause","org_id":"o","member_id":"m","reason":"pool_exhausted","seq":0,"issued_at":"2026-11-01T00:00:00Z"}'),
        (TaskControl, b'{"signal":"resume","org_id":"o","member_id":"m","reason":"funded","seq":1,"issued_at":"2026-11-01T00:00:00+00:00"}'),
        (Invoice, b'{"type":"invoice","org_id":"o","cycle_start":"2026-11-01T00:00:00Z","cycle_end":"2026-12-01T00:00:00Z","negative_balance_credits":"1.50","amount_usd_cents":2}'),
        (RefillRequest, b'{"type":"refill_request","request_id":"r","org_id":"o","credits":12.5,"amount_usd_cents":13}'),
        (Notification, b'{"type":"pool_empty","org_id":"o","member_id":null,"detail":{},"at":"2026-11-01T00:00:00Z"}'),
    ],
)  # fmt: skip
def test_outgoing_models_refuse_off_contract_output(model: type, raw: bytes) -> None:
    # The models are strict about what the worker writes: a non-canonical amount or time,
    # an unknown enum value or seq 0 would be a bug in an encoder.
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        model.model_validate_json(raw)  # type: ignore[attr-defined]


@given(
    credits_mc=st.integers(min_value=1, max_value=1_000_000_000),
    occurred_at_ms=st.integers(min_value=0, max_value=1_795_740_000_000),
    ids=st.lists(
        st.text(
            st.characters(exclude_categories=("Cs", "Cc")),
            min_size=1,
            max_size=128,
        ),
        min_size=4,
        max_size=4,
    ),
)
def test_usage_event_round_trip(credits_mc: int, occurred_at_ms: int, ids: list[str]) -> None:
    raw = encode_usage_event(
        event_id=ids[0],
        org_id=ids[1],
        member_id=ids[2],
        task_id=ids[3],
        credits_mc=credits_mc,
        occurred_at_ms=occurred_at_ms,
    )
    record = decode_usage(raw, now_ms=1_795_740_000_000)
    assert record == UsageRecord(ids[0], ids[1], ids[2], ids[3], credits_mc, occurred_at_ms)
    assert UsageEvent.model_validate_json(raw).credits_mc == credits_mc


@pytest.mark.parametrize(
    "command",
    [
        {"type": "tick"},
        {"type": "org_upsert", "billing_anchor_day": 15},
        {"type": "member_limit_set", "member_id": "m", "limit_mc": "inherit"},
        {"type": "member_limit_set", "member_id": "m", "limit_mc": None},
        {"type": "tier_limit_set", "tier": "pro", "limit_mc": 120_000},
        {
            "type": "auto_refill_set",
            "enabled": False,
            "threshold_mc": 0,
            "amount_mc": 1,
            "monthly_limit_mc": 10_000_000,
        },
        {
            "type": "promo_grant",
            "member_id": "m",
            "grant_id": "g",
            "credits_mc": 1_500,
            "expires_at_ms": CYCLE_END_MS,
        },
        {"type": "credit_request", "member_id": "m", "credits_mc": 1, "note": None},
    ],
)
def test_admin_command_round_trip(command: dict[str, object]) -> None:
    full = {"command_id": "c-1", "org_id": "o-1", "at_ms": CYCLE_START_MS, **command}
    record = decode_admin(encode_admin_command(full), now_ms=CYCLE_START_MS)
    assert isinstance(record, CommandRecord), record
    assert record.command == full


def test_dlq_headers() -> None:
    headers = dlq_headers(
        code=ErrorCode.AMOUNT_TOO_PRECISE,
        detail="credits: é" * 500,
        topic="credits.usage.v1",
        partition=3,
        offset=1_234,
    )
    as_dict = dict(headers)
    assert list(as_dict) == [
        "error.code",
        "error.detail",
        "source.topic",
        "source.partition",
        "source.offset",
    ]
    assert as_dict["error.code"] == b"amount_too_precise"
    assert as_dict["source.partition"] == b"3"
    assert as_dict["source.offset"] == b"1234"
    assert len(as_dict["error.detail"]) <= 1_024
    as_dict["error.detail"].decode()  # cut on a character boundary


def test_schema_files_match_the_models() -> None:
    stale = drift()
    assert not stale, f"run `python -m schemas.generate`: {stale} differ from the models"


def test_schema_drift_is_detected(tmp_path: Path) -> None:
    for name, text in render().items():
        (tmp_path / name).write_text(text)
    assert drift(tmp_path) == []
    (tmp_path / "usage_event.schema.json").write_text("{}\n")
    (tmp_path / "invoice.schema.json").unlink()
    assert sorted(drift(tmp_path)) == ["invoice.schema.json", "usage_event.schema.json"]


def test_generator_check_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "schemas.generate", "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd=SCHEMA_DIR.parent,
    )
    assert done.returncode == 0, done.stderr


def test_schema_files_describe_the_wire_names() -> None:
    usage = json.loads((SCHEMA_DIR / "usage_event.schema.json").read_text())
    assert usage["required"] == [
        "event_id",
        "org_id",
        "member_id",
        "task_id",
        "credits",
        "occurred_at",
    ]
    admin = json.loads((SCHEMA_DIR / "admin_command.schema.json").read_text())
    assert set(admin["discriminator"]["mapping"]) == {
        "org_upsert",
        "member_add",
        "member_remove",
        "member_set_tier",
        "tier_limit_set",
        "member_limit_set",
        "pool_purchase",
        "auto_refill_set",
        "refill_result",
        "promo_grant",
        "credit_request",
        "tick",
    }
    refill = admin["$defs"]["AutoRefillSet"]["required"]
    assert {"enabled", "threshold", "amount", "monthly_limit"} <= set(refill)


@pytest.mark.parametrize(
    ("signal", "reason"),
    [
        ("pause", "pool_exhausted"),
        ("pause", "member_limit_reached"),
        ("pause", "refill_failed"),
        ("pause", "member_removed"),
        ("resume", "funded"),
        ("resume", "limit_raised"),
        ("resume", "cycle_reset"),
        ("resume", "member_added"),
    ],
)
def test_every_spec_signal_reason_is_accepted(signal: str, reason: str) -> None:
    raw = encode_task_control(
        signal=signal, org_id="o", member_id="m", reason=reason, seq=1, issued_at_ms=0
    )
    assert TaskControl.model_validate_json(raw).reason == reason
