"""How long the broker may hold a fetch: short while traffic flows, open-ended while idle.

A fetch request carries two limits: the broker answers once ``min_bytes`` are waiting or after
``max_wait_ms``, whichever comes first. aiokafka keeps one request per broker in flight and
sends the next once the last answer is consumed, so under live traffic the wait is how long a
record that just arrived may sit at the broker before a batch takes it:

- **flowing** (the last batch held more than one record): ``Settings.fetch_min_bytes`` (64 KiB)
  or :data:`FLOWING_WAIT_MS`. A batch gathers a few milliseconds of traffic, so its fixed
  costs (claims, the PostgreSQL id check, script calls) are shared by every record in it.
- **idle** (the last fetch found nothing, or a single record): answer on the first byte, or
  after :data:`IDLE_WAIT_MS`. Nothing waits for more records that are not coming, and an idle
  worker sends two requests a second instead of one every few milliseconds.

A deep backlog is unaffected: every fetch finds 64 KiB waiting and is answered at once.
Measured at 2,000 events/s (BENCHMARKS.md "Fetch pacing"): a fixed 10 ms wait gave a pause
latency p50 of 19-21 ms; 3 ms while flowing gives 12-13 ms and a p99 of 28 ms, for a fifth to a
third more worker CPU at that rate. An idle worker used 6.7% of a core with the fixed 10 ms
wait, 13.8% with a fixed 3 ms one; the idle mode brings both down to under 1%.

aiokafka reads both limits from its fetcher each time it builds a request and takes them only
at construction: :class:`FetchPacing` sets the fetcher's two attributes (checked when it is
attached, and by a test against the installed aiokafka).
"""

from __future__ import annotations

from typing import Any

FLOWING_WAIT_MS = 3
"""Broker wait of a fetch while traffic flows (unless ``fetch_min_bytes`` are waiting)."""

IDLE_WAIT_MS = 500
"""Broker wait of a fetch while idle: it is answered as soon as any record arrives."""

IDLE_MIN_BYTES = 1

FLOWING_BATCH = 2
"""A batch of at least this many records means traffic flows: the next fetch may wait."""


class FetchPacing:
    """Switches a consumer's fetch limits between the flowing and the idle mode."""

    def __init__(self, flowing_min_bytes: int) -> None:
        self.flowing_min_bytes = flowing_min_bytes
        self.flowing = False
        self._fetcher: Any = None

    @staticmethod
    def limits_of(fetcher: Any) -> tuple[int, int]:
        """``(max_wait_ms, min_bytes)`` that the fetcher puts in its next request."""
        return fetcher._fetch_max_wait_ms, fetcher._fetch_min_bytes

    def attach(self, consumer: Any) -> None:
        """Pace a started consumer (idle until the first batch). Raises ``RuntimeError`` when
        the installed aiokafka keeps its limits elsewhere."""
        fetcher = getattr(consumer, "_fetcher", None)
        if fetcher is None or not all(
            isinstance(getattr(fetcher, name, None), int)
            for name in ("_fetch_max_wait_ms", "_fetch_min_bytes")
        ):
            raise RuntimeError("this aiokafka version keeps its fetch limits elsewhere")
        self._fetcher = fetcher
        self._set(flowing=False)

    def observe(self, records: int) -> None:
        """The last fetch returned ``records`` records: choose the limits of the next requests.

        aiokafka may already have sent the request that follows this fetch (it sends one as
        soon as the buffered records are taken): that one keeps the old limits, which costs at
        most one wait of the old mode."""
        flowing = records >= FLOWING_BATCH
        if flowing != self.flowing and self._fetcher is not None:
            self._set(flowing=flowing)

    def _set(self, *, flowing: bool) -> None:
        self.flowing = flowing
        f = self._fetcher
        if flowing:
            f._fetch_max_wait_ms, f._fetch_min_bytes = FLOWING_WAIT_MS, self.flowing_min_bytes
        else:
            f._fetch_max_wait_ms, f._fetch_min_bytes = IDLE_WAIT_MS, IDLE_MIN_BYTES
