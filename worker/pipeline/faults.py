"""Fault injection for the crash tests (never set in production; nothing else reads it).

``METERING_CRASH_AT=<step>[:<n>]`` makes the process exit abruptly (``os._exit(137)``, like
kill -9) at ``<step>`` of the n-th Kafka batch (default 1). The steps are the gaps between the
writes of ``worker/pipeline/commit.py`` and ``worker/pipeline/apply.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from redis.exceptions import ResponseError

log = logging.getLogger(__name__)

CRASH_STEPS = ("after_script", "after_publish", "after_pg_commit", "before_offset_commit")


def crash_plan() -> tuple[str, int] | None:
    """The planned crash ``(step, n)`` from the environment, or None."""
    raw = os.environ.get("METERING_CRASH_AT", "").strip()
    if not raw:
        return None
    step, _, nth = raw.partition(":")
    if step not in CRASH_STEPS:
        raise ValueError(f"METERING_CRASH_AT step must be one of {CRASH_STEPS}, got {step!r}")
    return step, int(nth or 1)


class CrashPoints:
    """Exits the process at the planned step (reads the plan once)."""

    def __init__(self) -> None:
        self._plan = crash_plan()

    def reached(self, step: str, kafka_no: int) -> None:
        """Called at ``step`` of Kafka batch ``kafka_no`` (0 for parked-retry turns)."""
        if self._plan is None or kafka_no == 0:
            return
        want, nth = self._plan
        if step == want and kafka_no >= nth:
            log.error("fault injection: exiting at %s of batch %d", step, kafka_no)
            logging.shutdown()
            os._exit(137)


POISON_ENV = "METERING_FAULT_ENGINE_ORG"
"""Test-only: engine calls for this org fail with a script error, as corrupt state would."""


def poisoned_org() -> str | None:
    """The org ``METERING_FAULT_ENGINE_ORG`` names, if any."""
    return os.environ.get(POISON_ENV) or None


class PoisonedEngine:
    """An engine whose calls for one org fail on its data (``ResponseError``): the isolation
    path of ``worker/pipeline/apply.py`` under test. Everything else is the wrapped engine."""

    def __init__(self, inner: Any, org_id: str) -> None:
        self._inner = inner
        self._org = org_id

    async def apply_many(self, calls: Any) -> Any:
        if any(c.org_id == self._org for c in calls):
            # The other orgs' script calls run (as they would beside a failing one); their
            # replies are lost with the error.
            await self._inner.apply_many([c for c in calls if c.org_id != self._org])
            await asyncio.sleep(0.05)  # a failing script takes its time too
            raise ResponseError("ERR user_script:1: fault injection: this org's data is corrupt")
        return await self._inner.apply_many(calls)

    async def apply_stream(self, calls: Any) -> Any:
        if any(c.org_id == self._org for c in calls):
            await self.apply_many(calls)  # raises, the other orgs applied, nothing handed over
        async for part in self._inner.apply_stream(calls):
            yield part

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
