"""End-to-end scenarios of the pipeline on real Kafka, Redis and PostgreSQL.

The worker runs in the test's event loop in bounded mode (``run_worker(max_events=...,
idle_exit_seconds=...)``); every scenario ends with the one checker of
``tests/integration/pipeline_checker.py``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from tests.integration.pipeline_checker import Workload, check_pipeline
from worker.config import Settings
from worker.engine_memory import MemoryEngine
from worker.runner import make_engine, run_worker


@pytest.fixture
def pipe_settings(isolated_settings: Settings) -> Settings:
    """Isolated settings with the HTTP server off (tests run several workers in a row)."""
    return isolated_settings.model_copy(update={"http_port": 0})


@pytest.fixture
async def engine(pipe_settings: Settings) -> AsyncIterator[Any]:
    """The production engine on this test's Redis database."""
    if os.environ.get("PIPELINE_TEST_ENGINE") == "model":  # development aid only
        yield MemoryEngine(pipe_settings.tiers)
        return
    built = make_engine(pipe_settings)
    try:
        yield built
    finally:
        await built.close()


async def _pg_fetchval(settings: Settings, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(
        settings.postgres_dsn.get_secret_value(),
        server_settings={"search_path": settings.postgres_schema},
    )
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def _parked(settings: Settings) -> int:
    try:
        return int(await _pg_fetchval(settings, "SELECT count(*) FROM parked_events"))
    except asyncpg.UndefinedTableError:  # the worker has not migrated yet
        return -1


def _org_story(w: Workload) -> None:
    """Two orgs: one with a pool that runs dry (pauses), one without a pool (debt)."""
    w.org("acme", ["ann", "bob", "cyd"])
    w.org("beta", ["dee"], tier="max")
    w.command("acme", "pool_purchase", 100, credits_mc=600_000)


async def test_happy_path(pipe_settings: Settings, engine: Any) -> None:
    """Allocations run out, the pool runs dry, members are paused; every credit is on the
    ledger once and the control topic says who is paused."""
    s = pipe_settings
    w = Workload(s)
    _org_story(w)
    for i in range(120):
        w.usage("acme", ("ann", "bob", "cyd")[i % 3], 40_000)
        w.usage("beta", "dee", 150_000)
    await w.produce()
    stats = await run_worker(s, max_events=len(w.messages), idle_exit_seconds=30, engine=engine)
    assert stats["charged"] == 240
    report = await check_pipeline(s, w, engine=engine)
    assert len(report.charged) == 240
    # acme: prorated allocations (joined late in the cycle) + a 600-credit pool for 4,800
    # credits of usage: the pool runs dry, every member ends in debt and paused.
    dash = await engine.dashboard("acme")
    assert dash["pool"]["balance"] == "0"
    assert [m["state"] for m in dash["members"]] == ["paused"] * 3, dash["members"]
    assert all(m["negative_balance"] != "0" for m in dash["members"])


async def test_duplicates_within_and_across_batches(pipe_settings: Settings, engine: Any) -> None:
    """Copies of an event_id in the same batch and in later batches are dropped, not charged."""
    s = pipe_settings.model_copy(update={"batch_max_records": 7})
    w = Workload(s)
    _org_story(w)
    ids = [w.usage("acme", "ann", 1_000) for _ in range(20)]
    for eid in ids[:10]:
        w.usage("acme", "ann", 1_000, event_id=eid)  # right behind: often the same batch
    for eid in ids:
        w.usage("acme", "ann", 1_000, event_id=eid)  # later batches
    await w.produce()
    stats = await run_worker(s, max_events=len(w.messages), idle_exit_seconds=30, engine=engine)
    assert stats["charged"] == 20
    assert stats["duplicate"] == 30
    report = await check_pipeline(s, w, engine=engine)
    dash = await engine.dashboard("acme")
    ann = next(m for m in dash["members"] if m["member_id"] == "ann")
    assert ann["used"] == "20"
    assert report.charged == set(ids)


async def test_full_replay_from_offset_zero(pipe_settings: Settings, engine: Any) -> None:
    """A second consumer group reading both topics from offset 0 changes nothing: every input
    is already decided in PostgreSQL."""
    s = pipe_settings
    w = Workload(s)
    _org_story(w)
    for i in range(60):
        w.usage("acme", ("ann", "bob")[i % 2], 30_000)
    w.bad_usage(b"{not json", "invalid_json")
    await w.produce()
    await run_worker(s, max_events=len(w.messages), idle_exit_seconds=30, engine=engine)
    before = await engine.dashboard("acme")
    rows_before = await _pg_fetchval(s, "SELECT count(*) FROM ledger_entries")

    replay = s.model_copy(update={"consumer_group": s.consumer_group + ".replay"})
    stats = await run_worker(
        replay, max_events=len(w.messages), idle_exit_seconds=30, engine=engine
    )
    assert stats["charged"] == 0
    assert stats["applied_commands"] == 0
    assert stats["duplicate"] + stats["replayed"] == len(w.messages) - 1
    assert await engine.dashboard("acme") == before
    assert await _pg_fetchval(s, "SELECT count(*) FROM ledger_entries") == rows_before
    await check_pipeline(replay, w, engine=engine)


async def test_duplicate_after_redis_forgot_is_not_charged(
    pipe_settings: Settings, engine: Any
) -> None:
    """Redis keeps event ids for a short window only; a copy arriving after the window is
    caught by PostgreSQL's record of decided ids before the engine sees it."""
    s = pipe_settings.model_copy(update={"dedupe_window_seconds": 1})
    w = Workload(s)
    _org_story(w)
    first = [w.usage("acme", "ann", 5_000) for _ in range(10)]
    await w.produce()
    await run_worker(s, max_events=len(w.messages), idle_exit_seconds=30, engine=engine)
    before = await engine.dashboard("acme")

    await asyncio.sleep(2.5)  # well past the 1 s dedupe window of the engine
    late = w.messages[len(w.messages) :]
    for eid in first:
        w.usage("acme", "ann", 5_000, event_id=eid)
    late = w.messages[-len(first) :]
    await w.produce(late)
    stats = await run_worker(s, max_events=len(late), idle_exit_seconds=30, engine=engine)
    assert stats["duplicate"] == len(first)
    assert stats["charged"] == 0
    assert await engine.dashboard("acme") == before
    await check_pipeline(s, w, engine=engine)


async def test_malformed_flood_never_blocks(pipe_settings: Settings, engine: Any) -> None:
    """Bad messages of every kind, mixed with good ones, go to the dead-letter topics with
    their codes; the good ones are charged; nothing blocks a partition."""
    s = pipe_settings.model_copy(update={"unknown_grace_seconds": 1})
    w = Workload(s)
    _org_story(w)
    good = []
    base = {
        "event_id": "x",
        "org_id": "acme",
        "member_id": "ann",
        "task_id": "t",
        "credits": "1",
        "occurred_at": "2026-01-01T00:00:00Z",
    }

    def ev(**over: Any) -> bytes:
        body = dict(base)
        body["event_id"] = f"bad-{len(w.messages)}"
        body.update(over)
        return orjson.dumps({k: v for k, v in body.items() if v is not ...})

    for i in range(5):
        good.append(w.usage("acme", "bob", 1_000))
        w.bad_usage(b"{not json" + bytes([48 + i]), "invalid_json")
        w.bad_usage(b'{"event_id": "\xff\xfe' + bytes([48 + i]) + b'"}', "invalid_utf8")
        w.bad_usage(ev(credits=-5), "amount_not_positive")
        w.bad_usage(ev(credits="1000000.001"), "amount_too_large")
        w.bad_usage(ev(credits=True), "wrong_type")
        w.bad_usage(ev(member_id=...), "missing_field")
        w.bad_usage(ev(occurred_at="2026-01-01T00:00:00"), "timestamp_without_timezone")
        w.bad_usage(ev(occurred_at="2999-01-01T00:00:00Z"), "timestamp_in_future")
        w.bad_usage(b"[1, 2, " + str(i).encode() + b"]", "wrong_type")
        w.bad_admin(
            b'{"type": "launch_rockets", "n": ' + str(i).encode() + b"}", "unknown_command_type"
        )
        w.unknown_org_usage(f"nobody-{i}")
    # Well-formed admin commands the rules refuse: no such org, no such member.
    w.command("nobody", "member_add", 50, member_id="x", tier="pro")
    w.messages[-1].bad = "unknown_org"
    w.command("acme", "member_remove", 50, member_id="not-a-member")
    w.messages[-1].bad = "*"  # dead-lettered; the engine's code for it is its own business
    w.bad_usage(b'{"pad": "' + b"x" * 1_000_000 + b'"}', "message_too_large")
    w.bad_usage(b'{"pad": "' + b"y" * 70_000 + b'"}', "message_too_large")
    await w.produce()
    # No max_events: the unknown-org events wait out their 1 s grace before dead-lettering.
    stats = await run_worker(s, idle_exit_seconds=4, engine=engine)
    assert stats["charged"] == len(good)
    report = await check_pipeline(s, w, engine=engine)
    assert good and set(good) <= report.charged
    dlq = report.dead_letters[s.topic_usage_dlq]
    assert len(dlq) == sum(1 for m in w.messages if m.bad and m.topic == s.topic_usage)


async def test_unknown_member_waits_for_member_add(pipe_settings: Settings, engine: Any) -> None:
    """A new member's first events overtake its member_add: they are parked (durably) and
    charged once the member exists, within the grace period."""
    s = pipe_settings.model_copy(update={"unknown_grace_seconds": 120})
    w = Workload(s)
    _org_story(w)
    await w.produce()
    early = [w.usage("acme", "newbie", 2_000) for _ in range(3)]
    await w.produce(w.messages[-3:])
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(s, stop=stop, engine=engine))
    try:
        for _ in range(200):
            if await _parked(s) == 3:
                break
            await asyncio.sleep(0.1)
        assert await _parked(s) == 3
        w.command("acme", "member_add", 50, member_id="newbie", tier="pro")
        await w.produce(w.messages[-1:])
        for _ in range(200):
            if await _parked(s) == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        stats = await worker
    assert stats["parked"] == 3
    assert stats["unparked"] == 3
    report = await check_pipeline(s, w, engine=engine)
    assert set(early) <= report.charged


async def test_correct_whatever_the_producer_key(pipe_settings: Settings, engine: Any) -> None:
    """Producers that do not key by org scatter one org over every partition; the worker is
    still exactly right (the admin commands go first so the org exists)."""
    s = pipe_settings
    w = Workload(s)
    _org_story(w)
    await w.produce()
    start = len(w.messages)
    for i in range(200):
        w.usage("acme", ("ann", "bob", "cyd")[i % 3], 7_000)
        w.usage("beta", "dee", 90_000)
    await w.produce(w.messages[start:], random_keys=True)
    # Records read away from their org's home are sent on there and read again: the worker
    # handles more records than were produced, so it runs until every event is charged.
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(s, stop=stop, engine=engine))
    try:
        for _ in range(600):
            await asyncio.sleep(0.1)
            if (
                await _parked(s) >= 0
                and await _pg_fetchval(
                    s, "SELECT count(*) FROM usage_events WHERE status = 'charged'"
                )
                == 400
            ):
                break
    finally:
        stop.set()
        stats = await worker
    assert stats["charged"] == 400
    assert stats["forwarded"] > 0  # the scattered records were decided at their orgs' homes
    await check_pipeline(s, w, engine=engine)


async def test_tick_scheduler_publishes_ticks_for_known_orgs(
    pipe_settings: Settings, engine: Any
) -> None:
    """With a tick interval, the worker owning admin partition 0 sends a wall-clock ``tick``
    for every org it knows, and applies them like any admin command."""
    s = pipe_settings.model_copy(update={"tick_interval_seconds": 0.5})
    w = Workload(s)
    _org_story(w)
    await w.produce()
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(s, stop=stop, engine=engine))
    try:
        for _ in range(200):
            await asyncio.sleep(0.1)
            ticks = 0
            if await _parked(s) >= 0:  # the worker has created its tables
                ticks = await _pg_fetchval(
                    s, "SELECT count(DISTINCT org_id) FROM admin_commands WHERE type = 'tick'"
                )
            if ticks == 2:
                break
    finally:
        stop.set()
        await worker
    assert ticks == 2
    applied = await _pg_fetchval(
        s, "SELECT count(*) FROM admin_commands WHERE type = 'tick' AND status = 'applied'"
    )
    assert applied >= 2


async def test_an_event_id_rejected_first_is_never_charged_later(
    pipe_settings: Settings, engine: Any
) -> None:
    """SPEC 5: the first message with an event_id decides it. A rejected first copy (here a
    negative amount) makes a later, valid copy a duplicate: dropped, not charged, not
    dead-lettered again."""
    from schemas.encode import encode_usage_event
    from tests.integration.pipeline_checker import Produced

    s = pipe_settings.model_copy(update={"batch_max_records": 3})
    w = Workload(s)
    _org_story(w)
    await w.produce()
    start = len(w.messages)
    bad = orjson.dumps(
        {"event_id": "once", "org_id": "acme", "member_id": "ann", "task_id": "t",
         "credits": "-5", "occurred_at": "2026-01-01T00:00:00Z"}
    )  # fmt: skip
    w.bad_usage(bad, "amount_not_positive", key=b"acme")
    late_copy = encode_usage_event(
        event_id="once", org_id="acme", member_id="ann", task_id="t", credits_mc=5_000,
        occurred_at_ms=w.now_ms - 60_000,
    )  # fmt: skip
    w.messages.append(Produced(s.topic_usage, b"acme", late_copy))  # neither charged nor DLQ'd
    await w.produce(w.messages[start : start + 1])
    await run_worker(s, max_events=start + 1, idle_exit_seconds=30, engine=engine)
    await w.produce(w.messages[start + 1 :])
    stats = await run_worker(s, max_events=1, idle_exit_seconds=30, engine=engine)
    assert stats["duplicate"] == 1
    assert stats["charged"] == 0
    report = await check_pipeline(s, w, engine=engine)
    assert report.rejected["once"] == "amount_not_positive"


async def test_an_id_claimed_for_a_later_copy_is_decided_by_that_copy(
    pipe_settings: Settings, engine: Any
) -> None:
    """Two records with one event_id in one batch, the later of them claimed for the id by
    an earlier attempt (a worker that crashed after claiming, before committing): the later
    one is the id's record and is charged; the first is the duplicate. (Deciding by batch
    order alone dropped the first as claimed by another record and the later as a copy of
    the first: the id was never decided.)"""
    from aiokafka import AIOKafkaProducer

    from schemas.encode import encode_usage_event
    from worker.connections import kafka_client_kwargs

    s = pipe_settings
    w = Workload(s)
    _org_story(w)
    await w.produce()
    start = len(w.messages)
    eid = w.usage("acme", "ann", 1_000)
    (first,) = w.messages[start:]
    # The same id with other credits, later on the same partition.
    later_value = encode_usage_event(**{**w.events[eid], "credits_mc": 2_000})
    later = type(first)(first.topic, first.key, later_value)
    producer = AIOKafkaProducer(**kafka_client_kwargs(s), enable_idempotence=True, acks="all")
    await producer.start()
    try:
        sent_first = await producer.send_and_wait(first.topic, first.value, key=first.key)
        sent_later = await producer.send_and_wait(later.topic, later.value, key=later.key)
    finally:
        await producer.stop()
    assert sent_first.partition == sent_later.partition  # one partition: the later is later
    # The earlier attempt's claim, as the claims of a worker that died before its commit.
    await engine.claim([(f"e|{eid}", f"{sent_later.partition}:{sent_later.offset}")])

    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(s, stop=stop, engine=engine))
    row = None
    try:
        for _ in range(600):
            await asyncio.sleep(0.1)
            if await _parked(s) >= 0:
                row = await _pg_fetchval(
                    s, "SELECT credits_mc FROM usage_events WHERE event_id = $1", eid
                )
                if row is not None:
                    break
    finally:
        stop.set()
        stats = await worker
    assert row == 2_000, row  # decided, and by the record that held the claim
    charged = await _pg_fetchval(
        s,
        "SELECT -sum(amount_mc) FROM ledger_entries WHERE source_kind = 'usage' AND source_id = $1",
        eid,
    )
    assert charged == 2_000
    assert stats["duplicate"] >= 1


async def test_a_record_sent_on_does_not_keep_a_claim_an_earlier_attempt_left(
    pipe_settings: Settings, engine: Any
) -> None:
    """Once the worker knows an org's home, records of the org read on another partition go
    straight there, unapplied. If one of them still holds its id's claim from an earlier
    attempt (a worker that died between claiming and releasing), the claim must go with it:
    kept, it made the copy at the home a duplicate and the event was never charged."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    from worker.connections import kafka_client_kwargs

    s = pipe_settings
    w = Workload(s)
    _org_story(w)
    await w.produce()
    parts = list(range(s.topic_partitions))
    home = DefaultPartitioner()(b"acme", parts, parts)  # where acme's org_upsert went
    away = (home + 1) % s.topic_partitions
    start = len(w.messages)
    learn = w.usage("acme", "ann", 1_000)
    later = w.usage("acme", "bob", 2_000)
    first_msg, later_msg = w.messages[start:]

    async def charged(eid: str) -> bool:
        if await _parked(s) < 0:
            return False
        got = await _pg_fetchval(s, "SELECT status FROM usage_events WHERE event_id = $1", eid)
        return bool(got == "charged")

    producer = AIOKafkaProducer(**kafka_client_kwargs(s), enable_idempotence=True, acks="all")
    await producer.start()
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(s, stop=stop, engine=engine))
    try:
        # The first record away from home teaches the worker acme's home.
        await producer.send_and_wait(
            first_msg.topic, first_msg.value, key=first_msg.key, partition=away
        )
        for _ in range(600):
            await asyncio.sleep(0.1)
            if await charged(learn):
                break
        assert await charged(learn)
        # The next record on that partition, claimed by an "earlier attempt" before it lands.
        offsets = await _end_offsets(s, later_msg.topic, away)
        await engine.claim([(f"e|{later}", f"{away}:{offsets}")])
        sent = await producer.send_and_wait(
            later_msg.topic, later_msg.value, key=later_msg.key, partition=away
        )
        assert sent.offset == offsets
        for _ in range(600):
            await asyncio.sleep(0.1)
            if await charged(later):
                break
    finally:
        await producer.stop()
        stop.set()
        stats = await worker
    assert await charged(later)
    assert stats["forwarded"] >= 2


async def test_a_record_that_lost_its_id_to_a_copy_sent_on_is_decided_when_read_again(
    pipe_settings: Settings, engine: Any
) -> None:
    """An earlier attempt read a copy of an event on another partition first: the copy claimed
    the id and was sent on to the org's home, the home's own record was dropped as its copy,
    the record after it was applied (so the engine's watermark passed it), and the worker
    died before committing. Read again, the home's record finds the id free and the engine
    answers ``replayed`` for an offset it never decided: it must still get the id decided
    (before, it kept the claim, the sent-on copy was its duplicate, the event was never
    charged)."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    from worker.connections import kafka_client_kwargs
    from worker.contract import UsageItem
    from worker.messages import HEADER_FORWARDED_FROM

    s = pipe_settings
    w = Workload(s)
    _org_story(w)
    await w.produce()
    await run_worker(s, max_events=len(w.messages), engine=engine)
    parts = list(range(s.topic_partitions))
    home = DefaultPartitioner()(b"acme", parts, parts)  # where acme's records are decided
    start = len(w.messages)
    lost = w.usage("acme", "ann", 1_000)  # its copy was read first, elsewhere, and sent on
    after = w.usage("acme", "bob", 2_000)  # applied by the attempt that died
    lost_msg, after_msg = w.messages[start:]
    topic = s.topic_usage

    async def charges(eid: str) -> int:
        return int(
            await _pg_fetchval(
                s,
                "SELECT count(*) FROM usage_events WHERE event_id = $1 AND status = 'charged'",
                eid,
            )
        )

    producer = AIOKafkaProducer(**kafka_client_kwargs(s), enable_idempotence=True, acks="all")
    await producer.start()
    try:
        at = await producer.send_and_wait(topic, lost_msg.value, key=b"acme", partition=home)
        nxt = await producer.send_and_wait(topic, after_msg.value, key=b"acme", partition=home)
        assert nxt.offset == at.offset + 1
        # What the attempt that died left: ``after`` claimed and applied (its effects in the
        # outbox), ``lost`` unclaimed (its copy's claim was released when it was sent on).
        ev = w.events[after]
        item = UsageItem(
            after,
            ev["member_id"],
            ev["task_id"],
            ev["credits_mc"],
            ev["occurred_at_ms"],
            f"{topic}:{home}",
            nxt.offset,
        )
        await engine.claim([(f"e|{after}", f"{home}:{nxt.offset}")])
        result = await engine.apply("acme", [item])
        assert [o.status for o in result.outcomes] == ["applied"]
        # The copy it sent on, now at the home after both.
        origin = f"{topic}:{(home + 1) % s.topic_partitions}:0".encode()
        await producer.send_and_wait(
            topic,
            lost_msg.value,
            key=b"acme",
            partition=home,
            headers=[(HEADER_FORWARDED_FROM, origin)],
        )
    finally:
        await producer.stop()

    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(s, stop=stop, engine=engine))
    try:
        for _ in range(600):
            await asyncio.sleep(0.1)
            if await charges(lost) and await charges(after):
                break
    finally:
        stop.set()
        stats = await worker
    assert await charges(lost) == 1
    assert await charges(after) == 1
    assert stats["resent"] == 1


async def _end_offsets(settings: Settings, topic: str, partition: int) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from worker.connections import kafka_client_kwargs

    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


class _NothingDecided:
    """PostgreSQL's answer for ids it has never seen (the check runs beside the claims)."""

    async def decided_ids(
        self, event_ids: list[str], command_ids: list[str]
    ) -> tuple[set[str], set[str]]:
        return set(), set()


async def test_a_copy_of_an_id_held_here_for_another_record_claims_nothing(
    pipe_settings: Settings, engine: Any
) -> None:
    """A record is sent on to its org's home: its claim is released in Redis at once, its entry
    in this worker's in-flight ids a moment later. A copy of the same event read in that moment
    is a duplicate of it here and must not take the freed claim: if it did, the copy at the
    home would be a duplicate too and the event would be charged by no record (a producer
    retry under unkeyed traffic; seen as "accepted event never decided" in the three-worker
    crash scenario, about one run in ten)."""
    from worker.contract import UsageItem
    from worker.engine import CLAIM_NEW, CLAIM_TAKEN
    from worker.messages import RawSource
    from worker.pipeline.backoff import Backoff
    from worker.pipeline.batch import Batch, Pending
    from worker.pipeline.intake import Intake

    s = pipe_settings
    intake = Intake(s, engine, _NothingDecided(), Backoff(s))  # type: ignore[arg-type]
    intake.in_flight["e|ev-1"] = "2:15"  # the record just sent on; its claim is released
    source = f"{s.topic_usage}:2"
    copy = UsageItem("ev-1", "ann", "t1", 1_000, 1_767_225_600_000, source, 16)
    batch = Batch(number=7)
    batch.by_org["acme"].append(
        Pending("ev-1", True, copy, RawSource(b"acme", b"{}", s.topic_usage, 2, 16))
    )
    await intake.drop_decided(batch)
    assert not batch.by_org, "the copy is a duplicate of the record held here"
    assert batch.counts["duplicate"] == 1
    # The record's copy at the home is the first to claim the id, and decides it.
    assert await engine.claim([("e|ev-1", "1:294")]) == [CLAIM_NEW]
    assert await engine.claim([("e|ev-1", "2:16")]) == [CLAIM_TAKEN]
