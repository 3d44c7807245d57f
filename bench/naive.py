"""The naive baseline: the metering loop most teams write first.

One PostgreSQL transaction per usage event: ``SELECT ... FOR UPDATE`` on the member's balance
row, pay from the seat allocation, then from the org pool (a second row lock), ``UPDATE`` the
rows, ``INSERT`` one ledger row (``ON CONFLICT (event_id) DO NOTHING`` for duplicates),
``COMMIT``; Kafka offsets committed after each fetched batch. It implements far fewer rules than
the worker (no promotions, blocks, limits, signals or cycles), which only flatters it: the cost
is the per-event round trips and the per-commit fsync, not the arithmetic.

Its tables live in their own schema (``bench_naive`` by default), dropped and recreated per run.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer

from bench.workload import topic_partitions

_DDL = """
CREATE TABLE member_balance (
    org_id        text   NOT NULL,
    member_id     text   NOT NULL,
    allocation_mc bigint NOT NULL,
    used_mc       bigint NOT NULL DEFAULT 0,
    debt_mc       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, member_id)
);
CREATE TABLE org_pool (
    org_id     text   PRIMARY KEY,
    balance_mc bigint NOT NULL DEFAULT 0
);
CREATE TABLE ledger (
    id          bigserial   PRIMARY KEY,
    event_id    text        NOT NULL UNIQUE,
    org_id      text        NOT NULL,
    member_id   text        NOT NULL,
    task_id     text        NOT NULL,
    from_alloc  bigint      NOT NULL,
    from_pool   bigint      NOT NULL,
    to_debt     bigint      NOT NULL,
    occurred_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
"""

TIER_MC = {"pro": 500_000, "max": 15_000_000}


def _mc(value: Any) -> int:
    return int(Decimal(str(value)) * 1000)


@dataclass(frozen=True)
class NaiveResult:
    """What the baseline did within its time bound."""

    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


async def _consume_all(consumer: AIOKafkaConsumer, topic: str) -> list[bytes]:
    parts = await topic_partitions(consumer, topic)
    consumer.assign(parts)
    await consumer.seek_to_beginning(*parts)
    end = await consumer.end_offsets(parts)
    out: list[bytes] = []
    while [tp for tp in parts if await consumer.position(tp) < end[tp]]:
        batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
        for records in batch.values():
            out.extend(r.value for r in records)
    return out


async def setup(conn: asyncpg.Connection, schema: str, admin_values: list[bytes]) -> None:
    """Recreate the baseline's tables and apply the org/member/purchase commands (not timed)."""
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE; CREATE SCHEMA "{schema}"')
    await conn.execute(f'SET search_path TO "{schema}"')
    await conn.execute(_DDL)
    members: list[tuple[str, str, int]] = []
    pools: dict[str, int] = {}
    for raw in admin_values:
        cmd = json.loads(raw)
        kind = cmd["type"]
        if kind == "org_upsert":
            pools.setdefault(cmd["org_id"], 0)
        elif kind == "member_add":
            members.append((cmd["org_id"], cmd["member_id"], TIER_MC[cmd["tier"]]))
        elif kind == "pool_purchase":
            pools[cmd["org_id"]] = pools.get(cmd["org_id"], 0) + _mc(cmd["credits"])
    await conn.executemany(
        "INSERT INTO member_balance (org_id, member_id, allocation_mc) VALUES ($1, $2, $3)",
        members,
    )
    await conn.executemany(
        "INSERT INTO org_pool (org_id, balance_mc) VALUES ($1, $2)", list(pools.items())
    )


async def charge_one(conn: asyncpg.Connection, event: dict[str, Any]) -> None:
    """Charge one event in its own transaction (the per-event design under test)."""
    from datetime import datetime

    need = _mc(event["credits"])
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT allocation_mc, used_mc FROM member_balance"
            " WHERE org_id = $1 AND member_id = $2 FOR UPDATE",
            event["org_id"],
            event["member_id"],
        )
        if row is None:
            return
        from_alloc = min(need, max(0, row["allocation_mc"] - row["used_mc"]))
        rest = need - from_alloc
        from_pool = 0
        if rest:
            pool = await conn.fetchval(
                "SELECT balance_mc FROM org_pool WHERE org_id = $1 FOR UPDATE", event["org_id"]
            )
            from_pool = min(rest, pool or 0)
            if from_pool:
                await conn.execute(
                    "UPDATE org_pool SET balance_mc = balance_mc - $2 WHERE org_id = $1",
                    event["org_id"],
                    from_pool,
                )
        debt = rest - from_pool
        inserted = await conn.fetchval(
            "INSERT INTO ledger (event_id, org_id, member_id, task_id, from_alloc, from_pool,"
            " to_debt, occurred_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT (event_id) DO NOTHING RETURNING id",
            event["event_id"],
            event["org_id"],
            event["member_id"],
            event["task_id"],
            from_alloc,
            from_pool,
            debt,
            datetime.fromisoformat(event["occurred_at"]),
        )
        if inserted is None:
            # A duplicate: raising rolls back the pool update made above.
            raise _Duplicate
        await conn.execute(
            "UPDATE member_balance SET used_mc = used_mc + $3, debt_mc = debt_mc + $4"
            " WHERE org_id = $1 AND member_id = $2",
            event["org_id"],
            event["member_id"],
            from_alloc,
            debt,
        )


class _Duplicate(Exception):
    pass


async def run_naive(
    *,
    bootstrap: str,
    dsn: str,
    usage_topic: str,
    admin_topic: str,
    group_id: str,
    schema: str = "bench_naive",
    time_limit_s: float = 30.0,
    max_events: int = 100_000,
    progress: Callable[[int, float], None] | None = None,
) -> NaiveResult:
    """Run the baseline over the usage topic until ``time_limit_s`` or ``max_events``."""
    conn = await asyncpg.connect(dsn)
    try:
        reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await reader.start()
        try:
            admin_values = await _consume_all(reader, admin_topic)
        finally:
            await reader.stop()
        await setup(conn, schema, admin_values)

        consumer = AIOKafkaConsumer(
            usage_topic,
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        done = 0
        started = time.perf_counter()
        last_report = started
        try:
            while done < max_events and time.perf_counter() - started < time_limit_s:
                batch = await consumer.getmany(timeout_ms=500, max_records=500)
                for records in batch.values():
                    for record in records:
                        with contextlib.suppress(_Duplicate):
                            await charge_one(conn, json.loads(record.value))
                        done += 1
                await consumer.commit()
                now = time.perf_counter()
                if progress is not None and now - last_report >= 2.0:
                    last_report = now
                    progress(done, now - started)
            elapsed = time.perf_counter() - started
        finally:
            await consumer.stop()
        return NaiveResult(events=done, seconds=elapsed)
    finally:
        await conn.close()
