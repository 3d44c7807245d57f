"""The ledger's hot queries on real PostgreSQL: the duplicate check of a batch probes the primary
keys whatever the table size and statistics (a sequential scan per batch grows with the
ledger), and finds exactly the decided ids."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bench.ledger_bench import charge_batch
from worker.config import Settings
from worker.effects import Command, Usage
from worker.effects import Ledger as Movement
from worker.ledger import QUERIES, FlushBatch, Ledger, migrate


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


async def test_a_rebuild_reads_an_orgs_decisions_through_keys_and_finds_each_once(
    ledger: Ledger,
) -> None:
    """The rebuild's read of one org's recorded decisions after a seq: charged events through
    their ledger movements (an event paid by two buckets has two, and is replayed once),
    events the engine rejected through their own index, commands; in seq order, nothing of
    another org or at or below the seq, and no scan of the large tables."""
    seqs: dict[str, int] = {}
    for first in range(0, 60_000, 20_000):
        await ledger.write(charge_batch(first, 20_000, 1_000, seqs))  # 60 charges per org
    org = "org00042"
    top = seqs[org]  # the seq of its last charge's usage row
    src = "credits.usage.v1:0"
    # After the org's charges: an event paid by two buckets (two movements, one usage row),
    # an event the engine rejected (no movement), a command; and the same for another org.
    batch = FlushBatch()
    for o in (org, "org00043"):
        s = seqs[o] + 1
        batch.add_effects([
            Movement(s, o, "m1", "usage", f"split-{o}", "t", "charge", "allocation", None,
                     -300, 0, False, 1),
            Movement(s + 1, o, "m1", "usage", f"split-{o}", "t", "charge", "pool", None,
                     -700, 0, False, 1),
            Usage(s + 2, o, f"split-{o}", "m1", "t", 1_000, 1, "charged", None, False, src, 1),
            Usage(s + 3, o, f"bad-{o}", "m1", "t", 9, 2, "rejected", "member_removed", False,
                  src, 2),
            Command(s + 4, o, f"cmd-{o}", "pool_purchase", "applied", None,
                    {"type": "pool_purchase"}, "credits.admin.v1:0", 3),
        ])  # fmt: skip
    batch.set_offset("credits.usage.v1", 0, 60_001)
    await ledger.write(batch)
    await ledger.pool.execute("ANALYZE")

    plan = "\n".join(
        r[0] for r in await ledger.pool.fetch("EXPLAIN " + QUERIES["rebuild_inputs"], org, 10)
    )
    assert "Seq Scan on usage_events" not in plan, plan
    assert "Seq Scan on ledger_entries" not in plan, plan

    # A snapshot's seq lies between two items: here after the usage row of the org's fourth
    # charge from the end, so the last three come back (movement, then usage row, each).
    after = top - 6
    rows = await ledger.rebuild_inputs(org, after)
    got = [(r["seq"], r["kind"]) for r in rows]
    assert got[:3] == [(top - 4, "usage"), (top - 2, "usage"), (top, "usage")]
    assert [(r["seq"], r["kind"], r["id"]) for r in rows[3:]] == [
        (top + 3, "usage", f"split-{org}"),
        (top + 4, "usage", f"bad-{org}"),
        (top + 5, "command", f"cmd-{org}"),
    ]
    assert all(r["id"] != "split-org00043" for r in rows)
    every = await ledger.rebuild_inputs(org, 0)
    assert len(every) == len({r["id"] for r in every}) == top // 2 + 3
    assert [r["seq"] for r in every] == sorted(r["seq"] for r in every)
