"""Fault injection for the crash tests (never set in production; nothing else reads it).

``METERING_CRASH_AT=<step>[:<n>]`` makes the process exit abruptly (``os._exit(137)``, like
kill -9) at ``<step>`` of the n-th Kafka batch (default 1). The steps are the gaps between the
writes of ``worker/pipeline/commit.py`` and ``worker/pipeline/apply.py``.
"""

from __future__ import annotations

import logging
import os

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
