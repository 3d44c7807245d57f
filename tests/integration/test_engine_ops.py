"""Engine operations on real Redis: idempotent replays, script cache loss, the outbox, an org of
10,000 members (chunked cycle end and pool-dry), and the same scripts on a Redis Cluster."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from integration.test_engine_differential import TIERS, _rename, scenarios
from integration.test_engine_rules import EngineHarness
from redis.asyncio.cluster import RedisCluster
from unit.test_model_rules import SCENARIOS, cmd, use

from worker.config import Settings
from worker.effects import Charge, decode_blob
from worker.engine import (
    CLAIM_MINE,
    CLAIM_NEW,
    CLAIM_TAKEN,
    STATUS_CHUNK,
    OrgCall,
    RedisBehind,
    RedisEngine,
    org_integers,
)
from worker.model import CommandItem, Item, UsageItem, to_ms

C = 1000
T0 = to_ms(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url, decode_responses=False)
    await c.flushdb()
    yield c
    await c.aclose()


_replay_run = iter(range(10**9))


@settings(
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=scenarios())
async def test_replaying_any_prefix_changes_nothing(
    client: aioredis.Redis, settings: Settings, batches: Any
) -> None:
    engine = RedisEngine(client, settings.model_copy(update={"tiers": TIERS}))
    run = next(_replay_run)
    decided: dict[str, list[Item]] = {}
    for o, items in batches:
        org, real = f"org{o}", f"p{run}-org{o}"
        items = [_rename(i, org, real) for i in items]
        res = await engine.apply(real, items)
        for item, out in zip(items, res.outcomes, strict=True):
            # Items that were not decided (unknown org/member, or read from a partition other
            # than the org's home: sent on there) are retried by design.
            if out.status not in ("unknown", "elsewhere") and out.code != "unknown_org":
                decided.setdefault(real, []).append(item)
    for real, items in decided.items():
        before = await engine.state_view(real)
        outbox = await engine.outbox_pending(real)
        for cut in {1, len(items) // 2, len(items)}:
            prefix = items[:cut]
            res = await engine.apply(real, prefix)
            assert {o.status for o in res.outcomes} == {"replayed"}
            assert res.effects == []
        assert await engine.state_view(real) == before
        assert await engine.outbox_pending(real) == outbox


async def test_script_cache_flush_is_survived(client: aioredis.Redis, settings: Settings) -> None:
    engine = RedisEngine(client, settings)
    await engine.apply("o", [cmd("org_upsert", T0, billing_anchor_day=1)])
    await client.script_flush()
    res = await engine.apply("o", [cmd("member_add", T0, member_id="a", tier="pro")])
    assert res.outcomes[0].status == "applied"
    assert (await engine.state_view("o") or {})["members"]["a"]["ag"] == 500 * C
    await client.script_flush()
    await engine.outbox_ack({"o": await engine.last_seq("o")})
    assert await engine.outbox_pending("o") == []


async def test_a_call_cancelled_mid_reply_leaves_nothing_for_the_next(
    client: aioredis.Redis, settings: Settings
) -> None:
    # The keys' wire form is sent on a pooled connection by hand (worker/packed.py): a call
    # cancelled before its reply is read must not hand that reply to the next call.
    engine = RedisEngine(client, settings)
    members = [cmd("member_add", T0, member_id=f"m{i}", tier="pro") for i in range(300)]
    await engine.apply("o", [cmd("org_upsert", T0, billing_anchor_day=1)])
    for turns in range(4):
        task = asyncio.create_task(engine.apply("o", members))
        for _ in range(turns):
            await asyncio.sleep(0)  # sent, not answered
        task.cancel()
        # The client may finish a command it has sent before it gives in to the cancel.
        await asyncio.gather(task, return_exceptions=True)
    res = await engine.apply("p", [cmd("org_upsert", T0, billing_anchor_day=1)])
    assert [o.status for o in res.outcomes] == ["applied"]
    assert {e.org_id for e in res.effects} == {"p"}


async def test_outbox_pending_ack_and_discovery(client: aioredis.Redis, settings: Settings) -> None:
    engine = RedisEngine(client, settings)
    r1 = await engine.apply("o1", [cmd("org_upsert", T0, billing_anchor_day=1), cmd("tick", T0)])
    r2 = await engine.apply("o1", [cmd("member_add", T0, member_id="a", tier="pro")])
    await engine.apply("o2", [cmd("org_upsert", T0, billing_anchor_day=5)])
    assert await engine.orgs_with_outbox() == ["o1", "o2"]
    everything = r1.effects + r2.effects
    assert await engine.outbox_pending("o1") == everything
    last_first = r1.effects[-1].seq
    assert await engine.outbox_pending("o1", after_seq=last_first) == r2.effects
    assert await engine.outbox_pending("o1", after_seq=1) == everything[1:]
    await engine.outbox_ack({"o1": last_first})
    assert await engine.outbox_pending("o1") == r2.effects
    await engine.outbox_ack({"o1": r2.effects[-1].seq, "o2": 10**9})
    assert await engine.outbox_pending("o1") == []
    assert await engine.orgs_with_outbox() == []
    # Seq keeps growing after a full ack.
    r3 = await engine.apply("o1", [cmd("tick", T0)])
    assert r3.effects[0].seq == r2.effects[-1].seq + 1


async def _start_up_reads(engine: RedisEngine) -> None:
    """The start-up checks read every org's seq and outbox: over more orgs than one status
    call holds, each org's own figures, unknown orgs at 0, acked outboxes not found."""
    orgs = [f"st{n}" for n in range(STATUS_CHUNK * 2 + 7)]
    ticks = {o: 1 + n % 3 for n, o in enumerate(orgs)}
    calls = [
        OrgCall(o, [cmd("org_upsert", T0, billing_anchor_day=1)] + [cmd("tick", T0)] * ticks[o])
        for o in orgs
    ]
    results = await engine.apply_many(calls)
    last = {r.org_id: r.effects[-1].seq for r in results}
    acked = orgs[::2]
    await engine.outbox_ack({o: last[o] for o in acked})
    assert await engine.last_seqs([*orgs, "never-seen"]) == {**last, "never-seen": 0}
    found = await engine.orgs_with_outbox()
    assert [o for o in found if o.startswith("st")] == sorted(orgs[1::2])


async def test_start_up_reads_of_many_orgs(client: aioredis.Redis, settings: Settings) -> None:
    await _start_up_reads(RedisEngine(client, settings))


async def test_start_up_reads_of_many_orgs_on_redis_cluster(
    redis_cluster: RedisCluster, cluster_settings: Settings
) -> None:
    await _start_up_reads(RedisEngine(redis_cluster, cluster_settings))


class TimedEngine(RedisEngine):
    """Records the wall time and the number of signals of every script call."""

    durations: list[float]
    signals: list[int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.durations = []
        self.signals = []

    async def _run_apply(self, org_ids: list[str], args: list[bytes]) -> Any:
        t = time.perf_counter()
        try:
            reply = await super()._run_apply(org_ids, args)
        finally:
            self.durations.append(time.perf_counter() - t)
        self.signals.append(
            sum(
                1
                for org_id, blob in zip(org_ids, reply[1:], strict=True)
                for e in decode_blob(org_id, blob)
                if e.kind == "signal"
            )
        )
        return reply


async def test_ten_thousand_members_pool_dry_and_cycle_end(
    client: aioredis.Redis, settings: Settings
) -> None:
    n = 10_000
    engine = TimedEngine(client, settings)
    await engine.apply(
        "big",
        [cmd("org_upsert", T0, billing_anchor_day=1),
         cmd("pool_purchase", T0, credits_mc=1000 * C)],
    )  # fmt: skip
    ids = [f"m{i:05d}" for i in range(n)]
    for i in range(0, n, 1000):
        await engine.apply(
            "big", [cmd("member_add", T0, member_id=m, tier="pro") for m in ids[i : i + 1000]]
        )
    # Everyone spends the whole allocation: all still running, all depending on the pool.
    for i in range(0, n, 1000):
        await engine.apply("big", [use(m, 500 * C, T0 + 1000) for m in ids[i : i + 1000]])
    keys = engine.keys("big")
    assert await client.zcard(keys.dependents) == n and await client.zcard(keys.paused) == 0
    engine.durations.clear()
    # One member drains the pool: every other member is paused, in bounded chunks.
    res = await engine.apply("big", [use(ids[0], 1000 * C, T0 + 2000)])
    pauses = [e for e in res.effects if e.kind == "signal" and e.signal == "pause"]
    assert len(pauses) == n and {e.reason for e in pauses} == {"pool_exhausted"}
    assert await client.zcard(keys.paused) == n
    dry_calls, dry_max = len(engine.durations), max(engine.durations)
    # The bound that keeps Redis responsive is structural: no call walks more members than
    # its budget (wall-clock figures are printed below and recorded in docs/engine.md).
    # (+1: the pause of the member whose own event drained the pool).
    assert dry_calls >= n // engine.walk_budget
    assert max(engine.signals) <= engine.walk_budget + 1
    # Cycle end: invoice at once, every paused member resumed without an event of its own.
    engine.durations.clear()
    engine.signals.clear()
    res = await engine.apply("big", [cmd("tick", to_ms(dt.datetime(2026, 2, 1, tzinfo=dt.UTC)))])
    resumes = [e for e in res.effects if e.kind == "signal" and e.signal == "resume"]
    assert len(resumes) == n and {e.reason for e in resumes} == {"cycle_reset"}
    assert [e.negative_balance_mc for e in res.effects if e.kind == "invoice"] == [0]
    assert await client.zcard(keys.paused) == 0
    end_max = max(engine.durations)
    assert len(engine.durations) >= n // engine.walk_budget
    assert max(engine.signals) <= engine.walk_budget
    dash = await engine.dashboard("big")
    assert dash is not None and len(dash["members"]) == n
    assert {m["remaining"] for m in dash["members"]} == {"500"}
    print(
        f"\n10k members: pool-dry {dry_calls} calls, max {dry_max * 1000:.1f} ms; "
        f"cycle end {len(engine.durations)} calls, max {end_max * 1000:.1f} ms"
    )


# --- Redis Cluster ------------------------------------------------------------------------


class RenamingHarness(EngineHarness):
    """Runs a scenario under another org id (so scenarios land on different slots)."""

    def __init__(self, engine: RedisEngine, org: str) -> None:
        super().__init__(engine)
        self.org = org

    async def run(self, org: str, *items: Item) -> Any:
        return await super().run(self.org + org, *items)

    async def state(self, org: str) -> dict[str, Any]:
        return await super().state(self.org + org)

    async def dashboard(self, org: str) -> dict[str, Any] | None:
        return await super().dashboard(self.org + org)


async def test_scripts_on_redis_cluster(
    redis_cluster: RedisCluster, cluster_settings: Settings
) -> None:
    engine = RedisEngine(redis_cluster, cluster_settings)
    for name, scenario in sorted(SCENARIOS.items()):
        await scenario(RenamingHarness(engine, f"{name}-"))
    nodes = {redis_cluster.get_node_from_key(engine.keys(f"{n}-o")[0]).port for n in SCENARIOS}
    assert len(nodes) == 3, "scenarios should spread over all three masters"
    orgs = await engine.orgs_with_outbox()
    assert set(orgs) >= {f"{n}-o" for n in SCENARIOS if n != "idempotency_and_unknown"}
    await redis_cluster.script_flush()
    res = await engine.apply("join_day_10_of_30-o", [cmd("tick", T0 + 400 * 86_400_000)])
    assert res.outcomes[0].status == "applied"


async def test_claims_window_rotates(client: aioredis.Redis, settings: Settings) -> None:
    # An id is claimed for the record that carries it for one to two windows of wall clock;
    # after that PostgreSQL's unique keys are what keep it decided once, ever.
    engine = RedisEngine(client, settings)
    w = settings.dedupe_window_seconds * 1000
    now = 1000 * w  # the start of a window
    assert await engine.claim([("e|ev", "0:1")], now_ms=now + 10) == [CLAIM_NEW]
    for later in (now + w - 1, now + w, now + 2 * w - 1):
        assert await engine.claim([("e|ev", "1:7")], now_ms=later) == [CLAIM_TAKEN], later
        assert await engine.claim([("e|ev", "0:1")], now_ms=later) == [CLAIM_MINE], later
    # Events and commands are separate namespaces; within one call the first record wins.
    assert await engine.claim(
        [("c|ev", "0:1"), ("e|x", "0:2"), ("e|x", "0:3")], now_ms=now + 10
    ) == [CLAIM_NEW, CLAIM_NEW, CLAIM_TAKEN]
    assert await engine.claim([("e|ev", "1:7")], now_ms=now + 2 * w) == [CLAIM_NEW]
    # Each window's hash expires on its own (no key grows without bound).
    ttl = await client.pttl(engine.claim_keys(zlib.crc32(b"e|ev") % engine.claim_shards, now)[0])
    assert 0 < ttl <= 2 * w + 60_000


@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_claims_of_one_id_in_one_call_and_records_passed_on(
    kind: str, client: aioredis.Redis, settings: Settings
) -> None:
    # The entries of one id are answered in order and at most one goes on: the one that holds
    # the id's claim from an earlier attempt, else the first. A record passed on to its org's
    # home makes no claim and drops its own stale one, so the home's copy can claim the id.
    from worker.engine_memory import MemoryEngine

    engine: Any = RedisEngine(client, settings) if kind == "redis" else MemoryEngine()
    await engine.claim([("e|a", "0:9")])  # an earlier attempt claimed the later copy
    assert await engine.claim([("e|a", "0:1"), ("e|a", "0:9"), ("e|a", "1:4")]) == [
        CLAIM_TAKEN,
        CLAIM_MINE,
        CLAIM_TAKEN,
    ]
    assert await engine.claim([("e|b", "0:1"), ("e|b", "0:2")]) == [CLAIM_NEW, CLAIM_TAKEN]
    # Passed on: free, and nothing claimed; a later entry of the id is not the id's record.
    assert await engine.claim([("e|c", "2:1"), ("e|c", "0:3")], passed={0}) == [
        CLAIM_NEW,
        CLAIM_TAKEN,
    ]
    assert await engine.claim([("e|c", "0:7")]) == [CLAIM_NEW]  # the copy at the home
    # Its own stale claim is dropped; another record's stays.
    await engine.claim([("e|d", "2:5"), ("e|f", "0:8")])
    assert await engine.claim([("e|d", "2:5"), ("e|f", "2:6")], passed={0, 1}) == [
        CLAIM_NEW,
        CLAIM_TAKEN,
    ]
    assert await engine.claim([("e|d", "0:1"), ("e|f", "0:8")]) == [CLAIM_NEW, CLAIM_MINE]


async def test_an_unknown_member_offset_is_decided_however_late_its_replay(
    client: aioredis.Redis, settings: Settings
) -> None:
    # Usage for a member that does not exist yet moves the watermark past its offset; a replay
    # of that offset (a crash before the event was parked) must be decided, not skipped as
    # applied, however late it comes: the mark lives in a set that never rotates.
    engine = RedisEngine(client, settings)
    await engine.apply("o", [cmd("org_upsert", T0, billing_anchor_day=1)])
    early = UsageItem("ev", "late", "t", C, T0 + 1, "u:0", 5)
    after = UsageItem("ev2", "late", "t", C, T0 + 2, "u:0", 6)
    res = await engine.apply("o", [early])
    assert res.outcomes[0].status == "unknown"
    await engine.apply("o", [cmd("member_add", T0, member_id="late", tier="pro")])
    assert (await engine.apply("o", [after])).outcomes[0].status == "applied"
    res = await engine.apply("o", [early])  # the replay
    assert res.outcomes[0].status == "applied"
    assert (await engine.apply("o", [early])).outcomes[0].status == "replayed"
    assert await client.scard(engine.keys("o").unknown) == 0  # decided: the mark is gone
    # The pipeline drops the mark itself once the event is parked in PostgreSQL.
    await engine.apply("o", [UsageItem("ev3", "ghost", "t", C, T0 + 3, "u:0", 9)])
    assert await client.scard(engine.keys("o").unknown) == 1
    await engine.outbox_ack({}, {"o": ["u|u:0|9"]})
    assert await client.scard(engine.keys("o").unknown) == 0


async def test_last_seq_and_reset(client: aioredis.Redis, settings: Settings) -> None:
    engine = RedisEngine(client, settings)
    assert await engine.last_seq("o") == 0
    res = await engine.apply("o", [cmd("org_upsert", T0, billing_anchor_day=1), cmd("tick", T0)])
    assert await engine.last_seq("o") == res.effects[-1].seq == 2
    await engine.reset_org("o")
    assert await engine.last_seq("o") == 0 and await engine.dashboard("o") is None
    assert await client.keys("*:o") == []


async def test_a_call_expecting_a_later_seq_is_refused_unchanged(
    client: aioredis.Redis, settings: Settings
) -> None:
    # The pipeline's check that Redis has not lost writes PostgreSQL holds (expect_seq).
    engine = RedisEngine(client, settings)
    setup = [
        cmd("org_upsert", T0, billing_anchor_day=1),
        cmd("member_add", T0, member_id="a", tier="pro"),
    ]
    await engine.apply("o", setup)
    seq = await engine.last_seq("o")
    usage = [UsageItem("e1", "a", "t", 5 * C, T0 + 1000, "usage:0", 7)]
    before = (await engine.state_view("o"), await engine.outbox_pending("o"))
    [refused] = await engine.apply_many([OrgCall("o", usage, seq + 1)])
    assert refused.behind is not None and refused.outcomes == [] == refused.effects
    assert (refused.behind.redis_seq, refused.behind.expected) == (seq, seq + 1)
    with pytest.raises(RedisBehind) as refused:
        await engine.apply("o", usage, expect_seq=seq + 1)
    assert (refused.value.redis_seq, refused.value.expected) == (seq, seq + 1)
    assert (await engine.state_view("o"), await engine.outbox_pending("o")) == before
    # An org Redis does not know at all is behind too; nothing is created.
    with pytest.raises(RedisBehind) as unknown:
        await engine.apply("lost", usage, expect_seq=3)
    assert unknown.value.redis_seq == 0 and await client.keys("*:lost") == []
    # At (or past) the expected seq the call goes through and charges the event once.
    [done] = await engine.apply_many([OrgCall("o", usage, seq)])
    assert [o.status for o in done.outcomes] == ["applied"]
    assert [type(e) for e in done.effects] == [Charge]  # one bucket paid it: one compact row


async def test_pending_work_is_finished_by_the_next_caller(
    client: aioredis.Redis, settings: Settings
) -> None:
    first = RedisEngine(client, settings, walk_budget=10)
    members = [f"m{i:03d}" for i in range(60)]
    await first.apply(
        "o",
        [cmd("org_upsert", T0, billing_anchor_day=1),
         *(cmd("member_add", T0, member_id=m, tier="pro") for m in members),
         *(use(m, 501 * C, T0 + 1) for m in members)],  # everyone in debt and paused
    )  # fmt: skip
    # One raw script call (a worker that dies right after it): the cycle end starts, most of
    # the resumes are still queued in Redis.
    tick = cmd("tick", to_ms(dt.datetime(2026, 2, 1, tzinfo=dt.UTC)))
    spec = [["o", [[2, orjson.dumps(tick.command).decode(), "", -1]], 0]]
    meta, _ = await first._apply(
        keys=first.keys("o"), args=[orjson.dumps(spec).decode(), first._config, first.walk_budget]
    )
    [(consumed, pending, _outs)] = orjson.loads(meta)
    # The tick is not consumed yet (its due moments are unfinished; it would be redelivered),
    # but the cycle has closed and the work is recorded.
    assert (consumed, pending) == (0, 1)
    assert org_integers(await client.hget(first.keys("o").org, "s"))["cs"] == tick.command["at_ms"]
    # Another worker applies a new event: the queued resumes come first, then the event.
    second = RedisEngine(client, settings)
    res = await second.apply(
        "o", [use("m000", 1 * C, to_ms(dt.datetime(2026, 2, 2, tzinfo=dt.UTC)))]
    )
    kinds = [e.kind for e in res.effects]
    assert kinds.count("signal") == 60 - 10 and kinds[-2:] == ["ledger", "usage"]
    assert await client.zcard(second.keys("o").paused) == 0


async def test_many_grants_expiring_at_one_instant(
    client: aioredis.Redis, settings: Settings
) -> None:
    engine = RedisEngine(client, settings, walk_budget=3)
    exp = T0 + 10 * 86_400_000
    members = [f"m{i:02d}" for i in range(20)]
    await engine.apply(
        "o",
        [cmd("org_upsert", T0, billing_anchor_day=1),
         *(cmd("member_add", T0, member_id=m, tier="pro") for m in members),
         *(cmd("promo_grant", T0, member_id=m, grant_id=g, credits_mc=C, expires_at_ms=exp)
           for m in members for g in ("a", "b"))],
    )  # fmt: skip
    calls = engine.calls
    res = await engine.apply("o", [cmd("tick", exp)])
    expired = [e for e in res.effects if e.kind == "ledger" and e.movement == "expire"]
    assert len(expired) == 40 and res.outcomes[0].status == "applied"
    assert engine.calls - calls >= 40 // 3


async def test_works_with_a_bytes_client(redis_url: str, settings: Settings) -> None:
    client = aioredis.Redis.from_url(redis_url)  # decode_responses=False, as in production
    try:
        await client.flushdb()
        engine = RedisEngine(client, settings)
        res = await engine.apply(
            "o",
            [cmd("org_upsert", T0, billing_anchor_day=1),
             cmd("member_add", T0, member_id="a", tier="pro"),
             use("a", 20 * C, T0 + 1)],
        )  # fmt: skip
        assert [o.status for o in res.outcomes] == ["applied"] * 3
        assert await engine.outbox_pending("o") == res.effects
        assert await engine.orgs_with_outbox() == ["o"]
        dash = await engine.dashboard("o")
        assert dash is not None and dash["members"][0]["used"] == "20"
        assert await engine.last_seq("o") == res.effects[-1].seq
    finally:
        await client.aclose()


async def test_out_of_memory_refuses_the_whole_call(settings: Settings, tmp_path: Any) -> None:
    # A private, throwaway redis-server: lowering maxmemory on the shared one would fail other
    # tests running at the same time.
    import shutil
    import socket
    import subprocess

    binary = shutil.which("redis-server")
    assert binary, "redis-server must be installed (the local stack uses it)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = aioredis.Redis(port=port)
    try:
        for _ in range(100):
            try:
                await client.ping()
                break
            except Exception:
                await asyncio.sleep(0.05)
        engine = RedisEngine(client, settings)
        await engine.apply(
            "o",
            [cmd("org_upsert", T0, billing_anchor_day=1),
             cmd("member_add", T0, member_id="a", tier="pro")],
        )  # fmt: skip
        before = await engine.state_view("o")
        outbox = await engine.outbox_pending("o")
        used = (await client.info("memory"))["used_memory"]
        await client.config_set("maxmemory", used - 100_000)
        with pytest.raises(Exception, match="maxmemory"):
            await engine.apply("o", [use("a", C, T0 + 1), cmd("pool_purchase", T0, credits_mc=C)])
        await client.config_set("maxmemory", 0)
        assert await engine.state_view("o") == before
        assert await engine.outbox_pending("o") == outbox
        res = await engine.apply("o", [use("a", C, T0 + 1)])
        assert res.outcomes[0].status == "applied"
    finally:
        await client.aclose()
        proc.terminate()
        proc.wait(timeout=10)


async def test_the_home_partition_survives_a_snapshot_and_binds_every_later_call(
    client: aioredis.Redis, settings: Settings
) -> None:
    # The org_upsert's partition is the org's home (kept in the org record and in its
    # snapshot); items read from another partition are answered "elsewhere" and write
    # nothing; a rebuild's replay (replay=True) is decided wherever it was recorded.
    engine = RedisEngine(client, settings)
    create = cmd("org_upsert", T0, billing_anchor_day=1)
    await engine.apply("o", [CommandItem(create.command, "admin:4", 0)])
    add = cmd("member_add", T0, member_id="a", tier="pro")
    away = await engine.apply("o", [CommandItem(add.command, "admin:1", 0)])
    assert [(o.status, o.code) for o in away.outcomes] == [("elsewhere", "4")]
    assert away.effects == []
    await engine.apply("o", [CommandItem(add.command, "admin:4", 1)])
    snap = (await engine.snapshots(["o"]))["o"]
    await engine.reset_org("o")
    await engine.restore_org(snap)
    raw = await client.hget(engine.keys("o").org, "s")
    assert org_integers(raw)["hm"] == 5  # partition 4, stored + 1
    before = await engine.state_view("o")
    usage = UsageItem("e1", "a", "t", C, T0 + 1, "usage:2", 3)
    res = await engine.apply("o", [usage, usage._replace(event_id="e2", offset=4)])
    assert [(o.status, o.code) for o in res.outcomes] == [("elsewhere", "4")] * 2
    assert await engine.state_view("o") == before
    assert (await engine.apply("o", [usage], replay=True)).outcomes[0].status == "applied"
    home = usage._replace(event_id="e3", source="usage:4")
    assert (await engine.apply("o", [home])).outcomes[0].status == "applied"


async def _members_current_signals(engine: RedisEngine) -> None:
    """Members paused in two orgs (no pool, allocation spent): the read-back of their
    current state answers each member's latest signal, and nothing for members without one.
    A member id is data whatever its characters (braces, slashes, quotes, 128 multi-byte)."""
    odd = '{x}/"\\:' + "€" * 121  # 128 characters
    latest: dict[str, dict[str, Any]] = {}
    for org in ("sig-a", "sig-b"):
        await engine.apply(org, [cmd("org_upsert", T0, billing_anchor_day=1)])
        members = ["m0", odd, "m2"]
        await engine.apply(org, [cmd("member_add", T0, member_id=m, tier="pro") for m in members])
        res = await engine.apply(org, [use(m, 600 * C, T0 + 1) for m in members[:2]])
        latest[org] = {e.member_id: e for e in res.effects if e.kind == "signal"}
        assert sorted(latest[org]) == sorted(["m0", odd])
    states = await engine.member_signals(
        {"sig-a": ["m0", odd, "m2", "nobody"], "sig-b": [odd], "sig-none": ["m0"]}
    )
    assert sorted(states) == ["sig-a", "sig-b", "sig-none"]
    assert sorted(states["sig-a"]) == sorted(["m0", odd]) and states["sig-none"] == {}
    assert list(states["sig-b"]) == [odd]
    for org, members in states.items():
        for mid, state in members.items():
            sent = latest[org][mid]
            assert state.signal == "pause"
            assert (state.reason, state.member_seq) == (sent.reason, sent.member_seq)


async def test_members_current_signals_are_read_back(
    client: aioredis.Redis, settings: Settings
) -> None:
    await _members_current_signals(RedisEngine(client, settings))


async def test_members_current_signals_are_read_back_on_redis_cluster(
    redis_cluster: RedisCluster, cluster_settings: Settings
) -> None:
    await _members_current_signals(RedisEngine(redis_cluster, cluster_settings))
