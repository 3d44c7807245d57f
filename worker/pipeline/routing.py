"""Routing: every org is decided by one worker, the owner of its home partition.

An org's home is the partition of the ``org_upsert`` that created it; the co-partitioned
assignment (``assignor.py``) gives partition ``p`` of every input topic to one worker, so
producers that key by org never cross partitions. A record read from another partition (a
producer that does not key by org, or keys differently on the two topics) is not decided
where it arrives: the engine answers ``elsewhere`` with the home, and the record is **sent on**
to that partition of its topic (same key and value, header ``forwarded.from``), where its
owner decides it like any other record. Homes never change, so this worker remembers the ones
it learnt (:attr:`Router.homes`) and intake sends the next records of those orgs on without
applying them or claiming their ids (their claim entry only drops a claim of theirs that an
earlier attempt left behind, so the copy at the home is free to claim). The argument for why
one decider per org is what makes a Redis that lost its last second safe is in
docs/delivery.md ("One owner per org").

Write order of a forward, and what a crash between two steps leaves:

1. (engine answered ``elsewhere``) the record's claim on its id is released in Redis, and
   forgotten by this worker's in-flight ids, so its copy at the home can claim it (a copy
   of the id this worker reads between the two is a duplicate of the record still held in
   flight, and intake has it claim nothing: its claim would leave the id to no record);
2. the copy is handed to the producer with the batch's other messages;
3. the commit stage waits for Kafka's ack before PostgreSQL records the batch's offsets.

- Crash after 1 or 2: the offsets do not pass the record; it is read again, claimed again and
  sent on again. If a copy reached the home already, it is the first there and decides the
  id; the next copy is a duplicate (decided once).
- Crash after 3: nothing is left to do; the copy at the home is the record now.

A record at its home can lose its id's claim to a record of another partition that is then
sent on (in one batch, before the home was known): it is dropped as a copy, and the records
after it move the engine's watermark past its offset. If a crash makes the next attempt read
it again before the sent-on copy claims, it claims afresh and the engine answers ``replayed``
for an offset it never decided. Such a record is sent to its own partition again, the same
way and in the same order as a forward (``Action.RESEND``): its new offset is decided like any
first record, unless the sent-on copy claimed the id first (then it is a duplicate).

A parked event (its org did not exist when it arrived) whose org turns out to live elsewhere
is not sent through Kafka (PostgreSQL holds it as parked, which makes any copy a duplicate):
its row is handed to the home's owner (``parked_events.owner_partition``) in the batch's
transaction, and that worker's parking lot retries it.
"""

from __future__ import annotations

import logging

from worker.contract import Engine
from worker.messages import forward_of
from worker.pipeline.backoff import Backoff
from worker.pipeline.batch import Batch, claim_of

log = logging.getLogger(__name__)

HOMES_MAX = 200_000
"""Homes remembered (about 100 bytes each); past it the memory starts again, empty."""


class Router:
    """Homes learnt from the engine, and the forwards of one batch."""

    def __init__(self, engine: Engine, backoff: Backoff, in_flight: dict[str, str]) -> None:
        self._engine = engine
        self._backoff = backoff
        self._in_flight = in_flight  # the intake's ids of batches not yet committed
        self.homes: dict[str, int] = {}

    def learn(self, org_id: str, home: int) -> None:
        homes = self.homes
        if org_id not in homes and len(homes) >= HOMES_MAX:
            homes.clear()
        homes[org_id] = home

    async def send_on(self, batch: Batch) -> None:
        """Records the engine answered ``elsewhere`` for (``batch.forwards``): release their
        claims (step 1), then queue their copies with the batch's messages (step 2)."""
        forwards = batch.forwards
        if not forwards:
            return
        entries = [(p.claim_id, claim_of(p.raw)) for _, p, _ in forwards]
        await self._backoff.retry("redis", lambda: self._engine.release_claims(entries))
        in_flight = self._in_flight
        released = set()
        for claim_id, claim in entries:
            if in_flight.get(claim_id) == claim:
                del in_flight[claim_id]
            released.add(claim_id)
        batch.claimed[:] = [c for c in batch.claimed if c not in released]
        for org_id, p, home in forwards:
            if home is None:  # sent to its own partition again (Action.RESEND)
                batch.messages.append(forward_of(p.raw, p.raw.partition))
                batch.counts["resent"] += 1
                continue
            self.learn(org_id, home)
            batch.messages.append(forward_of(p.raw, home))
            batch.counts["forwarded"] += 1
        forwards.clear()
