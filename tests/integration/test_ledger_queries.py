"""The ledger's hot queries on real PostgreSQL: the duplicate check of a batch probes the primary
keys whatever the table size and statistics (a sequential scan per batch grows with the
ledger), and finds exactly the decided ids."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bench.ledger_bench import charge_batch
from worker.config import Settings
from worker.ledger import QUERIES, Ledger, migrate


@pytest.fixture
async def ledger(settings: Settings, pg_schema: str) -> AsyncIterator[Ledger]:
    s = settings.model_copy(update={"postgres_schema": pg_schema})
    await migrate(s)
    led = await Ledger.connect(s)
    try:
        yield led
    finally:
        await led.close()


async def test_the_duplicate_check_probes_the_keys_of_a_large_ledger(ledger: Ledger) -> None:
    seqs: dict[str, int] = {}
    for first in range(0, 60_000, 20_000):
        await ledger.write(charge_batch(first, 20_000, 100, seqs))
    await ledger.pool.execute("ANALYZE")
    # A batch of 20,000 ids, a third of them decided: the shape the pipeline sends.
    batch = [f"e{n:09d}" for n in range(50_000, 70_000)]
    query = QUERIES["decided_event_ids"]
    plan = "\n".join(r[0] for r in await ledger.pool.fetch("EXPLAIN " + query, batch))
    assert "Seq Scan on usage_events" not in plan, plan
    assert "usage_events_pkey" in plan, plan
    events, commands = await ledger.decided_ids(batch, ["c1"])
    assert events == {f"e{n:09d}" for n in range(50_000, 60_000)}
    assert commands == set()


async def test_the_parked_retry_reads_each_partition_through_its_index(ledger: Ledger) -> None:
    # 30,000 parked events over 6 partitions: a turn reads the oldest 5,000 of ours, in order,
    # without sorting the whole lot.
    rows = [
        (f"p{n:06d}", f"o{n % 300}", "m", "t", 1000, 0, "unknown_org", "u", n % 6, n, None, b"v")
        for n in range(30_000)
    ]
    cols = list(zip(*rows, strict=True))
    await ledger.pool.execute(QUERIES["insert_parked"], *[list(c) for c in cols])
    await ledger.pool.execute("ANALYZE")
    plan = "\n".join(
        r[0]
        for r in await ledger.pool.fetch(
            "EXPLAIN " + QUERIES["parked_for_partitions"], "u", [0, 2, 4], 5000
        )
    )
    assert "parked_events_retry" in plan, plan
    assert "Seq Scan on parked_events" not in plan, plan
    got = await ledger.parked_for_partitions("u", [0, 2, 4], 5000)
    assert len(got) == 5000
    assert all(p.source_partition in (0, 2, 4) for p in got)
    assert not any(p.decided for p in got)
    counts = await ledger.parked_counts()
    assert sum(counts.values()) == 30_000 and counts["o7"] == 100
