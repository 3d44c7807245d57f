"""Wire amounts <-> millicredits: the parsing table, formatting, cents, and a Decimal oracle."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.amounts import (
    MAX_ADMIN_MC,
    MAX_USAGE_MC,
    JsonNumber,
    format_credits,
    parse_credits,
    parse_credits_text,
    usd_cents_from_mc,
)
from schemas.errors import ErrorCode, WireError

OK = None


@pytest.mark.parametrize(
    ("value", "expected_mc", "code"),
    [
        # accepted
        (12, 12_000, OK),
        (JsonNumber("12"), 12_000, OK),
        (JsonNumber("12.5"), 12_500, OK),
        ("12.5", 12_500, OK),
        ("0.125", 125, OK),
        (JsonNumber("0.001"), 1, OK),
        ("0.001", 1, OK),
        ("7.2500", 7_250, OK),  # trailing zeros are not precision
        (JsonNumber("3.000000"), 3_000, OK),
        (1_000_000, 1_000_000_000, OK),
        ("1000000", 1_000_000_000, OK),
        (JsonNumber("1000000.000"), 1_000_000_000, OK),
        (Decimal("12.5"), 12_500, OK),
        # not positive
        (0, None, ErrorCode.AMOUNT_NOT_POSITIVE),
        ("0", None, ErrorCode.AMOUNT_NOT_POSITIVE),
        (JsonNumber("0.000"), None, ErrorCode.AMOUNT_NOT_POSITIVE),
        (JsonNumber("-0"), None, ErrorCode.AMOUNT_NOT_POSITIVE),
        (-1, None, ErrorCode.AMOUNT_NOT_POSITIVE),
        (JsonNumber("-1"), None, ErrorCode.AMOUNT_NOT_POSITIVE),
        ("-0.5", None, ErrorCode.AMOUNT_NOT_POSITIVE),
        ("-0.0001", None, ErrorCode.AMOUNT_NOT_POSITIVE),  # sign is checked before precision
        # too precise
        ("0.1234", None, ErrorCode.AMOUNT_TOO_PRECISE),
        (JsonNumber("0.0001"), None, ErrorCode.AMOUNT_TOO_PRECISE),
        (JsonNumber("1000000.0001"), None, ErrorCode.AMOUNT_TOO_PRECISE),
        # too large
        (1_000_001, None, ErrorCode.AMOUNT_TOO_LARGE),
        (JsonNumber("1000000.001"), None, ErrorCode.AMOUNT_TOO_LARGE),
        ("1000001", None, ErrorCode.AMOUNT_TOO_LARGE),
        (JsonNumber("9" * 5_000), None, ErrorCode.AMOUNT_TOO_LARGE),  # no int() on 5k digits
        # not plain decimal notation
        (JsonNumber("1e3"), None, ErrorCode.INVALID_FIELD),
        (JsonNumber("1.5E+2"), None, ErrorCode.INVALID_FIELD),
        ("1e3", None, ErrorCode.INVALID_FIELD),
        ("NaN", None, ErrorCode.INVALID_FIELD),
        ("Infinity", None, ErrorCode.INVALID_FIELD),
        ("+1", None, ErrorCode.INVALID_FIELD),
        (" 1", None, ErrorCode.INVALID_FIELD),
        ("1 ", None, ErrorCode.INVALID_FIELD),
        (".5", None, ErrorCode.INVALID_FIELD),
        ("5.", None, ErrorCode.INVALID_FIELD),
        ("012", None, ErrorCode.INVALID_FIELD),
        ("", None, ErrorCode.INVALID_FIELD),
        ("1,5", None, ErrorCode.INVALID_FIELD),
        ("١٢", None, ErrorCode.INVALID_FIELD),  # Arabic-Indic digits are not ASCII digits
        (Decimal("NaN"), None, ErrorCode.INVALID_FIELD),
        # wrong type
        (True, None, ErrorCode.WRONG_TYPE),
        (False, None, ErrorCode.WRONG_TYPE),
        (None, None, ErrorCode.WRONG_TYPE),
        (12.5, None, ErrorCode.WRONG_TYPE),  # a binary float never becomes money
        ([], None, ErrorCode.WRONG_TYPE),
        ({}, None, ErrorCode.WRONG_TYPE),
    ],
)
def test_usage_amount_table(value: object, expected_mc: int | None, code: ErrorCode | None) -> None:
    if code is None:
        assert parse_credits(value) == expected_mc
    else:
        with pytest.raises(WireError) as info:
            parse_credits(value)
        assert info.value.code is code


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        ("0", {"allow_zero": True}, 0),
        ("-0", {"allow_zero": True}, 0),
        ("-1", {"allow_zero": True}, ErrorCode.AMOUNT_NOT_POSITIVE),
        ("5000000", {"max_mc": MAX_ADMIN_MC}, 5_000_000_000),
        ("1000000000", {"max_mc": MAX_ADMIN_MC}, MAX_ADMIN_MC),
        ("1000000000.001", {"max_mc": MAX_ADMIN_MC}, ErrorCode.AMOUNT_TOO_LARGE),
        ("120", {"whole": True, "allow_zero": True}, 120_000),
        ("120.5", {"whole": True}, ErrorCode.AMOUNT_TOO_PRECISE),
        ("120.000", {"whole": True}, 120_000),
    ],
)
def test_amount_options(text: str, kwargs: dict[str, object], expected: int | ErrorCode) -> None:
    if isinstance(expected, ErrorCode):
        with pytest.raises(WireError) as info:
            parse_credits_text(text, **kwargs)  # type: ignore[arg-type]
        assert info.value.code is expected
    else:
        assert parse_credits_text(text, **kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mc", "text"),
    [
        (0, "0"),
        (1, "0.001"),
        (10, "0.01"),
        (100, "0.1"),
        (1_000, "1"),
        (12_500, "12.5"),
        (1_234_500, "1234.5"),
        (1_000_000_000, "1000000"),
        (-1, "-0.001"),
        (-1_500, "-1.5"),
    ],
)
def test_format_credits(mc: int, text: str) -> None:
    assert format_credits(mc) == text


@pytest.mark.parametrize(
    ("mc", "cents"),
    [(0, 0), (499, 0), (500, 1), (1_000, 1), (1_499, 1), (1_500, 2), (812_500, 813)],
)
def test_usd_cents_round_half_up(mc: int, cents: int) -> None:
    assert usd_cents_from_mc(mc) == cents


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_format_then_parse_is_identity(mc: int) -> None:
    text = format_credits(mc)
    assert Decimal(text) * 1000 == mc
    if mc >= 0:
        assert parse_credits_text(text, allow_zero=True, max_mc=10**15) == mc


@given(
    st.from_regex(r"\A-?(0|[1-9][0-9]{0,8})(\.[0-9]{1,6})?\Z"),
    st.sampled_from([JsonNumber, str]),
)
def test_parse_agrees_with_decimal_oracle(text: str, wrap: type) -> None:
    value = Decimal(text)
    if value <= 0:
        expected: int | ErrorCode = ErrorCode.AMOUNT_NOT_POSITIVE
    elif value != value.quantize(Decimal("0.001")):
        expected = ErrorCode.AMOUNT_TOO_PRECISE
    elif value * 1000 > MAX_USAGE_MC:
        expected = ErrorCode.AMOUNT_TOO_LARGE
    else:
        expected = int(value * 1000)
    try:
        got: int | ErrorCode = parse_credits(wrap(text))
    except WireError as err:
        got = err.code
    assert got == expected


def test_bounds_match_the_engine() -> None:
    # The decoder and the engine must agree on what fits, or the engine would reject (or, for
    # Lua doubles, round) what the decoder let through.
    from worker import constants

    assert constants.MAX_USAGE_MC == MAX_USAGE_MC
    assert constants.MAX_AMOUNT_MC == MAX_ADMIN_MC
