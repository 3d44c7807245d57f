"""RFC 3339 timestamps <-> integer milliseconds since the Unix epoch (UTC).

Accepted input: ``YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)``, ASCII digits only, ``T``/``t``
and ``Z``/``z`` in either case (RFC 3339 section 5.6), any number of fraction digits. The
fraction is truncated to milliseconds (``.1239`` -> 123 ms), never rounded, so a timestamp
never moves later than the producer wrote it. ``-00:00`` is read as UTC.

- a date-time without offset (``2026-01-01T00:00:00``): ``timestamp_without_timezone``;
- anything else that does not match, an impossible date or time (Feb 30, hour 24, second 60:
  leap seconds are not representable), an offset hour above 23, an instant before
  1970-01-01T00:00:00Z (times are non-negative epoch milliseconds everywhere downstream):
  ``invalid_field``;
- not a JSON string: ``wrong_type``.

Two independent conversions exist on purpose: :func:`parse_timestamp_ms` is the fast path
(integer calendar arithmetic), :func:`parse_timestamp` builds an aware ``datetime`` for the
pydantic models. The differential tests check that they agree.

Output: :func:`format_timestamp` writes UTC with ``Z``, with ``.mmm`` only when the
milliseconds are not zero (``2026-11-01T00:00:00Z``, ``2026-11-01T10:15:00.250Z``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

from schemas.errors import ErrorCode, WireError

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)

_RFC3339: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))?"
)
_DAYS_IN_MONTH: Final = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _match(text: str) -> re.Match[str]:
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise WireError(
            ErrorCode.INVALID_FIELD, f"timestamp {text[:40]!r} is not an RFC 3339 date-time"
        )
    if m.group(8) is None and m.group(9) is None:
        raise WireError(
            ErrorCode.TIMESTAMP_WITHOUT_TIMEZONE,
            f"timestamp {text[:40]!r} has no timezone offset",
        )
    return m


def _invalid(text: str) -> WireError:
    return WireError(ErrorCode.INVALID_FIELD, f"timestamp {text[:40]!r} is not a valid instant")


def _days_from_civil(y: int, m: int, d: int) -> int:
    # Proleptic Gregorian day count relative to 1970-01-01 (H. Hinnant's algorithm).
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


_PREFIX_SECONDS: dict[str, int] = {}
"""``YYYY-MM-DDTHH:MM:SS`` -> epoch seconds of that wall time read as UTC, for prefixes already
validated. Events of one batch share a handful of seconds, so the hot path is one dict lookup;
cleared when full, so its memory stays bounded."""
_PREFIX_CACHE_MAX: Final = 65_536


def parse_timestamp_ms(text: str) -> int:
    """Epoch milliseconds of an RFC 3339 date-time with offset (raises :class:`WireError`)."""
    seconds = _PREFIX_SECONDS.get(text[:19])
    if seconds is not None:
        # Only the two shapes producers actually send are taken here; every other tail (and
        # every error) goes through the full parser.
        n = len(text)
        if n == 20 and text[19] in "Zz":
            return seconds * 1000
        if n == 24 and text[19] == "." and text[23] in "Zz":
            frac = text[20:23]
            if frac.isascii() and frac.isdigit():
                return seconds * 1000 + int(frac)
    return _parse_timestamp_ms(text)


def _parse_timestamp_ms(text: str) -> int:
    m = _match(text)
    year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3))
    hour, minute, second = int(m.group(4)), int(m.group(5)), int(m.group(6))
    if year < 1 or not 1 <= month <= 12 or hour > 23 or minute > 59 or second > 59:
        raise _invalid(text)
    leap = month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= day <= _DAYS_IN_MONTH[month] + leap:
        raise _invalid(text)
    offset_min = 0
    if m.group(9) is not None:
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            raise _invalid(text)
        offset_min = oh * 60 + om
        if m.group(9) == "-":
            offset_min = -offset_min
    frac = m.group(7)
    ms = int(frac[:3].ljust(3, "0")) if frac else 0
    wall = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
    if wall >= 0:
        if len(_PREFIX_SECONDS) >= _PREFIX_CACHE_MAX:
            _PREFIX_SECONDS.clear()
        _PREFIX_SECONDS[text[:19]] = wall
    seconds = wall - offset_min * 60
    if seconds < 0:
        raise _invalid(text)
    return seconds * 1000 + ms


def parse_timestamp(text: str) -> datetime:
    """Aware ``datetime`` of an RFC 3339 date-time with offset, truncated to milliseconds."""
    m = _match(text)
    frac = (m.group(7) or "")[:3].ljust(3, "0")
    if m.group(9) is None:
        tz = UTC
    else:
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            raise _invalid(text)
        delta = timedelta(hours=oh, minutes=om)
        tz = timezone(-delta if m.group(9) == "-" else delta)
    try:
        value = datetime(
            int(m.group(1)),
            int(m.group(2)),
            int(m.group(3)),
            int(m.group(4)),
            int(m.group(5)),
            int(m.group(6)),
            int(frac) * 1000,
            tzinfo=tz,
        )
    except ValueError:
        raise _invalid(text) from None
    if value < EPOCH:
        raise _invalid(text)
    return value


def datetime_to_ms(value: datetime) -> int:
    """Epoch milliseconds of an aware ``datetime`` (sub-millisecond part truncated)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise WireError(ErrorCode.TIMESTAMP_WITHOUT_TIMEZONE, "datetime has no timezone")
    return (value - EPOCH) // _ONE_MS


def ms_to_datetime(ms: int) -> datetime:
    """Aware UTC ``datetime`` for epoch milliseconds."""
    return EPOCH + timedelta(milliseconds=ms)


def format_timestamp(ms: int) -> str:
    """RFC 3339 UTC string with ``Z`` for epoch milliseconds."""
    seconds, millis = divmod(ms, 1000)
    dt = EPOCH + timedelta(seconds=seconds)
    base = (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    )
    return f"{base}.{millis:03d}Z" if millis else f"{base}Z"
