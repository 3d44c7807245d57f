"""Stopping and failing without losing anything: SIGTERM whatever the worker waits on, records
a store refuses for their content, input topics that disappear.

The worker runs as a subprocess (``scenario_harness.WorkerProcess``); a scenario that stops
PostgreSQL runs on a private instance of its own.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from pipeline_checker import Workload, check_pipeline, read_topic
from pydantic import SecretStr
from scenario_harness import PrivateKafka, PrivatePostgres, WorkerProcess, wait_drained

from devstack.stack import ensure_topics
from worker import metrics
from worker.config import Settings
from worker.connections import kafka_client_kwargs
from worker.engine import RedisEngine
from worker.ledger import FlushBatch, Ledger
from worker.pipeline.faults import POISON_ENV
from worker.runner import run_worker

pytestmark = pytest.mark.timeout(300)

C = 1000
GRACE = 4.0


def _settings(isolated: Settings, **extra: Any) -> Settings:
    update: dict[str, Any] = {
        "batch_max_records": 200,
        "batch_timeout_ms": 20,
        "shutdown_grace_seconds": GRACE,
        "retry_backoff_max_seconds": 1.0,
        "unknown_grace_seconds": 30,
    }
    update.update(extra)
    return isolated.model_copy(update=update)


def _story(w: Workload, events: int, org: str = "acme") -> None:
    w.org(org, ["ann", "bob"])
    w.command(org, "pool_purchase", 100, credits_mc=10**9)
    for i in range(events):
        w.usage(org, ("ann", "bob")[i % 2], 1 * C)


async def _timed_sigterm(worker: WorkerProcess) -> tuple[int, float]:
    started = time.monotonic()
    rc = await worker.terminate(timeout=GRACE + 30)
    return rc, time.monotonic() - started


async def test_sigterm_while_postgres_is_down(isolated_settings: Settings, tmp_path: Path) -> None:
    """PostgreSQL stops under a running worker: the worker keeps retrying; SIGTERM ends it
    within the grace period (non-zero: it could not commit); a restart loses nothing."""
    pg = PrivatePostgres(tmp_path)
    await pg.start()
    s = _settings(isolated_settings, postgres_dsn=SecretStr(pg.dsn), postgres_schema="metering")
    w = Workload(s)
    _story(w, 50)
    try:
        await w.produce(w.messages[:3])
        worker = await WorkerProcess(s, tmp_path, "pgdown").start()
        await wait_drained(s, [s.topic_admin], [worker], timeout=60)
        await pg.stop()
        await w.produce(w.messages[3:])
        await asyncio.sleep(3)  # it is retrying now
        assert worker.alive, worker.log_tail()
        rc, took = await _timed_sigterm(worker)
        assert rc != 0, "a worker that could not commit must say so"
        assert took < GRACE + 3, f"took {took:.1f} s to stop:\n{worker.log_tail()}"
        await pg.start()
        again = await WorkerProcess(s, tmp_path, "after").start()
        await wait_drained(s, [s.topic_usage, s.topic_admin], [again], timeout=90)
        assert await again.terminate() == 0, again.log_tail()
        engine = RedisEngine.from_settings(s)
        try:
            await check_pipeline(s, w, engine=engine)
        finally:
            await engine.close()
    finally:
        await pg.stop()


async def test_sigterm_while_the_broker_is_gone(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    """The Kafka broker disappears under a running worker with records in flight: SIGTERM still
    ends it within the grace period (plus the bounded closes), and with the broker back a
    restart loses nothing."""
    kafka = PrivateKafka(tmp_path, isolated_settings)
    await kafka.start()
    try:
        s = _settings(isolated_settings, kafka_bootstrap=kafka.settings.kafka_bootstrap)
        await ensure_topics(s)
        w = Workload(s)
        _story(w, 3_000)
        await w.produce(w.messages[:4])
        worker = await WorkerProcess(s, tmp_path, "nobroker").start()
        await wait_drained(s, [s.topic_admin], [worker], timeout=60)
        await w.produce(w.messages[4:])  # in flight when the broker goes
        await kafka.stop()
        await asyncio.sleep(3)
        assert worker.alive, worker.log_tail()
        rc, took = await _timed_sigterm(worker)
        assert took < GRACE + 3, f"took {took:.1f} s to stop:\n{worker.log_tail()}"
        await kafka.start()
        again = await WorkerProcess(s, tmp_path, "broker-back").start()
        w.usage("acme", "ann", 1 * C)  # one more: the new worker is consuming once it is in
        await w.produce(w.messages[-1:])
        await wait_drained(s, [s.topic_usage, s.topic_admin], [again], timeout=120)
        assert await again.terminate() == 0, again.log_tail()
        engine = RedisEngine.from_settings(s)
        try:
            await check_pipeline(s, w, engine=engine)
        finally:
            await engine.close()
        assert rc in (0, 3), rc
    finally:
        kafka.cleanup()


async def test_sigterm_while_a_poison_record_is_isolated(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    """Every engine call of one org fails on its data: the worker splits the org's records to
    find the bad ones (slowly: each piece is tried); SIGTERM in the middle still ends it within
    the grace period, and a restart (with the org healthy again) charges everything once."""
    s = _settings(isolated_settings, batch_max_records=500)
    w = Workload(s)
    _story(w, 400, org="sick")
    _story(w, 20, org="well")
    await w.produce()
    worker = WorkerProcess(s, tmp_path, "poison", extra_env={POISON_ENV: "sick"})
    await worker.start()
    deadline = time.monotonic() + 60
    while "isolating" not in worker.log_path.read_text(errors="replace"):
        assert worker.alive and time.monotonic() < deadline, worker.log_tail()
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    rc, took = await _timed_sigterm(worker)
    assert took < GRACE + 3, f"took {took:.1f} s to stop:\n{worker.log_tail()}"
    assert rc != 0
    again = await WorkerProcess(s, tmp_path, "healthy").start()
    await wait_drained(s, [s.topic_usage, s.topic_admin], [again], timeout=90)
    assert await again.terminate() == 0, again.log_tail()
    engine = RedisEngine.from_settings(s)
    try:
        await check_pipeline(s, w, engine=engine)
    finally:
        await engine.close()


async def test_an_org_the_engine_fails_on_is_dead_lettered_and_the_rest_flows(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    s = _settings(isolated_settings)
    w = Workload(s)
    _story(w, 3, org="sick")
    _story(w, 30, org="well")
    for m in w.messages:
        if m.key == b"sick":
            m.bad = "engine_failed"
    sick = {eid for eid, ev in w.events.items() if ev["org_id"] == "sick"}
    for eid in sick:
        del w.events[eid]
    for cid in [c for c, cmd in w.commands.items() if cmd["org_id"] == "sick"]:
        del w.commands[cid]
    await w.produce()
    worker = WorkerProcess(s, tmp_path, "sick", extra_env={POISON_ENV: "sick"})
    await worker.start()
    try:
        await wait_drained(s, [s.topic_usage, s.topic_admin], [worker], timeout=120)
    finally:
        assert await worker.terminate() == 0, worker.log_tail()
    assert "isolating" in worker.log_path.read_text()
    engine = RedisEngine.from_settings(s)
    try:
        report = await check_pipeline(s, w, engine=engine)
    finally:
        await engine.close()
    assert sick <= set(report.rejected)
    assert {report.rejected[e] for e in sick} == {"engine_failed"}


class _CorruptingLedger:
    """The real ledger, except that one event's usage row gets a U+0000 (which PostgreSQL
    refuses) on its way in: a record whose content the store cannot take."""

    def __init__(self, inner: Ledger, event_id: str) -> None:
        self._inner = inner
        self._event = event_id
        self.corrupted = 0

    async def write(self, batch: FlushBatch) -> None:
        for i, row in enumerate(batch.rows_ready().usage):
            if row[0] == self._event:
                batch.usage[i] = (*row[:4], "task\x00", *row[5:])
                self.corrupted += 1
        await self._inner.write(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_a_row_postgres_refuses_is_set_aside_and_the_batch_commits(
    isolated_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _settings(isolated_settings, http_port=0)
    w = Workload(s)
    _story(w, 20)
    bad = list(w.events)[7]
    await w.produce()
    real_connect = Ledger.connect
    holder: dict[str, _CorruptingLedger] = {}

    async def connect(settings: Settings) -> Any:
        holder["ledger"] = _CorruptingLedger(await real_connect(settings), bad)
        return holder["ledger"]

    monkeypatch.setattr(Ledger, "connect", connect)
    before = metrics.QUARANTINED.labels(stage="postgres")._value.get()
    stats = await run_worker(s, max_events=len(w.messages), idle_exit_seconds=20)
    assert holder["ledger"].corrupted >= 1
    assert stats["quarantined"] >= 1
    assert metrics.QUARANTINED.labels(stage="postgres")._value.get() > before
    conn = await asyncpg.connect(
        s.postgres_dsn.get_secret_value(), server_settings={"search_path": s.postgres_schema}
    )
    try:
        rows = await conn.fetch("SELECT table_name, row_json, source_offset FROM quarantined_rows")
        charged = await conn.fetchval("SELECT count(*) FROM usage_events WHERE status = 'charged'")
        offsets = await conn.fetchval("SELECT sum(next_offset) FROM consumer_offsets")
    finally:
        await conn.close()
    assert [r["table_name"] for r in rows] == ["usage_events"]
    assert bad in rows[0]["row_json"] and "\\u0000" in rows[0]["row_json"]
    # Every event of the batch committed with the offsets, the refused one with its text
    # escaped (its id stays decided); the original row waits in quarantined_rows.
    assert charged == 20
    assert offsets == len(w.messages)
    letters = await read_topic(s, s.topic_usage_dlq)
    assert [dict(r.headers)["error.code"] for r in letters] == [b"storage_failed"]


async def test_input_topics_deleted_under_a_running_worker(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    """The log grows by at most a few lines a second (aiokafka alone would write ~1,800), the
    worker keeps running, and SIGTERM still stops it cleanly."""
    s = _settings(isolated_settings)
    w = Workload(s)
    _story(w, 10)
    await w.produce()
    worker = await WorkerProcess(s, tmp_path, "notopics").start()
    try:
        await wait_drained(s, [s.topic_usage, s.topic_admin], [worker], timeout=60)
        admin = AIOKafkaAdminClient(**kafka_client_kwargs(s))
        await admin.start()
        try:
            await admin.delete_topics([s.topic_usage, s.topic_admin])
        finally:
            await admin.close()
        await asyncio.sleep(3)
        lines_before = len(worker.log_path.read_text(errors="replace").splitlines())
        await asyncio.sleep(20)
        lines_after = len(worker.log_path.read_text(errors="replace").splitlines())
        assert worker.alive, worker.log_tail()
        grown = lines_after - lines_before
        assert grown <= 3 * 20, f"{grown} lines in 20 s:\n{worker.log_tail(30)}"
        assert "input topics missing" in worker.log_path.read_text()
    finally:
        rc = await worker.terminate()
    assert rc == 0, worker.log_tail()
