"""The parking lot: usage events whose org or member does not exist yet, bounded.

Admin commands and usage travel on different topics, so a new member's first events can
overtake its ``member_add`` (SPEC section 5). Such an event is parked in ``parked_events``, in
the same PostgreSQL transaction as the offsets that pass it, and offered to the engine again
right after admin commands are applied and every few seconds; after the grace period it is
dead-lettered with ``unknown_org``/``unknown_member``.

The lot is bounded by construction: at most ``parked_max_per_org`` events of one org and
``parked_max_total`` in all; past either, an unknown event is dead-lettered at once (a flood of
events for orgs that never come cannot grow PostgreSQL or the retry work without limit). The
counts are kept in memory from what this worker parks and releases, and reloaded from
PostgreSQL on every retry turn (other workers park for their partitions). The retry query reads
each partition's oldest events through an index, so a turn costs the same whatever the backlog.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from worker import metrics
from worker.config import Settings
from worker.contract import UsageItem
from worker.ledger import Ledger
from worker.pipeline.batch import Batch, Pending
from worker.publisher import RawSource

log = logging.getLogger(__name__)

RETRY_LIMIT = 5_000
"""Parked events offered per turn at most (the rest wait for the next turn); never more than
``batch_max_records``, so a turn holds the records behind it no longer than a fetched batch."""

LOOK_ANYWAY_SECONDS = 10.0
"""With nothing parked here, how often the lot is read anyway: another worker may have handed
this worker's partitions events of orgs whose home they are (``parked_events.owner_partition``)."""


class ParkingLot:
    """Caps and counts of the parking lot, and the retry turns of this worker's partitions."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self._s = settings
        self._ledger = ledger
        self.by_org: Counter[str] = Counter()
        self.total = 0
        self.hint = True  # parked rows may exist for our partitions
        grace = settings.unknown_grace_seconds
        self.retry_interval = max(0.2, min(5.0, grace / 4 if grace else 1.0))
        self.limit = max(1, min(RETRY_LIMIT, settings.batch_max_records))
        """Parked events offered per turn."""
        self.last_retry = 0.0
        self.last_read = 0.0
        self.retry_soon = False

    async def reload(self) -> None:
        """Counts per org from PostgreSQL (all workers' parked events)."""
        counts = await self._ledger.parked_counts()
        self.by_org = Counter(counts)
        self.total = sum(counts.values())
        metrics.PARKED_EVENTS.set(self.total)

    def room(self, org_id: str) -> bool:
        """May one more event of ``org_id`` be parked?"""
        s = self._s
        return self.by_org[org_id] < s.parked_max_per_org and self.total < s.parked_max_total

    def take(self, org_id: str) -> None:
        self.by_org[org_id] += 1
        self.total += 1
        metrics.PARKED_EVENTS.set(self.total)

    def release(self, org_id: str) -> None:
        if self.by_org[org_id] > 0:
            self.by_org[org_id] -= 1
            if not self.by_org[org_id]:
                del self.by_org[org_id]
        self.total = max(0, self.total - 1)
        metrics.PARKED_EVENTS.set(self.total)

    def due(self) -> bool:
        """Is a retry turn due (after admin commands, or every ``retry_interval``)?"""
        return self.retry_soon or time.monotonic() - self.last_retry >= self.retry_interval

    async def retry_batch(
        self, partitions: list[int], number: int, in_flight: set[str]
    ) -> tuple[Batch | None, int]:
        """A batch of this worker's parked events to offer again, and how many were read.

        Events still in a batch being flushed (``in_flight``) wait for the next turn; events
        PostgreSQL already holds as decided (an outbox drained after a crash charged them) are
        only removed from the lot, never offered twice.
        """
        now = self.last_retry = time.monotonic()
        self.retry_soon = False
        if not partitions or (not self.hint and now - self.last_read < LOOK_ANYWAY_SECONDS):
            return None, 0
        self.last_read = now
        try:
            await self.reload()
            rows = await self._ledger.parked_for_partitions(
                self._s.topic_usage, partitions, self.limit
            )
        except Exception as exc:
            metrics.ERRORS.labels(stage="postgres").inc()
            log.warning("reading parked events failed: %s", exc)
            return None, 0
        offered = len(rows)
        rows = [r for r in rows if r.event_id not in in_flight]
        if not rows:
            self.hint = offered > 0
            return None, offered
        batch = Batch(number=number, is_retry=True)
        for r in rows:
            batch.parked_ids.add(r.event_id)
            if r.decided:
                batch.flush.parked_del.append(r.event_id)
                continue
            # Offered as from the partition that retries it: its org's home once handed over.
            owner = r.owner_partition if r.owner_partition >= 0 else r.source_partition
            item = UsageItem(
                r.event_id,
                r.member_id,
                r.task_id,
                r.credits_mc,
                r.occurred_at_ms,
                f"{r.source_topic}:{owner}",
                -1,
            )
            raw = RawSource(r.key, r.value, r.source_topic, r.source_partition, r.source_offset)
            batch.by_org[r.org_id].append(Pending(r.event_id, True, item, raw, parked=r))
        return batch, offered
