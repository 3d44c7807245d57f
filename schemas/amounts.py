"""Credit amounts: wire text <-> integer millicredits, never through a float.

Wire form (input). An amount is a JSON number or a JSON string, both in *plain decimal
notation*: an optional ``-``, an integer part without leading zeros, and an optional fraction
(``12``, ``12.5``, ``"0.125"``, ``"7.250"``). Trailing zeros in the fraction are allowed and do
not count as precision (``"7.2500"`` is 7,250 mc). Rejected:

- exponent forms (``1e3``, ``1.5E+2``), ``NaN``/``Infinity``, ``"+1"``, ``" 1"``, ``".5"``,
  ``"1."``, ``"012"``, non-ASCII digits: ``invalid_field``. No real producer emits an exponent
  for a valid amount (JavaScript and Python only switch to exponents for magnitudes far outside
  the allowed range), so plain notation loses nothing and keeps one parser for numbers and
  strings;
- ``true``/``false``, ``null``, arrays, objects, and Python floats: ``wrong_type``;
- below the minimum (``<= 0``, or ``< 0`` where zero is meaningful): ``amount_not_positive``;
- more than 3 significant decimals: ``amount_too_precise``;
- above the maximum: ``amount_too_large``.

The checks run in that order, so ``"-0.0001"`` is ``amount_not_positive`` and
``"1000000.0001"`` is ``amount_too_precise``.

JSON numbers reach this module as their raw text (:class:`JsonNumber`), so ``12.5`` is parsed
exactly as ``"12.5"``.

Output form. :func:`format_credits` writes the shortest decimal string: 1,234,500 mc ->
``"1234.5"``, 0 -> ``"0"``, -1 -> ``"-0.001"``.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Final

from schemas.errors import ErrorCode, WireError

MC_PER_CREDIT: Final = 1_000

MAX_USAGE_MC: Final = 1_000_000 * MC_PER_CREDIT
"""A usage event may charge at most 1,000,000 credits (SPEC section 5)."""

MAX_ADMIN_MC: Final = 1_000_000_000 * MC_PER_CREDIT
"""Bound for admin amounts (purchases, grants, limits, refill settings): 10^9 credits (10 M USD).

Lua numbers are doubles, exact for integers up to 2^53 (about 9.007e15 mc); keeping every single
input at or below 10^12 mc leaves room for millions of such amounts to be summed exactly.
"""

_PLAIN_DECIMAL: Final = re.compile(r"(-?)(0|[1-9][0-9]*)(?:\.([0-9]+))?")
_MAX_INT_DIGITS: Final = 16
"""More integer digits than this is above every bound; checked before ``int()`` so a 60 KB digit
string cannot trip Python's int-conversion limit or cost quadratic time."""


class JsonNumber:
    """The raw text of a JSON number, as the tokenizer saw it (never converted to float)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"JsonNumber({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonNumber) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def parse_credits_text(
    text: str,
    *,
    allow_zero: bool = False,
    max_mc: int = MAX_USAGE_MC,
    whole: bool = False,
) -> int:
    """Parse plain decimal credit text to millicredits (raises :class:`WireError`)."""
    m = _PLAIN_DECIMAL.fullmatch(text)
    if m is None:
        raise WireError(
            ErrorCode.INVALID_FIELD, f"amount {text[:40]!r} is not a plain decimal number"
        )
    sign, int_part, frac = m.groups()
    frac = (frac or "").rstrip("0")
    is_zero = int_part == "0" and not frac
    if (sign and not is_zero) or (is_zero and not allow_zero):
        raise WireError(
            ErrorCode.AMOUNT_NOT_POSITIVE,
            f"amount {text[:40]} must be {'>= 0' if allow_zero else '> 0'}",
        )
    if whole and frac:
        raise WireError(ErrorCode.AMOUNT_TOO_PRECISE, f"amount {text[:40]} must be whole credits")
    if len(frac) > 3:
        raise WireError(
            ErrorCode.AMOUNT_TOO_PRECISE, f"amount {text[:40]} has more than 3 decimals"
        )
    if len(int_part) > _MAX_INT_DIGITS:
        raise WireError(ErrorCode.AMOUNT_TOO_LARGE, f"amount {text[:40]}... is too large")
    mc = int(int_part) * MC_PER_CREDIT + (int(frac.ljust(3, "0")) if frac else 0)
    if mc > max_mc:
        raise WireError(
            ErrorCode.AMOUNT_TOO_LARGE,
            f"amount {text[:40]} is above {format_credits(max_mc)} credits",
        )
    return mc


def parse_credits(
    value: object,
    *,
    allow_zero: bool = False,
    max_mc: int = MAX_USAGE_MC,
    whole: bool = False,
) -> int:
    """Parse a wire amount (int, :class:`JsonNumber`, str or finite Decimal) to millicredits.

    Floats and bools are refused (``wrong_type``): money never passes through a binary float.
    Raises :class:`WireError` with the code of the first rule broken.
    """
    if isinstance(value, JsonNumber):
        return parse_credits_text(value.text, allow_zero=allow_zero, max_mc=max_mc, whole=whole)
    if isinstance(value, str):
        return parse_credits_text(value, allow_zero=allow_zero, max_mc=max_mc, whole=whole)
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise WireError(
            ErrorCode.WRONG_TYPE,
            f"amount must be a number or a decimal string, not {_json_type(value)}",
        )
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise WireError(ErrorCode.INVALID_FIELD, f"amount {value} is not finite")
        return parse_credits_text(
            format(value, "f"), allow_zero=allow_zero, max_mc=max_mc, whole=whole
        )
    if value < 0 or (value == 0 and not allow_zero):
        raise WireError(
            ErrorCode.AMOUNT_NOT_POSITIVE,
            f"amount {value} must be {'>= 0' if allow_zero else '> 0'}",
        )
    if value * MC_PER_CREDIT > max_mc:
        raise WireError(
            ErrorCode.AMOUNT_TOO_LARGE,
            f"amount {value} is above {format_credits(max_mc)} credits",
        )
    return value * MC_PER_CREDIT


def format_credits(mc: int) -> str:
    """Millicredits as the shortest decimal credit string (1234500 -> ``"1234.5"``)."""
    sign = "-" if mc < 0 else ""
    whole, frac = divmod(abs(mc), MC_PER_CREDIT)
    if frac:
        return f"{sign}{whole}.{frac:03d}".rstrip("0")
    return f"{sign}{whole}"


def usd_cents_from_mc(mc: int) -> int:
    """USD cents for an amount in millicredits (1 credit = 1 cent), rounded half up."""
    return (mc + MC_PER_CREDIT // 2) // MC_PER_CREDIT


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
