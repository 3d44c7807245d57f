"""Micro-benchmark of the credit engine alone: debits/s from one Python process into Redis.

    .venv/bin/python -m bench.engine_bench [--orgs 1000] [--members 20] [--events 200000]
        [--batch 500] [--inflight 4]
    .venv/bin/python -m bench.engine_bench --spread --orgs 5000 --members 10 --batch 1 \
        --events 60000 --credits 1        # live traffic: one debit per org and script call
    .venv/bin/python -m bench.engine_bench --spread --orgs 1000 --members 10 --batch 1 \
        --events 60000 --credits 100 --pool 0   # ... and every member paused by its 5th debit
    .venv/bin/python -m bench.engine_bench --spread ... --model   # ... and the same rounds
        through the reference rules (worker/model.py) in this process, for comparison

Runs against ``Settings.redis_url`` (the local stack's Redis, AOF everysec) under a unique key
prefix that is deleted afterwards. Each script call applies a batch of one org's debits; several
calls are kept in flight. Prints progress and the figures recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis

from schemas.amounts import MAX_ADMIN_MC, MAX_USAGE_MC, MC_PER_CREDIT, parse_credits_text
from schemas.errors import WireError
from worker.config import Settings
from worker.contract import OrgCall
from worker.effects import Signal, last_seq
from worker.engine import RedisEngine
from worker.model import CommandItem, Model, UsageItem

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--orgs", type=int, default=1000)
    p.add_argument("--members", type=int, default=20)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=500, help="debits per script call")
    p.add_argument("--inflight", type=int, default=4, help="script calls in flight")
    p.add_argument(
        "--credits",
        dest="debit_mc",
        type=_mc_arg(MAX_USAGE_MC),
        default=120 * MC_PER_CREDIT,
        help="credits per debit, a decimal with at most 3 places (pro seats: 500/cycle)",
    )
    p.add_argument(
        "--pool",
        dest="pool_mc",
        type=_mc_arg(MAX_ADMIN_MC, allow_zero=True),
        default=MAX_ADMIN_MC,
        help="credits in each org's pool (0: a member pauses when its allocation runs out, as "
        "in the live-traffic benchmark)",
    )
    p.add_argument(
        "--spread",
        action="store_true",
        help="live-traffic shape: every round gives each org --batch debits, all orgs of the "
        "round in one apply_many (many orgs per script call) then one outbox ack, the way the "
        "pipeline calls the engine; prints Redis's EVALSHA time per debit",
    )
    p.add_argument(
        "--model",
        action="store_true",
        help="with --spread: also run the same rounds through the reference rules "
        "(worker.model.Model) in this process, no store, and print their time per debit",
    )
    a = p.parse_args(argv)

    base = Settings()
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(update={"redis_key_prefix": prefix})
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    engine = RedisEngine(client, settings)
    info = await client.info("persistence")
    print(
        f"redis {settings.redis_url.get_secret_value()} aof={info.get('aof_enabled')} "
        f"prefix={prefix}: {a.orgs} orgs x {a.members} members, {a.events} debits, "
        f"batch {a.batch}, {a.inflight} in flight",
        flush=True,
    )
    orgs = [f"org{i:05d}" for i in range(a.orgs)]
    sem = asyncio.Semaphore(a.inflight)

    async def setup(org: str) -> None:
        async with sem:
            await engine.apply(org, setup_items(org, a))

    t = time.perf_counter()
    await asyncio.gather(*(setup(o) for o in orgs))
    print(f"setup {time.perf_counter() - t:.1f}s", flush=True)

    if a.spread:
        status = await spread_rounds(client, engine, orgs, a)
        await _clean(client, prefix)
        if a.model:
            model_rounds(orgs, a)
        return status

    # Work units: (org, batch of debits), spread over the members. At the default 120 credits
    # a member's 500-credit allocation runs out on its 5th debit and pool blocks of 500 are
    # drawn after that, so the run mixes one-bucket charges, split charges and draws.
    per_org = a.events // a.orgs
    debit_mc = a.debit_mc
    units: list[tuple[str, list[UsageItem]]] = []
    for start in range(0, per_org, a.batch):
        for o in orgs:
            n = min(a.batch, per_org - start)
            units.append((o, [
                UsageItem(f"{o}-e{start + k}", f"m{(start + k) % a.members}", "task", debit_mc,
                          T0 + 1000 + start + k, "credits.usage.v1:0", start + k)
                for k in range(n)
            ]))  # fmt: skip
    total = sum(len(u[1]) for u in units)
    done = 0
    charged = 0
    t = time.perf_counter()
    last = t

    async def run(org: str, batch: list[UsageItem]) -> None:
        nonlocal done, charged, last
        async with sem:
            res = await engine.apply(org, batch)
        done += len(batch)
        charged += sum(1 for o in res.outcomes if o.status == "applied")
        now = time.perf_counter()
        if now - last >= 2:
            last = now
            print(f"  {done:>9,} debits  {done / (now - t):>9,.0f}/s", flush=True)

    await asyncio.gather(*(run(o, b) for o, b in units))
    elapsed = time.perf_counter() - t
    print(
        f"RESULT {total:,} debits in {elapsed:.2f}s = {total / elapsed:,.0f} debits/s "
        f"({engine.calls} script calls incl. setup; {charged:,} charged)",
        flush=True,
    )
    await _clean(client, prefix)
    return 0 if charged == total else 1


async def spread_rounds(
    client: aioredis.Redis, engine: RedisEngine, orgs: list[str], a: argparse.Namespace
) -> int:
    """Rounds of ``--batch`` debits for every org, each round one ``apply_many`` and one
    ``outbox_ack``: the per-org cost of a script call shows at ``--batch 1``."""
    await engine.outbox_ack({o: 10**12 for o in orgs})  # the setup's effects
    debit_mc = a.debit_mc
    rounds = spread_round_count(orgs, a)
    await client.config_resetstat()
    t = time.perf_counter()
    done = charged = signals = 0
    for r in range(rounds):
        calls = round_calls(orgs, r, debit_mc, a)
        results = await engine.apply_many(calls)
        await engine.outbox_ack(
            {res.org_id: last_seq(res.effects[-1]) for res in results if res.effects}
        )
        done += sum(len(c.items) for c in calls)
        charged += sum(1 for res in results for o in res.outcomes if o.status == "applied")
        signals += sum(1 for res in results for e in res.effects if isinstance(e, Signal))
        print(f"  round {r + 1}/{rounds}: {done:,} debits", flush=True)
    elapsed = time.perf_counter() - t
    stats = await client.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {}).get("usec", 0)
    print(
        f"RESULT {done:,} debits ({a.batch} per org and call, {len(orgs):,} orgs a round) in "
        f"{elapsed:.2f}s = {done / elapsed:,.0f} debits/s; Redis EVALSHA {evalsha / done:.1f} us "
        f"per debit (apply and ack scripts, their commands included); {signals:,} signals",
        flush=True,
    )
    return 0 if charged == done else 1


def setup_items(org: str, a: argparse.Namespace) -> list[CommandItem | UsageItem]:
    """An org, its pool purchase (unless ``--pool 0``) and its members."""
    items: list[CommandItem | UsageItem] = [
        CommandItem({"type": "org_upsert", "command_id": f"{org}-c0", "at_ms": T0,
                     "billing_anchor_day": 1}),
    ]  # fmt: skip
    if a.pool_mc > 0:
        purchase = {"type": "pool_purchase", "command_id": f"{org}-c1", "at_ms": T0,
                    "credits_mc": a.pool_mc}  # fmt: skip
        items.append(CommandItem(purchase))
    items += [
        CommandItem({"type": "member_add", "command_id": f"{org}-m{j}", "at_ms": T0,
                     "member_id": f"m{j}", "tier": "pro"})
        for j in range(a.members)
    ]  # fmt: skip
    return items


def spread_round_count(orgs: list[str], a: argparse.Namespace) -> int:
    """How many rounds of ``--batch`` debits per org make ``--events`` (at least one)."""
    return max(1, a.events // (len(orgs) * a.batch))


def round_calls(orgs: list[str], r: int, debit_mc: int, a: argparse.Namespace) -> list[OrgCall]:
    """Round ``r`` (from 0) of ``--spread``: ``--batch`` debits for every org, each with an
    offset (and event id) of its own across the rounds."""
    calls = []
    offset = r * len(orgs) * a.batch
    for i, o in enumerate(orgs):
        items = []
        for k in range(a.batch):
            offset += 1
            # Each org's debits go round its members, one member after the other.
            member = (r * a.batch + k + i) % a.members
            items.append(
                UsageItem(f"{o}-e{offset}", f"m{member}", "task", debit_mc,
                          T0 + 1000 + offset, "credits.usage.v1:0", offset)
            )  # fmt: skip
        calls.append(OrgCall(o, items))
    return calls


def model_rounds(orgs: list[str], a: argparse.Namespace) -> None:
    """The rounds of :func:`spread_rounds` through the reference rules, one ``Model.apply``
    per org and round, in this process: what deciding costs without a store."""
    model = Model()
    for o in orgs:
        model.apply(o, setup_items(o, a))
    debit_mc = a.debit_mc
    rounds = spread_round_count(orgs, a)
    done = charged = 0
    elapsed = 0.0  # in Model.apply only, as the script's time is its own
    for r in range(rounds):
        for call in round_calls(orgs, r, debit_mc, a):
            t = time.perf_counter()
            res = model.apply(call.org_id, call.items)
            elapsed += time.perf_counter() - t
            done += len(call.items)
            charged += sum(1 for o in res.outcomes if o.status == "applied")
    print(
        f"MODEL {done:,} debits through worker.model.Model in this process (no store): "
        f"{elapsed / done * 1e6:.1f} us per debit; {charged:,} charged",
        flush=True,
    )


def _mc_arg(max_mc: int, *, allow_zero: bool = False) -> Callable[[str], int]:
    """An argparse type: credits as decimal text, to exact integer millicredits."""

    def parse(text: str) -> int:
        try:
            return parse_credits_text(text, allow_zero=allow_zero, max_mc=max_mc)
        except WireError as err:
            raise argparse.ArgumentTypeError(err.detail) from None

    return parse


async def _clean(client: aioredis.Redis, prefix: str) -> None:
    """Delete the benchmark's keys."""
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=5000)]
    for i in range(0, len(keys), 1000):
        await client.delete(*keys[i : i + 1000])
    await client.aclose()


if __name__ == "__main__":
    try:
        import uvloop  # the worker runs on uvloop too
    except ImportError:  # pragma: no cover - optional
        sys.exit(asyncio.run(main()))
    sys.exit(uvloop.run(main()))
