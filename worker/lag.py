"""Consumer lag: the gauges behind ``metering_consumer_lag`` and the ``metering lag`` table.

Lag of a partition = log end offset - the next offset the worker will process. Two sources:

- in the worker, ``consumer_lag_source(consumer, processed)`` uses the worker's own consumer
  for end offsets and the pipeline's processed offsets (which may run ahead of what is
  committed to Kafka, since offsets of record live in PostgreSQL);
- anywhere else (``metering lag``, a standalone ``metering api``), ``group_lag`` asks the
  cluster for the group's committed offsets, end offsets and member assignments.

``LagMonitor`` refreshes the gauges on an interval, so the lag is current even when no batch
arrives (an idle worker still shows the lag of a stuck or empty group).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from worker import metrics
from worker.connections import kafka_client_kwargs

if TYPE_CHECKING:
    from worker.config import Settings

log = logging.getLogger(__name__)

TP = tuple[str, int]
LagSource = Callable[[], Awaitable[Mapping[TP, int]]]
"""An async callable returning the current lag per ``(topic, partition)``."""


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One row of the group lag table."""

    topic: str
    partition: int
    committed: int | None
    """Next offset the group will read (``None``: nothing committed yet)."""
    end: int
    """Log end offset (offset of the next message to be written)."""
    lag: int
    member: str | None
    """``client_id@host`` of the member that owns the partition, ``None`` when unassigned."""
    member_id: str | None

    def as_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict."""
        return asdict(self)


def _tp_key(tp: Any) -> TP:
    return (str(tp.topic), int(tp.partition))


def compute_lag(end: int, committed: int | None, beginning: int = 0) -> int:
    """Lag of one partition: end - committed, or end - beginning when nothing is committed.

    A group without a commit starts from the earliest retained offset (the worker's
    ``auto_offset_reset``), so that is what it still has to read. Never negative: the end
    offset can be read before a commit that is already past it.
    """
    start = committed if committed is not None and committed >= 0 else beginning
    return max(0, end - start)


def _decode_assignment(raw: bytes) -> list[TP]:
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

    if not raw:
        return []
    decoded = ConsumerProtocolMemberAssignment.decode(raw)
    return [(topic, int(p)) for topic, partitions in decoded.assignment for p in partitions]


async def _group_members(admin: Any, group: str) -> dict[TP, tuple[str, str]]:
    """``(topic, partition) -> (member label, member_id)`` for a stable classic group."""
    owners: dict[TP, tuple[str, str]] = {}
    responses = await admin.describe_consumer_groups([group])
    for response in responses:
        for g in response.groups:
            error_code, group_id, _state, protocol_type, _protocol, members = g[:6]
            if error_code or group_id != group or protocol_type not in ("consumer", ""):
                continue
            for member_id, client_id, client_host, _metadata, assignment in members:
                label = f"{client_id}@{client_host.lstrip('/')}"
                try:
                    tps = _decode_assignment(assignment)
                except Exception:  # an unparsable assignment must not hide the lag table
                    log.warning("cannot decode assignment", extra={"member_id": member_id})
                    continue
                for tp in tps:
                    owners[tp] = (label, member_id)
    return owners


async def group_lag(
    settings: Settings,
    group: str | None = None,
    topics: list[str] | None = None,
    processed: Mapping[TP, int] | None = None,
) -> list[PartitionLag]:
    """The lag table of a consumer group (default: ``Settings.consumer_group`` on the usage and
    admin topics), one row per partition, sorted by topic and partition.

    ``processed`` adds offsets recorded outside Kafka (the worker's PostgreSQL
    ``consumer_offsets``); per partition the larger of it and the Kafka commit counts, since
    both only move forward and the worker resumes from the later one.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    group = group or settings.consumer_group
    topics = topics or [settings.topic_usage, settings.topic_admin]
    kwargs = kafka_client_kwargs(settings)
    kwargs["client_id"] = f"{settings.client_id}-lag"
    admin = AIOKafkaAdminClient(**kwargs)
    # A consumer without group_id never joins the group, so reading end offsets cannot
    # trigger a rebalance of the workers.
    consumer = AIOKafkaConsumer(**kwargs, enable_auto_commit=False)
    await admin.start()
    try:
        await consumer.start()
        try:
            described = await admin.describe_topics(topics)
            tps: list[Any] = []
            for t in described:
                if t.get("error_code"):
                    raise LookupError(f"topic {t.get('topic')!r} not found")
                tps.extend(TopicPartition(t["topic"], p["partition"]) for p in t["partitions"])
            if not tps:
                return []
            committed = await admin.list_consumer_group_offsets(group, partitions=tps)
            end = await consumer.end_offsets(tps)
            beginning = await consumer.beginning_offsets(tps)
            owners = await _group_members(admin, group)
        finally:
            await consumer.stop()
    finally:
        await admin.close()

    rows: list[PartitionLag] = []
    for tp in tps:
        key = _tp_key(tp)
        meta = committed.get(tp)
        offset = meta.offset if meta is not None and meta.offset >= 0 else None
        extra = (processed or {}).get(key)
        if extra is not None and (offset is None or extra > offset):
            offset = int(extra)
        owner = owners.get(key)
        rows.append(
            PartitionLag(
                topic=key[0],
                partition=key[1],
                committed=offset,
                end=int(end[tp]),
                lag=compute_lag(int(end[tp]), offset, int(beginning.get(tp, 0))),
                member=owner[0] if owner else None,
                member_id=owner[1] if owner else None,
            )
        )
    rows.sort(key=lambda r: (r.topic, r.partition))
    return rows


async def postgres_offsets(
    settings: Settings, group: str | None = None, pool: Any | None = None
) -> dict[TP, int]:
    """The processed offsets the worker recorded in PostgreSQL for ``group``."""
    from worker.sqlfiles import named_queries, quote_ident

    query = named_queries("api_queries.sql")["consumer_offsets"]
    sql = query.replace("{schema}", quote_ident(settings.postgres_schema))
    group = group or settings.consumer_group
    if pool is not None:
        rows = await pool.fetch(sql, group)
    else:
        import asyncpg

        from worker.connections import pg_connect_kwargs

        conn = await asyncpg.connect(**pg_connect_kwargs(settings), timeout=10)
        try:
            rows = await conn.fetch(sql, group)
        finally:
            await conn.close()
    return {(r["topic"], int(r["partition"])): int(r["next_offset"]) for r in rows}


def group_lag_source(
    settings: Settings,
    group: str | None = None,
    topics: list[str] | None = None,
    pg_pool: Any | None = None,
) -> LagSource:
    """A ``LagSource`` from the group's committed offsets (for a process without a consumer);
    with ``pg_pool``, the worker's PostgreSQL offsets count too."""

    async def source() -> Mapping[TP, int]:
        processed = None
        if pg_pool is not None:
            try:
                processed = await postgres_offsets(settings, group, pg_pool)
            except Exception as exc:  # Kafka commits alone over-report lag: the safe side
                log.warning("cannot read postgres offsets", extra={"error": repr(exc)})
        rows = await group_lag(settings, group, topics, processed)
        return {(r.topic, r.partition): r.lag for r in rows}

    return source


def consumer_lag_source(
    consumer: Any,
    processed: Callable[[], Mapping[Any, int]] | None = None,
) -> LagSource:
    """A ``LagSource`` for the partitions assigned to ``consumer`` (an ``AIOKafkaConsumer``).

    ``processed()`` returns the next offset to process (last processed offset + 1) per
    ``TopicPartition`` or ``(topic, partition)``. Assigned partitions it does not mention use
    the consumer's fetch position.
    """

    async def source() -> Mapping[TP, int]:
        assigned = list(consumer.assignment())
        if not assigned:
            return {}
        done = {
            _tp_key(tp) if not isinstance(tp, tuple) else tp: off
            for tp, off in (processed() if processed else {}).items()
        }
        end = await consumer.end_offsets(assigned)
        out: dict[TP, int] = {}
        for tp in assigned:
            key = _tp_key(tp)
            position = done.get(key)
            if position is None:
                try:
                    position = await consumer.position(tp)
                except Exception as exc:  # not positioned yet after a rebalance: next round
                    log.debug("no position for %s: %r", key, exc)
                    continue
            out[key] = compute_lag(int(end[tp]), int(position))
        return out

    return source


class LagMonitor:
    """Refresh ``metering_consumer_lag`` from a ``LagSource`` every ``interval`` seconds.

    Partitions that disappear from the source (revoked in a rebalance) lose their series, so
    the scrape of this process never reports a partition another worker now owns.
    """

    def __init__(self, source: LagSource, interval: float = 2.0) -> None:
        self._source = source
        self._interval = interval
        self._known: set[TP] = set()
        self._task: asyncio.Task[None] | None = None
        self.last: dict[TP, int] = {}

    async def refresh_once(self) -> dict[TP, int]:
        """Read the source once and update the gauges; returns the lag per partition."""
        lags = dict(await self._source())
        for topic, partition in self._known - lags.keys():
            metrics.forget_lag(topic, partition)
        for (topic, partition), lag in lags.items():
            metrics.set_lag(topic, partition, lag)
        self._known = set(lags)
        self.last = lags
        metrics.CONSUMER_LAG_UPDATED.set(time.time())
        return lags

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Refresh until ``stop`` is set (or the task is cancelled); errors are logged, retried."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.refresh_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.ERRORS.labels(stage="lag").inc()
                log.warning("consumer lag refresh failed", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._interval)

    def start(self) -> asyncio.Task[None]:
        """Run in a background task (stopped by ``stop()``)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="lag-monitor")
        return self._task

    async def stop(self) -> None:
        """Cancel the background task and wait for it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> LagMonitor:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
