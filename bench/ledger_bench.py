"""Micro-benchmark of the PostgreSQL flush alone: ``Ledger.write`` of one-bucket charge batches.

    .venv/bin/python -m bench.ledger_bench [--batches 25] [--batch 20000] [--orgs 1000]
        [--drop-index ledger_entries_member]

Writes the rows the pipeline writes for one-bucket charges (a ledger row and a usage row per
event, the offsets, the org seqs) into a fresh schema of ``Settings.postgres_dsn`` (the local
stack's PostgreSQL), one transaction per batch, and drops the schema afterwards. Prints the time
per batch, the part of it spent encoding on the client, and the decided-ids query of a batch of
new ids (the pipeline's duplicate check). ``--drop-index`` shows what a secondary index costs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

import asyncpg

from worker.config import Settings
from worker.effects import Charge
from worker.ledger import FlushBatch, Ledger, migrate, quote_schema

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def charge_batch(first: int, size: int, orgs: int, seqs: dict[str, int]) -> FlushBatch:
    """One batch of ``size`` one-bucket charges (compact ``Charge`` effects)."""
    batch = FlushBatch()
    charges: list[Charge] = []
    for n in range(first, first + size):
        org = f"org{n * 7919 % orgs:05d}"
        seq = seqs.get(org, 0) + 1
        seqs[org] = seq + 1  # the usage row takes seq + 1
        member = f"m{n % 20:03d}"
        charges.append(
            Charge(seq, org, "allocation", None, f"e{n:09d}", member, f"t{n % 20:03d}", 12_500,
                   T0 + n, False, "credits.usage.v1:0", n, T0, T0 + n)
        )  # fmt: skip
    charges.sort(key=lambda c: c.org_id)
    batch.add_effects(charges)
    batch.set_offset("credits.usage.v1", 0, first + size)
    return batch


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--batches", type=int, default=25)
    p.add_argument("--batch", type=int, default=20_000, help="events per batch")
    p.add_argument("--orgs", type=int, default=1000)
    p.add_argument("--drop-index", action="append", default=[], metavar="NAME")
    a = p.parse_args(argv)

    settings = Settings().namespaced(f"ledgerbench{uuid.uuid4().hex[:6]}")
    schema = quote_schema(settings.postgres_schema)
    await migrate(settings)
    ledger = await Ledger.connect(settings)
    try:
        for name in a.drop_index:
            await ledger.pool.execute(f"DROP INDEX {schema}.{quote_schema(name)}")
        print(
            f"schema {settings.postgres_schema}: {a.batches} batches x {a.batch:,} charges over "
            f"{a.orgs} orgs, dropped indexes: {', '.join(a.drop_index) or 'none'}",
            flush=True,
        )
        seqs: dict[str, int] = {}
        wall = cpu = 0.0
        for i in range(a.batches):
            batch = charge_batch(i * a.batch, a.batch, a.orgs, seqs)
            c0, t0 = time.process_time(), time.perf_counter()
            await ledger.write(batch)
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            if (i + 1) % 5 == 0 or i + 1 == a.batches:
                print(f"  {i + 1:>4}/{a.batches} batches, {wall / (i + 1) * 1000:6.1f} ms/batch")
        events = a.batches * a.batch
        ids = [f"e{n:09d}" for n in range(events, events + a.batch)]
        query_ms = float("inf")
        for _ in range(3):  # the pipeline runs it every batch: report the warm figure
            t0 = time.perf_counter()
            decided, _ = await ledger.decided_ids(ids, [])
            query_ms = min(query_ms, (time.perf_counter() - t0) * 1000)
        print(
            f"RESULT {wall / a.batches * 1000:.1f} ms per batch "
            f"({cpu / a.batches * 1000:.1f} ms of it encoding on the client), "
            f"{events / wall:,.0f} events/s; decided-ids query of {a.batch:,} new ids (best of 3) "
            f"{query_ms:.1f} ms ({len(decided)} found)",
            flush=True,
        )
    finally:
        await ledger.close()
        conn = await asyncpg.connect(settings.postgres_dsn.get_secret_value())
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
