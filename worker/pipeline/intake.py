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

Several records of one id in a batch (a producer's retry, the id on two partitions) are all
claimed, the first one first, and the claim picks the one that goes on: the first, unless an
earlier attempt (a crash, a rebalance) claimed the id for a later one. That one may have been
applied already, so it must be the one applied again (its offset comes back ``replayed``, and
its charge reaches the ledger); dropping it as a copy of the first, with the first told the id
is taken, would leave the id decided by no record at all.

Records of orgs known to live on another partition (``Router.homes``) are passed on there
unclaimed; their claim entries drop a claim of theirs that an earlier attempt left, so the copy
at the home is free to claim the id.

A record that goes on with a new claim (``Pending.fresh_claim``) and comes back ``replayed``
from the engine has decided nothing: it is sent to its partition again (``routing.py``;
docs/delivery.md, "Sent again").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
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
from worker.contract import CLAIM_NEW, CLAIM_TAKEN, CommandItem, Engine, UsageItem
from worker.ledger import Ledger
from worker.messages import forward_of
from worker.pipeline.backoff import Backoff
from worker.pipeline.batch import Batch, Malformed, Pending, claim_of
from worker.pipeline.routing import Router
from worker.publisher import RawSource, dlq_message

log = logging.getLogger(__name__)

SHARE_DIVISOR = 32
"""A batch first takes a thirty-second of its size, shared evenly over the partitions with
data (at least one record each, so a lone urgent record goes in the next batch), then draws
the rest from one partition after the other (``Intake.fetch``)."""

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
        """The partition the next batch draws from first (``fetch``)."""
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
        """About ``max_records`` records: first a small share from every partition with data,
        then the rest drawn from one partition after the other, in turn.

        ``getmany`` alone drains its buffered partitions in arrival order, so behind a
        partition holding a flood (say, events of an org that never comes) a partition with
        one urgent record would wait until the flood is drained. So each assigned partition
        with data first gives up to its share (``SHARE_DIVISOR``): with a shallow queue (live
        traffic) the draw that follows takes everything there is.

        A backlog's batch is drawn from as few partitions as it can be. An org's events share
        its partition, so such a batch holds fewer orgs with more events each, and one engine
        call per org serves more of them. In the ``make bench`` backlog an evenly shared batch
        gave each org about 20 events, a drawn one about 130 (Redis 20-25% less CPU, 10-14%
        more events/s); in the sparse one (10,000 orgs) an org call serves about 9 events
        instead of 2 (BENCHMARKS.md "Backlog batches take a partition's fetch whole", "Every
        backlog batch is drawn").

        A partition gives what it has fetched whole, even past ``max_records`` (by half at
        most), and the draw stops once the batch is half full: a fetch (4 MiB, about 21,500
        events) split over two batches would cost its orgs two engine calls each. Each batch
        starts after the partition the last one ended on, so every partition is drawn within
        as many batches as there are partitions.
        """
        parts = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        if not parts:
            return dict(await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records))
        n = len(parts)
        share = max(1, max_records // (SHARE_DIVISOR * n))
        first = self._turn % n
        out: dict[TopicPartition, list[Any]] = {}
        left = max_records
        for k in range(n):
            tp = parts[(first + k) % n]
            got = await consumer.getmany(tp, timeout_ms=0, max_records=min(share, left))
            for key, recs in got.items():
                out[key] = recs
                left -= len(recs)
            if left <= 0:  # fewer records than partitions: the next batch starts after this one
                self._turn = (first + k + 1) % n
                return out
        if not out:
            return dict(await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records))
        half = max_records // 2
        for k in range(n):
            if left <= half:
                break
            tp = parts[(first + k) % n]
            got = await consumer.getmany(tp, timeout_ms=0, max_records=left + half)
            for key, recs in got.items():
                out[key] = out.get(key, []) + recs
                self._turn = (first + k + 1) % n  # the next batch starts after this one
                left -= len(recs)
        return out

    async def decode(self, batch: Batch, records: Mapping[TopicPartition, list[Any]]) -> None:
        """Decode and validate a fetched batch into ``batch``."""
        s = self._s
        now_ms = int(time.time() * 1000)
        skew_ms = s.max_clock_skew_seconds * 1000
        seen_events: set[str] = set()
        seen_commands: set[str] = set()
        copies = batch.copies
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
                            copies.append((None, bad))
                            continue
                        seen.add(ident)
                    batch.malformed.append(bad)
                    continue
                pend: Pending
                if isinstance(decoded, UsageRecord):
                    ident = decoded.event_id
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
                    pend = Pending(ident, True, item, raw)
                    seen = seen_events
                else:
                    ident = decoded.command_id
                    citem = CommandItem(command=decoded.command, source=source, offset=r.offset)
                    pend = Pending(ident, False, citem, raw)
                    seen = seen_commands
                if ident in seen:
                    copies.append((decoded.org_id, pend))
                    continue
                seen.add(ident)
                batch.by_org[decoded.org_id].append(pend)

    async def drop_decided(self, batch: Batch) -> None:
        """Drop inputs whose id is already decided, pick one record per id, pass on the
        records of orgs known to live elsewhere; settle the malformed records.

        PostgreSQL holds every decided id forever; the claims hold the ids of the last one or
        two dedupe windows, including those of batches still in flight on any worker; this
        worker's own batches in flight are also remembered here (``in_flight``), which holds
        even when Redis lost its last second of claims.
        """
        homes = self.router.homes
        # Every record naming an id: the first of each id (per org, then malformed), then
        # the later copies, in batch order (the claims answer the entries of an id in order).
        named: list[tuple[str | None, Pending | Malformed]] = [
            (org_id, p) for org_id, ps in batch.by_org.items() for p in ps
        ]
        named_bad = [(None, bad) for bad in batch.malformed if bad.claim_id is not None]
        named += named_bad
        named += batch.copies
        passed: dict[int, int] = {}  # position in ``named`` -> the org's home partition
        entries: list[tuple[str, str]] = []  # (namespaced id, claim), as Engine.claim takes them
        add = entries.append
        event_ids: set[str] = set()
        command_ids: set[str] = set()
        for i, (org_id, rec) in enumerate(named):
            raw = rec.raw
            add((rec.claim_id, claim_of(raw)))  # type: ignore[arg-type]  # named: it has one
            (event_ids if rec.is_usage else command_ids).add(rec.ident)  # type: ignore[arg-type]
            if homes and org_id is not None:
                home = homes.get(org_id)
                if home is not None and home != raw.partition:
                    passed[i] = home
        verdicts: list[int] = []
        held_here: set[str] = set()
        decided_events: set[str] = set()
        decided_commands: set[str] = set()
        in_flight = self.in_flight
        if entries:
            # This worker's own ids in flight, read before PostgreSQL is asked: a batch that
            # commits while the query runs leaves them (``release``) only once PostgreSQL
            # holds them, so an id is caught by one of the two whatever the timing, even when
            # Redis lost the claims. (Read after the query, an id released meanwhile was in
            # neither, and a copy of it was decided twice.)
            no_claim = set(passed)
            if in_flight and not in_flight.keys().isdisjoint(c for c, _ in entries):
                for i, (claim_id, claim) in enumerate(entries):
                    held = in_flight.get(claim_id)
                    if held is not None and held != claim:
                        held_here.add(claim_id)
                        # A copy of an id held here for another record is a duplicate, and
                        # claims nothing: that record may have just been sent on to its org's
                        # home (its claim released, its entry here not dropped yet), and a
                        # claim made now would make the copy at the home a duplicate too, the
                        # id decided by no record. Asked like a record sent on, it only drops
                        # a claim of its own an earlier attempt left.
                        no_claim.add(i)
            ev, cm = list(event_ids), list(command_ids)
            (decided_events, decided_commands), verdicts = await asyncio.gather(
                self._backoff.retry("postgres", lambda: self._ledger.decided_ids(ev, cm)),
                self._backoff.retry("redis", lambda: self._engine.claim(entries, passed=no_claim)),
            )
        rejected: list[Malformed] = [bad for bad in batch.malformed if bad.claim_id is None]
        first_copy = len(named) - len(batch.copies)
        if (
            first_copy == len(named) == len(entries)
            and not passed
            and not held_here
            and not decided_events
            and not decided_commands
            and CLAIM_TAKEN not in verdicts
            and not named_bad
        ):
            # Every record goes on, as decode grouped it (the common case): no record is
            # moved, and the in-flight ids are recorded in bulk.
            for (_, rec), verdict in zip(named, verdicts, strict=True):
                rec.fresh_claim = verdict == CLAIM_NEW  # type: ignore[union-attr]
            in_flight.update(entries)
            batch.claimed.extend(claim_id for claim_id, _ in entries)
        else:
            self._place(batch, named, entries, verdicts, passed, held_here, first_copy,
                        decided_events, decided_commands, rejected)  # fmt: skip
        batch.malformed.clear()
        batch.copies.clear()
        for bad in rejected:
            self._reject(batch, bad)

    def _place(
        self,
        batch: Batch,
        named: list[tuple[str | None, Pending | Malformed]],
        entries: list[tuple[str, str]],
        verdicts: list[int],
        passed: dict[int, int],
        held_here: set[str],
        first_copy: int,
        decided_events: set[str],
        decided_commands: set[str],
        rejected: list[Malformed],
    ) -> None:
        """Each named record by its claim's verdict: a duplicate (counted), dead-lettered
        (malformed: it decides its id; added to ``rejected``), sent on to its org's home, or
        on to the engine."""
        by_org: dict[str, list[Pending]] = defaultdict(list)
        reordered: set[str] = set()
        in_flight = self.in_flight
        claimed = batch.claimed
        for i, (org_id, rec) in enumerate(named):
            claim_id, claim = entries[i]
            verdict = verdicts[i]
            done = decided_events if rec.is_usage else decided_commands
            if verdict == CLAIM_TAKEN or claim_id in held_here or rec.ident in done:
                # At most one record per id is told otherwise (Engine.claim).
                self._count_duplicate(batch, rec)
            elif isinstance(rec, Malformed):
                rejected.append(rec)  # the id's record: dead-lettered, and it decides the id
            elif i in passed:
                batch.messages.append(forward_of(rec.raw, passed[i]))
                batch.counts["forwarded"] += 1
            else:
                assert org_id is not None
                by_org[org_id].append(rec)
                if i >= first_copy:
                    reordered.add(org_id)  # a later copy picked by its claim
                in_flight[claim_id] = claim
                claimed.append(claim_id)
                rec.fresh_claim = verdict == CLAIM_NEW
        admin = self._s.topic_admin
        for org_id in reordered:
            # Where decoding would have put it: admin first, then by partition and offset
            # (the engine's watermark needs each partition's offsets in order).
            by_org[org_id].sort(key=lambda p: (p.raw.topic != admin, p.raw.partition, p.raw.offset))
        batch.by_org = by_org

    @staticmethod
    def _count_duplicate(batch: Batch, rec: Pending | Malformed) -> None:
        """A record whose id is decided by another (never charged, never dead-lettered)."""
        if rec.is_usage:
            batch.counts["duplicate"] += 1
            return
        batch.counts["duplicate_command"] += 1
        if isinstance(rec, Pending):
            typ = command_type_label(rec.item.command.get("type"))  # type: ignore[union-attr]
            metrics.COMMANDS.labels(type=typ, status="duplicate").inc()

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
