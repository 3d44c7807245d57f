"""Stable rejection codes for usage events and admin commands (SPEC section 5).

A rejected message goes to its dead-letter topic with the code in the ``error.code`` header and
a human-readable ``error.detail``. Codes are part of the wire contract: dashboards and alerts
key on them, so a code is never renamed or reused for another meaning.

=============================  =====================================================  ==========
code                           meaning                                                decided by
=============================  =====================================================  ==========
``message_too_large``          raw message longer than ``max_message_bytes`` (64 KiB)   decoder
``invalid_utf8``               bytes are not valid UTF-8                               decoder
``invalid_json``               not syntactically valid JSON (incl. NaN, a lone        decoder
                               surrogate escape such as ``"\\ud800"`` anywhere in the
                               message), or nested too deeply to parse
``wrong_type``                 the message is not a JSON object, or a field has the    decoder
                               wrong JSON type (``true`` or ``12`` for a string, a
                               string or float for an integer, a bool for an amount)
``missing_field``              a required field is absent (``null`` is a wrong type     decoder
                               unless the field allows it)
``invalid_id``                 an id (``event_id``, ``org_id``, ``member_id``,         decoder
                               ``task_id``, ``command_id``, ``grant_id``,
                               ``request_id``, a tier name) outside the alphabet of
                               :mod:`schemas.ids`: empty, over 128 characters, or
                               with a control character (U+0000-U+001F,
                               U+007F-U+009F)
``invalid_field``              right type, bad value: a note containing U+0000,        decoder
                               amount not plain decimal notation (``1e3``, ``"+1"``,
                               ``" 1"``, ``".5"``), bad date, unknown enum value,
                               anchor day outside 1-31
``amount_not_positive``        amount <= 0 (or < 0 where zero is allowed)              decoder
``amount_too_large``           amount above its bound (usage: 1,000,000 credits)       decoder
``amount_too_precise``         more than 3 decimals (tier limits: any decimals)        decoder
``timestamp_without_timezone`` RFC 3339 date-time without ``Z`` or a ``±hh:mm`` offset  decoder
``timestamp_in_future``        ``occurred_at``/``at`` more than the allowed skew        decoder
                               (default 5 minutes) ahead of the worker's wall clock
``unknown_command_type``       admin ``type`` not one of SPEC section 6                decoder
``unknown_tier``               tier not in the configured catalogue                    decoder or
                                                                                      engine
``unknown_org``                org does not exist after the grace period               engine
``unknown_member``             member does not exist after the grace period            engine
``member_removed``             member was removed before ``occurred_at``               engine
``duplicate``                  ``event_id``/``command_id`` already decided: counted    engine
                               in metrics only, never dead-lettered
``member_exists``              ``member_add`` for a member that is already active      engine
``promo_expired``              ``promo_grant`` whose ``expires_at`` is not after the    engine
                               org clock
``duplicate_grant``            ``promo_grant`` reusing a ``grant_id`` of the member     engine
``balance_overflow``           the input would push a pool balance, debt or invoice     engine
                               past 10^12 credits (the exact range of Lua doubles)
``invalid_amount``             defensive re-check inside the engine of an amount the    engine
                               decoder already validated (seen only if a producer
                               bypasses the decoder)
``invalid_command``            same, for a command's fields                            engine
``engine_failed``              the engine call failed on this org's records for a       pipeline
                               reason a retry cannot fix (a script error, not an
                               outage): the records are dead-lettered, the rest flows
``storage_failed``             PostgreSQL refused the record's ledger row for its       pipeline
                               content; the row is kept in ``quarantined_rows``
=============================  =====================================================  ==========

``unknown_org`` and ``unknown_member`` are also given at once, without waiting out the grace
period, when the parking lot is full (per org or in total; ``Settings.parked_max_*``).

The engine's codes are the ``E_*`` constants of ``worker.constants``; a test keeps the two lists
in step. ``unknown_request`` (a ``refill_result`` for an unknown or answered request) is not a
rejection: SPEC section 4 says it changes nothing, so it is applied as a no-op.

When a message has several problems the decoder reports the first one in this order: size,
UTF-8, JSON syntax, top-level type, then the fields in the order SPEC section 6 lists them
(for admin commands ``type`` first), and only then the clock check against ``now``.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a message was rejected (stable, used as the ``error.code`` DLQ header)."""

    MESSAGE_TOO_LARGE = "message_too_large"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    WRONG_TYPE = "wrong_type"
    MISSING_FIELD = "missing_field"
    INVALID_ID = "invalid_id"
    INVALID_FIELD = "invalid_field"
    AMOUNT_NOT_POSITIVE = "amount_not_positive"
    AMOUNT_TOO_LARGE = "amount_too_large"
    AMOUNT_TOO_PRECISE = "amount_too_precise"
    TIMESTAMP_WITHOUT_TIMEZONE = "timestamp_without_timezone"
    TIMESTAMP_IN_FUTURE = "timestamp_in_future"
    UNKNOWN_COMMAND_TYPE = "unknown_command_type"
    UNKNOWN_TIER = "unknown_tier"
    UNKNOWN_ORG = "unknown_org"
    UNKNOWN_MEMBER = "unknown_member"
    MEMBER_REMOVED = "member_removed"
    DUPLICATE = "duplicate"
    MEMBER_EXISTS = "member_exists"
    PROMO_EXPIRED = "promo_expired"
    DUPLICATE_GRANT = "duplicate_grant"
    BALANCE_OVERFLOW = "balance_overflow"
    INVALID_AMOUNT = "invalid_amount"
    INVALID_COMMAND = "invalid_command"
    ENGINE_FAILED = "engine_failed"
    STORAGE_FAILED = "storage_failed"


class WireError(ValueError):
    """A value that breaks the wire contract, with the code it is rejected under."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
