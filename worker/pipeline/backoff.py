"""Retries: outages wait with exponential backoff; data errors are given up on and isolated.

Two kinds of failure reach a stage, and they need opposite answers:

- an **outage** (Kafka, Redis or PostgreSQL down, failing over, refusing connections, out of
  memory, timing out) heals by itself: the stage waits and tries again, for as long as it
  takes, and the bounded queues between the stages stop the fetching meanwhile;
- a **data error** (a script error, a value PostgreSQL refuses, a key in the wrong slot) comes
  back on every attempt: after ``DATA_ATTEMPTS`` the caller is told (:class:`DataFailure`) and
  isolates the records that cause it, so that one record's content can never stop a partition.

Only the error classes listed below count as data errors; anything unknown is treated as an
outage (retried), because wrongly dead-lettering good usage during an outage is worse than a
stall that an alert reports. While stopping, retries give up once the grace period is over
(leaving work undone is safe: docs/delivery.md). Failures are logged once per
``LOG_EVERY_SECONDS`` per stage, with the number of failures in between, so an outage of hours
writes a few lines a minute, not thousands.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from redis import exceptions as redis_errors

from worker import metrics
from worker.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

DATA_ATTEMPTS = 3
"""Attempts before a data error is given up on (a second and third try rule out a fluke)."""
LOG_EVERY_SECONDS = 30.0
"""At most one failure line per stage in this interval (the count of the others is in it)."""

_REDIS_OUTAGES = (
    redis_errors.ConnectionError,  # includes BusyLoadingError
    redis_errors.TimeoutError,
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.ClusterDownError,  # includes MasterDownError
    redis_errors.TryAgainError,
    redis_errors.SlotNotCoveredError,
    redis_errors.ClusterError,
)
_PG_DATA = (
    asyncpg.DataError,  # class 22: invalid text, out of range, untranslatable character
    asyncpg.IntegrityConstraintViolationError,  # class 23 (unique violations are handled)
    asyncpg.ProgramLimitExceededError,  # class 54: e.g. a value too large to index
)


def is_redis_data_error(exc: BaseException) -> bool:
    """A failure of an engine call that a retry cannot fix."""
    if isinstance(exc, _REDIS_OUTAGES):
        return False
    if isinstance(exc, redis_errors.ResponseError):
        text = str(exc)
        # Server states that pass: a long script elsewhere, a replica loading, a failover.
        return not text.startswith(("BUSY", "LOADING", "MASTERDOWN", "NOSCRIPT", "CLUSTERDOWN"))
    # Client-side: keys in different slots, a value redis-py cannot encode, our own encoding.
    return isinstance(
        exc, (redis_errors.RedisClusterException, redis_errors.DataError, TypeError, ValueError)
    )


def is_pg_data_error(exc: BaseException) -> bool:
    """A failure of a PostgreSQL write that a retry cannot fix."""
    if isinstance(exc, asyncpg.UniqueViolationError):
        return False
    return isinstance(exc, (*_PG_DATA, TypeError, ValueError, OverflowError))


class DataFailure(Exception):
    """A step failed ``DATA_ATTEMPTS`` times on a data error; ``error`` is the last one."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(f"{stage}: {type(error).__name__}: {error}")
        self.stage = stage
        self.error = error


class GaveUp(Exception):
    """A retry loop ended because the worker is stopping and the grace period is over."""


class Backoff:
    """Exponential backoff for outages (capped by ``Settings.retry_backoff_max_seconds``)."""

    def __init__(self, settings: Settings, giving_up: Callable[[], bool] | None = None) -> None:
        self._max = settings.retry_backoff_max_seconds
        self._giving_up = giving_up or (lambda: False)
        self._last_log: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def giving_up(self) -> bool:
        """The worker is stopping and the grace period is over."""
        return self._giving_up()

    async def retry(
        self,
        stage: str,
        func: Callable[[], Awaitable[T]],
        *,
        data_error: Callable[[BaseException], bool] | None = None,
        data_attempts: int = DATA_ATTEMPTS,
        fatal: tuple[type[BaseException], ...] = (),
    ) -> T:
        """Run ``func`` until it succeeds; between attempts sleep 0.1 s, 0.2 s ... up to max.

        ``data_error(exc)`` true for ``data_attempts`` attempts in a row raises
        :class:`DataFailure`; exceptions of the ``fatal`` types propagate at once; past the
        stop grace period :class:`GaveUp` is raised (from the last error).
        """
        delay = 0.1
        data_failures = 0
        while True:
            try:
                result = await func()
            except asyncio.CancelledError:
                raise
            except fatal:
                raise
            except Exception as exc:
                metrics.ERRORS.labels(stage=stage).inc()
                metrics.WORKER_UP.set(0)
                if data_error is not None and data_error(exc):
                    data_failures += 1
                    if data_failures >= data_attempts:
                        raise DataFailure(stage, exc) from exc
                else:
                    data_failures = 0
                if self._giving_up():
                    raise GaveUp(stage) from exc
                self._report(stage, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max)
            else:
                if stage in self._quiet or stage in self._last_log:
                    self._recovered(stage)
                return result

    def _report(self, stage: str, exc: BaseException, delay: float) -> None:
        now = time.monotonic()
        last = self._last_log.get(stage)
        if last is not None and now - last < LOG_EVERY_SECONDS:
            self._quiet[stage] = self._quiet.get(stage, 0) + 1
            return
        quiet = self._quiet.pop(stage, 0)
        more = f" ({quiet} more failures since the last report)" if quiet else ""
        log.warning(
            "%s failed (%s: %s); retrying in %.1f s%s",
            stage,
            type(exc).__name__,
            exc,
            delay,
            more,
        )
        self._last_log[stage] = now

    def _recovered(self, stage: str) -> None:
        quiet = self._quiet.pop(stage, 0)
        if self._last_log.pop(stage, None) is not None:
            log.info("%s recovered (%d failures after the last report)", stage, quiet)
