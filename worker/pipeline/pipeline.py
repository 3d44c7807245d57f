"""The consumer loop of one worker: three stages as tasks, batches flowing through them in order.

::

    fetch stage   getmany -> Intake.decode -> Intake.drop_decided  (+ parked-retry turns)
        | queue (1 batch)
    apply stage   Applier.apply -> hand the messages to the producer
        | queue (2 batches)
    commit stage  Committer.flush: Kafka acks -> PostgreSQL -> outbox ack -> Kafka commit

Batch N+1 is fetched while batch N is applied and batch N-1 committed. The bounded queues are
the back-pressure: a stage that waits on an outage stops the ones before it. The write order
and the crash notes live with the code that writes (``commit.py``, ``apply.py``) and in
docs/delivery.md.

Stopping: ``stop`` (SIGTERM) ends fetching at once; the batches in flight are finished within
``shutdown_grace_seconds`` (less the few seconds kept for closing the clients), after which every
retry gives up (``GaveUp``) and the run ends with :class:`ShutdownIncomplete`: what was not
committed is replayed by the next owner, harmlessly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from worker import metrics
from worker.config import Settings
from worker.contract import Engine
from worker.ledger import Ledger
from worker.pipeline.apply import Applier, FlushProgress
from worker.pipeline.assignor import CoPartitionedAssignor
from worker.pipeline.backoff import Backoff, GaveUp
from worker.pipeline.batch import Batch, BatchSizer, Stats
from worker.pipeline.commit import Committer
from worker.pipeline.faults import CrashPoints
from worker.pipeline.intake import Intake
from worker.pipeline.pacing import FLOWING_WAIT_MS, FetchPacing
from worker.pipeline.parking import ParkingLot
from worker.publisher import Publisher

log = logging.getLogger(__name__)

GC_INTERVAL_SECONDS = 30.0
"""Seconds between two explicit garbage collections (automatic collection is off, see
``tune_gc``)."""

FETCH_FAILURE_LOG_SECONDS = 30.0
"""At most one "fetch failed" line in this interval (the count of the others is in it)."""


class ShutdownIncomplete(Exception):
    """The grace period ended before every fetched batch was committed (safe: replayed)."""


class StartRefused(Exception):
    """The worker cannot run as configured (the message says why and what to change)."""


class Pipeline:
    """The consumer loop of one worker process (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        ledger: Ledger,
        publisher: Publisher,
        stop: asyncio.Event,
        max_events: int | None = None,
        idle_exit_seconds: float | None = None,
    ) -> None:
        self.s = settings
        self.engine = engine
        self.ledger = ledger
        self.publisher = publisher
        self.stop = stop
        self.max_events = max_events
        self.idle_exit_seconds = idle_exit_seconds
        self.stats = Stats()
        self.consumer: AIOKafkaConsumer | None = None
        self._stopped_at: float | None = None
        self.backoff = Backoff(settings, self.giving_up)
        self.progress = FlushProgress()
        self.parking = ParkingLot(settings, ledger)
        self.intake = Intake(settings, engine, ledger, self.backoff)
        self.router = self.intake.router
        self.applier = Applier(
            settings,
            engine=engine,
            ledger=ledger,
            publisher=publisher,
            backoff=self.backoff,
            parking=self.parking,
            progress=self.progress,
            router=self.router,
        )
        self.crash = CrashPoints()
        self.committer = Committer(
            settings,
            engine=engine,
            ledger=ledger,
            publisher=publisher,
            backoff=self.backoff,
            applier=self.applier,
            parking=self.parking,
            progress=self.progress,
            crash=self.crash,
            stats=self.stats,
        )
        self._apply_q: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=1)
        self._slot = asyncio.Semaphore(1)  # held from fetching a batch until apply takes it
        self.sizer = BatchSizer(settings)
        self.pacing = FetchPacing(settings.fetch_min_bytes)
        self._commit_q = CommitQueue(max(settings.batch_max_records * 2, 1))
        self._inflight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._batch_no = 0
        self._kafka_batches = 0
        self._parked_in_flight: dict[str, int] = {}  # parked event -> batch deciding it
        self._sync_commits: dict[TopicPartition, int] = {}
        self._fetch_failures = 0
        self._fetch_logged = 0.0

    # --- lifecycle -----------------------------------------------------------------------------
    def make_consumer(self) -> AIOKafkaConsumer:
        from worker.connections import kafka_client_kwargs

        return AIOKafkaConsumer(
            **kafka_client_kwargs(self.s),
            group_id=self.s.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # 4 MiB per partition: a backlog batch is filled from one partition after the
            # other (``Intake.fetch``), as far as what is buffered of each allows; with Kafka's
            # default of 1 MiB (about 5,000 sparse events) the sparse backlog ran 15-20%
            # slower, for 25-45 MiB less held.
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            # The flowing limits (pacing.py): the broker answers once fetch_min_bytes wait
            # or after a few milliseconds. ``FetchPacing`` switches to answer-on-first-byte
            # while idle and back when traffic flows.
            fetch_max_wait_ms=FLOWING_WAIT_MS,
            fetch_min_bytes=self.s.fetch_min_bytes,
            # Partition p of both input topics to one worker: one owner per org.
            partition_assignment_strategy=(CoPartitionedAssignor,),
        )

    def processed_offsets(self) -> dict[tuple[str, int], int]:
        """Next offset flushed to PostgreSQL per partition (for the lag gauge)."""
        return dict(self.committer.processed)

    def giving_up(self) -> bool:
        """True once a stop was requested and the grace period is over: retries end."""
        if not self.stop.is_set():
            return False
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        budget = self.s.shutdown_grace_seconds - self.s.close_reserve_seconds
        return time.monotonic() - self._stopped_at > budget

    async def run(self, consumer: AIOKafkaConsumer) -> Stats:
        """Consume until ``stop`` is set (or the bounded run ends); returns the counters."""
        self.consumer = consumer
        self.committer.consumer = consumer
        try:
            self.pacing.attach(consumer)
        except RuntimeError as exc:
            log.warning("fetch limits stay fixed (%s ms, %d bytes): %s",
                        FLOWING_WAIT_MS, self.s.fetch_min_bytes, exc)  # fmt: skip
        self.applier.pg_seq = await self.backoff.retry("postgres", self.ledger.org_seqs)
        await self.backoff.retry("postgres", self.parking.reload)
        gc_was_enabled = gc.isenabled()
        tune_gc()
        tune_malloc()
        helpers = [
            asyncio.create_task(collect_garbage(), name="pipeline-gc"),
            asyncio.create_task(self._note_stop(), name="pipeline-stop"),
        ]
        consumer.subscribe([self.s.topic_usage, self.s.topic_admin], listener=_Listener(self))
        metrics.WORKER_UP.set(1)
        # The effects this pipeline has left in outboxes and not acked: none yet (a pipeline
        # that ended on an error in this process may have left the gauge above zero).
        metrics.OUTBOX_DEPTH.set(0)
        stages = [
            asyncio.create_task(self._apply_stage(), name="pipeline-apply"),
            asyncio.create_task(self._commit_stage(), name="pipeline-commit"),
        ]
        try:
            try:
                await self._fetch_stage()
            except Exception as exc:
                # A retry of the fetch stage given up at the end of the grace period (or a
                # bug): the stages after it still finish what they hold.
                if not isinstance(exc, GaveUp):
                    log.exception("fetch stage failed; stopping the worker")
                self.progress.broken = self.progress.broken or exc
                self.stop.set()
            # The end marker waits for room like a batch (the apply stage gives up its retries
            # at the end of the grace period, so this wait is bounded too).
            await self._slot.acquire()
            self._apply_q.put_nowait(None)
            for task in stages:
                await task
        except asyncio.CancelledError:
            # Cut short (the runner's grace period is over): abandon the work in progress, which
            # is safe (outbox + replay from the PostgreSQL offsets).
            for task in stages:
                task.cancel()
            for task in stages:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            raise
        finally:
            metrics.WORKER_UP.set(0)
            for task in helpers:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if gc_was_enabled:
                gc.enable()
        if self.progress.broken is not None:
            raise ShutdownIncomplete("a batch could not be committed") from self.progress.broken
        return self.stats

    async def _note_stop(self) -> None:
        await self.stop.wait()
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()

    async def _put_commit(self, item: Batch | None) -> bool:
        """Hand ``item`` to the commit stage, waiting for room up to the grace period."""
        while not self.giving_up():
            if await self._commit_q.put(item, wait_seconds=0.5):
                return True
        return False

    def _done(self) -> bool:
        return self.max_events is not None and self.stats.records >= self.max_events

    # --- fetch stage ---------------------------------------------------------------------------
    async def _take_slot(self) -> bool:
        """Wait until the apply stage can take the next batch (False: stopping first).

        Fetching only then keeps the batch fresh: a record that arrives while the apply stage
        is busy goes into the very next batch, instead of waiting behind one fetched earlier.
        """
        if self._slot.locked():
            getter = asyncio.ensure_future(self._slot.acquire())
            stopper = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not getter.done():
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
                return False
            return True
        await self._slot.acquire()
        return True

    async def _fetch_stage(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        idle_since = time.monotonic()
        fetched = 0
        final_retry = True  # bounded run: parked events get turns until none are left to try
        offered = 0
        while not self.stop.is_set():
            if self.max_events is not None and fetched >= self.max_events:
                # Every wanted record is fetched; wait for the commit stage, give parked events
                # one last turn (their member_add may have come in the same run), stop.
                if not self._done() or self._inflight:
                    await asyncio.sleep(0.01)
                    continue
                if self.parking.hint and final_retry:
                    offered = await self._retry_parked()
                    final_retry = False
                    continue
                if offered >= self.parking.limit and self.committer.retry_decided > 0:
                    final_retry = True  # a full turn that made progress: there may be more
                    continue
                break
            if self.parking.due():
                await self._retry_parked()
                continue
            if not await self._take_slot():
                break
            handed = False
            try:
                try:
                    records = await self.intake.fetch(
                        consumer, timeout_ms=self.s.batch_timeout_ms, max_records=self.sizer.size
                    )
                except Exception as exc:
                    self._fetch_failed(exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), 0.5)
                    continue
                self.pacing.observe(sum(len(recs) for recs in records.values()))
                if self._fetch_failures:
                    log.info("fetching again (%d failures)", self._fetch_failures)
                    self._fetch_failures = 0
                if self._sync_commits:
                    await self.committer.commit_to_kafka(self._sync_commits)
                    self._sync_commits = {}
                now = time.monotonic()
                if records:
                    idle_since = now
                    self._batch_no += 1
                    batch = Batch(number=self._batch_no, fetched_at=now)
                    await self.intake.decode(batch, records)
                    del records  # the decoded batch holds what it needs of them
                    fetched += batch.records
                    self._kafka_batches += 1
                    batch.kafka_no = self._kafka_batches
                    handed = True
                    await self._process(batch)
                elif (
                    self.idle_exit_seconds is not None
                    and self._inflight == 0
                    and now - idle_since >= self.idle_exit_seconds
                ):
                    log.info("idle for %.1f s: stopping (bounded run)", self.idle_exit_seconds)
                    break
            finally:
                if not handed:
                    self._slot.release()

    def _fetch_failed(self, exc: BaseException) -> None:
        metrics.ERRORS.labels(stage="kafka").inc()
        self._fetch_failures += 1
        now = time.monotonic()
        if now - self._fetch_logged >= FETCH_FAILURE_LOG_SECONDS:
            self._fetch_logged = now
            log.warning("fetch failed (%s: %s); retrying", type(exc).__name__, exc)

    async def _process(self, batch: Batch) -> None:
        """The fetch stage's part of a batch, then hand it to the apply stage (the caller holds
        the apply slot; the apply stage releases it when it takes the batch)."""
        self._inflight += 1
        self._drained.clear()
        try:
            if not batch.is_retry:
                await self.intake.drop_decided(batch)
            batch.intake_at = time.monotonic()
        except BaseException:
            self._slot.release()
            self._finish(batch)
            raise
        for ident in batch.parked_ids:
            self._parked_in_flight[ident] = batch.number
        self._apply_q.put_nowait(batch)

    async def _retry_parked(self) -> int:
        """Offer parked events of our partitions to the engine again; returns how many were
        read (events of batches still being committed wait for the next turn)."""
        if self.consumer is None:
            return 0
        partitions = sorted(
            tp.partition for tp in self.consumer.assignment() if tp.topic == self.s.topic_usage
        )
        if not await self._take_slot():
            return 0
        try:
            batch, offered = await self.parking.retry_batch(
                partitions, self._batch_no + 1, set(self._parked_in_flight)
            )
        except BaseException:
            self._slot.release()
            raise
        if batch is None:
            self._slot.release()
            return offered
        self._batch_no = batch.number
        await self._process(batch)
        return offered

    # --- apply stage ---------------------------------------------------------------------------
    async def _apply_stage(self) -> None:
        """Apply batches through the engine in fetch order and hand them to the commit stage."""
        while True:
            batch = await self._apply_q.get()
            self._slot.release()
            if batch is None:
                await self._put_commit(None)
                return
            if self.progress.broken is not None:
                self._finish(batch)  # never apply or commit past a failed batch
                continue
            batch.apply_at = time.monotonic()
            try:
                with metrics.timed(metrics.REDIS_SCRIPT_SECONDS, script="batch"):
                    await self.applier.apply(batch)
                self.crash.reached("after_script", batch.kafka_no)
                # Hand-over only (most messages went as their engine calls returned): Kafka's
                # acks are awaited in the commit stage.
                await self.applier.publish(batch)
                batch.wait_publish = batch.acks_of_sends()
                batch.applied_at = time.monotonic()
                if not batch.is_retry:
                    self.sizer.observe(batch.records, batch.applied_at - batch.apply_at)
                # After the hand-over: a snapshot read never delays a signal.
                await self.applier.take_snapshots(batch)
                batch.shed_inputs()
            except Exception as exc:
                self._fail(batch, exc, "applying")
                continue
            self.progress.handed = batch.number
            if not await self._put_commit(batch):
                self.progress.broken = self.progress.broken or GaveUp("commit queue")
                self._finish(batch)

    # --- commit stage --------------------------------------------------------------------------
    async def _commit_stage(self) -> None:
        interval = self.s.commit_interval_ms / 1000
        next_start = 0.0
        while True:
            # Live traffic applies a small batch every few milliseconds: waiting for the
            # interval commits several of them in one transaction (a full queue or the end
            # does not wait).
            batches, ended = await self._commit_q.take_all(linger_until=next_start)
            next_start = time.monotonic() + interval
            if batches:
                try:
                    if self.progress.broken is None:
                        await self.committer.flush(batches)
                except Exception as exc:
                    for batch in batches:
                        self._fail(batch, exc, "committing")
                else:
                    for batch in batches:
                        if log.isEnabledFor(logging.DEBUG):
                            _log_timings(batch)
                        self._finish(batch)
                finally:
                    self._commit_q.done(batches)
            if ended:
                return

    def _fail(self, batch: Batch, exc: BaseException, step: str) -> None:
        # Never commit a later batch past one that failed: its offsets would skip the failed
        # batch's records. Stop instead; the next start drains the outboxes and re-reads from
        # the PostgreSQL offsets (docs/delivery.md).
        if self.giving_up():
            log.warning("%s batch %d given up at the end of the grace period", step, batch.number)
        else:
            log.exception("%s batch %d failed; stopping the worker", step, batch.number)
        self.progress.broken = exc
        self.stop.set()
        self._finish(batch)

    def _finish(self, batch: Batch) -> None:
        self.progress.finished(batch.number)
        self.intake.release(batch)
        for ident in batch.parked_ids:
            if self._parked_in_flight.get(ident) == batch.number:
                del self._parked_in_flight[ident]
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()

    # --- rebalance -----------------------------------------------------------------------------
    async def wait_drained(self, limit_seconds: float) -> bool:
        """Wait until every fetched batch is committed (or ``limit_seconds``)."""
        try:
            await asyncio.wait_for(self._drained.wait(), limit_seconds)
        except TimeoutError:
            return False
        return True

    async def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        """Seek every newly assigned partition to the offset recorded in PostgreSQL."""
        assert self.consumer is not None
        tps = list(assigned)
        metrics.REBALANCES.inc()
        for topic in (self.s.topic_usage, self.s.topic_admin):
            metrics.ASSIGNED_PARTITIONS.labels(topic=topic).set(
                sum(1 for tp in self.consumer.assignment() if tp.topic == topic)
            )
        if not tps:
            return
        # The orgs of these partitions were someone else's: what PostgreSQL holds for them now
        # (the previous owner flushed before giving them up) is the Redis-behind check's floor.
        self.applier.flushed(await self.backoff.retry("postgres", self.ledger.org_seqs))
        stored = await self.backoff.retry("postgres", self.ledger.load_offsets)
        for tp in tps:
            offset = stored.get((tp.topic, tp.partition))
            if offset is not None:
                self.consumer.seek(tp, offset)
                # Kafka's commit may lag PostgreSQL's after a crash; lag tools read Kafka's.
                self._sync_commits[tp] = offset
        self.parking.hint = True
        self.parking.retry_soon = True
        log.info(
            "assigned %d partitions (%d with offsets in postgres)",
            len(tps),
            sum(1 for tp in tps if (tp.topic, tp.partition) in stored),
        )

    async def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Commit what was fetched before the partitions go to another worker."""
        tps = list(revoked)
        if not tps:
            return
        # Waiting on our own commit stage (never on a lock the fetch loop holds) cannot
        # deadlock: the commit stage does not need the consumer, and its Kafka commit is best
        # effort.
        drained = await self.wait_drained(max(10.0, self.s.shutdown_grace_seconds))
        if not drained:
            log.warning("revoking partitions before the in-flight batch was committed")
        for tp in tps:
            metrics.forget_lag(tp.topic, tp.partition)
            self.committer.processed.pop((tp.topic, tp.partition), None)


class CommitQueue:
    """Batches applied and waiting for the commit stage, bounded by their records.

    The commit stage takes everything that waits at once (a group commit), so many small
    batches of live traffic cost one PostgreSQL transaction; the bound (twice the largest
    batch) keeps what a backlog can pile up in memory in check, and stops the apply stage only
    then.
    """

    def __init__(self, max_records: int) -> None:
        self._max = max_records
        self._items: list[Batch] = []
        self._records = 0
        self._in_commit = 0
        self._ended = False
        self._changed = asyncio.Event()

    async def put(self, item: Batch | None, *, wait_seconds: float) -> bool:
        """Queue ``item`` (None: no more batches) once there is room; False if there was none
        within ``wait_seconds``."""
        deadline = time.monotonic() + wait_seconds
        if item is not None:
            while self._items and self._records + self._in_commit + item.records > self._max:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
            self._items.append(item)
            self._records += item.records
        else:
            self._ended = True
        self._changed.set()
        return True

    async def take_all(self, *, linger_until: float = 0.0) -> tuple[list[Batch], bool]:
        """Every waiting batch (at least one unless the end came), and whether it ended.

        With ``linger_until`` (a ``time.monotonic()`` instant) more batches are awaited until
        then, unless the queue is half full or the end came."""
        while not self._items and not self._ended:
            self._changed.clear()
            await self._changed.wait()
        while not self._ended and self._records * 2 < self._max:
            left = linger_until - time.monotonic()
            if left <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        items, self._items = self._items, []
        self._records = 0
        self._in_commit = sum(b.records for b in items)
        ended = self._ended and not self._items
        return items, ended

    def done(self, items: list[Batch]) -> None:
        """The commit stage finished ``items``: their room is free again."""
        self._in_commit = 0
        self._changed.set()


def _log_timings(b: Batch) -> None:
    """One DEBUG line per batch: where its time went (ms from fetch)."""
    if not b.fetched_at:
        return
    now = time.monotonic()

    def ms(t: float) -> str:
        return f"{(t - b.fetched_at) * 1000:.0f}" if t else "-"

    age = time.time() * 1000 - (time.monotonic() - b.fetched_at) * 1000 - b.oldest_ms
    log.debug(
        "batch %d: %d records (oldest waited %.0f ms), intake %s ms, apply start %s, handed %s,"
        " committed %s",
        b.number,
        b.records,
        age if b.oldest_ms else 0.0,
        ms(b.intake_at),
        ms(b.apply_at),
        ms(b.applied_at),
        ms(now),
    )


def tune_gc() -> None:
    """Take the cyclic garbage collector off the per-event path.

    A fetched batch creates several container objects per record (records, items, rows) that
    live until the batch is committed. The automatic collector starts a collection every few
    hundred allocations and walks all of them again and again: about a tenth of the worker's
    CPU in the end-to-end benchmark. The pipeline makes no reference cycles on its hot path (its
    objects die by reference count), so automatic collection is turned off and
    :func:`collect_garbage` runs a full collection every ``GC_INTERVAL_SECONDS`` for the rare
    cycles (exceptions with tracebacks) of the libraries, whatever the stages are doing. What
    start-up loaded (modules, scripts, settings) is moved out of the collector's reach.
    """
    gc.collect()
    gc.freeze()
    gc.disable()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def tune_malloc() -> bool:
    """Give the worker's large buffers back to the system as soon as they are freed.

    A fetch response (up to 4 MiB per partition), a batch's lists and dicts and a COPY's
    buffers are large allocations made and freed at every batch. glibc serves a large one with
    its own ``mmap`` (and unmaps it when freed), but raises that threshold to the size of each
    one freed, up to 32 MiB: after the first batches every such buffer came from the heap,
    where batches in different stages fragment it, and the heap held 90 MiB at the worker's
    peak. A fixed threshold of 1 MiB keeps them out of the heap: the `make bench` shape's
    worker peaks 11-21 MiB lower (BENCHMARKS.md, "Live traffic: where Redis spends a live
    event, and three cuts"). A ``MALLOC_MMAP_THRESHOLD_`` in the
    environment is the operator's choice and stays; another C library (musl, macOS) decides
    alone. Returns whether the threshold was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


async def collect_garbage() -> None:
    """Every GC_INTERVAL_SECONDS, a full collection: 50-200 ms in the end-to-end benchmark
    (mostly walking the live objects of the batches in flight), once every 30 s."""
    while True:
        await asyncio.sleep(GC_INTERVAL_SECONDS)
        started = time.perf_counter()
        found = gc.collect()
        log.debug(
            "garbage collection: %d unreachable objects in %.1f ms",
            found,
            (time.perf_counter() - started) * 1000,
        )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._p.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._p.on_assigned(assigned)
