"""RFC 3339 timestamps: the table, the two independent conversions agreeing, formatting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.errors import ErrorCode, WireError
from schemas.timestamps import (
    datetime_to_ms,
    format_timestamp,
    parse_timestamp,
    parse_timestamp_ms,
)

BASE_MS = 1_795_737_600_000  # 2026-11-27T00:00:00Z


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-27T00:00:00Z", BASE_MS),
        ("2026-11-27T00:00:00z", BASE_MS),
        ("2026-11-27t00:00:00Z", BASE_MS),
        ("2026-11-27T00:00:00+00:00", BASE_MS),
        ("2026-11-27T00:00:00-00:00", BASE_MS),
        ("2026-11-27T01:30:00+01:30", BASE_MS),
        ("2026-11-26T19:00:00-05:00", BASE_MS),
        ("2026-11-27T00:00:00.5Z", BASE_MS + 500),
        ("2026-11-27T00:00:00.123Z", BASE_MS + 123),
        ("2026-11-27T00:00:00.1239Z", BASE_MS + 123),  # truncated, not rounded
        ("2026-11-27T00:00:00.999999999Z", BASE_MS + 999),
        ("2024-02-29T00:00:00Z", 1_709_164_800_000),  # leap day
        ("1970-01-01T00:00:00Z", 0),
        ("9999-12-31T23:59:59.999Z", 253_402_300_799_999),
        # no offset
        ("2026-11-27T00:00:00", ErrorCode.TIMESTAMP_WITHOUT_TIMEZONE),
        ("2026-11-27T00:00:00.123", ErrorCode.TIMESTAMP_WITHOUT_TIMEZONE),
        # malformed or impossible
        ("2026-11-27", ErrorCode.INVALID_FIELD),
        ("2026-11-27 00:00:00Z", ErrorCode.INVALID_FIELD),
        ("2026-11-27T00:00Z", ErrorCode.INVALID_FIELD),
        ("2026-11-27T00:00:00+0100", ErrorCode.INVALID_FIELD),
        ("2026-11-27T00:00:00+01", ErrorCode.INVALID_FIELD),
        ("2026-11-27T00:00:00.Z", ErrorCode.INVALID_FIELD),
        ("2026-11-27T00:00:00ZZ", ErrorCode.INVALID_FIELD),
        (" 2026-11-27T00:00:00Z", ErrorCode.INVALID_FIELD),
        ("2026-02-30T00:00:00Z", ErrorCode.INVALID_FIELD),
        ("2025-02-29T00:00:00Z", ErrorCode.INVALID_FIELD),
        ("2026-13-01T00:00:00Z", ErrorCode.INVALID_FIELD),
        ("2026-11-27T24:00:00Z", ErrorCode.INVALID_FIELD),
        ("2026-11-27T23:60:00Z", ErrorCode.INVALID_FIELD),
        ("2026-12-31T23:59:60Z", ErrorCode.INVALID_FIELD),  # leap second
        ("2026-11-27T00:00:00+24:00", ErrorCode.INVALID_FIELD),
        ("0000-01-01T00:00:00Z", ErrorCode.INVALID_FIELD),
        ("1969-12-31T23:59:59Z", ErrorCode.INVALID_FIELD),
        ("1970-01-01T00:30:00+01:00", ErrorCode.INVALID_FIELD),  # before the epoch in UTC
        ("２０２６-11-27T00:00:00Z", ErrorCode.INVALID_FIELD),  # fullwidth digits
        ("1795737600000", ErrorCode.INVALID_FIELD),
        ("yesterday", ErrorCode.INVALID_FIELD),
        ("", ErrorCode.INVALID_FIELD),
    ],
)
def test_timestamp_table(text: str, expected: int | ErrorCode) -> None:
    # Twice: the second call takes the cached-prefix path.
    for _ in range(2):
        for parse in (parse_timestamp_ms, lambda t: datetime_to_ms(parse_timestamp(t))):
            if isinstance(expected, ErrorCode):
                with pytest.raises(WireError) as info:
                    parse(text)
                assert info.value.code is expected, parse
            else:
                assert parse(text) == expected


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(WireError) as info:
        datetime_to_ms(datetime(2026, 1, 1))
    assert info.value.code is ErrorCode.TIMESTAMP_WITHOUT_TIMEZONE


_offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59)


@st.composite
def rfc3339(draw: st.DrawFn) -> str:
    """Valid-looking and broken date-times around the supported range."""
    year = draw(st.sampled_from([1969, 1970, 2000, 2024, 2026, 2100, 9999]))
    month = draw(st.integers(0, 13))
    day = draw(st.integers(0, 32))
    hour, minute, second = (
        draw(st.integers(0, 24)),
        draw(st.integers(0, 60)),
        draw(st.integers(0, 60)),
    )
    frac = draw(st.one_of(st.just(""), st.from_regex(r"\A\.[0-9]{1,10}\Z")))
    off = draw(_offsets)
    zone = draw(
        st.sampled_from(
            ["Z", "z", "", f"{'-' if off < 0 else '+'}{abs(off) // 60:02d}:{abs(off) % 60:02d}"]
        )
    )
    sep = draw(st.sampled_from(["T", "t", " "]))
    return f"{year:04d}-{month:02d}-{day:02d}{sep}{hour:02d}:{minute:02d}:{second:02d}{frac}{zone}"


@given(rfc3339())
def test_fast_arithmetic_agrees_with_datetime(text: str) -> None:
    def outcome(parse: object) -> int | ErrorCode:
        try:
            return parse(text)  # type: ignore[operator,no-any-return]
        except WireError as err:
            return err.code

    fast = outcome(parse_timestamp_ms)
    again = outcome(parse_timestamp_ms)  # the cached prefix must not change the answer
    slow = outcome(lambda t: datetime_to_ms(parse_timestamp(t)))
    assert fast == again == slow


@given(st.integers(min_value=0, max_value=253_402_300_799_999))
def test_format_timestamp_round_trips(ms: int) -> None:
    text = format_timestamp(ms)
    assert text.endswith("Z")
    assert parse_timestamp_ms(text) == ms
    assert datetime.fromisoformat(text) == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
        milliseconds=ms
    )


def test_format_timestamp_shapes() -> None:
    assert format_timestamp(BASE_MS) == "2026-11-27T00:00:00Z"
    assert format_timestamp(BASE_MS + 250) == "2026-11-27T00:00:00.250Z"
    assert format_timestamp(0) == "1970-01-01T00:00:00Z"


def test_parse_timestamp_keeps_offset_and_truncates() -> None:
    value = parse_timestamp("2026-11-27T01:30:00.123456+01:30")
    assert value.utcoffset() == timedelta(hours=1, minutes=30)
    assert value.microsecond == 123_000
    assert value == datetime(2026, 11, 27, 1, 30, 0, 123_000, tzinfo=timezone(timedelta(hours=1.5)))
