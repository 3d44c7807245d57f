"""What one batch carries through the stages (intake -> apply -> commit), and the counters.

A batch is built by intake from one ``getmany`` (or by a parked-retry turn), gains its engine
results in the apply stage, and is written out by the commit stage. Each stage owns the fields
it fills; nothing here does I/O.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from worker.config import Settings
from worker.contract import CommandItem, UsageItem
from worker.ledger import FlushBatch, ParkedEvent
from worker.publisher import OutMessage, RawSource


@dataclass(slots=True)
class Pending:
    """One accepted input on its way to the engine."""

    ident: str  # event_id or command_id (is_usage says which namespace)
    is_usage: bool
    item: UsageItem | CommandItem
    raw: RawSource
    parked: ParkedEvent | None = None
    fresh_claim: bool = False  # claim new in this attempt, no engine call may have applied it

    @property
    def claim_id(self) -> str:
        """The namespaced id the claims and the dedupe window use (``e|`` / ``c|``)."""
        return ("e|" if self.is_usage else "c|") + self.ident


@dataclass(slots=True)
class Malformed:
    """A record the decoder rejected, with the ids it still names (``readable_ids``)."""

    raw: RawSource
    is_usage: bool
    code: str
    detail: str
    ids: dict[str, str]

    @property
    def ident(self) -> str | None:
        """The id it decides, if readable: ``event_id`` (usage) or ``command_id`` (admin)."""
        return self.ids.get("event_id" if self.is_usage else "command_id")

    @property
    def claim_id(self) -> str | None:
        ident = self.ident
        if ident is None:
            return None
        return ("e|" if self.is_usage else "c|") + ident


def claim_of(raw: RawSource) -> str:
    """The claim a record makes on its id: where it sits in its topic."""
    return f"{raw.partition}:{raw.offset}"


@dataclass(slots=True)
class Batch:
    """One fetched batch (or one turn of parked retries) through the stages."""

    number: int
    kafka_no: int = 0  # 1, 2, ... for fetched batches; 0 for parked-retry turns
    records: int = 0  # Kafka records (usage + admin) covered by this batch
    by_org: dict[str, list[Pending]] = field(default_factory=lambda: defaultdict(list))
    raws: list[RawSource] = field(default_factory=list)
    """Once applied (``shed_inputs``): the original record of every input that went on."""
    malformed: list[Malformed] = field(default_factory=list)
    copies: list[tuple[str | None, Pending | Malformed]] = field(default_factory=list)
    """Later records with an id already in the batch, with their org (None: malformed);
    intake's claims pick which record of an id goes on."""
    flush: FlushBatch = field(default_factory=FlushBatch)
    messages: list[OutMessage] = field(default_factory=list)
    acks: dict[str, int] = field(default_factory=dict)
    unknown_marks: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    forwards: list[tuple[str, Pending, int | None]] = field(default_factory=list)
    """(org, input, home partition) the engine answered ``elsewhere`` for, not sent on yet;
    home None: an input sent to its own partition again (``Action.RESEND``)."""
    signals: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    """Per org, per member: the highest member seq of the signals this batch publishes."""
    outboxed: int = 0  # effects this batch left in Redis outboxes until its ack
    parked_ids: set[str] = field(default_factory=set)  # parked events this batch decides
    claimed: list[str] = field(default_factory=list)  # namespaced ids it holds in flight
    snapshot_due: set[str] = field(default_factory=set)  # orgs whose state it snapshots
    commit: dict[TopicPartition, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wait_publish: Callable[[], Awaitable[Any]] | None = None
    """Waits for Kafka's acks of every message of the batch (set once all are handed over)."""
    sent: int = 0  # messages[:sent] are handed to the producer
    waits: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)  # one per hand-over
    orgs_with_commands: set[str] = field(default_factory=set)
    charged_mc: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by bucket
    is_retry: bool = False
    oldest_ms: int = 0  # Kafka timestamp of the batch's oldest record (how long it waited)
    fetched_at: float = 0.0  # monotonic times: fetched, decided ids dropped, apply started,
    intake_at: float = 0.0  # handed to the producer (the latency a pause sees), committed
    apply_at: float = 0.0
    applied_at: float = 0.0

    def shed_inputs(self) -> None:
        """The batch is applied: of its inputs, keep only their original records.

        A batch waits up to two commits in the commit stage; its decoded inputs (items, ids,
        the pending records) are no longer needed there, only the bytes of each record for
        the rare dead letter of a row PostgreSQL refuses (``storage_failed``). About a third
        of what an event holds in memory between apply and commit."""
        self.raws = [p.raw for ps in self.by_org.values() for p in ps]
        self.by_org = {}

    def acks_of_sends(self) -> Callable[[], Awaitable[None]] | None:
        """One wait for the acks of every hand-over so far (None: nothing was sent)."""
        waits = list(self.waits)
        if not waits:
            return None
        if len(waits) == 1:
            return waits[0]

        async def wait_all() -> None:
            # Every wait is awaited, even after one fails, so no ack error goes unretrieved;
            # the first error is raised (the commit stage then sends everything again).
            results = await asyncio.gather(*(w() for w in waits), return_exceptions=True)
            for res in results:
                if isinstance(res, BaseException):
                    raise res

        return wait_all


class BatchSizer:
    """How many records the next fetch may take: as many as the apply stage handles within
    ``Settings.batch_target_seconds`` (at most ``batch_max_records``).

    With a shallow queue a fetch returns what is there (a few records, milliseconds of work);
    with a deep one, batches grow until one takes the target time to apply, which bounds how
    long a record that just arrived waits behind the batches in flight (about two and a half
    apply times). The cost per record is a moving average of what batches really took.
    """

    MIN_RECORDS = 100

    def __init__(self, settings: Settings) -> None:
        self.max = settings.batch_max_records
        self.target = settings.batch_target_seconds
        self.size = self.max
        self._per_record: float | None = None

    def observe(self, records: int, seconds: float) -> None:
        """A batch of ``records`` took ``seconds`` to apply."""
        if records <= 0 or self.target <= 0:
            return
        cost = seconds / records
        self._per_record = cost if self._per_record is None else 0.8 * self._per_record + 0.2 * cost
        want = int(self.target / self._per_record) if self._per_record > 0 else self.max
        self.size = max(min(self.MIN_RECORDS, self.max), min(self.max, want))


@dataclass(slots=True)
class Stats:
    """Counters for the shutdown summary line."""

    batches: int = 0
    records: int = 0
    charged: int = 0
    applied_commands: int = 0
    duplicate: int = 0
    replayed: int = 0
    rejected: int = 0
    parked: int = 0
    unparked: int = 0
    forwarded: int = 0
    resent: int = 0  # records sent to their own partition again (Action.RESEND)
    published: int = 0
    dead_letters: int = 0
    quarantined: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}
