"""Recovery: drain the Redis outboxes at start-up, and rebuild Redis from the PostgreSQL ledger.

Redis with ``appendfsync everysec`` can lose about a second of writes on a crash, or everything
if its data is lost. PostgreSQL records every decided input (``usage_events``,
``admin_commands``) with the org-wide ``seq`` of its decision, and ``org_seq`` keeps the highest
effect seq it holds per org. An org whose last seq in Redis is below PostgreSQL's lost state:
it is reset and its recorded decisions are replayed through the engine in seq order. The replay
recreates effects PostgreSQL already has, so they are acknowledged instead of published. Kafka
is then consumed from the PostgreSQL offsets, which cover exactly what was replayed.

An org with a snapshot (``org_snapshots``, written by the commit stage every
``snapshot_every_effects`` effects) is restored from it and only the decisions after it are
replayed: a rebuild costs the org's state plus the tail of its ledger, not its history.

``rebuild`` is also the ``metering rebuild`` command. Run it with the workers stopped: a worker
applying to an org while it is replayed would interleave with the replay.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from worker import metrics
from worker.config import Settings
from worker.contract import CommandItem, Engine, UsageItem
from worker.effects import Signal, last_seq
from worker.engine import RedisEngine
from worker.ledger import FlushBatch, Ledger, SeqCollision, migrate
from worker.publisher import Publisher

log = logging.getLogger(__name__)

REPLAY_CHUNK = 500


async def drain_outboxes(engine: Engine, ledger: Ledger, publisher: Publisher) -> int:
    """Publish and persist every unacknowledged effect left by a previous run; returns the count.

    Runs at start-up before consuming. Per org: publish (wait for Kafka's acks) -> the members'
    current states after them (``Publisher.ensure_current_signals``: a drained signal may be
    older than one another worker published meanwhile) -> PostgreSQL (idempotent inserts) ->
    outbox ack. A crash in between repeats the drain on the next start: rows already there are
    skipped, messages are published again (at-least-once, deduplicated downstream by seq). Dead
    letters of engine rejections are re-encoded from the effect (the original bytes are not
    kept in Redis).
    """
    total = 0
    for org_id in await engine.orgs_with_outbox():
        effects = await engine.outbox_pending(org_id, 0)
        if not effects:
            continue
        await publisher.publish(publisher.encoder.messages(effects, None))
        signals: dict[str, int] = {}
        for e in effects:
            if isinstance(e, Signal):
                signals[e.member_id] = max(signals.get(e.member_id, 0), e.member_seq)
        if signals:
            await publisher.ensure_current_signals(engine, {org_id: signals})
        flush = FlushBatch()
        flush.add_effects(effects)
        try:
            await ledger.write_safe(flush)
        except SeqCollision as collision:
            # Decided on state Redis lost (another worker's committed decisions collide): drop
            # the org, the check below finds it behind and rebuilds it from the ledger.
            log.error("%s: dropping the outbox and state for a rebuild", collision)
            await engine.reset_org(org_id)
            continue
        await engine.outbox_ack({org_id: max(last_seq(e) for e in effects)})
        for e in effects:
            e.count()
        total += len(effects)
    return total


def replay_items(rows: Iterable[Any]) -> list[Any]:
    """Engine items for recorded decisions (rows of the ``rebuild_inputs`` query)."""
    items: list[Any] = []
    for r in rows:
        source = r["source"] or ""  # (rows recorded before sources were)
        if r["kind"] == "usage":
            items.append(
                UsageItem(
                    event_id=r["id"],
                    member_id=r["member_id"],
                    task_id=r["task_id"],
                    credits_mc=r["credits_mc"],
                    occurred_at_ms=r["occurred_at_ms"],
                    source=source,
                    offset=-1,
                )
            )
        else:
            items.append(CommandItem(command=orjson.loads(r["command"]), source=source, offset=-1))
    return items


async def rebuild_org(
    engine: Engine, ledger: Ledger, org_id: str, progress: Callable[[str], None] | None = None
) -> int:
    """Reset one org in Redis, restore its latest snapshot and replay the recorded decisions
    after it (all of them when it has none); returns the items replayed.

    Crash at any point: the org is left reset, restored or partly replayed, and Redis is
    behind PostgreSQL for it; the next call (or the next start, whose check finds it behind)
    starts the rebuild again from the top. Nothing is published: the replay recreates effects
    PostgreSQL already holds, and they are acknowledged below.
    """
    snapshot = await ledger.snapshot(org_id)
    rows = await ledger.rebuild_inputs(org_id, snapshot.seq if snapshot else 0)
    items = replay_items(rows)
    if snapshot is None:
        await engine.reset_org(org_id)
    else:
        await engine.restore_org(snapshot)  # replaces every key of the org, outbox included
        if progress is not None:
            progress(f"  {org_id}: snapshot at seq {snapshot.seq} restored")
    top = 0
    done = 0
    for start in range(0, len(items), REPLAY_CHUNK):
        chunk = items[start : start + REPLAY_CHUNK]
        result = await engine.apply(org_id, chunk, replay=True)
        for e in result.effects:
            top = max(top, last_seq(e))
        done += len(chunk)
        if progress is not None and len(items) > REPLAY_CHUNK:
            progress(f"  {org_id}: {done}/{len(items)} decisions replayed")
    # Everything the replay produced is already in PostgreSQL (it is what PostgreSQL recorded).
    pending = await engine.outbox_pending(org_id, 0)
    if pending:
        top = max(top, *(last_seq(e) for e in pending))
    if top:
        await engine.outbox_ack({org_id: top})
    return len(items)


async def rebuild_behind(
    settings: Settings,
    engine: Engine,
    ledger: Ledger,
    *,
    org_ids: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    reason: str = "redis_behind",
) -> list[str]:
    """Rebuild every org whose Redis seq is behind PostgreSQL (or exactly ``org_ids``)."""
    pg = await ledger.org_seqs()
    if org_ids is not None:
        targets = [o for o in org_ids if o in pg]
        missing = [o for o in org_ids if o not in pg]
        if missing and progress is not None:
            progress(f"no ledger records for: {', '.join(missing)}")
    else:
        targets = []
        redis_seqs = await engine.last_seqs(list(pg))
        for org_id, pg_seq in pg.items():
            redis_seq = redis_seqs.get(org_id, 0)
            if redis_seq < pg_seq:
                log.warning(
                    "redis is behind postgres for org %s (seq %d < %d): rebuilding",
                    org_id,
                    redis_seq,
                    pg_seq,
                )
                targets.append(org_id)
    started = time.monotonic()
    for n, org_id in enumerate(targets, 1):
        replayed = await rebuild_org(engine, ledger, org_id, progress)
        after = (await engine.last_seqs([org_id]))[org_id]
        if after != pg.get(org_id, after):
            log.warning(
                "org %s rebuilt to seq %d but postgres holds %d", org_id, after, pg.get(org_id)
            )
        metrics.rebuilt(reason)
        if progress is not None:
            progress(f"[{n}/{len(targets)}] {org_id}: {replayed} decisions replayed, seq {after}")
    if targets:
        log.info("rebuilt %d orgs in %.1f s", len(targets), time.monotonic() - started)
    return targets


async def rebuild(
    settings: Settings | None = None, *, org_ids: Sequence[str] | None = None
) -> dict[str, Any]:
    """``metering rebuild``: rebuild the orgs Redis lost (or ``org_ids``) from PostgreSQL."""
    settings = settings or Settings()

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    await migrate(settings)
    ledger = await Ledger.connect(settings)
    engine = RedisEngine.from_settings(settings)
    publisher = Publisher(settings)
    try:
        # Effects still in an outbox are newer than PostgreSQL: persist them before any reset.
        await publisher.start()
        try:
            drained = await drain_outboxes(engine, ledger, publisher)
        finally:
            await publisher.stop()
        if drained:
            say(f"drained {drained} effects left in the outboxes")
        say("comparing Redis with the PostgreSQL ledger ...")
        targets = await rebuild_behind(
            settings,
            engine,
            ledger,
            org_ids=org_ids,
            progress=say,
            reason="manual",
        )
        say(f"{len(targets)} orgs rebuilt")
        return {"orgs": len(targets), "org_ids": targets}
    finally:
        await engine.close()
        await ledger.close()
