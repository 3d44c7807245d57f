"""The Kafka loop: fetch, decode, drop decided ids, group by org, apply, publish, flush, commit.

A batch goes through three stages, each its own task, overlapping across batches:

- fetch (``_stage_a``): ``getmany`` a batch, decode and validate every record, drop ids that are
  duplicates in the batch, in PostgreSQL (one ``= ANY($1)`` query per kind) or in a batch still
  being flushed;
- apply (``_stage_apply``): check that Redis has not lost the batch's orgs (rebuild them from
  the ledger if it has), apply the records through the engine (one call per org and chunk,
  several orgs in flight), hand the effect messages and dead letters to the producer;
- flush (``_stage_b``): wait for Kafka's acks, write the batch's rows and the next offsets in one
  PostgreSQL transaction, acknowledge the engine outboxes, commit the offsets to Kafka.

The write order and what a crash between any two steps leaves behind are written next to each
step below and in docs/delivery.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from schemas.decode import CommandRecord, Rejection, UsageRecord, decode_admin, decode_usage
from worker import metrics
from worker.config import Settings
from worker.constants import KEY_OUTBOX, ORG_KEY_SUFFIXES
from worker.engine import RedisBehind, RedisEngine, expand_charges
from worker.ledger import FlushBatch, Ledger, ParkedEvent
from worker.model import CommandItem, Outcome, UsageItem
from worker.publisher import OutMessage, Publisher, RawSource, dlq_message
from worker.recovery import engine_last_seq, engine_last_seqs, rebuild_org

log = logging.getLogger(__name__)

T = TypeVar("T")

ENGINE_CHUNK = 500
"""Items per engine call: bounds the time one Lua call holds Redis (NOTES: ~500 debits/call)."""

ENGINE_CONCURRENCY = 8
"""Engine calls in flight across orgs (NOTES: 4 calls in flight roughly double throughput)."""

GC_INTERVAL_SECONDS = 30.0
"""Seconds between two explicit garbage collections (automatic collection is off, see
``_tune_gc``)."""

DECODE_SLICE = 500
"""Records decoded between two turns of the event loop."""

PARKED_RETRY_LIMIT = 5_000
"""Parked events retried per turn (the rest wait for the next turn)."""

_OUTBOX_INDEX = ORG_KEY_SUFFIXES.index(KEY_OUTBOX)

UNPARSEABLE = frozenset({"message_too_large", "invalid_utf8", "invalid_json"})


class Engine(Protocol):
    """What the pipeline needs from the engine (``worker.engine.RedisEngine``)."""

    async def apply(self, org_id: str, items: Sequence[Any]) -> Any:
        """Apply items of one org atomically; returns ``.outcomes`` and ``.effects``."""

    async def outbox_pending(self, org_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """Effects not yet acknowledged with ``seq > after_seq``, in seq order."""

    async def outbox_ack(self, org_id: str, upto_seq: int) -> Any:
        """Drop the org's outbox effects with ``seq <= upto_seq``."""

    async def orgs_with_outbox(self) -> list[str]:
        """Every org that has unacknowledged effects (startup recovery)."""


# --- fault injection (tests only) --------------------------------------------------------------
# FAULT-INJECTION HOOK for the crash tests: METERING_CRASH_AT=<step>[:<n>] makes the process
# exit abruptly (os._exit(137), like kill -9) at <step> of the n-th Kafka batch (default 1).
# Steps: after_script, after_publish, after_pg_commit, before_offset_commit. Never set it in
# production; nothing else reads it.
CRASH_STEPS = ("after_script", "after_publish", "after_pg_commit", "before_offset_commit")


def _crash_plan() -> tuple[str, int] | None:
    raw = os.environ.get("METERING_CRASH_AT", "").strip()
    if not raw:
        return None
    step, _, nth = raw.partition(":")
    if step not in CRASH_STEPS:
        raise ValueError(f"METERING_CRASH_AT step must be one of {CRASH_STEPS}, got {step!r}")
    return step, int(nth or 1)


# --- batch data ------------------------------------------------------------------------------
@dataclass(slots=True)
class Pending:
    """One accepted input on its way to the engine."""

    ident: str  # event_id or command_id
    is_usage: bool
    item: Any  # UsageItem | CommandItem
    raw: RawSource
    parked: ParkedEvent | None = None


@dataclass(slots=True)
class Batch:
    """One fetched batch (or one turn of parked retries) through both stages."""

    number: int
    kafka_no: int = 0  # 1, 2, ... for fetched batches; 0 for parked-retry turns
    records: int = 0  # Kafka records (usage + admin) covered by this batch
    by_org: dict[str, list[Pending]] = field(default_factory=lambda: defaultdict(list))
    flush: FlushBatch = field(default_factory=FlushBatch)
    messages: list[OutMessage] = field(default_factory=list)
    acks: dict[str, int] = field(default_factory=dict)
    outboxed: int = 0  # effects this batch left in Redis outboxes until its ack
    ids: set[str] = field(default_factory=set)  # ids decided by the pipeline, not the engine
    commit: dict[TopicPartition, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wait_publish: Callable[[], Awaitable[Any]] | None = None
    orgs_with_commands: set[str] = field(default_factory=set)
    charged_mc: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by bucket
    is_retry: bool = False


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
    published: int = 0
    dead_letters: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


def _status(outcome: Any) -> tuple[str, str | None]:
    """(status, code) of an engine outcome (object, dict or plain string)."""
    if isinstance(outcome, str):
        return outcome, None
    if isinstance(outcome, Mapping):
        return str(outcome.get("status")), outcome.get("code")
    return str(outcome.status), getattr(outcome, "code", None)


def _peek_ids(raw: bytes) -> dict[str, str]:
    """Best-effort string ids of a rejected message (``event_id``, ``org_id`` ...)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(obj, dict):
        return {}
    return {
        k: v
        for k in ("event_id", "command_id", "org_id", "member_id", "task_id", "type")
        if isinstance(v := obj.get(k), str) and 0 < len(v) <= 128
    }


class Backoff:
    """Exponential backoff for outages (capped by ``Settings.retry_backoff_max_seconds``)."""

    def __init__(self, settings: Settings, stop: asyncio.Event) -> None:
        self._max = settings.retry_backoff_max_seconds
        self._stop = stop

    async def retry(
        self,
        stage: str,
        func: Callable[[], Awaitable[T]],
        *,
        give_up: Callable[[], bool] | None = None,
        fatal: tuple[type[Exception], ...] = (),
    ) -> T:
        """Run ``func`` until it succeeds; between attempts sleep 0.1 s, 0.2 s ... up to max.

        ``give_up()`` is consulted after a failure; when true the error propagates (shutdown
        past its grace period: leaving work undone is safe, see docs/delivery.md). Exceptions
        of the ``fatal`` types propagate at once.
        """
        delay = 0.1
        while True:
            try:
                return await func()
            except asyncio.CancelledError:
                raise
            except fatal:
                raise
            except Exception as exc:
                metrics.ERRORS.labels(stage=stage).inc()
                metrics.WORKER_UP.set(0)
                if give_up is not None and give_up():
                    raise
                log.warning(
                    "%s failed (%s: %s); retrying in %.1f s", stage, type(exc).__name__, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max)


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
        self._backoff = Backoff(settings, stop)
        self._apply_q: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=1)
        self._queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=2)
        self._inflight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._batch_no = 0
        self._kafka_batches = 0
        self._last_seq: dict[str, int] = {}
        self._pending_ids: dict[str, int] = {}  # pipeline-decided ids of unflushed batches
        self._parked_hint = True  # parked rows may exist for our partitions
        self._retry_soon = False
        self._retry_decided = 0  # events the last parked-retry turn charged or dead-lettered
        self._sync_commits: dict[TopicPartition, int] = {}
        self._broken: BaseException | None = None  # a flush failed: nothing more is flushed
        self._pg_seq: dict[str, int] = {}  # highest effect seq flushed to PostgreSQL, per org
        self._handed_no = 0  # last batch handed to the flush stage
        self._flushed_no = 0  # last batch the flush stage finished
        self._flush_progress = asyncio.Event()
        self._last_retry = 0.0
        self._stopping_since: float | None = None
        self._crash = _crash_plan()
        self._tiers = frozenset(settings.tiers)
        self._processed: dict[tuple[str, int], int] = {}  # next offset flushed, for lag
        self._sem = asyncio.Semaphore(ENGINE_CONCURRENCY)
        # RedisEngine.apply_rows keeps one-bucket charges as compact rows that become
        # PostgreSQL rows directly. Only for an engine whose apply is RedisEngine's own: other
        # engines (the model) and wrappers or subclasses that change apply (fault injection)
        # go through apply and effect dicts.
        self._apply_rows = (
            engine.apply_rows
            if isinstance(engine, RedisEngine) and type(engine).apply is RedisEngine.apply
            else None
        )
        grace = settings.unknown_grace_seconds
        self._retry_interval = max(0.2, min(5.0, grace / 4 if grace else 1.0))

    # --- lifecycle -----------------------------------------------------------------------------
    def make_consumer(self) -> AIOKafkaConsumer:
        from worker.connections import kafka_client_kwargs

        return AIOKafkaConsumer(
            **kafka_client_kwargs(self.s),
            group_id=self.s.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
        )

    def processed_offsets(self) -> dict[tuple[str, int], int]:
        """Next offset flushed to PostgreSQL per partition (for the lag gauge)."""
        return dict(self._processed)

    async def run(self, consumer: AIOKafkaConsumer) -> Stats:
        """Consume until ``stop`` is set (or the bounded run ends); returns the counters."""
        self.consumer = consumer
        self._pg_seq = await self._backoff.retry("postgres", self.ledger.org_seqs)
        gc_was_enabled = gc.isenabled()
        _tune_gc()
        collector = asyncio.create_task(_collect_garbage(), name="pipeline-gc")
        consumer.subscribe([self.s.topic_usage, self.s.topic_admin], listener=_Listener(self))
        metrics.WORKER_UP.set(1)
        stages = [
            asyncio.create_task(self._stage_apply(), name="pipeline-apply"),
            asyncio.create_task(self._stage_b(), name="pipeline-flush"),
        ]
        try:
            try:
                await self._stage_a()
            finally:
                await self._apply_q.put(None)
            for task in stages:
                await task
        except asyncio.CancelledError:
            # The runner's grace period is over: abandon the work in progress (safe: outbox +
            # replay from the PostgreSQL offsets) rather than outlive the shutdown.
            for task in stages:
                task.cancel()
            for task in stages:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            raise
        finally:
            metrics.WORKER_UP.set(0)
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
            if gc_was_enabled:
                gc.enable()
        if self._broken is not None and not self._giving_up():
            raise RuntimeError("a batch could not be flushed") from self._broken
        return self.stats

    def _giving_up(self) -> bool:
        # After a stop request the retries keep going for the grace period only; the runner
        # cancels what is left, which is safe (outbox + replay, docs/delivery.md).
        return self._stopping_since is not None and (
            time.monotonic() - self._stopping_since > self.s.shutdown_grace_seconds
        )

    def _done(self) -> bool:
        return self.max_events is not None and self.stats.records >= self.max_events

    # --- stage A ---------------------------------------------------------------------------------
    async def _stage_a(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        idle_since = time.monotonic()
        fetched = 0
        final_retry = True  # bounded run: parked events get turns until none are left to try
        offered = 0
        while not self.stop.is_set():
            if self.max_events is not None and fetched >= self.max_events:
                # Every wanted record is fetched; wait for stage B to flush them, give parked
                # events one last turn (their member_add may have come in the same run), stop.
                if not self._done() or self._inflight:
                    await asyncio.sleep(0.01)
                    continue
                if self._parked_hint and final_retry:
                    offered = await self._retry_parked()
                    final_retry = False
                    continue
                if offered >= PARKED_RETRY_LIMIT and self._retry_decided > 0:
                    final_retry = True  # a full turn that made progress: there may be more
                    continue
                break
            try:
                records = await consumer.getmany(
                    timeout_ms=self.s.batch_timeout_ms, max_records=self.s.batch_max_records
                )
            except Exception as exc:
                metrics.ERRORS.labels(stage="kafka").inc()
                log.warning("fetch failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if self._sync_commits:
                await self._commit_to_kafka(self._sync_commits)
                self._sync_commits = {}
            now = time.monotonic()
            if records:
                idle_since = now
                batch = await self._decode(records)
                fetched += batch.records
                self._kafka_batches += 1
                batch.kafka_no = self._kafka_batches
                await self._process(batch)
            elif (
                self.idle_exit_seconds is not None
                and self._inflight == 0
                and now - idle_since >= self.idle_exit_seconds
            ):
                log.info("idle for %.1f s: stopping (bounded run)", self.idle_exit_seconds)
                break
            if self._retry_soon or now - self._last_retry >= self._retry_interval:
                await self._retry_parked()
        self._stopping_since = time.monotonic()

    async def _decode(self, records: Mapping[TopicPartition, list[Any]]) -> Batch:
        """Decode and validate a fetched batch; bad records become dead letters at once."""
        self._batch_no += 1
        batch = Batch(number=self._batch_no)
        s = self.s
        now_ms = int(time.time() * 1000)
        skew_ms = s.max_clock_skew_seconds * 1000
        seen: set[str] = set()
        counts = batch.counts
        # Admin partitions first: a member_add and the usage it enables often share a batch.
        for tp in sorted(records, key=lambda t: (t.topic != s.topic_admin, t.partition)):
            recs = records[tp]
            if not recs:
                continue
            is_usage = tp.topic == s.topic_usage
            source = f"{tp.topic}:{tp.partition}"
            next_offset = recs[-1].offset + 1
            batch.flush.set_offset(tp.topic, tp.partition, next_offset)
            batch.commit[tp] = next_offset
            batch.records += len(recs)
            for i, r in enumerate(recs):
                if i % DECODE_SLICE == DECODE_SLICE - 1:
                    # Give the other stages' replies a turn (keeps Redis and PostgreSQL busy).
                    await asyncio.sleep(0)
                value: bytes = r.value if r.value is not None else b""
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
                raw = RawSource(r.key, value, tp.topic, tp.partition, r.offset)
                if isinstance(decoded, Rejection):
                    self._reject_undecoded(batch, raw, decoded, is_usage, seen)
                    continue
                if isinstance(decoded, UsageRecord):
                    ident = decoded.event_id
                    if ident in seen:
                        counts["duplicate"] += 1
                        continue
                    seen.add(ident)
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
                    ident = "c:" + decoded.command_id
                    if ident in seen:
                        counts["duplicate_command"] += 1
                        continue
                    seen.add(ident)
                    citem = CommandItem(command=decoded.command, source=source, offset=r.offset)
                    batch.by_org[decoded.org_id].append(
                        Pending(decoded.command_id, False, citem, raw)
                    )
        return batch

    def _reject_undecoded(
        self, batch: Batch, raw: RawSource, rej: Rejection, is_usage: bool, seen: set[str]
    ) -> None:
        code = str(rej.code)
        s = self.s
        batch.messages.append(
            dlq_message(
                s.topic_usage_dlq if is_usage else s.topic_admin_dlq,
                key=raw.key,
                value=raw.value,
                code=code,
                detail=rej.detail,
                source_topic=raw.topic,
                source_partition=raw.partition,
                source_offset=raw.offset,
            )
        )
        # A rejected message that still names an id decides that id (SPEC 5: the first message
        # with an event_id is charged or rejected, later ones are duplicates), so it is recorded.
        ids = {} if code in UNPARSEABLE else _peek_ids(raw.value)
        source = f"{raw.topic}:{raw.partition}"
        if is_usage:
            batch.counts["rejected"] += 1
            metrics.EVENTS_REJECTED.labels(reason=code).inc()
            event_id = ids.get("event_id")
            if event_id is not None and event_id not in seen:
                seen.add(event_id)
                batch.ids.add(event_id)
                batch.flush.add_rejected_usage(
                    event_id=event_id,
                    org_id=ids.get("org_id", ""),
                    member_id=ids.get("member_id"),
                    task_id=ids.get("task_id"),
                    credits_mc=None,
                    occurred_at_ms=None,
                    code=code,
                    source=source,
                    offset=raw.offset,
                )
        else:
            metrics.COMMANDS.labels(type=ids.get("type", "unknown"), status="rejected").inc()
            command_id = ids.get("command_id")
            if command_id is not None and "c:" + command_id not in seen:
                seen.add("c:" + command_id)
                batch.ids.add("c:" + command_id)
                batch.flush.add_rejected_command(
                    command_id=command_id,
                    org_id=ids.get("org_id", ""),
                    type_=ids.get("type", ""),
                    code=code,
                    command={"raw": raw.value[:4096].decode("utf-8", "replace")},
                    source=source,
                    offset=raw.offset,
                )

    async def _drop_decided(self, batch: Batch) -> None:
        """Drop inputs whose id is already decided: permanent at-most-once.

        Redis remembers ids only for a short window; PostgreSQL holds every decided id forever.
        One query per kind for the whole batch, before the engine sees anything, so a duplicate
        that arrives after Redis forgot its id is dropped here and never charged.
        """
        event_ids: list[str] = []
        command_ids: list[str] = []
        for ps in batch.by_org.values():
            for p in ps:
                (event_ids if p.is_usage else command_ids).append(p.ident)
        if not event_ids and not command_ids:
            return
        decided_events, decided_commands = await self._backoff.retry(
            "postgres",
            lambda: self.ledger.decided_ids(event_ids, command_ids),
            give_up=self._giving_up,
        )
        pending = self._pending_ids
        if not decided_events and not decided_commands and not pending:
            return  # the common case: nothing to drop
        for org_id in list(batch.by_org):
            kept = []
            for p in batch.by_org[org_id]:
                if p.is_usage:
                    if p.ident in decided_events or p.ident in pending:
                        batch.counts["duplicate"] += 1
                        continue
                elif p.ident in decided_commands or "c:" + p.ident in pending:
                    batch.counts["duplicate_command"] += 1
                    continue
                kept.append(p)
            if kept:
                batch.by_org[org_id] = kept
            else:
                del batch.by_org[org_id]

    async def _process(self, batch: Batch) -> None:
        """Stage A's part of a batch (drop decided ids), then hand it to the apply stage."""
        self._inflight += 1
        self._drained.clear()
        try:
            if not batch.is_retry:
                await self._drop_decided(batch)
            self._remember_ids(batch)
        except BaseException:
            self._finish(batch)
            raise
        await self._apply_q.put(batch)

    def _remember_ids(self, batch: Batch) -> None:
        # Ids decided by the pipeline itself (rejections, parked events) are in PostgreSQL only
        # once the batch is flushed; until then later batches check them here.
        for ident in batch.ids:
            self._pending_ids[ident] = batch.number

    async def _stage_apply(self) -> None:
        """Apply batches through the engine in fetch order and hand them to the flush stage.

        Runs as its own task so that fetching and decoding batch N+1 overlaps applying batch N.
        """
        while True:
            batch = await self._apply_q.get()
            if batch is None:
                await self._queue.put(None)
                return
            if self._broken is not None:
                self._finish(batch)  # never apply or flush past a failed batch
                continue
            try:
                if self._apply_rows is None:
                    # Other engines: one read of the orgs' seqs per batch. RedisEngine checks
                    # in the script itself (expect_seq, see _apply_org).
                    await self._check_redis(batch)
                with metrics.timed(metrics.REDIS_SCRIPT_SECONDS, script="batch"):
                    await self._apply_all(batch)
                # Crash here: the engine applied the batch and its effects wait in the
                # outboxes; nothing is published or in PostgreSQL. Restart drains the outboxes
                # (publish + rows) and replays the batch from the PostgreSQL offsets; the
                # engine's offset watermark turns the replay into no-ops, PostgreSQL's ids
                # catch the rest.
                self._maybe_crash("after_script", batch)
                self._remember_ids(batch)
                # Hand-over only: Kafka's acks are awaited in stage B, overlapping this stage.
                batch.wait_publish = await self._backoff.retry(
                    "publish",
                    lambda batch=batch: self.publisher.send(batch.messages),  # type: ignore[misc]
                    give_up=self._giving_up,
                )
            except Exception as exc:
                log.exception("applying batch %d failed; stopping the worker", batch.number)
                self._broken = exc
                self.stop.set()
                self._finish(batch)
                continue
            self._handed_no = batch.number
            await self._queue.put(batch)

    async def _check_redis(self, batch: Batch) -> None:
        """Before applying, make sure Redis has not lost any org of the batch.

        Redis restarted behind its last writes (AOF ``everysec``) or emptied under a running
        worker would otherwise decide on stale state: an org it forgot looks unknown, and an org
        behind would reuse effect seqs PostgreSQL already holds. One pipelined read of the
        orgs' seq per batch compares Redis with the highest seq we know PostgreSQL holds (or
        will hold once the batches in flight are flushed); an org behind is rebuilt from the
        ledger first, after those batches are flushed.
        """
        expected = {org: seq for org in batch.by_org if (seq := self._expected_seq(org)) > 0}
        if not expected:
            return
        seqs = await self._backoff.retry(
            "redis",
            lambda: engine_last_seqs(self.engine, list(expected)),
            give_up=self._giving_up,
        )
        behind = sorted(org for org, seq in expected.items() if seqs.get(org, 0) < seq)
        if not behind:
            return
        log.warning(
            "redis lost state of %d orgs (e.g. %s): rebuilding them", len(behind), behind[0]
        )
        for org in behind:
            await self._rebuild_behind(org)

    def _expected_seq(self, org_id: str) -> int:
        """The org's effect seq PostgreSQL holds, or will hold once the batches in flight are
        flushed: Redis must be at least there (0: nothing known yet)."""
        return max(self._pg_seq.get(org_id, 0), self._last_seq.get(org_id, 0))

    async def _rebuild_behind(self, org_id: str) -> None:
        """Rebuild an org Redis lost from the ledger, before anything more is applied to it."""
        # Batches already applied carry effects PostgreSQL does not have yet: flush them
        # first, so the rebuild replays everything that was decided. (The batch being applied
        # has applied nothing for this org: the check comes before its first call.)
        while self._flushed_no < self._handed_no and self._broken is None:
            self._flush_progress.clear()
            await self._flush_progress.wait()
        if self._broken is not None:
            raise RuntimeError("cannot rebuild: an earlier batch failed to flush")
        await self._backoff.retry(
            "redis",
            lambda: rebuild_org(self.engine, self.ledger, org_id),
            give_up=self._giving_up,
        )
        self._last_seq[org_id] = await engine_last_seq(self.engine, org_id)
        metrics.rebuilt("redis_behind")

    async def _apply_all(self, batch: Batch) -> None:
        async def one_org(org_id: str, pend: list[Pending]) -> None:
            async with self._sem:
                await self._apply_org(batch, org_id, pend)

        orgs = list(batch.by_org.items())
        if len(orgs) == 1:
            await self._apply_org(batch, *orgs[0])
        elif orgs:
            await asyncio.gather(*(one_org(o, p) for o, p in orgs))

    async def _apply_org(self, batch: Batch, org_id: str, pend: list[Pending]) -> None:
        apply_rows = self._apply_rows
        # The first call of the org in this batch checks that Redis has not lost it (see
        # _check_redis); later chunks follow our own writes, and so does a call after a
        # rebuild (it replayed what PostgreSQL holds: never rebuild in a loop).
        check = [apply_rows is not None]
        for start in range(0, len(pend), ENGINE_CHUNK):
            chunk = pend[start : start + ENGINE_CHUNK]
            items = [p.item for p in chunk]
            retried = False

            async def call(items: list[Any] = items) -> tuple[list[Any], list[Any], list[Any]]:
                nonlocal retried
                try:
                    if apply_rows is not None:
                        expect = self._expected_seq(org_id) if check[0] else 0
                        rows: tuple[list[Any], list[Any], list[Any]] = await apply_rows(
                            org_id, items, expect_seq=expect
                        )
                        return rows
                    result = await self.engine.apply(org_id, items)
                    return list(result.outcomes), list(result.effects), []
                except RedisBehind:
                    raise  # refused unchanged: not a lost reply
                except Exception:
                    retried = True
                    raise

            while True:
                try:
                    outcomes, effects, charges = await self._backoff.retry(
                        "redis", call, give_up=self._giving_up, fatal=(RedisBehind,)
                    )
                except RedisBehind as exc:
                    log.warning("%s: rebuilding the org from the ledger", exc)
                    await self._rebuild_behind(org_id)
                    check[0] = False
                    continue
                break
            check[0] = False
            effects, charges = await self._fill_gap(org_id, effects, charges, force=retried)
            self._record_outcomes(batch, org_id, chunk, outcomes, effects, charges)
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
                batch.messages.extend(self.publisher.encoder.messages(org_id, effects, lookup))
                top = max(top, max(int(e["seq"]) for e in effects))
                _tally(effects, batch.charged_mc)
            if top:
                batch.acks[org_id] = max(batch.acks.get(org_id, 0), top)
            # A compact charge row stands for two effects (its ledger and usage records).
            outboxed = len(effects) + 2 * len(charges)
            batch.outboxed += outboxed
            metrics.OUTBOX_DEPTH.inc(outboxed)

    async def _fill_gap(
        self,
        org_id: str,
        effects: list[dict[str, Any]],
        charges: list[list[Any]],
        *,
        force: bool,
    ) -> tuple[list[dict[str, Any]], list[list[Any]]]:
        """Add unacknowledged outbox effects that precede this call's effects.

        ``outbox_ack`` acknowledges a prefix (``seq <= upto``). Effects of the same org made by
        another worker (producers not keying by org), or by a call whose reply was lost, may sit
        in the outbox below our seqs; we persist and publish them too before acking past them
        (idempotent rows, at-least-once messages), so an ack never drops an effect that is not
        in PostgreSQL. Compact charge rows stay compact on the common path (this call's seqs
        follow the last ones we saw); on the rare gap path they are expanded and merged.
        """
        last = self._last_seq.get(org_id)
        if last is None:
            # First call for this org in this process: every seq up to what PostgreSQL holds
            # needs nothing from the outbox, so only effects above it count as a gap (on a
            # fresh start the common case: no outbox read per org).
            last = self._pg_seq.get(org_id)
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
                self._last_seq[org_id] = high
            return effects, charges
        if charges:
            effects = sorted(
                [*effects, *expand_charges(org_id, charges)], key=lambda e: int(e["seq"])
            )
            charges = []
        pending = await self._backoff.retry(
            "redis",
            lambda: self.engine.outbox_pending(org_id, last or 0),
            give_up=self._giving_up,
        )
        have = {int(e["seq"]) for e in effects}
        extra = [e for e in pending if int(e["seq"]) not in have]
        if first is not None:
            extra = [e for e in extra if int(e["seq"]) < first]
        merged = sorted([*extra, *effects], key=lambda e: int(e["seq"]))
        if merged:
            self._last_seq[org_id] = max(int(merged[-1]["seq"]), last or 0)
        return merged, charges

    def _record_outcomes(
        self,
        batch: Batch,
        org_id: str,
        chunk: list[Pending],
        outcomes: list[Any],
        effects: list[dict[str, Any]],
        charges: Sequence[Sequence[Any]] = (),
    ) -> None:
        counts = batch.counts
        usage_effects = {e["event_id"] for e in effects if e.get("kind") == "usage"}
        usage_effects.update(r[4] for r in charges)
        command_effects = {e["command_id"] for e in effects if e.get("kind") == "command"}
        now_ms = int(time.time() * 1000)
        grace_ms = self.s.unknown_grace_seconds * 1000
        charged = 0
        for p, outcome in zip(chunk, outcomes, strict=True):
            if type(outcome) is Outcome:
                status, code = outcome.status, outcome.code
            else:
                status, code = _status(outcome)
            if status == "applied" and p.is_usage and p.parked is None:
                charged += 1  # the common case, counted once per call
                continue
            if not p.is_usage:
                if status == "applied":
                    counts["applied_command"] += 1
                    batch.orgs_with_commands.add(org_id)
                elif status == "duplicate":
                    counts["duplicate_command"] += 1
                    metrics.COMMANDS.labels(type=p.item.command.get("type"), status=status).inc()
                elif status == "replayed":
                    counts["replayed"] += 1
                elif p.ident in command_effects:
                    # Rejected by the rules: its command record (counted with the effects)
                    # becomes the dead letter.
                    counts["rejected_command"] += 1
                else:
                    # Rejected without a record in the org's outbox (e.g. the org does not
                    # exist): the pipeline dead-letters and records it itself.
                    reason = code or "rejected"
                    counts["rejected_command"] += 1
                    metrics.COMMANDS.labels(
                        type=p.item.command.get("type"), status="rejected"
                    ).inc()
                    batch.messages.append(_dlq_for(self.s.topic_admin_dlq, p.raw, reason))
                    batch.ids.add("c:" + p.ident)
                    batch.flush.add_rejected_command(
                        command_id=p.ident,
                        org_id=org_id,
                        type_=str(p.item.command.get("type")),
                        code=reason,
                        command=p.item.command,
                        source=f"{p.raw.topic}:{p.raw.partition}",
                        offset=p.raw.offset,
                    )
                continue
            if status == "applied":
                counts["charged"] += 1
                if p.parked is not None:
                    batch.flush.parked_del.append(p.ident)
                    counts["unparked"] += 1
            elif status == "duplicate":
                counts["duplicate"] += 1
                if p.parked is not None:
                    batch.flush.parked_del.append(p.ident)
            elif status == "replayed":
                counts["replayed"] += 1
            elif status == "unknown":
                reason = code or "unknown_org"
                parked = p.parked
                if parked is None:
                    # Park durably, in the same transaction as the offsets that pass it; wait
                    # for the admin command that creates the org/member (grace period).
                    counts["parked"] += 1
                    batch.ids.add(p.ident)
                    item = p.item
                    batch.flush.parked_add.append(
                        (
                            p.ident,
                            org_id,
                            item.member_id,
                            item.task_id,
                            item.credits_mc,
                            item.occurred_at_ms,
                            reason,
                            p.raw.topic,
                            p.raw.partition,
                            p.raw.offset,
                            p.raw.key,
                            p.raw.value,
                        )
                    )
                    self._parked_hint = True
                elif now_ms - parked.parked_at_ms >= grace_ms:
                    # Grace period over: dead-letter, record the decision, leave the lot.
                    counts["rejected"] += 1
                    metrics.EVENTS_REJECTED.labels(reason=reason).inc()
                    batch.flush.parked_del.append(p.ident)
                    self._reject_usage(batch, org_id, p, reason)
                else:
                    counts["still_parked"] += 1
            else:  # rejected by the engine (e.g. member_removed): a usage effect carries it
                counts["rejected"] += 1
                metrics.EVENTS_REJECTED.labels(reason=code or "rejected").inc()
                if p.parked is not None:
                    batch.flush.parked_del.append(p.ident)
                if p.ident not in usage_effects:
                    self._reject_usage(batch, org_id, p, code or "rejected")
        counts["charged"] += charged

    def _reject_usage(self, batch: Batch, org_id: str, p: Pending, reason: str) -> None:
        """Dead-letter a usage event the engine left no effect for, and record it as decided."""
        batch.messages.append(_dlq_for(self.s.topic_usage_dlq, p.raw, reason))
        batch.ids.add(p.ident)
        item = p.item
        batch.flush.add_rejected_usage(
            event_id=p.ident,
            org_id=org_id,
            member_id=item.member_id,
            task_id=item.task_id,
            credits_mc=item.credits_mc,
            occurred_at_ms=item.occurred_at_ms,
            code=reason,
            source=f"{p.raw.topic}:{p.raw.partition}",
            offset=p.raw.offset,
        )

    # --- parked events ---------------------------------------------------------------------------
    async def _retry_parked(self) -> int:
        """Offer parked events of our partitions to the engine again (after the org or member
        may have been created), and dead-letter those past the grace period; returns how many
        were offered."""
        self._last_retry = time.monotonic()
        self._retry_soon = False
        if not self._parked_hint or self.consumer is None:
            return 0
        partitions = sorted(
            tp.partition for tp in self.consumer.assignment() if tp.topic == self.s.topic_usage
        )
        if not partitions:
            return 0
        try:
            rows = await self.ledger.parked_for_partitions(
                self.s.topic_usage, partitions, PARKED_RETRY_LIMIT
            )
        except Exception as exc:
            metrics.ERRORS.labels(stage="postgres").inc()
            log.warning("reading parked events failed: %s", exc)
            return 0
        offered = len(rows)
        rows = [r for r in rows if r.event_id not in self._pending_ids]
        metrics.PARKED_EVENTS.set(offered)
        if not rows:
            self._parked_hint = offered > 0
            return 0
        self._batch_no += 1
        batch = Batch(number=self._batch_no, is_retry=True)
        for r in rows:
            item = UsageItem(
                event_id=r.event_id,
                member_id=r.member_id,
                task_id=r.task_id,
                credits_mc=r.credits_mc,
                occurred_at_ms=r.occurred_at_ms,
                source=f"{r.source_topic}:{r.source_partition}",
                offset=-1,
            )
            raw = RawSource(r.key, r.value, r.source_topic, r.source_partition, r.source_offset)
            batch.by_org[r.org_id].append(Pending(r.event_id, True, item, raw, parked=r))
        await self._process(batch)
        return offered

    # --- stage B ---------------------------------------------------------------------------------
    async def _stage_b(self) -> None:
        while True:
            batch = await self._queue.get()
            if batch is None:
                return
            try:
                if self._broken is None:
                    await self._flush(batch)
            except Exception as exc:
                # Never flush a later batch past one that failed: its offsets would skip the
                # failed batch's records. Stop instead; the next start drains the outboxes and
                # re-reads from the PostgreSQL offsets (docs/delivery.md).
                log.exception("flush of batch %d failed; stopping the worker", batch.number)
                self._broken = exc
                self.stop.set()
            finally:
                self._finish(batch)

    async def _flush(self, batch: Batch) -> None:
        started = time.perf_counter()
        giving_up = self._giving_up
        # 1. Kafka acks for effect messages and dead letters handed over in stage A.
        if batch.wait_publish is not None:
            wait = batch.wait_publish

            async def publish() -> None:
                nonlocal wait
                try:
                    await wait()
                except Exception:
                    # Resend everything: the idempotent producer and the consumers' seq dedupe
                    # make a second copy harmless, a missing one is not.
                    wait = await self.publisher.send(batch.messages)
                    raise

            await self._backoff.retry("publish", publish, give_up=giving_up)
        # Crash here: messages are in Kafka, nothing in PostgreSQL, effects still in the
        # outboxes. Restart drains the outboxes again (messages published twice: consumers
        # drop seen seqs) and replays the batch from the PostgreSQL offsets (no-op in the
        # engine); dead letters of the replayed records are published again, identified by
        # their source coordinates.
        self._maybe_crash("after_publish", batch)
        # 2. One transaction: ledger rows, decided ids, parked events, offsets.
        with metrics.timed(metrics.PG_FLUSH_SECONDS):
            await self._backoff.retry(
                "postgres", lambda: self.ledger.write(batch.flush), give_up=giving_up
            )
        # Crash here: PostgreSQL holds the batch and the offsets past it; the outboxes still
        # hold the effects. Restart re-drains them: rows conflict and are skipped, messages are
        # published again (at-least-once). Consumption resumes after the batch.
        for org, seq in batch.flush.org_seq.items():
            if seq > self._pg_seq.get(org, 0):
                self._pg_seq[org] = seq
        self._maybe_crash("after_pg_commit", batch)
        # 3. Outbox ack: only now may Redis forget the effects.
        if batch.acks:
            await self._backoff.retry(
                "redis", lambda: self._ack_outboxes(batch.acks), give_up=giving_up
            )
        metrics.OUTBOX_DEPTH.dec(batch.outboxed)
        # Crash here: everything is durable; only Kafka's committed offsets lag behind. They
        # are informational (lag, tools): a restart seeks to the PostgreSQL offsets.
        self._maybe_crash("before_offset_commit", batch)
        # 4. Kafka offset commit, best effort (PostgreSQL's offsets are the ones that count).
        if batch.commit:
            await self._commit_to_kafka(batch.commit)
        for (topic, partition), off in batch.flush.offsets.items():
            self._processed[(topic, partition)] = off
        self._account(batch)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.WORKER_UP.set(1)
        if batch.flush.parked_add:
            # Read back by the retry turn only once committed: raise the flag again now.
            self._parked_hint = True
        if batch.orgs_with_commands and self._parked_hint:
            self._retry_soon = True

    async def _commit_to_kafka(self, commit: Mapping[TopicPartition, int]) -> None:
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

    async def _ack_outboxes(self, acks: Mapping[str, int]) -> None:
        many = getattr(self.engine, "outbox_ack_many", None)
        if many is not None:
            await many(acks)
            return
        client = getattr(self.engine, "client", None)
        keys = getattr(self.engine, "keys", None)
        if client is not None and keys is not None:
            # RedisEngine: one pipelined round trip of XTRIM MINID for the whole batch (the
            # same command outbox_ack sends), instead of one round trip per org.
            pipe = client.pipeline(transaction=False)
            for org_id, seq in acks.items():
                pipe.xtrim(keys(org_id)[_OUTBOX_INDEX], minid=f"{seq + 1}-0", approximate=False)
            await pipe.execute()
            return
        # A batch may touch thousands of orgs: bound the calls in flight (and so the client's
        # connections) rather than firing one per org at once.
        sem = asyncio.Semaphore(ENGINE_CONCURRENCY * 2)

        async def one(org_id: str, seq: int) -> None:
            async with sem:
                await self.engine.outbox_ack(org_id, seq)

        await asyncio.gather(*(one(o, seq) for o, seq in acks.items()))

    def _finish(self, batch: Batch) -> None:
        if batch.number > self._flushed_no:
            self._flushed_no = batch.number
        self._flush_progress.set()
        for ident in batch.ids:
            if self._pending_ids.get(ident) == batch.number:
                del self._pending_ids[ident]
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()

    def _account(self, batch: Batch) -> None:
        c = batch.counts
        st = self.stats
        if batch.is_retry:
            self._retry_decided = c["unparked"] + c["rejected"]
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
        dead = sum(1 for m in batch.messages if m.is_dlq)
        st.dead_letters += dead
        st.published += len(batch.messages) - dead
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

    def _maybe_crash(self, step: str, batch: Batch) -> None:
        if self._crash is None or batch.is_retry:
            return
        want_step, nth = self._crash
        if step == want_step and batch.kafka_no >= nth:
            log.error("fault injection: exiting at %s of batch %d", step, batch.kafka_no)
            logging.shutdown()
            os._exit(137)

    # --- rebalance -------------------------------------------------------------------------------
    async def wait_drained(self, limit_seconds: float) -> bool:
        """Wait until every fetched batch is flushed (or ``limit_seconds``); True when drained."""
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
        stored = await self._backoff.retry("postgres", self.ledger.load_offsets)
        for tp in tps:
            offset = stored.get((tp.topic, tp.partition))
            if offset is not None:
                self.consumer.seek(tp, offset)
                # Kafka's commit may lag PostgreSQL's after a crash; lag tools read Kafka's.
                self._sync_commits[tp] = offset
        self._parked_hint = True
        self._retry_soon = True
        log.info(
            "assigned %d partitions (%d with offsets in postgres)",
            len(tps),
            sum(1 for tp in tps if (tp.topic, tp.partition) in stored),
        )

    async def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Flush what was fetched before the partitions go to another worker."""
        tps = list(revoked)
        if not tps:
            return
        # Waiting on our own flush (never on a lock the fetch loop holds) cannot deadlock: the
        # flush stage does not need the consumer, and the commit it makes is best effort.
        drained = await self.wait_drained(max(10.0, self.s.shutdown_grace_seconds))
        if not drained:
            log.warning("revoking partitions before the in-flight batch was flushed")
        for tp in tps:
            metrics.forget_lag(tp.topic, tp.partition)
            self._processed.pop((tp.topic, tp.partition), None)


def _tune_gc() -> None:
    """Take the cyclic garbage collector off the per-event path.

    A fetched batch creates several container objects per record (records, items, rows) that
    live until the batch is flushed. The automatic collector starts a collection every few
    hundred allocations and walks all of them again and again: about a tenth of the worker's
    CPU in the end-to-end benchmark. The pipeline makes no reference cycles on its hot path (its
    objects die by reference count), so automatic collection is turned off and
    ``_collect_garbage`` runs a full collection every ``GC_INTERVAL_SECONDS`` for the rare
    cycles (exceptions with tracebacks) of the libraries, whatever the stages are doing (a
    stalled pipeline still serves the HTTP API). What start-up loaded (modules, scripts,
    settings) is moved out of the collector's reach.
    """
    gc.collect()
    gc.freeze()
    gc.disable()


async def _collect_garbage() -> None:
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


def _dlq_for(topic: str, raw: RawSource, code: str) -> OutMessage:
    return dlq_message(
        topic,
        key=raw.key,
        value=raw.value,
        code=code,
        detail=code,
        source_topic=raw.topic,
        source_partition=raw.partition,
        source_offset=raw.offset,
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._p.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._p.on_assigned(assigned)
