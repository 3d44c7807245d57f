"""A rebuild costs the org's state, not its history: an org with a long ledger (1M decided
events by default, ``METERING_TEST_HISTORY`` to change it) loses its Redis state and is rebuilt
from its latest snapshot plus the ledger after it.

The history is made by the real engine (Redis) and written by the real ledger (PostgreSQL),
with snapshots stored the way the commit stage stores them (a multiple of
``snapshot_every_effects`` crossed, written in the transaction that covers its seq).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from worker.config import Settings
from worker.contract import CommandItem, UsageItem
from worker.effects import last_seq
from worker.engine import RedisEngine
from worker.ledger import FlushBatch, Ledger, migrate
from worker.model import to_ms
from worker.recovery import rebuild_org

pytestmark = pytest.mark.timeout(900)

HISTORY = int(os.environ.get("METERING_TEST_HISTORY", "1000000"))
CHUNK = 500  # items per engine call, as the pipeline's calls
TAIL = 1_000  # events after the last snapshot
MEMBERS = 20
T0 = to_ms(dt.datetime.now(dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url, decode_responses=False)
    await c.flushdb()
    yield c
    await c.aclose()


def _command(n: int, typ: str, **fields: Any) -> CommandItem:
    body = {"type": typ, "command_id": f"c{n}", "at_ms": T0 + n, **fields}
    return CommandItem(command=body, source="admin:0", offset=n)


async def _org_state(client: aioredis.Redis, engine: RedisEngine, org: str) -> dict[str, Any]:
    """Everything Redis holds for the org that a rebuild must recreate (not the outbox, not
    Kafka watermarks, which a replay from the ledger does not recreate either)."""
    keys = engine.keys(org)
    org_hash = {
        k: v for k, v in (await client.hgetall(keys.org)).items() if not k.startswith(b"w:")
    }
    zsets = [
        await client.zrange(k, 0, -1, withscores=True)
        for k in (keys.paused, keys.dependents, keys.debtors, keys.promo_expiry)
    ]
    return {"org": org_hash, "members": await client.hgetall(keys.members), "zsets": zsets}


async def test_rebuild_of_a_long_history_costs_its_state_not_its_history(
    client: aioredis.Redis, settings: Settings, pg_schema: str
) -> None:
    s = settings.model_copy(update={"postgres_schema": pg_schema})
    every = s.snapshot_every_effects
    await migrate(s)
    ledger = await Ledger.connect(s)
    engine = RedisEngine(client, s)
    org = "acme"
    try:
        setup = [_command(1, "org_upsert", billing_anchor_day=1)]
        setup += [
            _command(2 + m, "member_add", member_id=f"m{m:02d}", tier="pro") for m in range(MEMBERS)
        ]
        setup.append(_command(100, "pool_purchase", credits_mc=HISTORY * 100))
        result = await engine.apply(org, setup)
        flush = FlushBatch()
        flush.add_effects(result.effects)
        await ledger.write_safe(flush)

        started = time.monotonic()
        snapshots = 0
        total = HISTORY + TAIL  # the tail: decided after the last snapshot
        for start in range(0, total, CHUNK):
            items = [
                UsageItem(
                    f"ev{i}",
                    f"m{i % MEMBERS:02d}",
                    "t",
                    100 + (i % 7),
                    T0 + 1_000 + i,
                    "usage:0",
                    i,
                )
                for i in range(start, min(start + CHUNK, total))
            ]
            result = await engine.apply(org, items)
            flush = FlushBatch()
            flush.add_effects(result.effects)
            first, top = result.effects[0].seq, last_seq(result.effects[-1])
            # The commit stage's rule: a multiple of the interval crossed (none in the tail).
            if start < HISTORY and (first - 1) // every < top // every:
                flush.snapshots.update(await engine.snapshots([org]))
                snapshots += 1
            await ledger.write_safe(flush)
            await engine.outbox_ack({org: top})
            if start and start % 100_000 == 0:
                _say(
                    f"  history: {start:,}/{HISTORY:,} events ({time.monotonic() - started:.0f} s)"
                )
        _say(f"history of {HISTORY:,} events made in {time.monotonic() - started:.0f} s")
        assert snapshots >= HISTORY // every - 1

        before_view = await engine.dashboard(org)
        before_state = await _org_state(client, engine, org)
        assert before_view is not None and len(before_view["members"]) == MEMBERS
        # The ids of the last batch are claimed, as the pipeline's intake claims them.
        last = range(total - CHUNK, total)
        await engine.claim([(f"e|ev{i}", f"0:{i}") for i in last])
        claim_keys = sorted(await client.keys(f"{s.redis_key_prefix}:ids:*"))
        claims_before = {k: await client.hlen(k) for k in claim_keys}
        memory_before = (await client.info("memory"))["used_memory"]

        await engine.reset_org(org)  # Redis lost the org
        assert await engine.dashboard(org) is None
        memory_lost = (await client.info("memory"))["used_memory"]

        snap = await ledger.snapshot(org)
        assert snap is not None and snap.seq <= (await ledger.org_seqs())[org]
        t = time.monotonic()
        replayed = await rebuild_org(engine, ledger, org)
        took = time.monotonic() - t
        memory_after = (await client.info("memory"))["used_memory"]
        _say(
            f"rebuild of {HISTORY:,} events of history: {took * 1000:.0f} ms, {replayed} decisions"
            f" replayed after the snapshot at seq {snap.seq:,}; Redis memory"
            f" {memory_before / 1e6:.1f} MB before the loss, {memory_lost / 1e6:.1f} MB after it,"
            f" {memory_after / 1e6:.1f} MB rebuilt"
        )

        assert await engine.dashboard(org) == before_view
        assert await _org_state(client, engine, org) == before_state
        assert await engine.last_seq(org) == (await ledger.org_seqs())[org]
        assert TAIL <= replayed < TAIL + every // 2  # the tail, not the history
        # Nothing of the history went into Redis: the claims are as they were, and memory is
        # back to what the live org used.
        assert {k: await client.hlen(k) for k in claim_keys} == claims_before
        assert sorted(await client.keys(f"{s.redis_key_prefix}:ids:*")) == claim_keys
        assert memory_after - memory_lost < 1_000_000

        # And the rebuilt org goes on exactly as the lost one would have.
        more = [UsageItem("late", "m00", "t", 5_000, T0 + 2_000_000, "usage:0", HISTORY)]
        res = await engine.apply(org, more)
        assert res.outcomes[0].status == "applied"
    finally:
        await ledger.close()
