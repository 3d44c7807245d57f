"""pydantic v2 models of every message in SPEC section 6: the reference for the wire contract.

Incoming messages (:class:`UsageEvent`, :data:`AdminCommand`) validate exactly as SPEC
section 5 says, with the error codes of :mod:`schemas.errors`. Validate raw messages with
``UsageEvent.from_wire(raw)`` and :func:`parse_admin_command`, never ``model_validate_json``:
pydantic's JSON parser reads ``12.5`` as a binary float, which the amount fields refuse
(``wrong_type``) rather than round. ``from_wire`` feeds the models through
:mod:`schemas.jsonwire`, which keeps JSON numbers as their text. The fast decoder in
:mod:`schemas.decode` must agree with these models; a differential test checks it.

Conventions:

- Field names on the wire are exactly the SPEC's. Amount fields are held as integer
  millicredits under a ``_mc`` attribute whose alias is the wire name (``credits_mc`` is
  ``"credits"`` on the wire); only the wire name is accepted as input.
- Timestamps are aware ``datetime`` values truncated to milliseconds.
- Unknown extra fields on incoming messages are ignored (producers may add fields before the
  worker knows them); outgoing models forbid them.
- Incoming types are strict: no ``"12"`` for an integer, no ``1`` for a boolean, no number for a
  string.

Outgoing messages (:class:`TaskControl`, :class:`Notification`, :class:`RefillRequest`,
:class:`Invoice`) describe the JSON the worker writes: amounts as decimal strings, times as
RFC 3339 UTC strings with ``Z``. The encoders in :mod:`schemas.encode` build that JSON directly;
tests validate their output against these models.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Final, Literal, Self, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from schemas.amounts import MAX_ADMIN_MC, MAX_USAGE_MC, JsonNumber, parse_credits
from schemas.errors import ErrorCode, WireError
from schemas.ids import ID_MAX_LENGTH, ID_PATTERN, id_problem
from schemas.jsonwire import json_fields, json_value, raw_fields
from schemas.timestamps import datetime_to_ms, parse_timestamp

NOTE_MAX_LENGTH: Final = 1_024

_AMOUNT_PATTERN: Final = r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?$"
_CREDIT_STRING_PATTERN: Final = r"^-?(0|[1-9][0-9]*)(\.[0-9]{0,2}[1-9])?$"
_UTC_PATTERN: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{3})?Z$"
_INT_TEXT: Final = re.compile(r"-?(0|[1-9][0-9]*)")


def _custom(err: WireError) -> PydanticCustomError:
    # The detail is passed as context, never as the template: it may echo user text with braces.
    return PydanticCustomError(err.code.value, "{detail}", {"detail": err.detail})


def _amount(*, allow_zero: bool, max_mc: int, whole: bool = False) -> Callable[[object], int]:
    def validate(value: object) -> int:
        try:
            return parse_credits(value, allow_zero=allow_zero, max_mc=max_mc, whole=whole)
        except WireError as err:
            raise _custom(err) from None

    return validate


def _amount_schema(*, allow_zero: bool, max_mc: int, whole: bool = False) -> dict[str, Any]:
    credits = max_mc // 1_000
    bound = "0 <= x" if allow_zero else "0 < x"
    decimals = "whole credits" if whole else "at most 3 decimals"
    return {
        "description": (
            f"Credits, {bound} <= {credits}, {decimals}, plain decimal notation "
            "(no exponent), as a JSON number or a decimal string"
        ),
        "anyOf": [
            {"type": "integer" if whole else "number"},
            {"type": "string", "pattern": _AMOUNT_PATTERN},
        ],
    }


def _timestamp(value: object) -> datetime:
    try:
        if isinstance(value, str):
            return parse_timestamp(value)
        if isinstance(value, datetime):
            if datetime_to_ms(value) < 0:  # also refuses naive values
                raise WireError(ErrorCode.INVALID_FIELD, "timestamp is before 1970-01-01")
            return value.replace(microsecond=value.microsecond // 1000 * 1000)
    except WireError as err:
        raise _custom(err) from None
    raise PydanticCustomError(
        ErrorCode.WRONG_TYPE.value, "timestamp must be an RFC 3339 string", {}
    )


def _wire_int(value: object) -> object:
    if isinstance(value, JsonNumber):
        if _INT_TEXT.fullmatch(value.text) is None:
            raise PydanticCustomError(
                ErrorCode.WRONG_TYPE.value, "{detail}", {"detail": "expected an integer"}
            )
        if len(value.text) > 18:
            raise PydanticCustomError(
                ErrorCode.INVALID_FIELD.value, "{detail}", {"detail": "integer out of range"}
            )
        return int(value.text)
    return value


def _tier_limit(value: object) -> int | None:
    if value is None:
        return None
    return _amount(allow_zero=True, max_mc=MAX_ADMIN_MC, whole=True)(value)


def _member_limit(value: object) -> int | Literal["inherit"] | None:
    if value is None:
        return None
    if value == "inherit" and type(value) is str:
        return "inherit"
    return _amount(allow_zero=True, max_mc=MAX_ADMIN_MC)(value)


def _no_nul(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold U+0000: such a string would be accepted here and then
    # fail the ledger write forever, so it is refused at the door.
    if "\x00" in value:
        raise PydanticCustomError(
            ErrorCode.INVALID_FIELD.value, "{detail}", {"detail": "contains U+0000"}
        )
    return value


def _valid_id(value: str) -> str:
    problem = id_problem(value)
    if problem is not None:
        raise PydanticCustomError(ErrorCode.INVALID_ID.value, "{detail}", {"detail": problem})
    return value


Id = Annotated[
    str,
    StringConstraints(strict=True),
    AfterValidator(_valid_id),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": ID_MAX_LENGTH,
            "pattern": ID_PATTERN,
            "description": "1-128 characters, no control characters (schemas/ids.py)",
        }
    ),
]
"""An identifier in the alphabet of :mod:`schemas.ids` (rejected with ``invalid_id``)."""
Note = Annotated[
    str, StringConstraints(max_length=NOTE_MAX_LENGTH, strict=True), AfterValidator(_no_nul)
]

Timestamp = Annotated[
    datetime,
    BeforeValidator(_timestamp),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "description": "RFC 3339 date-time with Z or a +hh:mm offset",
        }
    ),
]
UsageAmount = Annotated[
    int,
    BeforeValidator(_amount(allow_zero=False, max_mc=MAX_USAGE_MC)),
    WithJsonSchema(_amount_schema(allow_zero=False, max_mc=MAX_USAGE_MC)),
]
PositiveAmount = Annotated[
    int,
    BeforeValidator(_amount(allow_zero=False, max_mc=MAX_ADMIN_MC)),
    WithJsonSchema(_amount_schema(allow_zero=False, max_mc=MAX_ADMIN_MC)),
]
NonNegativeAmount = Annotated[
    int,
    BeforeValidator(_amount(allow_zero=True, max_mc=MAX_ADMIN_MC)),
    WithJsonSchema(_amount_schema(allow_zero=True, max_mc=MAX_ADMIN_MC)),
]
TierLimit = Annotated[
    int | None,
    BeforeValidator(_tier_limit),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "null"},
                _amount_schema(allow_zero=True, max_mc=MAX_ADMIN_MC, whole=True),
            ],
            "description": "null (no limit) or whole credits per cycle",
        }
    ),
]
MemberLimit = Annotated[
    int | Literal["inherit"] | None,
    BeforeValidator(_member_limit),
    WithJsonSchema(
        {
            "anyOf": [
                {"const": "inherit"},
                {"type": "null"},
                _amount_schema(allow_zero=True, max_mc=MAX_ADMIN_MC),
            ],
            "description": '"inherit" (use the tier limit), null (no limit) or credits per cycle',
        }
    ),
]
AnchorDay = Annotated[int, BeforeValidator(_wire_int), Field(ge=1, le=31)]

CreditString = Annotated[
    str,
    StringConstraints(pattern=_CREDIT_STRING_PATTERN, strict=True),
    Field(description="Credits as the shortest decimal string, e.g. 1234.5"),
]
UtcTimestamp = Annotated[
    str,
    StringConstraints(pattern=_UTC_PATTERN, strict=True),
    Field(description="RFC 3339 UTC date-time with Z"),
]


class _Incoming(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    @classmethod
    def wire_names(cls) -> frozenset[str]:
        """The field names this message has on the wire (aliases where set)."""
        return frozenset(f.alias or name for name, f in cls.model_fields.items())

    @classmethod
    def from_wire(cls, raw: bytes) -> Self:
        """Validate one raw JSON message (amounts never through a float).

        Raises :class:`WireError` with the code of the first problem (syntax, then fields in
        declaration order). Size and the wall-clock check are the decoder's business.
        """
        fields = json_fields(raw, cls.wire_names())
        try:
            return cls.model_validate(fields)
        except ValidationError as err:
            raise wire_error(err) from None


class _Outgoing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class UsageEvent(_Incoming):
    """One charge from the agent runtime (topic ``credits.usage.v1``)."""

    event_id: Id
    org_id: Id
    member_id: Id
    task_id: Id
    credits_mc: UsageAmount = Field(alias="credits")
    occurred_at: Timestamp


class _Command(_Incoming):
    command_id: Id
    org_id: Id
    at: Timestamp

    def to_engine(self) -> dict[str, Any]:
        """The command as the engine's plain dict (see :mod:`schemas.decode`)."""
        out: dict[str, Any] = {}
        for name, value in self:
            if isinstance(value, datetime):
                out[f"{name}_ms"] = datetime_to_ms(value)
            else:
                out[name] = value
        return out


class OrgUpsert(_Command):
    """Create an org or change its billing anchor day."""

    type: Literal["org_upsert"]
    billing_anchor_day: AnchorDay


class MemberAdd(_Command):
    """Add a member (again) with a seat tier."""

    type: Literal["member_add"]
    member_id: Id
    tier: Id


class MemberRemove(_Command):
    """Remove a member from the org."""

    type: Literal["member_remove"]
    member_id: Id


class MemberSetTier(_Command):
    """Change a member's seat tier."""

    type: Literal["member_set_tier"]
    member_id: Id
    tier: Id


class TierLimitSet(_Command):
    """Set the per-cycle pool limit of a seat tier (``null``: no limit)."""

    type: Literal["tier_limit_set"]
    tier: Id
    limit_mc: TierLimit = Field(alias="limit")


class MemberLimitSet(_Command):
    """Set a member's per-cycle pool limit (``"inherit"``, ``null`` or credits)."""

    type: Literal["member_limit_set"]
    member_id: Id
    limit_mc: MemberLimit = Field(alias="limit")


class PoolPurchase(_Command):
    """Add purchased credits to the org pool."""

    type: Literal["pool_purchase"]
    credits_mc: PositiveAmount = Field(alias="credits")


class AutoRefillSet(_Command):
    """Configure auto-refill of the org pool."""

    type: Literal["auto_refill_set"]
    enabled: bool
    threshold_mc: NonNegativeAmount = Field(alias="threshold")
    amount_mc: PositiveAmount = Field(alias="amount")
    monthly_limit_mc: NonNegativeAmount = Field(alias="monthly_limit")


class RefillResult(_Command):
    """The payment system's answer to a refill request."""

    type: Literal["refill_result"]
    request_id: Id
    status: Literal["succeeded", "failed"]


class PromoGrant(_Command):
    """Grant promotional credits to one member, with an expiry."""

    type: Literal["promo_grant"]
    member_id: Id
    grant_id: Id
    credits_mc: PositiveAmount = Field(alias="credits")
    expires_at: Timestamp


class CreditRequest(_Command):
    """A member asks the admin for more credits (forwarded as a notification)."""

    type: Literal["credit_request"]
    member_id: Id
    credits_mc: PositiveAmount = Field(alias="credits")
    note: Note | None = None


class Tick(_Command):
    """Advance the org clock to ``at`` (sent by the worker's scheduler)."""

    type: Literal["tick"]


AdminCommandModel = (
    OrgUpsert
    | MemberAdd
    | MemberRemove
    | MemberSetTier
    | TierLimitSet
    | MemberLimitSet
    | PoolPurchase
    | AutoRefillSet
    | RefillResult
    | PromoGrant
    | CreditRequest
    | Tick
)
AdminCommand = Annotated[AdminCommandModel, Field(discriminator="type")]
"""Any admin command (topic ``credits.admin.v1``), discriminated on ``type``."""

ADMIN_COMMAND_ADAPTER: Final[TypeAdapter[AdminCommandModel]] = TypeAdapter(AdminCommand)

PauseReason = Literal["pool_exhausted", "member_limit_reached", "refill_failed", "member_removed"]
ResumeReason = Literal["funded", "limit_raised", "cycle_reset", "member_added"]
NotificationType = Literal[
    "pool_limit_reached",
    "credit_request",
    "pool_below_threshold",
    "refill_requested",
    "refill_failed",
    "refill_limit_reached",
    "pool_expired",
]


class TaskControl(_Outgoing):
    """Pause or resume a member's tasks (compacted topic ``credits.control.v1``, key
    ``org_id/member_id``). A pause carries a pause reason (pool_exhausted, member_limit_reached,
    refill_failed, member_removed), a resume a resume reason (funded, limit_raised, cycle_reset,
    member_added). ``seq`` increases strictly per member; the latest record is the state."""

    signal: Literal["pause", "resume"]
    org_id: Id
    member_id: Id
    reason: PauseReason | ResumeReason
    seq: int = Field(ge=1)
    issued_at: UtcTimestamp

    @model_validator(mode="after")
    def _reason_fits_signal(self) -> Self:
        pausing = self.reason in get_args(PauseReason)
        if pausing != (self.signal == "pause"):
            raise ValueError(f"reason {self.reason!r} does not go with signal {self.signal!r}")
        return self


class Notification(_Outgoing):
    """Something an admin (or member) should hear about (``credits.notifications.v1``)."""

    type: NotificationType
    org_id: Id
    member_id: Id | None
    detail: dict[str, Any]
    at: UtcTimestamp


class RefillRequest(_Outgoing):
    """Ask the payment system to charge an auto-refill (``credits.billing.v1``)."""

    type: Literal["refill_request"]
    request_id: Id
    org_id: Id
    credits: CreditString
    amount_usd_cents: int = Field(ge=0)


class Invoice(_Outgoing):
    """The org's debt for one closed cycle (``credits.billing.v1``)."""

    type: Literal["invoice"]
    org_id: Id
    cycle_start: UtcTimestamp
    cycle_end: UtcTimestamp
    negative_balance_credits: CreditString
    amount_usd_cents: int = Field(ge=0)


_COMMAND_MODELS: Final[dict[str, type[AdminCommandModel]]] = {
    get_args(model.model_fields["type"].annotation)[0]: model
    for model in (
        OrgUpsert,
        MemberAdd,
        MemberRemove,
        MemberSetTier,
        TierLimitSet,
        MemberLimitSet,
        PoolPurchase,
        AutoRefillSet,
        RefillResult,
        PromoGrant,
        CreditRequest,
        Tick,
    )
}

COMMAND_TYPES: Final = frozenset(_COMMAND_MODELS)


def parse_admin_command(raw: bytes) -> AdminCommandModel:
    """Validate one raw admin command: ``type`` first, then that type's fields.

    Raises :class:`WireError` (``missing_field``/``wrong_type``/``unknown_command_type`` for a
    bad ``type``, then the field codes). Agrees with :data:`ADMIN_COMMAND_ADAPTER`.
    """
    fields = raw_fields(raw)
    if "type" not in fields:
        raise WireError(ErrorCode.MISSING_FIELD, "type: field required")
    type_ = json_value(fields["type"])
    if not isinstance(type_, str):
        raise WireError(ErrorCode.WRONG_TYPE, "type: must be a string")
    model = _COMMAND_MODELS.get(type_)
    if model is None:
        raise WireError(ErrorCode.UNKNOWN_COMMAND_TYPE, f"type: {type_[:40]!r} is not known")
    known = model.wire_names()
    values = {key: json_value(token) for key, token in fields.items() if key in known}
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise wire_error(err) from None


_TYPE_CODES: Final = {
    "missing": ErrorCode.MISSING_FIELD,
    "union_tag_not_found": ErrorCode.MISSING_FIELD,
    "union_tag_invalid": ErrorCode.UNKNOWN_COMMAND_TYPE,
    "string_type": ErrorCode.WRONG_TYPE,
    "int_type": ErrorCode.WRONG_TYPE,
    "bool_type": ErrorCode.WRONG_TYPE,
    "model_type": ErrorCode.WRONG_TYPE,
    "model_attributes_type": ErrorCode.WRONG_TYPE,
    "dict_type": ErrorCode.WRONG_TYPE,
    "datetime_type": ErrorCode.WRONG_TYPE,
    "none_required": ErrorCode.WRONG_TYPE,
}
_CODES_BY_VALUE: Final = {code.value: code for code in ErrorCode}


def error_code(error_type: str) -> ErrorCode:
    """The stable code for a pydantic error type (custom types are already codes)."""
    code = _CODES_BY_VALUE.get(error_type)
    if code is not None:
        return code
    return _TYPE_CODES.get(error_type, ErrorCode.INVALID_FIELD)


def wire_error(err: ValidationError) -> WireError:
    """The first error of a pydantic ``ValidationError`` as a coded :class:`WireError`."""
    first = err.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(part) for part in first["loc"]) or "message"
    return WireError(error_code(first["type"]), f"{loc}: {first['msg']}")


__all__ = [
    "ADMIN_COMMAND_ADAPTER",
    "COMMAND_TYPES",
    "AdminCommand",
    "AdminCommandModel",
    "AutoRefillSet",
    "CreditRequest",
    "Invoice",
    "MemberAdd",
    "MemberLimitSet",
    "MemberRemove",
    "MemberSetTier",
    "Notification",
    "OrgUpsert",
    "PoolPurchase",
    "PromoGrant",
    "RefillRequest",
    "RefillResult",
    "TaskControl",
    "Tick",
    "TierLimitSet",
    "UsageEvent",
    "error_code",
    "parse_admin_command",
    "wire_error",
]
