"""Apply: run a batch through the engine, one call per org and chunk, several orgs in flight.

For each org of the batch the items go to the engine in chunks of ``ENGINE_CHUNK``; each call
is atomic in Redis and leaves its effects in the org's outbox until the commit stage acks them.
What the engine decided is turned into rows, messages and counts by :func:`classify`.

Three things can stand in the way, and each has its answer here:

- **Redis lost the org** (restarted behind its AOF, emptied): the first call of an org in a
  batch carries the seq PostgreSQL holds or will hold (``expect_seq``); the engine refuses it
  unchanged (``RedisBehind``), the org is rebuilt from the ledger once the batches already
  applied are flushed, and the call is made again.
- **An outage**: the call is retried with backoff (``Backoff``), never skipped.
- **A data error** (the engine fails on this org's records every time): the chunk is split
  until the records that fail are found; they are dead-lettered with ``engine_failed`` and
  recorded as decided, an alert metric counts them, and every other record flows on.

Crash after a call: the effects wait in the outbox; the restart drains it (publish, rows, ack)
and re-reads the batch from the PostgreSQL offsets, where the engine's watermark turns the
replay into no-ops (docs/delivery.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from worker import metrics
from worker.config import Settings
from worker.contract import ChargeRow, Engine, Outcome, RedisBehind
from worker.engine import expand_charges
from worker.ledger import Ledger
from worker.pipeline.backoff import (
    DATA_ATTEMPTS,
    Backoff,
    DataFailure,
    GaveUp,
    is_redis_data_error,
)
from worker.pipeline.batch import Batch, Pending
from worker.pipeline.classify import Action, classify
from worker.pipeline.intake import command_type_label
from worker.pipeline.parking import ParkingLot
from worker.publisher import EffectEncoder, OutMessage, RawSource, dlq_message
from worker.recovery import rebuild_org

log = logging.getLogger(__name__)

ENGINE_CHUNK = 500
"""Items per engine call: bounds the time one Lua call holds Redis (NOTES: ~500 debits/call)."""

ENGINE_CONCURRENCY = 8
"""Engine calls in flight across orgs (NOTES: 4 calls in flight roughly double throughput)."""

Rows = tuple[list[Outcome], list[dict[str, Any]], list[ChargeRow]]


class FlushProgress:
    """Which batches were handed to the commit stage and which it finished (for rebuilds)."""

    def __init__(self) -> None:
        self.handed = 0
        self.flushed = 0
        self.broken: BaseException | None = None
        self.changed = asyncio.Event()

    def finished(self, number: int) -> None:
        if number > self.flushed:
            self.flushed = number
        self.changed.set()

    async def wait_flushed(self) -> None:
        """Until every batch handed over is flushed (or a flush failed)."""
        while self.flushed < self.handed and self.broken is None:
            self.changed.clear()
            await self.changed.wait()
        if self.broken is not None:
            raise RuntimeError("an earlier batch failed to flush") from self.broken


class Applier:
    """The apply stage's engine calls and their outcomes."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        ledger: Ledger,
        encoder: EffectEncoder,
        backoff: Backoff,
        parking: ParkingLot,
        progress: FlushProgress,
    ) -> None:
        self._s = settings
        self._engine = engine
        self._ledger = ledger
        self._encoder = encoder
        self._backoff = backoff
        self._parking = parking
        self._progress = progress
        self._sem = asyncio.Semaphore(ENGINE_CONCURRENCY)
        self.last_seq: dict[str, int] = {}  # highest effect seq of our calls, per org
        self.pg_seq: dict[str, int] = {}  # highest effect seq flushed to PostgreSQL, per org

    async def apply(self, batch: Batch) -> None:
        """Every org of the batch through the engine; rows, messages and counts into it."""

        async def one_org(org_id: str, pend: list[Pending]) -> None:
            async with self._sem:
                await self._apply_org(batch, org_id, pend)

        orgs = list(batch.by_org.items())
        if len(orgs) == 1:
            await self._apply_org(batch, *orgs[0])
        elif orgs:
            await asyncio.gather(*(one_org(o, p) for o, p in orgs))

    def flushed(self, org_seq: dict[str, int]) -> None:
        """The commit stage wrote these orgs' effects up to these seqs."""
        pg = self.pg_seq
        for org, seq in org_seq.items():
            if seq > pg.get(org, 0):
                pg[org] = seq

    def expected_seq(self, org_id: str) -> int:
        """The org's effect seq PostgreSQL holds, or will hold once the batches in flight are
        flushed: Redis must be at least there (0: nothing known yet)."""
        return max(self.pg_seq.get(org_id, 0), self.last_seq.get(org_id, 0))

    async def _rebuild_behind(self, org_id: str) -> None:
        """Rebuild an org Redis lost from the ledger, before anything more is applied to it."""
        # Batches already applied carry effects PostgreSQL does not have yet: flush them
        # first, so the rebuild replays everything that was decided. (The batch being applied
        # has applied nothing for this org: the check comes before its first call.)
        await self._progress.wait_flushed()
        await self._backoff.retry("redis", lambda: rebuild_org(self._engine, self._ledger, org_id))
        self.last_seq[org_id] = (await self._engine.last_seqs([org_id]))[org_id]
        metrics.rebuilt("redis_behind")

    async def _call(
        self, org_id: str, items: list[Any], check: list[bool], *, attempts: int = DATA_ATTEMPTS
    ) -> tuple[Rows, bool]:
        """One engine call (rebuilding the org first if Redis lost it); ``retried`` says
        whether an attempt failed, so the reply of an earlier attempt may have been lost."""
        retried = False

        async def call() -> Rows:
            nonlocal retried
            expect = self.expected_seq(org_id) if check[0] else 0
            try:
                return await self._engine.apply_rows(org_id, items, expect_seq=expect)
            except RedisBehind:
                raise  # refused unchanged: not a lost reply
            except Exception:
                retried = True
                raise

        while True:
            try:
                rows = await self._backoff.retry(
                    "redis",
                    call,
                    data_error=is_redis_data_error,
                    data_attempts=attempts,
                    fatal=(RedisBehind,),
                )
            except RedisBehind as exc:
                log.warning("%s: rebuilding the org from the ledger", exc)
                await self._rebuild_behind(org_id)
                # The rebuild replayed what PostgreSQL holds: never rebuild in a loop.
                check[0] = False
                continue
            check[0] = False
            return rows, retried

    async def _apply_org(self, batch: Batch, org_id: str, pend: list[Pending]) -> None:
        # The first call of the org in this batch checks that Redis has not lost it; later
        # chunks follow our own writes.
        check = [True]
        for start in range(0, len(pend), ENGINE_CHUNK):
            await self._apply_chunk(batch, org_id, pend[start : start + ENGINE_CHUNK], check)

    async def _apply_chunk(
        self, batch: Batch, org_id: str, chunk: list[Pending], check: list[bool]
    ) -> None:
        try:
            (outcomes, effects, charges), retried = await self._call(
                org_id, [p.item for p in chunk], check
            )
        except DataFailure as failure:
            await self._isolate(batch, org_id, chunk, failure, check)
            return
        effects, charges = await self._fill_gap(org_id, effects, charges, force=retried)
        self._record(batch, org_id, chunk, outcomes, effects, charges)

    async def _isolate(
        self,
        batch: Batch,
        org_id: str,
        chunk: list[Pending],
        failure: DataFailure,
        check: list[bool],
        depth: int = 0,
    ) -> None:
        """Find the records of ``chunk`` the engine fails on: halves are tried on their own
        (each half that succeeds is applied as usual), down to single records, which are
        dead-lettered with ``engine_failed`` and recorded as decided."""
        if not depth:
            log.error(
                "engine call for org %r failed on its data (%s); isolating %d records",
                org_id,
                failure.error,
                len(chunk),
            )
        if self._backoff.giving_up():
            raise GaveUp("isolating") from failure
        if len(chunk) == 1:
            self._quarantine(batch, org_id, chunk[0], str(failure.error))
            return
        half = len(chunk) // 2
        for part in (chunk[:half], chunk[half:]):
            try:
                # The error was seen three times already: one attempt per piece.
                (outcomes, effects, charges), retried = await self._call(
                    org_id, [p.item for p in part], check, attempts=1
                )
            except DataFailure as inner:
                await self._isolate(batch, org_id, part, inner, check, depth + 1)
                continue
            effects, charges = await self._fill_gap(org_id, effects, charges, force=retried)
            self._record(batch, org_id, part, outcomes, effects, charges)
        if not depth:
            log.error(
                "org %r: records the engine fails on are dead-lettered (engine_failed, %d in"
                " this batch so far)",
                org_id,
                batch.counts["quarantined"],
            )

    def _quarantine(self, batch: Batch, org_id: str, p: Pending, reason: str) -> None:
        metrics.QUARANTINED.labels(stage="engine").inc()
        batch.counts["quarantined"] += 1
        code = "engine_failed"
        if p.is_usage:
            batch.counts["rejected"] += 1
            metrics.EVENTS_REJECTED.labels(reason=code).inc()
            if p.parked is not None:
                batch.flush.parked_del.append(p.ident)
            self._reject_usage(batch, org_id, p, code, detail=reason)
        else:
            batch.counts["rejected_command"] += 1
            self._reject_command(batch, org_id, p, code, detail=reason)

    async def _fill_gap(
        self,
        org_id: str,
        effects: list[dict[str, Any]],
        charges: list[ChargeRow],
        *,
        force: bool,
    ) -> tuple[list[dict[str, Any]], list[ChargeRow]]:
        """Add unacknowledged outbox effects that precede this call's effects.

        ``outbox_ack`` acknowledges a prefix (``seq <= upto``). Effects of the same org made by
        another worker (producers not keying by org), or by a call whose reply was lost, may sit
        in the outbox below our seqs; we persist and publish them too before acking past them
        (idempotent rows, at-least-once messages), so an ack never drops an effect that is not
        in PostgreSQL. Compact charge rows stay compact on the common path (this call's seqs
        follow the last ones we saw); on the rare gap path they are expanded and merged.
        """
        last = self.last_seq.get(org_id)
        if last is None:
            # First call for this org in this process: every seq up to what PostgreSQL holds
            # needs nothing from the outbox, so only effects above it count as a gap.
            last = self.pg_seq.get(org_id)
        first: int | None = None
        high = 0
        if effects:
            first = int(effects[0]["seq"])
            high = int(effects[-1]["seq"])
        if charges:
            c_first = int(charges[0][1])
            first = c_first if first is None else min(first, c_first)
            high = max(high, int(charges[-1][1]) + 1)
        if not force and (first is None or (last is not None and first == last + 1)):
            if first is not None:
                self.last_seq[org_id] = high
            return effects, charges
        if charges:
            effects = sorted(
                [*effects, *expand_charges(org_id, charges)], key=lambda e: int(e["seq"])
            )
            charges = []
        pending = await self._backoff.retry(
            "redis", lambda: self._engine.outbox_pending(org_id, last or 0)
        )
        have = {int(e["seq"]) for e in effects}
        extra = [e for e in pending if int(e["seq"]) not in have]
        if first is not None:
            extra = [e for e in extra if int(e["seq"]) < first]
        merged = sorted([*extra, *effects], key=lambda e: int(e["seq"]))
        if merged:
            self.last_seq[org_id] = max(int(merged[-1]["seq"]), last or 0)
        return merged, charges

    def _record(
        self,
        batch: Batch,
        org_id: str,
        chunk: Sequence[Pending],
        outcomes: list[Outcome],
        effects: list[dict[str, Any]],
        charges: Sequence[ChargeRow],
    ) -> None:
        """Rows, messages, acks and counts of one engine call's results."""
        top = 0
        if charges:
            batch.flush.add_charges(org_id, charges)
            top = int(charges[-1][1]) + 1  # rows in seq order; the usage seq follows
            charged_mc = batch.charged_mc
            for r in charges:
                charged_mc[r[2] or "unknown"] += r[7]
        if effects:
            lookup = _lookup(chunk)
            _add_sources(effects, lookup)
            batch.flush.add_effects(org_id, effects)
            batch.messages.extend(self._encoder.messages(org_id, effects, lookup))
            top = max(top, max(int(e["seq"]) for e in effects))
            _tally(effects, batch.charged_mc)
            published = batch.signals[org_id]
            for e in effects:
                if e["kind"] == "signal":
                    mid = str(e["member_id"])
                    published[mid] = max(published.get(mid, 0), int(e["member_seq"]))
        if top:
            batch.acks[org_id] = max(batch.acks.get(org_id, 0), top)
        # A compact charge row stands for two effects (its ledger and usage records).
        outboxed = len(effects) + 2 * len(charges)
        batch.outboxed += outboxed
        metrics.OUTBOX_DEPTH.inc(outboxed)
        self._outcomes(batch, org_id, chunk, outcomes, effects, charges)

    def _outcomes(
        self,
        batch: Batch,
        org_id: str,
        chunk: Sequence[Pending],
        outcomes: list[Outcome],
        effects: list[dict[str, Any]],
        charges: Sequence[ChargeRow],
    ) -> None:
        counts = batch.counts
        usage_effects: set[str] | None = None
        command_effects: set[str] | None = None
        now_ms = int(time.time() * 1000)
        grace_ms = self._s.unknown_grace_seconds * 1000
        charged = 0
        for p, outcome in zip(chunk, outcomes, strict=True):
            status = outcome.status
            if status == "applied" and p.is_usage and p.parked is None:
                charged += 1  # the common case, counted once per call
                continue
            if usage_effects is None:
                usage_effects = {e["event_id"] for e in effects if e.get("kind") == "usage"}
                usage_effects.update(r[4] for r in charges)
                command_effects = {e["command_id"] for e in effects if e.get("kind") == "command"}
            assert command_effects is not None
            has_effect = p.ident in (usage_effects if p.is_usage else command_effects)
            unknown = status == "unknown" and p.parked is None
            verdict = classify(
                is_usage=p.is_usage,
                status=status,
                code=outcome.code,
                has_effect=has_effect,
                parked_at_ms=p.parked.parked_at_ms if p.parked is not None else None,
                now_ms=now_ms,
                grace_ms=grace_ms,
                park_room=unknown and self._parking.room(org_id),
            )
            action = verdict.action
            if verdict.unpark:
                batch.flush.parked_del.append(p.ident)
                self._parking.release(org_id)
            if action is Action.CHARGED:
                counts["charged"] += 1
                if p.parked is not None:
                    counts["unparked"] += 1
            elif action is Action.COMMAND_APPLIED:
                counts["applied_command"] += 1
                batch.orgs_with_commands.add(org_id)
            elif action is Action.DUPLICATE:
                counts["duplicate"] += 1
            elif action is Action.COMMAND_DUPLICATE:
                counts["duplicate_command"] += 1
                typ = command_type_label(p.item.command.get("type"))  # type: ignore[union-attr]
                metrics.COMMANDS.labels(type=typ, status="duplicate").inc()
            elif action is Action.REPLAYED:
                counts["replayed"] += 1
            elif action is Action.PARK:
                self._park(batch, org_id, p, verdict.code or "unknown_org")
            elif action is Action.STILL_PARKED:
                counts["still_parked"] += 1
            elif action is Action.ENGINE_REJECTED:
                counts["rejected"] += 1
                metrics.EVENTS_REJECTED.labels(reason=verdict.code or "rejected").inc()
            elif action is Action.PIPELINE_REJECTS:
                counts["rejected"] += 1
                metrics.EVENTS_REJECTED.labels(reason=verdict.code or "rejected").inc()
                self._reject_usage(batch, org_id, p, verdict.code or "rejected")
            elif action is Action.COMMAND_ENGINE_REJECTED:
                counts["rejected_command"] += 1
            else:  # COMMAND_PIPELINE_REJECTS
                counts["rejected_command"] += 1
                self._reject_command(batch, org_id, p, verdict.code or "rejected")
        counts["charged"] += charged

    def _park(self, batch: Batch, org_id: str, p: Pending, reason: str) -> None:
        # Park durably, in the same transaction as the offsets that pass it; wait for the admin
        # command that creates the org/member (grace period). The engine marked the offset as
        # unknown; the mark is dropped once the commit stage has written the parked row.
        batch.counts["parked"] += 1
        self._parking.take(org_id)
        self._parking.hint = True
        item = p.item
        raw = p.raw
        batch.flush.parked_add.append(
            (
                p.ident,
                org_id,
                item.member_id,  # type: ignore[union-attr]
                item.task_id,  # type: ignore[union-attr]
                item.credits_mc,  # type: ignore[union-attr]
                item.occurred_at_ms,  # type: ignore[union-attr]
                reason,
                raw.topic,
                raw.partition,
                raw.offset,
                raw.key,
                raw.value,
            )
        )
        if reason == "unknown_member":
            batch.unknown_marks[org_id].append(f"u|{raw.topic}:{raw.partition}|{raw.offset}")

    def _reject_usage(
        self, batch: Batch, org_id: str, p: Pending, code: str, detail: str | None = None
    ) -> None:
        """Dead-letter a usage event the engine left no effect for, and record it as decided."""
        batch.messages.append(_dlq_for(self._s.topic_usage_dlq, p.raw, code, detail))
        item = p.item
        batch.flush.add_rejected_usage(
            event_id=p.ident,
            org_id=org_id,
            member_id=item.member_id,  # type: ignore[union-attr]
            task_id=item.task_id,  # type: ignore[union-attr]
            credits_mc=item.credits_mc,  # type: ignore[union-attr]
            occurred_at_ms=item.occurred_at_ms,  # type: ignore[union-attr]
            code=code,
            source=f"{p.raw.topic}:{p.raw.partition}",
            offset=p.raw.offset,
        )

    def _reject_command(
        self, batch: Batch, org_id: str, p: Pending, code: str, detail: str | None = None
    ) -> None:
        """Dead-letter a command the engine left no record for, and record it as decided."""
        command = p.item.command  # type: ignore[union-attr]
        typ = command_type_label(command.get("type"))
        metrics.COMMANDS.labels(type=typ, status="rejected").inc()
        batch.messages.append(_dlq_for(self._s.topic_admin_dlq, p.raw, code, detail))
        batch.flush.add_rejected_command(
            command_id=p.ident,
            org_id=org_id,
            type_=typ,
            code=code,
            command=command,
            source=f"{p.raw.topic}:{p.raw.partition}",
            offset=p.raw.offset,
        )


def _lookup(chunk: Sequence[Pending]) -> Callable[[str], RawSource | None]:
    index: dict[str, RawSource] | None = None

    def find(ident: str) -> RawSource | None:
        nonlocal index
        if index is None:
            index = {p.ident: p.raw for p in chunk}
        return index.get(ident)

    return find


def _tally(effects: list[dict[str, Any]], charged_mc: dict[str, int]) -> None:
    """Count effects for the metrics: usage charges summed per bucket (one counter update
    per batch instead of one per event), the rare kinds one by one."""
    for e in effects:
        kind = e["kind"]
        if kind == "ledger":
            amount = e.get("amount_mc") or 0
            if amount < 0 and e.get("source_kind") == "usage":
                charged_mc[e.get("bucket") or "unknown"] -= amount
        elif kind != "usage":
            metrics.count_effect(e)


def _add_sources(effects: list[dict[str, Any]], lookup: Callable[[str], RawSource | None]) -> None:
    """Note where each decided input came from on its usage/command record (PostgreSQL keeps
    it for audits; the engine's outbox does not carry it)."""
    for e in effects:
        kind = e.get("kind")
        if kind == "usage":
            raw = lookup(str(e.get("event_id")))
        elif kind == "command":
            raw = lookup(str(e.get("command_id")))
        else:
            continue
        if raw is not None and "source" not in e:
            e["source"] = f"{raw.topic}:{raw.partition}"
            e["offset"] = raw.offset


def _dlq_for(topic: str, raw: RawSource, code: str, detail: str | None = None) -> OutMessage:
    return dlq_message(
        topic,
        key=raw.key,
        value=raw.value,
        code=code,
        detail=detail or code,
        source_topic=raw.topic,
        source_partition=raw.partition,
        source_offset=raw.offset,
    )
