"""Recovery of the pipeline: Redis data loss rebuilt from PostgreSQL, a crash at each step of
the write path (the ``METERING_CRASH_AT`` hook in a worker subprocess) followed by a restart,
and a graceful stop in the middle of a run. Every scenario ends with the one checker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.integration.pipeline_checker import Workload, check_pipeline
from tests.integration.scenario_harness import CRASH_EXIT, WorkerProcess
from worker import metrics
from worker.config import Settings
from worker.pipeline import ShutdownIncomplete
from worker.pipeline.faults import CRASH_STEPS
from worker.recovery import rebuild
from worker.runner import make_engine, run_worker


@pytest.fixture
def pipe_settings(isolated_settings: Settings) -> Settings:
    return isolated_settings.model_copy(update={"http_port": 0, "batch_max_records": 40})


@pytest.fixture
async def engine(pipe_settings: Settings) -> AsyncIterator[Any]:
    built = make_engine(pipe_settings)
    try:
        yield built
    finally:
        await built.close()


def _story(w: Workload, events: int) -> None:
    w.org("acme", ["ann", "bob", "cyd"])
    w.org("beta", ["dee", "eve"], tier="max")
    w.command("acme", "pool_purchase", 100, credits_mc=300_000)
    _story_usage(w, events)


def _story_usage(w: Workload, events: int) -> None:
    for i in range(events):
        w.usage("acme", ("ann", "bob", "cyd")[i % 3], 9_000 + 125 * (i % 5))
        w.usage("beta", ("dee", "eve")[i % 2], 60_000)


async def test_redis_data_loss_is_rebuilt_from_postgres(
    pipe_settings: Settings, engine: Any, redis: aioredis.Redis
) -> None:
    """Redis emptied after a run: the next start finds Redis behind PostgreSQL, replays the
    recorded decisions, and both the state and later charging are exactly right."""
    s = pipe_settings
    w = Workload(s)
    _story(w, 60)
    await w.produce()
    await run_worker(s, max_events=len(w.messages), idle_exit_seconds=30, engine=engine)
    before = {org: await engine.dashboard(org) for org in ("acme", "beta")}

    await redis.flushdb()  # total loss of the Redis data
    assert await engine.dashboard("acme") is None
    stats = await run_worker(s, max_events=0, engine=engine)
    assert stats["rebuilt_orgs"] == 2
    assert {org: await engine.dashboard(org) for org in ("acme", "beta")} == before
    await check_pipeline(s, w, engine=engine)

    # Life goes on after the rebuild: new events are charged on the rebuilt balances, and a
    # replayed old event_id is still a duplicate (Redis forgot it, PostgreSQL did not).
    start = len(w.messages)
    for i in range(30):
        w.usage("acme", ("ann", "bob")[i % 2], 4_000)
    old = next(iter(w.events))
    w.usage("acme", "ann", 0, event_id=old)
    await w.produce(w.messages[start:])
    stats = await run_worker(
        s, max_events=len(w.messages) - start, idle_exit_seconds=30, engine=engine
    )
    assert stats["charged"] == 30
    assert stats["duplicate"] == 1
    await check_pipeline(s, w, engine=engine)


async def test_redis_behind_after_partial_loss(pipe_settings: Settings, engine: Any) -> None:
    """Only some orgs lost their latest writes (as with AOF everysec): just those rebuild."""
    s = pipe_settings
    w = Workload(s)
    _story(w, 20)
    await w.produce()
    await run_worker(s, max_events=len(w.messages), idle_exit_seconds=30, engine=engine)
    before = await engine.dashboard("beta")
    # Lose beta's state: delete its keys (as if the last second of its writes never reached
    # the disk and the org had not existed before).
    await engine.client.delete(*engine.keys("beta"))
    stats = await run_worker(s, max_events=0, engine=engine)
    assert stats["rebuilt_orgs"] == 1
    assert await engine.dashboard("beta") == before
    await check_pipeline(s, w, engine=engine)


async def test_rebuild_command_restores_an_org_on_demand(
    pipe_settings: Settings, engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``metering rebuild --org`` replays one org from PostgreSQL, with progress output."""
    s = pipe_settings
    w = Workload(s)
    _story(w, 30)
    await w.produce()
    await run_worker(s, max_events=len(w.messages), idle_exit_seconds=30, engine=engine)
    before = await engine.dashboard("acme")
    await engine.client.delete(*engine.keys("acme"))
    result = await rebuild(s, org_ids=["acme"])
    assert result["org_ids"] == ["acme"]
    assert "acme" in capsys.readouterr().out
    assert await engine.dashboard("acme") == before
    await check_pipeline(s, w, engine=engine)


async def test_the_worker_snapshots_orgs_and_a_rebuild_starts_from_the_snapshot(
    pipe_settings: Settings, engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Snapshots are written by the pipeline as orgs cross multiples of
    ``snapshot_every_effects``, never ahead of the ledger; after a total Redis loss the rebuild
    restores them and replays only the decisions after them, and the books are exact."""
    s = pipe_settings.model_copy(update={"snapshot_every_effects": 25})
    w = Workload(s)
    _story(w, 80)
    await w.produce()
    await run_worker(s, max_events=len(w.messages), idle_exit_seconds=30, engine=engine)
    before = {org: await engine.dashboard(org) for org in ("acme", "beta")}
    conn = await asyncpg.connect(s.postgres_dsn.get_secret_value())
    try:
        rows = await conn.fetch(
            f'SELECT s.org_id, s.seq, o.last_seq FROM "{s.postgres_schema}".org_snapshots s'
            f' JOIN "{s.postgres_schema}".org_seq o USING (org_id) ORDER BY s.org_id'
        )
    finally:
        await conn.close()
    assert [r["org_id"] for r in rows] == ["acme", "beta"]
    assert all(0 < r["seq"] <= r["last_seq"] for r in rows)
    assert all(r["last_seq"] - r["seq"] < 25 + 2 * s.batch_max_records * 2 for r in rows)

    await engine.client.flushdb()
    result = await rebuild(s)
    assert sorted(result["org_ids"]) == ["acme", "beta"]
    out = capsys.readouterr().out
    for r in rows:
        assert f"{r['org_id']}: snapshot at seq {r['seq']} restored" in out
    assert {org: await engine.dashboard(org) for org in ("acme", "beta")} == before
    await check_pipeline(s, w, engine=engine)

    # Life goes on from the restored state.
    start = len(w.messages)
    for i in range(20):
        w.usage("acme", ("ann", "bob")[i % 2], 4_000)
    await w.produce(w.messages[start:])
    stats = await run_worker(
        s, max_events=len(w.messages) - start, idle_exit_seconds=30, engine=engine
    )
    assert stats["charged"] == 20
    await check_pipeline(s, w, engine=engine)


@pytest.mark.slow
# One step here as a check of the hook and the restart path; every step is covered (under load,
# several workers) by tests/integration/test_scenarios_crash.py.
@pytest.mark.parametrize("step", [s for s in CRASH_STEPS if s == "after_publish"])
async def test_crash_at_each_step_then_restart(
    pipe_settings: Settings, engine: Any, step: str, tmp_path: Path
) -> None:
    """kill -9 equivalent at a step of the write path on the 2nd batch; a restarted worker
    drains the outbox, resumes from PostgreSQL's offsets, and the books are exact."""
    s = pipe_settings.model_copy(update={"shutdown_grace_seconds": 5.0})
    w = Workload(s)
    _story(w, 80)
    # Duplicates too, so the restart has to tell replays from copies.
    for eid in list(w.events)[:10]:
        w.usage("acme", "ann", 0, event_id=eid)
    await w.produce()
    crashing = WorkerProcess(
        s,
        tmp_path,
        "crashing",
        crash_at=f"{step}:2",
        extra_env={"METERING_MAX_EVENTS": str(len(w.messages))},
    )
    await crashing.start()
    try:
        rc = await crashing.wait(120)
    finally:
        crashing.kill()
    assert rc == CRASH_EXIT, crashing.log_tail()
    assert f"fault injection: exiting at {step}" in crashing.log_tail(400)
    await run_worker(s, max_events=len(w.messages), idle_exit_seconds=30, engine=engine)
    await check_pipeline(s, w, engine=engine)


async def test_stop_mid_run_then_resume(pipe_settings: Settings, engine: Any) -> None:
    """A stop request in the middle of a run finishes the in-flight batches; the next run
    continues where it stopped, nothing lost, nothing twice."""
    s = pipe_settings.model_copy(update={"batch_max_records": 10})
    w = Workload(s)
    _story(w, 0)
    await w.produce()
    setup = len(w.messages)
    await run_worker(s, max_events=setup, idle_exit_seconds=30, engine=engine)
    _story_usage(w, 300)
    await w.produce(w.messages[setup:])
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(s, stop=stop, engine=engine))
    for _ in range(400):
        await asyncio.sleep(0.02)
        if await _decided(s) >= 20:
            break
    stop.set()
    first = await asyncio.wait_for(task, s.shutdown_grace_seconds + 5)
    todo = len(w.messages) - setup
    assert 0 < first["records"] < todo
    rest = await run_worker(
        s, max_events=todo - first["records"], idle_exit_seconds=30, engine=engine
    )
    assert first["charged"] + rest["charged"] == len(w.events)
    await check_pipeline(s, w, engine=engine)


async def _decided(settings: Settings) -> int:
    conn = await asyncpg.connect(
        settings.postgres_dsn.get_secret_value(),
        server_settings={"search_path": settings.postgres_schema},
    )
    try:
        return int(await conn.fetchval("SELECT count(*) FROM usage_events"))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


async def test_redis_emptied_under_a_running_worker(
    pipe_settings: Settings, engine: Any, redis: aioredis.Redis
) -> None:
    """Redis loses everything while the worker runs: the next batch finds its orgs behind
    PostgreSQL, rebuilds them from the ledger and charges on exact balances (nothing parked
    as unknown, nothing charged twice)."""
    s = pipe_settings
    w = Workload(s)
    _story(w, 0)
    await w.produce()
    await run_worker(s, max_events=len(w.messages), idle_exit_seconds=30, engine=engine)
    start = len(w.messages)
    _story_usage(w, 40)
    await w.produce(w.messages[start:])
    first = len(w.events)
    rebuilds = metrics.REBUILDS.labels(reason="redis_behind")
    rebuilt_before = rebuilds._value.get()
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(s, stop=stop, engine=engine))
    try:
        for _ in range(300):
            await asyncio.sleep(0.05)
            if await _decided(s) == first:
                break
        assert await _decided(s) == first
        await redis.flushdb()
        start = len(w.messages)
        _story_usage(w, 40)
        await w.produce(w.messages[start:])
        for _ in range(300):
            await asyncio.sleep(0.05)
            if await _decided(s) == len(w.events):
                break
    finally:
        stop.set()
        stats = await task
    assert stats["parked"] == 0  # the orgs were rebuilt, never taken for unknown
    assert rebuilds._value.get() - rebuilt_before == 2  # acme and beta, by the running worker
    await check_pipeline(s, w, engine=engine)


class _RedisDown:
    """The engine while Redis is unreachable: every apply fails with a connection error."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.attempts = 0

    async def apply_many(self, calls: Any) -> Any:
        self.attempts += 1
        raise ConnectionError("redis is down")

    async def apply_stream(self, calls: Any) -> Any:
        await self.apply_many(calls)
        yield  # an async generator that fails before its first part

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_stop_during_an_outage_exits_within_the_grace_period(
    pipe_settings: Settings, engine: Any
) -> None:
    """Redis down: the worker retries with backoff and commits nothing; a stop request still
    ends it within the grace period, and a later run on a healthy Redis loses nothing."""
    s = pipe_settings.model_copy(
        update={"shutdown_grace_seconds": 2.0, "retry_backoff_max_seconds": 0.5}
    )
    w = Workload(s)
    _story(w, 10)
    await w.produce()
    down = _RedisDown(engine)
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(s, stop=stop, engine=down))
    for _ in range(200):
        await asyncio.sleep(0.05)
        if down.attempts >= 3:
            break
    assert down.attempts >= 3  # it kept retrying
    stop.set()
    # Within the grace period (+ client shutdown), reporting that it could not commit.
    with pytest.raises(ShutdownIncomplete):
        await asyncio.wait_for(task, 10)
    assert await _decided(s) == 0
    await run_worker(s, max_events=len(w.messages), idle_exit_seconds=30, engine=engine)
    await check_pipeline(s, w, engine=engine)
