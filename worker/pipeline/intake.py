"""Intake: decode a fetched batch, dead-letter what is malformed, drop what is already decided.

Every record of a ``getmany`` becomes one of:

- a **pending** input (a valid usage event or admin command), grouped by org, admin partitions
  first (a ``member_add`` and the usage it enables often share a batch), per-partition order
  kept;
- a **malformed** record: dead-lettered with its code. If it still names its id (read exactly
  as the decoders read it, ``schemas.decode.readable_ids``), that id is decided by it, like any
  other first message with that id (SPEC section 5);
- a **duplicate**: a later message with an id that is already decided, counted and dropped
  (never charged, never dead-lettered again, even when malformed).

"Already decided" is checked three ways, events and commands in separate namespaces: within
the batch; against PostgreSQL's permanent record (one query per kind, ``decided_ids``); and
against the global claims in Redis (``Engine.claim``), which cover what other workers and
earlier batches still have in flight, across orgs. The two lookups run concurrently. Nothing is
written before the commit stage except the claims: a crash after claiming leaves claims whose
records are read again and present the same claim (``CLAIM_MINE``), so nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.decode import (
    CommandRecord,
    Rejection,
    UsageRecord,
    decode_admin,
    decode_usage,
    readable_ids,
)
from schemas.models import COMMAND_TYPES
from worker import metrics
from worker.config import Settings
from worker.contract import CLAIM_TAKEN, CommandItem, Engine, UsageItem
from worker.ledger import Ledger
from worker.pipeline.backoff import Backoff
from worker.pipeline.batch import Batch, Malformed, Pending, claim_of
from worker.pipeline.routing import Router
from worker.publisher import RawSource, dlq_message

log = logging.getLogger(__name__)

DECODE_SLICE = 500
"""Records decoded between two turns of the event loop."""


def command_type_label(value: object) -> str:
    """A ``type`` for metric labels: a known command type, else ``unknown`` (bounded set)."""
    return value if isinstance(value, str) and value in COMMAND_TYPES else "unknown"


class Intake:
    """Decoding and the decided-id checks of the fetch stage."""

    def __init__(self, settings: Settings, engine: Engine, ledger: Ledger, backoff: Backoff):
        self._s = settings
        self._engine = engine
        self._ledger = ledger
        self._backoff = backoff
        self._tiers = frozenset(settings.tiers)
        self._turn = 0
        self.in_flight: dict[str, str] = {}
        """Namespaced ids of this worker's batches not yet committed -> the record that holds
        them: a later copy is a duplicate even if the claims (in Redis) were lost meanwhile
        and PostgreSQL does not hold the first one yet."""
        self.router = Router(engine, backoff, self.in_flight)
        """Orgs known to be decided on another partition, and the forwards there."""

    def release(self, batch: Batch) -> None:
        """The batch is committed (or abandoned): its ids are PostgreSQL's business now."""
        in_flight = self.in_flight
        for claim_id in batch.claimed:
            in_flight.pop(claim_id, None)

    async def fetch(
        self, consumer: AIOKafkaConsumer, *, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[Any]]:
        """Up to ``max_records`` records, every partition with data getting its share.

        ``getmany`` alone drains its buffered partitions in arrival order, so behind a
        partition holding a flood (say, events of an org that never comes) a partition with
        one urgent record waits until the flood is drained. Here each assigned partition with
        data contributes up to ``max_records / partitions`` records first (the start rotates),
        then the rest fills up; a burst on one partition costs the others one batch at most.
        """
        parts = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        if not parts:
            return dict(await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records))
        self._turn = (self._turn + 1) % len(parts)
        parts = parts[self._turn :] + parts[: self._turn]
        share = max(1, max_records // len(parts))
        out: dict[TopicPartition, list[Any]] = {}
        left = max_records
        for tp in parts:
            got = await consumer.getmany(tp, timeout_ms=0, max_records=min(share, left))
            for key, recs in got.items():
                out[key] = recs
                left -= len(recs)
            if left <= 0:
                return out
        if out:
            # Fill the rest of the batch from whatever is buffered (a deep backlog).
            more = await consumer.getmany(timeout_ms=0, max_records=left)
            for key, recs in more.items():
                out[key] = out.get(key, []) + recs
            return out
        return dict(await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records))

    async def decode(self, batch: Batch, records: Mapping[TopicPartition, list[Any]]) -> None:
        """Decode and validate a fetched batch into ``batch``."""
        s = self._s
        now_ms = int(time.time() * 1000)
        skew_ms = s.max_clock_skew_seconds * 1000
        seen_events: set[str] = set()
        seen_commands: set[str] = set()
        counts = batch.counts
        for tp in sorted(records, key=lambda t: (t.topic != s.topic_admin, t.partition)):
            recs = records[tp]
            if not recs:
                continue
            is_usage = tp.topic == s.topic_usage
            source = f"{tp.topic}:{tp.partition}"
            next_offset = recs[-1].offset + 1
            first_ts = recs[0].timestamp
            if first_ts and (not batch.oldest_ms or first_ts < batch.oldest_ms):
                batch.oldest_ms = first_ts
            batch.flush.set_offset(tp.topic, tp.partition, next_offset)
            batch.commit[tp] = next_offset
            batch.records += len(recs)
            for i, r in enumerate(recs):
                if i % DECODE_SLICE == DECODE_SLICE - 1:
                    # Give the other stages' replies a turn (keeps Redis and PostgreSQL busy).
                    await asyncio.sleep(0)
                value: bytes = r.value if r.value is not None else b""
                raw = RawSource(r.key, value, tp.topic, tp.partition, r.offset)
                decoded: UsageRecord | CommandRecord | Rejection
                if is_usage:
                    decoded = decode_usage(
                        value, now_ms=now_ms, max_bytes=s.max_message_bytes, max_skew_ms=skew_ms
                    )
                else:
                    decoded = decode_admin(
                        value,
                        now_ms=now_ms,
                        max_bytes=s.max_message_bytes,
                        max_skew_ms=skew_ms,
                        tiers=self._tiers,
                    )
                if isinstance(decoded, Rejection):
                    bad = Malformed(raw, is_usage, str(decoded.code), decoded.detail, {})
                    bad.ids = readable_ids(value)
                    ident = bad.ident
                    seen = seen_events if is_usage else seen_commands
                    if ident is not None:
                        if ident in seen:
                            counts["duplicate" if is_usage else "duplicate_command"] += 1
                            continue
                        seen.add(ident)
                    batch.malformed.append(bad)
                    continue
                if isinstance(decoded, UsageRecord):
                    ident = decoded.event_id
                    if ident in seen_events:
                        counts["duplicate"] += 1
                        continue
                    seen_events.add(ident)
                    # Positional: keyword arguments cost a third more on this per-record path.
                    item = UsageItem(
                        ident,
                        decoded.member_id,
                        decoded.task_id,
                        decoded.credits_mc,
                        decoded.occurred_at_ms,
                        source,
                        r.offset,
                    )
                    batch.by_org[decoded.org_id].append(Pending(ident, True, item, raw))
                else:
                    ident = decoded.command_id
                    if ident in seen_commands:
                        counts["duplicate_command"] += 1
                        metrics.COMMANDS.labels(type=decoded.type, status="duplicate").inc()
                        continue
                    seen_commands.add(ident)
                    citem = CommandItem(command=decoded.command, source=source, offset=r.offset)
                    batch.by_org[decoded.org_id].append(Pending(ident, False, citem, raw))

    async def drop_decided(self, batch: Batch) -> None:
        """Drop inputs whose id is already decided; settle the malformed records.

        PostgreSQL holds every decided id forever; the claims hold the ids of the last one or
        two dedupe windows, including those of batches still in flight on any worker; this
        worker's own batches in flight are also remembered here (``in_flight``), which holds
        even when Redis lost its last second of claims.
        """
        self.router.send_on_known(batch)
        event_ids: list[str] = []
        command_ids: list[str] = []
        entries: list[tuple[str, str]] = []
        for ps in batch.by_org.values():
            for p in ps:
                (event_ids if p.is_usage else command_ids).append(p.ident)
                entries.append((p.claim_id, claim_of(p.raw)))
        for bad in batch.malformed:
            ident, claim_id = bad.ident, bad.claim_id
            if ident is not None and claim_id is not None:
                (event_ids if bad.is_usage else command_ids).append(ident)
                entries.append((claim_id, claim_of(bad.raw)))
        if entries:
            # This worker's own ids in flight, read before PostgreSQL is asked: a batch that
            # commits while the query runs leaves them (``release``) only once PostgreSQL
            # holds them, so an id is caught by one of the two whatever the timing, even when
            # Redis lost the claims. (Read after the query, an id released meanwhile was in
            # neither, and a copy of it was decided twice.)
            held_here: set[str] = set()
            in_flight = self.in_flight
            if in_flight:
                for claim_id, claim in entries:
                    held = in_flight.get(claim_id)
                    if held is not None and held != claim:
                        held_here.add(claim_id)
            (decided_events, decided_commands), verdicts = await asyncio.gather(
                self._backoff.retry(
                    "postgres", lambda: self._ledger.decided_ids(event_ids, command_ids)
                ),
                self._backoff.retry("redis", lambda: self._engine.claim(entries)),
            )
            taken = {e[0] for e, v in zip(entries, verdicts, strict=True) if v == CLAIM_TAKEN}
            taken |= held_here
        else:
            decided_events, decided_commands, taken = set(), set(), set()
        counts = batch.counts
        if decided_events or decided_commands or taken:
            for org_id in list(batch.by_org):
                kept = []
                for p in batch.by_org[org_id]:
                    done = decided_events if p.is_usage else decided_commands
                    if p.ident in done or p.claim_id in taken:
                        if p.is_usage:
                            counts["duplicate"] += 1
                        else:
                            counts["duplicate_command"] += 1
                            typ = p.item.command.get("type")  # type: ignore[union-attr]
                            metrics.COMMANDS.labels(type=typ, status="duplicate").inc()
                        continue
                    kept.append(p)
                if kept:
                    batch.by_org[org_id] = kept
                else:
                    del batch.by_org[org_id]
        in_flight = self.in_flight
        claimed = batch.claimed
        for ps in batch.by_org.values():
            for p in ps:
                claim_id = p.claim_id
                in_flight[claim_id] = claim_of(p.raw)
                claimed.append(claim_id)
        for bad in batch.malformed:
            ident = bad.ident
            if ident is not None:
                done = decided_events if bad.is_usage else decided_commands
                if ident in done or bad.claim_id in taken:
                    # A malformed later copy of a decided id: counted, not dead-lettered again.
                    counts["duplicate" if bad.is_usage else "duplicate_command"] += 1
                    continue
            self._reject(batch, bad)
        batch.malformed.clear()

    def _reject(self, batch: Batch, bad: Malformed) -> None:
        s = self._s
        raw = bad.raw
        batch.messages.append(
            dlq_message(
                s.topic_usage_dlq if bad.is_usage else s.topic_admin_dlq,
                key=raw.key,
                value=raw.value,
                code=bad.code,
                detail=bad.detail,
                source_topic=raw.topic,
                source_partition=raw.partition,
                source_offset=raw.offset,
            )
        )
        ids = bad.ids
        source = f"{raw.topic}:{raw.partition}"
        if bad.is_usage:
            batch.counts["rejected"] += 1
            metrics.EVENTS_REJECTED.labels(reason=bad.code).inc()
            event_id = ids.get("event_id")
            if event_id is not None:
                # Only valid ids are stored: readable_ids returns nothing else.
                batch.flush.add_rejected_usage(
                    event_id=event_id,
                    org_id=ids.get("org_id"),
                    member_id=ids.get("member_id"),
                    task_id=ids.get("task_id"),
                    credits_mc=None,
                    occurred_at_ms=None,
                    code=bad.code,
                    source=source,
                    offset=raw.offset,
                )
        else:
            typ = command_type_label(ids.get("type"))
            batch.counts["rejected_command"] += 1
            metrics.COMMANDS.labels(type=typ, status="rejected").inc()
            command_id = ids.get("command_id")
            if command_id is not None:
                batch.flush.add_rejected_command(
                    command_id=command_id,
                    org_id=ids.get("org_id"),
                    type_=typ,
                    code=bad.code,
                    command={k: v for k, v in ids.items() if k in ("type", "command_id", "org_id")},
                    source=source,
                    offset=raw.offset,
                )
