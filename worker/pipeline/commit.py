"""Commit: make one applied batch durable, in this order, then let Redis and Kafka forget it.

1. **Kafka acks** of the effect messages and dead letters the apply stage handed over (on an
   error everything is sent again: copies are harmless, a gap is not), then the members whose
   signals went out are read back and any newer state is published after them, so the
   compacted control topic ends on each member's current state. The batches the apply stage
   handed over meanwhile are committed together (a group commit) in the steps below.
2. **One PostgreSQL transaction**: ledger rows, decided ids (``usage_events``,
   ``admin_commands``, rejections included), invoices, notifications, refill requests, last
   signals, parked events added and removed, ``org_seq`` and ``consumer_offsets``: the offsets
   and the rows they cover commit together. If PostgreSQL refuses rows for their content (a
   data error, not an outage), the refused rows are set aside in ``quarantined_rows`` and their
   inputs dead-lettered with ``storage_failed``; the rest commits.
3. **Outbox ack** (``XTRIM MINID`` per org up to the batch's highest seq) and the unknown-offset
   marks of the events now parked in PostgreSQL.
4. **Kafka offset commit**, best effort (PostgreSQL's offsets are the ones that count).

A crash between two steps leaves:

- after 1: messages in Kafka, nothing in PostgreSQL, effects in the outboxes. The restart
  drains the outboxes (messages published again: consumers drop seen seqs; rows written) and
  re-reads the batch from the PostgreSQL offsets, a no-op in the engine (watermark); dead
  letters of the re-read records are published again, identified by their source headers.
- after 2: PostgreSQL holds the batch and the offsets past it, the outboxes still hold the
  effects. The restart re-drains them: rows conflict and are skipped, messages are published
  again (at-least-once). Consumption resumes after the batch.
- after 3: everything is durable; only Kafka's committed offsets lag behind. They are
  informational (lag, tools): a restart seeks to the PostgreSQL offsets.

Batches are committed strictly in fetch order, and never past one that failed: its offsets
would skip the failed batch's records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from worker import metrics
from worker.config import Settings
from worker.contract import Engine
from worker.ledger import FlushBatch, Ledger, Quarantined, SeqCollision
from worker.pipeline.apply import Applier, FlushProgress
from worker.pipeline.backoff import Backoff, DataFailure, is_pg_data_error
from worker.pipeline.batch import Batch, Stats
from worker.pipeline.faults import CrashPoints
from worker.pipeline.parking import ParkingLot
from worker.publisher import OutMessage, Publisher, RawSource, dlq_message

log = logging.getLogger(__name__)


class Committer:
    """The commit stage: the write order of the module docstring, one batch at a time."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        ledger: Ledger,
        publisher: Publisher,
        backoff: Backoff,
        applier: Applier,
        parking: ParkingLot,
        progress: FlushProgress,
        crash: CrashPoints,
        stats: Stats,
    ) -> None:
        self._s = settings
        self._engine = engine
        self._ledger = ledger
        self._publisher = publisher
        self._backoff = backoff
        self._applier = applier
        self._parking = parking
        self._progress = progress
        self._crash = crash
        self.stats = stats
        self.consumer: AIOKafkaConsumer | None = None
        self.processed: dict[tuple[str, int], int] = {}  # next offset flushed, for lag
        self.retry_decided = 0  # events the last parked-retry turn charged or dead-lettered

    async def flush(self, batches: list[Batch]) -> None:
        """Steps 1-4 of the module docstring for consecutive batches, in one transaction.

        Whatever the apply stage handed over while the last commit ran is committed together
        (a group commit): the commit stage's fixed costs (the fsync, the outbox ack, the Kafka
        commit) are paid once, so it keeps up with small live batches and never holds the apply
        stage (and a pause) back.
        """
        started = time.perf_counter()
        last = batches[-1]
        signals: dict[str, dict[str, int]] = {}
        for batch in batches:
            await self._await_publish(batch)
            for org, members in batch.signals.items():
                mine = signals.setdefault(org, {})
                for mid, seq in members.items():
                    mine[mid] = max(mine.get(mid, 0), seq)
        if signals:
            publisher, engine = self._publisher, self._engine
            await self._backoff.retry(
                "publish", lambda: publisher.ensure_current_signals(engine, signals)
            )
        self._crash.reached("after_publish", last.kafka_no)
        flush = batches[0].flush
        if len(batches) > 1:
            flush = FlushBatch()
            for batch in batches:
                flush.merge(batch.flush)
        with metrics.timed(metrics.PG_FLUSH_SECONDS):
            try:
                await self._backoff.retry(
                    "postgres",
                    lambda: self._ledger.write(flush),
                    data_error=is_pg_data_error,
                    fatal=(SeqCollision,),
                )
            except DataFailure as failure:
                await self._write_isolated(batches, flush, failure)
            except SeqCollision as collision:
                await self._diverged(collision)
                raise
        self._applier.flushed(flush.org_seq)
        self._crash.reached("after_pg_commit", last.kafka_no)
        acks: dict[str, int] = {}
        marks: dict[str, list[str]] = {}
        commit: dict[TopicPartition, int] = {}
        for batch in batches:
            for org, seq in batch.acks.items():
                acks[org] = max(acks.get(org, 0), seq)
            for org, org_marks in batch.unknown_marks.items():
                marks.setdefault(org, []).extend(org_marks)
            for tp, off in batch.commit.items():
                commit[tp] = max(commit.get(tp, 0), off)
        if acks or marks:
            await self._backoff.retry("redis", lambda: self._engine.outbox_ack(acks, marks))
        metrics.OUTBOX_DEPTH.dec(sum(b.outboxed for b in batches))
        self._crash.reached("before_offset_commit", last.kafka_no)
        if commit:
            await self.commit_to_kafka(commit)
        for (topic, partition), off in flush.offsets.items():
            self.processed[(topic, partition)] = off
        for batch in batches:
            self._account(batch)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.WORKER_UP.set(1)
        if flush.parked_add:
            # Read back by the retry turn only once committed: raise the flag again now.
            self._parking.hint = True
        if any(b.orgs_with_commands for b in batches) and self._parking.hint:
            self._parking.retry_soon = True

    async def _diverged(self, collision: SeqCollision) -> None:
        """Orgs whose decisions collide with the ledger: Redis decided them on lost state.

        Their Redis state is dropped (outbox included: it holds decisions PostgreSQL will never
        take) and the batch fails, which stops the worker: the next start finds the orgs behind
        PostgreSQL, rebuilds them from the ledger, and consumes the batch's records again from
        PostgreSQL's offsets, deciding them on the right state. Signals already published for
        the dropped decisions are followed by the new decisions' (higher member seqs) and by
        each member's current state. A worker still applying to these orgs finds them unknown
        to Redis and rebuilds them itself (``RedisBehind``). A crash before the reset leaves
        the diverged outbox behind: the start-up drain meets the same collision, and drops the
        org the same way (``recovery.drain_outboxes``).
        """
        metrics.ERRORS.labels(stage="seq_collision").inc()
        log.error("%s: dropping their Redis state for a rebuild", collision)
        engine = self._engine

        async def reset() -> None:
            for org_id in collision.org_ids:
                await engine.reset_org(org_id)

        await self._backoff.retry("redis", reset)

    async def _await_publish(self, batch: Batch) -> None:
        """Kafka's acks for the batch's messages (on an error everything is sent again)."""
        if batch.wait_publish is None:
            return
        wait = batch.wait_publish

        async def publish() -> None:
            nonlocal wait
            try:
                await wait()
            except Exception:
                # Resend everything: the idempotent producer and the consumers' seq dedupe
                # make a second copy harmless, a missing one is not. An older signal may now
                # land after a newer one: the read-back of the current states fixes that.
                wait = await self._publisher.send(batch.messages)
                raise

        await self._backoff.retry("publish", publish)

    async def _write_isolated(
        self, batches: list[Batch], flush: FlushBatch, failure: DataFailure
    ) -> None:
        """PostgreSQL refused the batches for their content: set the refused rows aside,
        dead-letter their inputs with ``storage_failed``, commit the rest (step 2)."""
        log.error("postgres refused batch %d for its content (%s): isolating",
                  batches[-1].number, failure.error)  # fmt: skip
        bad = await self._backoff.retry("postgres", lambda: self._ledger.write_isolated(flush))
        if not bad:
            return
        metrics.QUARANTINED.labels(stage="postgres").inc(len(bad))
        self.stats.quarantined += len(bad)
        letters = self._storage_dead_letters(batches, bad)
        for q in bad:
            log.error("row set aside in quarantined_rows: %s (%s)", q.table, q.reason)
        if letters:
            await self._backoff.retry("publish", lambda: self._publisher.publish(letters))

    def _storage_dead_letters(
        self, batches: list[Batch], bad: list[Quarantined]
    ) -> list[OutMessage]:
        raws: dict[tuple[str, int], RawSource] = {}
        for batch in batches:
            for r in batch.raws:
                raws[(f"{r.topic}:{r.partition}", r.offset)] = r
        out: list[OutMessage] = []
        for q in bad:
            if q.source is None or q.offset is None:
                continue
            raw = raws.get((q.source, q.offset))
            if raw is None:
                continue
            usage = q.table == "usage_events"
            topic = self._s.topic_usage_dlq if usage else self._s.topic_admin_dlq
            out.append(
                dlq_message(
                    topic,
                    key=raw.key,
                    value=raw.value,
                    code="storage_failed",
                    detail=f"the ledger refused its {q.table} row: {q.reason}",
                    source_topic=raw.topic,
                    source_partition=raw.partition,
                    source_offset=raw.offset,
                )
            )
        return out

    async def commit_to_kafka(self, commit: Mapping[TopicPartition, int]) -> None:
        """Commit offsets of partitions we still own; a failure is logged, not raised."""
        if self.consumer is None:
            return
        assigned = self.consumer.assignment()
        offsets = {tp: OffsetAndMetadata(off, "") for tp, off in commit.items() if tp in assigned}
        if not offsets:
            return
        try:
            await asyncio.wait_for(self.consumer.commit(offsets), timeout=10)
        except Exception as exc:
            metrics.ERRORS.labels(stage="kafka").inc()
            log.info("kafka offset commit skipped (%s); postgres has the offsets", exc)

    def _account(self, batch: Batch) -> None:
        c = batch.counts
        st = self.stats
        if batch.is_retry:
            self.retry_decided = c["unparked"] + c["rejected"]
        else:
            st.batches += 1
            st.records += batch.records
            metrics.BATCH_SIZE.observe(batch.records)
        st.charged += c["charged"]
        st.applied_commands += c["applied_command"]
        st.duplicate += c["duplicate"] + c["duplicate_command"]
        st.replayed += c["replayed"]
        st.rejected += c["rejected"] + c["rejected_command"]
        st.parked += c["parked"]
        st.unparked += c["unparked"]
        st.forwarded += c["forwarded"]
        st.resent += c["resent"]
        st.quarantined += c["quarantined"]
        dead = sum(1 for m in batch.messages if m.is_dlq)
        st.dead_letters += dead
        st.published += len(batch.messages) - dead - c["forwarded"] - c["resent"]
        decided = c["charged"] + c["rejected"]
        metrics.count_outcomes(
            {
                "processed": decided,
                "charged": c["charged"],
                "duplicate": c["duplicate"],
                "replayed": c["replayed"],
                "parked": c["parked"],
            }
        )
        for bucket, mc in batch.charged_mc.items():
            metrics.charge(bucket, mc)
        # "rejected" of usage events is counted per reason where it is decided.
        metrics.EVENTS.labels(outcome="rejected").inc(c["rejected"])
