"""Process lifecycle of the worker: start-up recovery, the consumer loop, graceful shutdown.

Start-up, in this order (each step safe to repeat after a crash):

1. apply PostgreSQL migrations;
2. drain the Redis outboxes left by a previous run (publish, persist, ack);
3. compare each org's last effect seq in Redis with PostgreSQL and rebuild the orgs Redis lost;
4. join the consumer group; on assignment each partition seeks to its PostgreSQL offset.

Signals only set an ``asyncio.Event``. On SIGTERM/SIGINT the loop stops fetching, finishes
the in-flight batches (flush, ack, commit) and the resources close in reverse order through an
``AsyncExitStack``, all within ``Settings.shutdown_grace_seconds``; whatever is cut short by the
grace period is safe to abandon (docs/delivery.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, TypeVar

from schemas.encode import encode_admin_command
from schemas.ids import derived_id
from worker import metrics
from worker.config import Settings
from worker.contract import Engine
from worker.engine import RedisEngine
from worker.ledger import Ledger, migrate
from worker.pipeline import Backoff, Pipeline, ShutdownIncomplete, StartRefused
from worker.pipeline.assignor import partition_problem
from worker.pipeline.faults import PoisonedEngine, poisoned_org
from worker.publisher import OutMessage, Publisher
from worker.recovery import drain_outboxes, rebuild_behind

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_MAX_EVENTS = "METERING_MAX_EVENTS"
ENV_IDLE_EXIT = "METERING_IDLE_EXIT_SECONDS"


def make_engine(settings: Settings) -> Engine:
    """The production engine (``worker.engine.RedisEngine``) built from settings."""
    return RedisEngine.from_settings(settings)


class ShutdownClock:
    """When the stop came, and what is left of the grace period: the closes at the end share
    it (a producer with its broker gone, a pool with PostgreSQL down would otherwise wait)."""

    def __init__(self, settings: Settings, stop: asyncio.Event) -> None:
        self._grace = settings.shutdown_grace_seconds
        self._reserve = settings.close_reserve_seconds
        self._stop = stop
        self.stopped_at: float | None = None

    def remaining(self) -> float:
        if self.stopped_at is None:
            if not self._stop.is_set():
                return self._reserve  # a normal end (bounded run): the same bound per close
            self.stopped_at = time.monotonic()
        return max(0.2, self.stopped_at + self._grace - time.monotonic())

    async def watch(self) -> None:
        await self._stop.wait()
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()


async def _bounded_close(
    clock: ShutdownClock, name: str, close: Callable[[], Awaitable[Any]]
) -> None:
    limit = clock.remaining()
    try:
        await asyncio.wait_for(close(), limit)
    except TimeoutError:
        log.warning("closing %s took over %.1f s: abandoned", name, limit)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are being cancelled ourselves
        # A client's own cancelled background task leaking out of its close (aiokafka's
        # fetcher does when its broker is gone): the close is over either way.
        log.warning("closing %s was cut short by its own cancelled tasks", name)
    except Exception as exc:
        log.warning("closing %s failed: %s", name, exc)


def _env_number(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else None


async def run_worker(
    settings: Settings | None = None,
    *,
    max_events: int | None = None,
    idle_exit_seconds: float | None = None,
    stop: asyncio.Event | None = None,
    engine: Engine | None = None,
) -> dict[str, int]:
    """Run the worker until SIGTERM/SIGINT, ``stop``, or the bounded-run limits.

    ``max_events``: stop once that many input records (usage + admin, good or bad) are flushed.
    ``idle_exit_seconds``: stop when nothing arrived for that long and nothing is in flight.
    Both default to the ``METERING_MAX_EVENTS`` / ``METERING_IDLE_EXIT_SECONDS`` environment
    variables (bounded runs of a worker subprocess in tests and the benchmark). Returns the
    counters also logged as the summary line.
    """
    settings = settings or Settings()
    if max_events is None and (env := _env_number(ENV_MAX_EVENTS)) is not None:
        max_events = int(env)
    if idle_exit_seconds is None:
        idle_exit_seconds = _env_number(ENV_IDLE_EXIT)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    started = time.monotonic()
    counters: dict[str, int] = {}
    try:
        counters = await _run(settings, stop, max_events, idle_exit_seconds, engine)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        counters["seconds"] = round(time.monotonic() - started)
        log.info(
            "worker stopped: %s",
            " ".join(f"{k}={v}" for k, v in counters.items()),
            extra={"summary": counters},
        )
    return counters


async def _run(
    settings: Settings,
    stop: asyncio.Event,
    max_events: int | None,
    idle_exit_seconds: float | None,
    engine: Engine | None,
) -> dict[str, int]:
    backoff = Backoff(settings, lambda: stop.is_set())
    clock = ShutdownClock(settings, stop)
    watcher = asyncio.create_task(clock.watch(), name="shutdown-clock")
    try:
        return await _run_with(
            settings, stop, max_events, idle_exit_seconds, engine, backoff, clock
        )
    finally:
        watcher.cancel()


async def _run_with(
    settings: Settings,
    stop: asyncio.Event,
    max_events: int | None,
    idle_exit_seconds: float | None,
    engine: Engine | None,
    backoff: Backoff,
    clock: ShutdownClock,
) -> dict[str, int]:
    counters: dict[str, int] = {}
    async with AsyncExitStack() as stack:
        # PostgreSQL may still be starting (or down): keep trying, but let SIGTERM end it.
        await _until_stopped(stop, backoff.retry("postgres", lambda: migrate(settings)))
        if stop.is_set():
            return counters
        ledger = await Ledger.connect(settings)
        stack.push_async_callback(_bounded_close, clock, "postgres pool", ledger.close)
        if engine is None:
            engine = make_engine(settings)
            stack.push_async_callback(_bounded_close, clock, "engine", engine.close)
        if (poison := poisoned_org()) is not None:  # fault injection for the tests only
            log.error("fault injection: engine calls of org %r fail", poison)
            engine = PoisonedEngine(engine, poison)
        publisher = Publisher(settings)
        # Health, readiness, /metrics and the read API, up before the slow start-up steps so
        # probes answer during a long drain or rebuild (worker.api.serve_worker_http).
        from worker.api import serve_worker_http

        await serve_worker_http(settings, stack, engine=engine, ledger=ledger, publisher=publisher)
        await _until_stopped(stop, backoff.retry("kafka", publisher.start))
        stack.push_async_callback(_bounded_close, clock, "producer", publisher.stop)
        if stop.is_set():
            return counters
        await _check_partitions(settings, publisher)

        # Start-up recovery retries through outages, but a SIGTERM ends it (nothing is lost:
        # the next start does it again).
        eng = engine
        drained = await _until_stopped(
            stop, backoff.retry("redis", lambda: drain_outboxes(eng, ledger, publisher))
        )
        if stop.is_set():
            return counters
        counters["drained_effects"] = drained or 0
        if drained:
            log.info("drained %d effects left in the outboxes by a previous run", drained)

        rebuilt = await _until_stopped(
            stop, backoff.retry("redis", lambda: rebuild_behind(settings, eng, ledger))
        )
        if stop.is_set():
            return counters
        counters["rebuilt_orgs"] = len(rebuilt or [])

        pipeline = Pipeline(
            settings,
            engine=engine,
            ledger=ledger,
            publisher=publisher,
            stop=stop,
            max_events=max_events,
            idle_exit_seconds=idle_exit_seconds,
        )
        consumer = pipeline.make_consumer()
        await _until_stopped(stop, backoff.retry("kafka", consumer.start))
        stack.push_async_callback(_bounded_close, clock, "consumer", consumer.stop)
        if stop.is_set():
            return counters

        lag_task = asyncio.create_task(_lag_loop(pipeline, consumer, stop), name="lag")
        stack.push_async_callback(_cancel, lag_task)
        topics_task = asyncio.create_task(_topics_watch(settings, publisher, stop), name="topics")
        stack.push_async_callback(_cancel, topics_task)
        if settings.tick_interval_seconds > 0:
            tick_task = asyncio.create_task(
                _tick_loop(settings, pipeline, ledger, publisher, stop), name="ticks"
            )
            stack.push_async_callback(_cancel, tick_task)

        run = asyncio.create_task(pipeline.run(consumer), name="pipeline")
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({run, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not run.done():
            # Stop requested: the loop stops fetching and commits what it has; its retries give
            # up at the grace period, and it is cut short a little later if it still waits
            # (what is left is replayed by the next owner, harmlessly).
            try:
                await asyncio.wait_for(
                    run, timeout=clock.remaining() - settings.close_reserve_seconds / 2
                )
            except TimeoutError:
                counters.update(pipeline.stats.as_dict())
                raise ShutdownIncomplete("grace period over with batches in flight") from None
        counters.update(pipeline.stats.as_dict())
        if run.done() and not run.cancelled() and run.exception() is not None:
            raise run.exception()  # type: ignore[misc]
    return counters


async def _until_stopped(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """Await ``work`` unless ``stop`` is set first (start-up retries must not block SIGTERM);
    None when stopped."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        await _cancel(task)
        return None
    return task.result()


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _lag_loop(pipeline: Pipeline, consumer: Any, stop: asyncio.Event) -> None:
    """Refresh the consumer-lag gauges every few seconds, also when idle."""
    from worker.lag import LagMonitor, consumer_lag_source

    # 2 s between refreshes keeps every gauge younger than 5 s even when a refresh is slow.
    monitor = LagMonitor(consumer_lag_source(consumer, pipeline.processed_offsets), interval=2.0)
    await monitor.run(stop)


async def _check_partitions(settings: Settings, publisher: Publisher) -> None:
    """Refuse to start when the input topics are not co-partitioned (one owner per org)."""
    cluster = await publisher.producer.client.fetch_all_metadata()
    counts: dict[str, int | None] = {}
    for topic in (settings.topic_usage, settings.topic_admin):
        found = cluster.partitions_for_topic(topic)
        counts[topic] = None if found is None else len(found)
    problem = partition_problem(counts)
    if problem is not None:
        raise StartRefused(problem)


TOPICS_CHECK_SECONDS = 5.0
TOPICS_LOG_SECONDS = 30.0


async def _topics_watch(settings: Settings, publisher: Publisher, stop: asyncio.Event) -> None:
    """Report input topics the broker does not know: a gauge every few seconds, a log line
    once per ``TOPICS_LOG_SECONDS`` (readiness fails meanwhile: worker.api)."""
    wanted = {settings.topic_usage, settings.topic_admin}
    logged = 0.0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=TOPICS_CHECK_SECONDS)
        try:
            cluster = await publisher.producer.client.fetch_all_metadata()
        except Exception as exc:  # the broker is down: the stages report that themselves
            log.debug("topic check skipped: %s", exc)
            continue
        missing = sorted(wanted - cluster.topics())
        metrics.INPUT_TOPICS_MISSING.set(len(missing))
        now = time.monotonic()
        if missing and now - logged >= TOPICS_LOG_SECONDS:
            logged = now
            log.error("input topics missing on the broker: %s (nothing is consumed)", missing)
        elif not missing and logged:
            logged = 0.0
            log.info("input topics are back")


async def _tick_loop(
    settings: Settings,
    pipeline: Pipeline,
    ledger: Ledger,
    publisher: Publisher,
    stop: asyncio.Event,
) -> None:
    """Publish a ``tick`` admin command for every known org every ``tick_interval_seconds``.

    Only the worker that owns partition 0 of the admin topic ticks, so a scaled-out group sends
    one tick per org per interval. Ticks carry wall-clock time: cycles close and paused members
    resume even when an org sends nothing.
    """
    interval = settings.tick_interval_seconds
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
        if stop.is_set():
            return
        consumer = pipeline.consumer
        if consumer is None or not any(
            tp.topic == settings.topic_admin and tp.partition == 0 for tp in consumer.assignment()
        ):
            continue
        try:
            orgs = list(await ledger.org_seqs())
            now_ms = int(time.time() * 1000)
            messages = [
                OutMessage(
                    settings.topic_admin,
                    org.encode(),
                    encode_admin_command(
                        {
                            "type": "tick",
                            "command_id": derived_id("tick", org, now_ms),
                            "org_id": org,
                            "at_ms": now_ms,
                        }
                    ),
                )
                for org in orgs
            ]
            await publisher.publish(messages)
        except Exception as exc:
            metrics.ERRORS.labels(stage="publish").inc()
            log.warning("tick publishing failed: %s", exc)
