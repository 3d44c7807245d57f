"""Two workers deciding one org from different states (producers that do not key by org, and
Redis losing writes another worker had already committed): the flush finds the collision with
the ledger, drops the org's Redis state, stops; the restart rebuilds the org from the ledger
and decides the records again, on the right state. Nothing is lost, nothing counted twice.

The "other worker" is played by the test itself (the real engine and ledger), so the
interleaving is exact: its decisions reach PostgreSQL, then Redis is put back to its state
before them, then the worker under test decides new records for the org on that state.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from schemas.encode import encode_usage_event
from worker.config import Settings
from worker.connections import kafka_client_kwargs
from worker.contract import CommandItem, Item, UsageItem
from worker.engine import RedisEngine
from worker.ledger import FlushBatch, Ledger, SeqCollision, migrate
from worker.pipeline import ShutdownIncomplete
from worker.runner import make_engine, run_worker

pytestmark = pytest.mark.timeout(180)

ORG = "acme"
C = 1_000  # millicredits per credit


def _setup(t0: int) -> list[Item]:
    def cmd(n: int, typ: str, **fields: object) -> CommandItem:
        body = {"type": typ, "command_id": f"setup-{n}", "at_ms": t0 + n, **fields}
        return CommandItem(command=body, source="admin:0", offset=n)

    return [
        cmd(1, "org_upsert", billing_anchor_day=1),
        cmd(2, "member_add", member_id="ann", tier="pro"),
        cmd(3, "member_add", member_id="bob", tier="pro"),
        cmd(4, "pool_purchase", credits_mc=600 * C),
    ]


def _usage(eid: str, member: str, credits: int, at: int) -> UsageItem:
    return UsageItem(eid, member, "t", credits * C, at, "usage:0", -1)


@pytest.fixture
async def engine(isolated_settings: Settings) -> AsyncIterator[RedisEngine]:
    built = make_engine(isolated_settings)
    assert isinstance(built, RedisEngine)
    try:
        yield built
    finally:
        await built.close()


async def _write(ledger: Ledger, effects: list) -> None:  # type: ignore[type-arg]
    flush = FlushBatch()
    flush.add_effects(effects)
    await ledger.write_safe(flush)


async def _decided(s: Settings) -> list[str]:
    """The event ids PostgreSQL holds as decided, in decision (seq) order."""
    conn = await asyncpg.connect(s.postgres_dsn.get_secret_value())
    try:
        rows = await conn.fetch(
            f'SELECT event_id FROM "{s.postgres_schema}".usage_events ORDER BY seq'
        )
    finally:
        await conn.close()
    return [r[0] for r in rows]


async def test_the_ledger_refuses_other_decisions_at_the_same_seqs(
    isolated_settings: Settings, engine: RedisEngine
) -> None:
    s = isolated_settings
    await migrate(s)
    ledger = await Ledger.connect(s)
    try:
        t0 = int(time.time() * 1000) - 3_600_000
        await _write(ledger, (await engine.apply(ORG, _setup(t0))).effects)
        (before,) = (await engine.snapshots([ORG])).values()
        theirs = await engine.apply(ORG, [_usage("a1", "ann", 450, t0 + 100)])
        await _write(ledger, theirs.effects)
        await _write(ledger, theirs.effects)  # a copy of the same decisions: accepted
        await engine.restore_org(before)  # Redis lost them
        ours = await engine.apply(ORG, [_usage("b1", "bob", 120, t0 + 200)])
        assert ours.effects[0].seq == theirs.effects[0].seq  # the same seqs, other decisions
        with pytest.raises(SeqCollision) as refused:
            await _write(ledger, ours.effects)
        assert refused.value.org_ids == [ORG]
        assert await _decided(s) == ["a1"]  # nothing of the refused batch committed
    finally:
        await ledger.close()


async def test_a_collision_is_rebuilt_and_decided_again_on_the_right_state(
    isolated_settings: Settings, engine: RedisEngine, redis_url: str
) -> None:
    s = isolated_settings.model_copy(update={"http_port": 0})
    await migrate(s)
    ledger = await Ledger.connect(s)
    t0 = int(time.time() * 1000) - 3_600_000
    a_items = [_usage(f"a{i}", "ann", 200, t0 + 100 + i) for i in range(3)]
    b_items = [_usage(f"b{i}", "ann", 150, t0 + 200 + i) for i in range(3)]
    try:
        # The org exists in Redis and PostgreSQL; the worker starts and knows its seq.
        await _write(ledger, (await engine.apply(ORG, _setup(t0))).effects)
        await engine.outbox_ack({ORG: await engine.last_seq(ORG)})
        worker = asyncio.create_task(run_worker(s, idle_exit_seconds=20, engine=engine))
        await asyncio.sleep(3)  # joined, assigned, idle
        # Another worker decides A and commits it; then Redis loses A (back to the state
        # before it), and B arrives for the worker under test, which decides it on that state.
        (before,) = (await engine.snapshots([ORG])).values()
        theirs = await engine.apply(ORG, a_items)
        await _write(ledger, theirs.effects)
        await engine.outbox_ack({ORG: theirs.effects[-1].seq})
        await engine.restore_org(before)
        producer = AIOKafkaProducer(**kafka_client_kwargs(s), enable_idempotence=True)
        await producer.start()
        try:
            for it in b_items:
                value = encode_usage_event(
                    event_id=it.event_id,
                    org_id=ORG,
                    member_id=it.member_id,
                    task_id=it.task_id,
                    credits_mc=it.credits_mc,
                    occurred_at_ms=it.occurred_at_ms,
                )
                await producer.send_and_wait(s.topic_usage, value, key=ORG.encode())
        finally:
            await producer.stop()
        with pytest.raises(ShutdownIncomplete):
            await asyncio.wait_for(worker, 60)
        assert await engine.dashboard(ORG) is None  # its diverged state was dropped

        # The restart rebuilds the org from the ledger (setup and A) and decides B after A.
        stats = await run_worker(s, max_events=len(b_items), idle_exit_seconds=30, engine=engine)
        assert stats["rebuilt_orgs"] == 1
        assert stats["charged"] == len(b_items)
        got = await engine.dashboard(ORG)

        # The same inputs, in the order the ledger now holds them, on a clean engine.
        reference = RedisEngine(
            engine.client, s.model_copy(update={"redis_key_prefix": f"r{uuid.uuid4().hex[:8]}"})
        )
        await reference.apply(ORG, _setup(t0))
        await reference.apply(ORG, a_items)
        await reference.apply(ORG, b_items)
        assert got == await reference.dashboard(ORG)
        assert await _decided(s) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    finally:
        await ledger.close()
