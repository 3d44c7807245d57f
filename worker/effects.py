"""Effects: what an engine call produced, as typed values (a tagged union of msgspec Structs).

Each effect knows what it becomes: its PostgreSQL row (``row``, in the column order of the
table named by ``TABLE``, see ``worker/ledger.py``), its Kafka message if it has one
(``message``), and its metrics (``count``). The pipeline, the ledger, the publisher and the
recovery code hand effects around without looking at their kind.

Every effect carries the org-wide, strictly increasing ``seq`` that also orders it in the
org's outbox. The Lua engine returns effects as positional rows in the order of
``worker/layout.py``; :func:`decode_rows` turns them into these types. ``Charge`` is the compact
form of the commonest pair, a usage event paid by one bucket: its ``Ledger`` row has ``seq``,
its ``Usage`` row ``seq + 1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import msgspec
import orjson

from schemas.encode import (
    control_key,
    encode_admin_command,
    encode_invoice,
    encode_notification,
    encode_refill_request,
    encode_task_control,
    encode_usage_event,
)
from worker import metrics
from worker.layout import EFFECT_FIELDS, EFFECT_KINDS
from worker.messages import HEADER_SEQ, OutMessage, RawLookup, dlq_message, dlq_of

Row = tuple[Any, ...]


class Topics(Protocol):
    """The output topics an effect may go to (``worker.config.Settings`` has them)."""

    @property
    def topic_control(self) -> str: ...
    @property
    def topic_notifications(self) -> str: ...
    @property
    def topic_billing(self) -> str: ...
    @property
    def topic_usage_dlq(self) -> str: ...
    @property
    def topic_admin_dlq(self) -> str: ...


def _command_type(value: object) -> str:
    from schemas.models import COMMAND_TYPES

    return value if isinstance(value, str) and value in COMMAND_TYPES else "unknown"


class Effect(msgspec.Struct, frozen=True, gc=False, tag_field="kind"):
    """Common to every effect: its seq in the org's outbox and the org."""

    seq: int
    org_id: str

    TABLE: ClassVar[str | None] = None
    """The ``FlushBatch`` list (PostgreSQL table) its row goes to, if any."""

    @property
    def kind(self) -> str:
        return str(type(self).__struct_config__.tag)

    def row(self) -> Row:
        raise NotImplementedError

    def message(self, topics: Topics, raw: RawLookup | None) -> OutMessage | None:
        """Its Kafka message, if it has one."""
        return None

    def count(self) -> None:
        """Add it to the metrics."""

    def as_dict(self) -> dict[str, Any]:
        """The effect as a plain dict (``kind`` and every field): tests, comparisons, logs."""
        return {"kind": self.kind, **msgspec.structs.asdict(self)}

    def _seq_header(self) -> tuple[tuple[str, bytes], ...]:
        # A member's current state re-sent as such has no org-wide seq of its own (0).
        return ((HEADER_SEQ, str(self.seq).encode()),) if self.seq else ()


class Ledger(Effect, tag="ledger", frozen=True, gc=False):
    """One bucket movement: ``amount_mc`` signed, positive into the bucket."""

    member_id: str | None
    source_kind: str
    source_id: str | None
    task_id: str | None
    movement: str
    bucket: str | None
    grant_id: str | None
    amount_mc: int
    cycle_start_ms: int | None
    late: bool
    at_ms: int | None

    TABLE: ClassVar[str | None] = "ledger"

    def row(self) -> Row:
        return (self.org_id, self.seq, self.member_id, self.source_kind or "system",
                self.source_id, self.task_id, self.movement or "", self.bucket, self.grant_id,
                self.amount_mc or 0, self.cycle_start_ms, bool(self.late), self.at_ms)  # fmt: skip

    def count(self) -> None:
        if self.source_kind == "usage" and self.amount_mc < 0:
            metrics.charge(self.bucket or "unknown", -self.amount_mc)


def _offset(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _source_offset(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _split_source(source: object) -> tuple[str, int]:
    text = str(source or "")
    topic, _, part = text.rpartition(":")
    try:
        return topic, int(part)
    except ValueError:
        return text, -1


class Usage(Effect, tag="usage", frozen=True, gc=False):
    """A decided usage event (charged or rejected): the permanent "decided once" record."""

    event_id: str
    member_id: str | None
    task_id: str | None
    credits_mc: int | None
    occurred_at_ms: int | None
    status: str
    code: str | None
    late: bool
    source: str | None
    offset: int | None

    TABLE: ClassVar[str | None] = "usage"

    def row(self) -> Row:
        return (self.event_id, self.org_id, self.seq, self.member_id, self.task_id,
                self.credits_mc, self.occurred_at_ms, self.status or "charged", self.code,
                bool(self.late), self.source, _offset(self.offset))  # fmt: skip

    def message(self, topics: Topics, raw: RawLookup | None) -> OutMessage | None:
        if self.status != "rejected":
            return None
        code = self.code or "rejected"
        original = raw("e|" + self.event_id) if raw is not None else None
        if original is not None:
            return dlq_of(topics.topic_usage_dlq, original, code)
        # Only after a crash (an outbox drained at start-up): the original bytes are gone from
        # memory, so the dead letter carries the decided input re-encoded.
        value = encode_usage_event(
            event_id=self.event_id, org_id=self.org_id, member_id=str(self.member_id),
            task_id=str(self.task_id), credits_mc=int(self.credits_mc or 0),
            occurred_at_ms=int(self.occurred_at_ms or 0),
        )  # fmt: skip
        topic, partition = _split_source(self.source)
        return dlq_message(topics.topic_usage_dlq, key=self.org_id.encode(), value=value,
                           code=code, detail=code, source_topic=topic,
                           source_partition=partition,
                           source_offset=_source_offset(self.offset))  # fmt: skip


class Command(Effect, tag="command", frozen=True, gc=False):
    """A decided admin command (applied or rejected); ``command`` is the input as given."""

    command_id: str
    type: str
    status: str
    code: str | None
    command: dict[str, Any]
    source: str | None
    offset: int | None

    TABLE: ClassVar[str | None] = "commands"

    def row(self) -> Row:
        return (str(self.command_id), self.org_id, self.seq,
                str(self.type or self.command.get("type") or ""), str(self.status or "applied"),
                self.code, orjson.dumps(self.command).decode(), self.source,
                _offset(self.offset))  # fmt: skip

    def message(self, topics: Topics, raw: RawLookup | None) -> OutMessage | None:
        if self.status != "rejected":
            return None
        code = self.code or "rejected"
        original = raw("c|" + self.command_id) if raw is not None else None
        if original is not None:
            return dlq_of(topics.topic_admin_dlq, original, code)
        topic, partition = _split_source(self.source)
        return dlq_message(topics.topic_admin_dlq, key=self.org_id.encode(),
                           value=encode_admin_command(self.command), code=code, detail=code,
                           source_topic=topic, source_partition=partition,
                           source_offset=_source_offset(self.offset))  # fmt: skip

    def count(self) -> None:
        typ = _command_type(self.type)
        metrics.COMMANDS.labels(type=typ, status=str(self.status)).inc()
        failed = self.command.get("status") == "failed"
        if typ == "refill_result" and self.status == "applied" and failed:
            metrics.REFILL_FAILURES.inc()


class Signal(Effect, tag="signal", frozen=True, gc=False):
    """A member's pause or resume; ``member_seq`` is TaskControl's ``seq``."""

    member_id: str
    signal: str
    reason: str
    member_seq: int
    issued_at_ms: int

    TABLE: ClassVar[str | None] = "signals"

    def row(self) -> Row:
        return (self.org_id, self.member_id, self.seq, self.signal, self.reason or "",
                int(self.member_seq or 0), int(self.issued_at_ms or 0))  # fmt: skip

    def message(self, topics: Topics, raw: RawLookup | None) -> OutMessage | None:
        value = encode_task_control(signal=self.signal, org_id=self.org_id,
                                    member_id=self.member_id, reason=self.reason,
                                    seq=int(self.member_seq),
                                    issued_at_ms=int(self.issued_at_ms))  # fmt: skip
        key = control_key(self.org_id, self.member_id)
        return OutMessage(topics.topic_control, key, value, self._seq_header())

    def count(self) -> None:
        metrics.signal(self.signal, self.reason)


class Notification(Effect, tag="notification", frozen=True, gc=False):
    """Something an admin (or member) should hear about."""

    type: str
    member_id: str | None
    detail: dict[str, Any]
    at_ms: int

    TABLE: ClassVar[str | None] = "notifications"

    def row(self) -> Row:
        return (self.org_id, self.seq, str(self.type or ""), self.member_id,
                orjson.dumps(self.detail or {}).decode(), int(self.at_ms or 0))  # fmt: skip

    def message(self, topics: Topics, raw: RawLookup | None) -> OutMessage | None:
        detail = self.detail if isinstance(self.detail, Mapping) else {"detail": self.detail}
        value = encode_notification(type=self.type, org_id=self.org_id,
                                    member_id=self.member_id, detail=detail,
                                    at_ms=int(self.at_ms))  # fmt: skip
        return OutMessage(topics.topic_notifications, self.org_id.encode(), value,
                          self._seq_header())  # fmt: skip

    def count(self) -> None:
        metrics.NOTIFICATIONS.labels(type=str(self.type)).inc()


class RefillRequest(Effect, tag="refill_request", frozen=True, gc=False):
    """Ask the payment system for an auto-refill."""

    request_id: str
    credits_mc: int
    amount_usd_cents: int
    at_ms: int

    TABLE: ClassVar[str | None] = "refills"

    def row(self) -> Row:
        return (self.org_id, self.seq, self.request_id, int(self.credits_mc or 0),
                int(self.amount_usd_cents or 0), int(self.at_ms or 0))  # fmt: skip

    def message(self, topics: Topics, raw: RawLookup | None) -> OutMessage | None:
        value = encode_refill_request(request_id=self.request_id, org_id=self.org_id,
                                      credits_mc=int(self.credits_mc),
                                      amount_usd_cents=int(self.amount_usd_cents))  # fmt: skip
        return OutMessage(topics.topic_billing, self.org_id.encode(), value, self._seq_header())

    def count(self) -> None:
        metrics.REFILL_REQUESTS.inc()


class Invoice(Effect, tag="invoice", frozen=True, gc=False):
    """The org's debt for one closed cycle."""

    cycle_start_ms: int
    cycle_end_ms: int
    negative_balance_mc: int
    amount_usd_cents: int

    TABLE: ClassVar[str | None] = "invoices"

    def row(self) -> Row:
        return (self.org_id, self.seq, int(self.cycle_start_ms or 0),
                int(self.cycle_end_ms or 0), int(self.negative_balance_mc or 0),
                int(self.amount_usd_cents or 0))  # fmt: skip

    def message(self, topics: Topics, raw: RawLookup | None) -> OutMessage | None:
        value = encode_invoice(org_id=self.org_id, cycle_start_ms=int(self.cycle_start_ms),
                               cycle_end_ms=int(self.cycle_end_ms),
                               negative_balance_mc=int(self.negative_balance_mc),
                               amount_usd_cents=int(self.amount_usd_cents))  # fmt: skip
        return OutMessage(topics.topic_billing, self.org_id.encode(), value, self._seq_header())

    def count(self) -> None:
        metrics.INVOICES.inc()


class Charge(Effect, tag="charge", frozen=True, gc=False):
    """A usage event paid by one bucket: its ``Ledger`` (``seq``) and ``Usage`` (``seq + 1``)."""

    bucket: str
    grant_id: str | None
    event_id: str
    member_id: str
    task_id: str
    credits_mc: int
    occurred_at_ms: int
    late: bool
    source: str | None
    offset: int | None
    cycle_start_ms: int
    at_ms: int

    TABLE: ClassVar[str | None] = "charge"

    @property
    def last_seq(self) -> int:
        return self.seq + 1

    def expand(self) -> tuple[Ledger, Usage]:
        ledger = Ledger(self.seq, self.org_id, self.member_id, "usage", self.event_id,
                        self.task_id, "charge", self.bucket, self.grant_id, -self.credits_mc,
                        self.cycle_start_ms, self.late, self.at_ms)  # fmt: skip
        usage = Usage(self.seq + 1, self.org_id, self.event_id, self.member_id, self.task_id,
                      self.credits_mc, self.occurred_at_ms, "charged", None, self.late,
                      self.source, self.offset)  # fmt: skip
        return ledger, usage

    def rows(self) -> tuple[Row, Row]:
        """Its ledger row and its usage row."""
        return self.ledger_row(), self.usage_row()

    def ledger_row(self) -> Row:
        return (self.org_id, self.seq, self.member_id, "usage", self.event_id, self.task_id,
                "charge", self.bucket, self.grant_id, -self.credits_mc, self.cycle_start_ms,
                bool(self.late), self.at_ms)  # fmt: skip

    def usage_row(self) -> Row:
        return (self.event_id, self.org_id, self.seq + 1, self.member_id, self.task_id,
                self.credits_mc, self.occurred_at_ms, "charged", None, bool(self.late),
                self.source, _offset(self.offset))  # fmt: skip

    def count(self) -> None:
        metrics.charge(self.bucket or "unknown", self.credits_mc)


AnyEffect = Ledger | Usage | Command | Signal | Notification | RefillRequest | Invoice | Charge
"""Every effect type (the tagged union)."""

_CLASSES: dict[str, type[Effect]] = {
    "ledger": Ledger,
    "usage": Usage,
    "command": Command,
    "signal": Signal,
    "notification": Notification,
    "refill_request": RefillRequest,
    "invoice": Invoice,
    "charge": Charge,
}
_BY_CODE: tuple[type[Effect] | None, ...] = (None, *(_CLASSES[k] for k in EFFECT_KINDS))

# The Struct fields after (seq, org_id) must be the layout's, in its order: positional rows.
for _kind, _cls in _CLASSES.items():
    assert _cls.__struct_fields__[2:] == EFFECT_FIELDS[_kind], (_kind, _cls.__struct_fields__)


def decode_rows(org_id: str, rows: Iterable[Sequence[Any]]) -> list[Effect]:
    """Effects of the apply script's positional rows (``[kind code, seq, *fields]``)."""
    out: list[Effect] = []
    by_code = _BY_CODE
    for r in rows:
        cls = by_code[r[0]]
        assert cls is not None
        if cls is Command:
            out.append(Command(r[1], org_id, r[2], r[3], r[4], r[5], orjson.loads(r[6]), r[7],
                               r[8]))  # fmt: skip
        elif cls is Notification:
            detail = r[4] if isinstance(r[4], dict) else {}
            out.append(Notification(r[1], org_id, r[2], r[3], detail, r[5]))
        else:
            out.append(cls(r[1], org_id, *r[2:]))
    return out


def from_dict(effect: Mapping[str, Any]) -> Effect:
    """An effect of the model's plain dicts (``kind`` plus the fields)."""
    cls = _CLASSES[str(effect["kind"])]
    fields = {k: v for k, v in effect.items() if k != "kind"}
    return cls(**fields)


def expanded(effects: Iterable[Effect]) -> list[Effect]:
    """``effects`` with every ``Charge`` replaced by its ``Ledger`` and ``Usage``."""
    out: list[Effect] = []
    for e in effects:
        if isinstance(e, Charge):
            out.extend(e.expand())
        else:
            out.append(e)
    return out


def last_seq(effect: Effect) -> int:
    """The highest seq an effect stands for (a ``Charge`` is two)."""
    return effect.seq + 1 if isinstance(effect, Charge) else effect.seq


def as_dicts(effects: Iterable[Effect]) -> list[dict[str, Any]]:
    """Plain dicts of ``effects``, charges expanded: the form ``worker.model`` produces."""
    return [e.as_dict() for e in expanded(effects)]


def decode_blob(org_id: str, blob: bytes | None) -> list[Effect]:
    """Effects of one outbox entry or reply blob (a MessagePack list of positional rows; empty
    when the call produced none)."""
    if not blob:
        return []
    rows = msgspec.msgpack.decode(blob)
    return decode_rows(org_id, rows) if rows else []
