"""Apply: run a batch through the engine, every org of it in one ``apply_many``.

The engine groups the orgs by shard and applies each group in one Lua call (many orgs per
call, a few calls in flight), each org's items atomically and in order; the effects stay in
the org's outbox until the commit stage acks them. What the engine decided is turned into rows,
messages and counts by :func:`classify`.

Three things can stand in the way, and each has its answer here:

- **Redis lost the org** (restarted behind its AOF, emptied): each org's first call in a
  batch carries the seq PostgreSQL holds or will hold (``expect_seq``); the engine refuses the
  org unchanged (``OrgResult.behind``), the org is rebuilt from the ledger once the batches
  already applied are flushed, and its items are applied again.
- **An outage**: the call is retried with backoff (``Backoff``), never skipped. Orgs of script
  calls that ran before the failure were applied: the retry sees their offsets as replayed and
  takes their effects from the outbox (``_fill_gaps``), so nothing is lost or doubled.
- **A data error** (the engine fails on some org's records every time): the orgs are split in
  halves, then that org's items, until the records that fail are found; they are dead-lettered
  with ``engine_failed`` and recorded as decided, an alert metric counts them, and every other
  record flows on.

Crash after a call: the effects wait in the outbox; the restart drains it (publish, rows, ack)
and re-reads the batch from the PostgreSQL offsets, where the engine's watermark turns the
replay into no-ops (docs/delivery.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from functools import partial

from worker import metrics
from worker.config import Settings
from worker.contract import Engine, OrgCall, OrgResult, Outcome
from worker.effects import Charge, Command, Effect, Ledger, Signal, Usage, last_seq
from worker.ledger import Ledger as PgLedger
from worker.messages import RawSource, dlq_of
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
from worker.pipeline.routing import Router
from worker.publisher import EffectEncoder, Publisher
from worker.recovery import rebuild_org

log = logging.getLogger(__name__)

OrgWork = tuple[str, list[Pending]]
"""One org of a batch and its inputs, in order."""


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


class _HandlingFailed(Exception):
    """Handling a part of the engine's results failed with ``error``: not retried."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Applier:
    """The apply stage's engine calls and their outcomes."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        ledger: PgLedger,
        publisher: Publisher,
        backoff: Backoff,
        parking: ParkingLot,
        progress: FlushProgress,
        router: Router,
    ) -> None:
        self._s = settings
        self._engine = engine
        self._ledger = ledger
        self._publisher = publisher
        self._encoder: EffectEncoder = publisher.encoder
        self._backoff = backoff
        self._parking = parking
        self._progress = progress
        self._router = router
        self.last_seq: dict[str, int] = {}  # highest effect seq of our calls, per org
        self.pg_seq: dict[str, int] = {}  # highest effect seq flushed to PostgreSQL, per org
        self._unchecked: set[str] = set()  # orgs just rebuilt: their next call does not check
        self._unsure: set[str] = set()  # orgs that may have been applied by a failed call

    async def apply(self, batch: Batch) -> None:
        """Every org of the batch through the engine; rows, messages and counts into it."""
        orgs = [(org_id, pend) for org_id, pend in batch.by_org.items() if pend]
        if orgs:
            await self._round(batch, orgs, DATA_ATTEMPTS, 0)

    async def take_snapshots(self, batch: Batch) -> None:
        """Read the state of the batch's orgs that are due a snapshot; it is written by the
        batch's PostgreSQL transaction, and only where that transaction's ``org_seq`` covers
        it (``upsert_snapshots``). Called after the batch's signals are handed to the producer:
        never on a pause's path.

        A crash before the commit loses the snapshot with the batch (the next multiple of
        ``snapshot_every_effects`` takes another; a rebuild meanwhile replays from the older
        one). A failed read only costs the snapshot: it is logged and the batch goes on.
        """
        if not batch.snapshot_due:
            return
        try:
            batch.flush.snapshots.update(await self._engine.snapshots(sorted(batch.snapshot_due)))
        except Exception as exc:
            log.warning("snapshots of %d orgs skipped: %s", len(batch.snapshot_due), exc)
        else:
            metrics.SNAPSHOTS.inc(len(batch.flush.snapshots))

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
        # has applied nothing for this org: the engine refused it before its first write.)
        await self._progress.wait_flushed()
        await self._backoff.retry("redis", lambda: rebuild_org(self._engine, self._ledger, org_id))
        self.last_seq[org_id] = (await self._engine.last_seqs([org_id]))[org_id]
        # The rebuild replayed what PostgreSQL holds: never rebuild in a loop.
        self._unchecked.add(org_id)
        metrics.rebuilt("redis_behind")

    async def _call(
        self,
        orgs: list[OrgWork],
        attempts: int,
        handle: Callable[[list[tuple[OrgWork, OrgResult]]], Awaitable[None]],
    ) -> None:
        """The engine calls for ``orgs`` (retried on outages), ``handle`` awaited with each
        part of the results as the engine hands it over. ``orgs`` is left holding the orgs
        not handled yet (all of them when this returns normally: none)."""

        async def call() -> None:
            calls = []
            for org_id, pend in orgs:
                expect = 0 if org_id in self._unchecked else self.expected_seq(org_id)
                calls.append(OrgCall(org_id, [p.item for p in pend], expect))
            handled: set[int] = set()
            try:
                async with aclosing(self._engine.apply_stream(calls)) as parts:
                    async for part in parts:
                        handled.update(i for i, _ in part)
                        try:
                            await handle([(orgs[i], res) for i, res in part])
                        except Exception as exc:
                            # Recorded in part, maybe: never retried (it would record twice).
                            raise _HandlingFailed(exc) from exc
            except _HandlingFailed:
                raise
            except Exception:
                # Orgs of script calls that ran before the error are applied, their reply
                # lost: their next results must be completed from the outbox (_fill_gaps).
                # The handled ones are done: the retry is for the others only.
                orgs[:] = [w for i, w in enumerate(orgs) if i not in handled]
                self._unsure.update(org_id for org_id, _ in orgs)
                for _, pend in orgs:
                    for p in pend:
                        # Maybe applied by this call: ``replayed`` next time is its own
                        # decision, not an offset passed undecided (Action.RESEND).
                        p.fresh_claim = False
                raise
            orgs.clear()

        called = [org_id for org_id, _ in orgs]
        try:
            await self._backoff.retry(
                "redis",
                call,
                data_error=is_redis_data_error,
                data_attempts=attempts,
                fatal=(_HandlingFailed,),
            )
        except _HandlingFailed as failed:
            raise failed.error from None
        for org_id in called:
            self._unchecked.discard(org_id)

    async def _round(self, batch: Batch, orgs: list[OrgWork], attempts: int, depth: int) -> None:
        """Apply ``orgs``; orgs Redis lost are rebuilt and applied again.

        Each part the engine hands over is recorded and its messages handed to the producer at
        once (:meth:`publish`): a pause leaves when the script call that decided it returns, not
        when the whole batch is applied. The effects are in the outbox already, so a crash
        after that hand-over re-publishes them at the restart (at-least-once, docs/delivery.md).
        """
        while orgs:
            behind: list[OrgWork] = []
            left = list(orgs)
            try:
                await self._call(left, attempts, partial(self._handle, batch, behind))
            except DataFailure as failure:
                await self._isolate(batch, left, failure, depth)
                orgs = behind
                for org_id, _ in behind:
                    await self._rebuild_behind(org_id)
                continue
            for org_id, _ in behind:
                await self._rebuild_behind(org_id)
            orgs = behind

    async def _handle(
        self, batch: Batch, behind: list[OrgWork], part: list[tuple[OrgWork, OrgResult]]
    ) -> None:
        """Record one part of the engine's results and hand its messages over; orgs Redis
        lost go to ``behind``."""
        done: list[tuple[OrgWork, OrgResult]] = []
        for work, res in part:
            if res.behind is not None:
                log.warning("%s: rebuilding the org from the ledger", res.behind)
                behind.append(work)
            else:
                done.append((work, res))
        await self._fill_gaps(done)
        outboxed = batch.outboxed
        try:
            for (org_id, pend), res in done:
                self._record(batch, org_id, pend, res.outcomes, res.effects)
        finally:
            # Once a part, not once an org (and what was recorded counts, even on an error).
            metrics.OUTBOX_DEPTH.inc(batch.outboxed - outboxed)
        await self._router.send_on(batch)
        await self.publish(batch)

    async def publish(self, batch: Batch) -> None:
        """Hand the batch's messages not handed over yet to the producer (Kafka's acks are
        awaited in the commit stage, ``Batch.wait_publish``)."""
        publisher = self._publisher
        if batch.sent >= len(batch.messages):
            return
        messages = batch.messages[batch.sent :]
        wait = await self._backoff.retry("publish", lambda: publisher.send(messages))
        batch.sent = len(batch.messages)
        batch.waits.append(wait)

    async def _isolate(
        self, batch: Batch, orgs: list[OrgWork], failure: DataFailure, depth: int
    ) -> None:
        """Find the records the engine fails on: halves (of the orgs, then of one org's
        records) are tried on their own, each half that succeeds applied as usual, down to
        single records, which are dead-lettered with ``engine_failed`` and recorded as
        decided."""
        if not depth:
            log.error(
                "engine call failed on its data (%s); isolating %d records of %d orgs",
                failure.error,
                sum(len(p) for _, p in orgs),
                len(orgs),
            )
        if self._backoff.giving_up():
            raise GaveUp("isolating") from failure
        if len(orgs) == 1 and len(orgs[0][1]) == 1:
            org_id, (p,) = orgs[0]
            self._quarantine(batch, org_id, p, str(failure.error))
            return
        if len(orgs) > 1:
            half = len(orgs) // 2
            parts = [orgs[:half], orgs[half:]]
        else:
            org_id, pend = orgs[0]
            half = len(pend) // 2
            parts = [[(org_id, pend[:half])], [(org_id, pend[half:])]]
        for part in parts:
            # The error was seen three times already: one attempt per piece.
            await self._round(batch, part, 1, depth + 1)
        if not depth:
            log.error(
                "records the engine fails on are dead-lettered (engine_failed, %d in this batch"
                " so far)",
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

    async def _fill_gaps(self, done: list[tuple[OrgWork, OrgResult]]) -> None:
        """Add unacknowledged outbox effects that precede each org's effects of this call.

        ``outbox_ack`` acknowledges a prefix (``seq <= upto``). Effects of the same org made by
        another worker (producers not keying by org), or by a call whose reply was lost, may sit
        in the outbox below our seqs; we persist and publish them too before acking past them
        (idempotent rows, at-least-once messages), so an ack never drops an effect that is not
        in PostgreSQL. On the common path (this call's seqs follow the last ones we saw) there
        is nothing to read; the gaps of one call are read in one round trip.
        """
        gaps: dict[str, int] = {}
        unsure = self._unsure
        for (org_id, _), res in done:
            effects = res.effects
            force = org_id in unsure
            last = self.last_seq.get(org_id)
            if last is None:
                # First call for this org in this process: every seq up to what PostgreSQL
                # holds needs nothing from the outbox, so only effects above it count as a gap.
                last = self.pg_seq.get(org_id)
            # (An org new to PostgreSQL too starts at seq 1.)
            follows = effects and effects[0].seq == (last or 0) + 1
            if not force and (not effects or follows):
                if effects:
                    self.last_seq[org_id] = last_seq(effects[-1])
                continue
            gaps[org_id] = last or 0
        if not gaps:
            return
        pending = await self._backoff.retry("redis", lambda: self._engine.outbox_pending_many(gaps))
        for (org_id, _), res in done:
            if org_id not in gaps:
                continue
            effects = res.effects
            have: set[int] = set()
            for e in effects:
                have.add(e.seq)
                if isinstance(e, Charge):
                    have.add(e.seq + 1)
            first = effects[0].seq if effects else None
            extra = [
                e
                for e in pending.get(org_id, ())
                if e.seq not in have and (first is None or e.seq < first)
            ]
            if extra:
                effects = sorted([*extra, *effects], key=lambda e: e.seq)
                res.effects = effects
            if effects:
                self.last_seq[org_id] = max(last_seq(effects[-1]), gaps[org_id])
            unsure.discard(org_id)

    def _record(
        self,
        batch: Batch,
        org_id: str,
        chunk: Sequence[Pending],
        outcomes: list[Outcome],
        effects: list[Effect],
    ) -> None:
        """Rows, messages, acks and counts of one org's engine results."""
        if effects:
            batch.flush.add_effects(effects)
            charged_mc = batch.charged_mc
            published = batch.signals[org_id]
            outboxed = 0
            rare: list[Effect] = []
            for e in effects:
                if isinstance(e, Charge):
                    charged_mc[e.bucket] += e.credits_mc
                    outboxed += 2  # a compact charge stands for two effects
                    continue
                outboxed += 1
                if isinstance(e, Usage):
                    if e.status == "rejected":
                        rare.append(e)
                elif isinstance(e, Ledger):
                    if e.source_kind == "usage" and e.amount_mc < 0:
                        charged_mc[e.bucket or "unknown"] -= e.amount_mc
                else:
                    rare.append(e)
                    e.count()
                    if isinstance(e, Signal):
                        mid = e.member_id
                        published[mid] = max(published.get(mid, 0), e.member_seq)
            if rare:
                batch.messages.extend(self._encoder.messages(rare, _lookup(chunk)))
            top = last_seq(effects[-1])
            if top > batch.acks.get(org_id, 0):
                batch.acks[org_id] = top
            every = self._s.snapshot_every_effects
            if every and (effects[0].seq - 1) // every < top // every:
                batch.snapshot_due.add(org_id)  # crossed a multiple of the interval
            batch.outboxed += outboxed
        self._outcomes(batch, org_id, chunk, outcomes, effects)

    def _outcomes(
        self,
        batch: Batch,
        org_id: str,
        chunk: Sequence[Pending],
        outcomes: list[Outcome],
        effects: list[Effect],
    ) -> None:
        counts = batch.counts
        usage_effects: set[str] | None = None
        command_effects: set[str] | None = None
        now_ms = 0  # read when an outcome needs it (not on the common path)
        grace_ms = self._s.unknown_grace_seconds * 1000
        charged = 0
        for p, outcome in zip(chunk, outcomes, strict=True):
            status = outcome.status
            if status == "applied" and p.is_usage and p.parked is None:
                charged += 1  # the common case, counted once per call
                continue
            if not now_ms:
                now_ms = int(time.time() * 1000)
            if usage_effects is None:
                usage_effects = {e.event_id for e in effects if isinstance(e, Usage | Charge)}
                command_effects = {e.command_id for e in effects if isinstance(e, Command)}
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
                fresh_claim=p.fresh_claim,
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
            elif action is Action.FORWARD:
                batch.forwards.append((org_id, p, int(verdict.code or 0)))
            elif action is Action.RESEND:
                batch.forwards.append((org_id, p, None))
            elif action is Action.MOVE_PARKED:
                home = int(verdict.code or 0)
                self._router.learn(org_id, home)
                batch.flush.parked_move[p.ident] = home
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
        batch.messages.append(dlq_of(self._s.topic_usage_dlq, p.raw, code, detail))
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
        batch.messages.append(dlq_of(self._s.topic_admin_dlq, p.raw, code, detail))
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
            index = {p.claim_id: p.raw for p in chunk}
        return index.get(ident)

    return find
