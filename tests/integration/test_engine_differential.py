"""Differential test: random sequences through the Redis Lua engine and the Python model.

Several orgs, members, tiers (one of 0 credits), cycle boundaries, limits, refills, promos,
removal/re-add, unknown members, duplicates and replays. After every batch the engine and the
model must agree on outcomes, on the state and the dashboard, on every effect (signals and
limit notifications per member in order; every other effect in order), and the invariants must
hold on the engine's state. The engine runs with a tiny walk budget so that org-wide work is
chunked over many script calls, which must not change any result.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.ids import derived_id
from worker import views
from worker.config import Settings
from worker.effects import as_dicts
from worker.engine import RedisEngine
from worker.model import (
    CommandItem,
    Item,
    Model,
    ModelResult,
    UsageItem,
    check_invariants,
    to_ms,
)

TIERS = {"pro": 500, "max": 15_000, "free": 0}
MEMBERS = ["m0", "m1", "m2", "m3", "ghost"]
C = 1000
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
T0 = to_ms(dt.datetime(2026, 1, 20, 9, tzinfo=dt.UTC))
_run = itertools.count()


def split_effects(effects: Sequence[dict[str, Any]]) -> tuple[dict[str, list[Any]], list[Any]]:
    """(per-member signal/limit-notification lists, every other effect), seqs stripped."""
    per_member: dict[str, list[Any]] = {}
    others: list[Any] = []
    for e in effects:
        body = {k: v for k, v in e.items() if k != "seq"}
        if e["kind"] == "signal" or (
            e["kind"] == "notification" and e["type"] == "pool_limit_reached"
        ):
            per_member.setdefault(e["member_id"], []).append(body)
        else:
            others.append(body)
    return per_member, others


@st.composite
def scenarios(draw: st.DrawFn) -> list[tuple[int, list[Item]]]:
    n_orgs = draw(st.integers(1, 2))
    clock = [T0] * n_orgs
    offsets = {"u:0": 0, "u:1": 0, "a:0": 0}
    history: list[list[Item]] = [[] for _ in range(n_orgs)]
    ids = itertools.count()
    batches: list[tuple[int, list[Item]]] = []

    def command(org: int, typ: str, at: int, **fields: Any) -> CommandItem:
        offsets["a:0"] += 1
        c = {"type": typ, "command_id": f"c{next(ids)}", "at_ms": at, **fields}
        return CommandItem(c, "a:0", offsets["a:0"])

    for o in range(n_orgs):
        anchor = draw(st.sampled_from([1, 20, 21, 31]))
        items: list[Item] = [command(o, "org_upsert", clock[o], billing_anchor_day=anchor)]
        for mid in MEMBERS[:4]:
            if draw(st.booleans()) or mid == "m0":
                items.append(
                    command(
                        o,
                        "member_add",
                        clock[o],
                        member_id=mid,
                        tier=draw(st.sampled_from(list(TIERS))),
                    )
                )
        if draw(st.booleans()):
            items.append(
                command(
                    o,
                    "auto_refill_set",
                    clock[o],
                    enabled=True,
                    threshold_mc=draw(st.sampled_from([200, 1000])) * C,
                    amount_mc=draw(st.sampled_from([100, 700, 3000])) * C,
                    monthly_limit_mc=draw(st.sampled_from([500, 4000])) * C,
                )
            )
        if draw(st.booleans()):
            items.append(
                command(
                    o,
                    "pool_purchase",
                    clock[o],
                    credits_mc=draw(st.sampled_from([300, 1000, 2500])) * C,
                )
            )
        history[o].extend(items)
        batches.append((o, items))

    for _ in range(draw(st.integers(1, 14))):
        o = draw(st.integers(0, n_orgs - 1))
        items = []
        for _ in range(draw(st.integers(1, 10))):
            step = draw(
                st.sampled_from([0, 0, MIN, HOUR, DAY, 4 * DAY, 12 * DAY, 33 * DAY, 400 * DAY])
            )
            clock[o] += step
            at = clock[o] - draw(st.sampled_from([0, 0, 0, 2 * DAY]))  # some arrive late
            member = draw(st.sampled_from(MEMBERS[:4] * 3 + MEMBERS[4:]))
            kind = draw(
                st.sampled_from(
                    ["use"] * 8
                    + [
                        "dup",
                        "replay",
                        "purchase",
                        "refill_set",
                        "refill_result",
                        "refill_result",
                        "refill_result",
                        "tier_limit",
                        "member_limit",
                        "add",
                        "remove",
                        "set_tier",
                        "promo",
                        "request",
                        "tick",
                        "anchor",
                    ]
                )
            )
            item: Item
            if kind == "use":
                src = draw(st.sampled_from(["u:0", "u:1"]))
                offsets[src] += 1
                credits = draw(st.sampled_from([1, 499, 500, 777, 5_000, 120_500, 600_001]))
                item = UsageItem(
                    f"e{next(ids)}", member, "t", credits * C // 1000, at, src, offsets[src]
                )
            elif kind == "dup":
                old = [i for i in history[o] if isinstance(i, UsageItem)]
                if not old:
                    continue
                prev = draw(st.sampled_from(old))
                offsets["u:1"] += 1
                item = UsageItem(
                    prev.event_id,
                    prev.member_id,
                    "t",
                    prev.credits_mc,
                    prev.occurred_at_ms,
                    "u:1",
                    offsets["u:1"],
                )
            elif kind == "replay":
                if not history[o]:
                    continue
                item = draw(st.sampled_from(history[o]))
            elif kind == "purchase":
                item = command(
                    o,
                    "pool_purchase",
                    at,
                    credits_mc=draw(st.sampled_from([1, 300, 1000, 5000])) * C,
                )
            elif kind == "refill_set":
                item = command(
                    o,
                    "auto_refill_set",
                    at,
                    enabled=draw(st.booleans()),
                    threshold_mc=draw(st.sampled_from([0, 200, 1000])) * C,
                    amount_mc=draw(st.sampled_from([100, 700, 3000])) * C,
                    monthly_limit_mc=draw(st.sampled_from([0, 500, 4000])) * C,
                )
            elif kind == "refill_result":
                rid = f"org{o}|{draw(st.integers(1, 3))}"  # made real in _rename
                item = command(
                    o,
                    "refill_result",
                    at,
                    request_id=rid,
                    status=draw(st.sampled_from(["succeeded", "failed"])),
                )
            elif kind == "tier_limit":
                item = command(
                    o,
                    "tier_limit_set",
                    at,
                    tier=draw(st.sampled_from(list(TIERS))),
                    limit_mc=draw(st.sampled_from([None, 0, 100 * C, 600 * C])),
                )
            elif kind == "member_limit":
                item = command(
                    o,
                    "member_limit_set",
                    at,
                    member_id=member,
                    limit_mc=draw(st.sampled_from(["inherit", None, 0, 300 * C, 1000 * C])),
                )
            elif kind == "add":
                item = command(
                    o, "member_add", at, member_id=member, tier=draw(st.sampled_from(list(TIERS)))
                )
            elif kind == "remove":
                item = command(o, "member_remove", at, member_id=member)
            elif kind == "set_tier":
                item = command(
                    o,
                    "member_set_tier",
                    at,
                    member_id=member,
                    tier=draw(st.sampled_from(list(TIERS))),
                )
            elif kind == "promo":
                item = command(
                    o,
                    "promo_grant",
                    at,
                    member_id=member,
                    grant_id=draw(st.sampled_from(["g1", "g2", "g3"])),
                    credits_mc=draw(st.sampled_from([1, 50, 600])) * C,
                    expires_at_ms=draw(
                        st.sampled_from(
                            # Shared instants make several grants expire at once.
                            [clock[o] + HOUR, clock[o] + 2 * DAY, T0 + 45 * DAY, T0 + 72 * DAY]
                        )
                    ),
                )
            elif kind == "request":
                item = command(
                    o,
                    "credit_request",
                    at,
                    member_id=member,
                    credits_mc=5 * C,
                    note=draw(st.sampled_from([None, "please"])),
                )
            elif kind == "tick":
                item = command(o, "tick", at)
            else:
                item = command(
                    o, "org_upsert", at, billing_anchor_day=draw(st.sampled_from([1, 15, 31]))
                )
            items.append(item)
            history[o].append(item)  # duplicates and replays within one batch too
        if items:
            batches.append((o, items))
    return batches


@pytest.fixture
async def diff_engine(redis_url: str, settings: Settings) -> Any:
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    await client.flushdb()
    engine = RedisEngine(client, settings.model_copy(update={"tiers": TIERS}), walk_budget=2)
    yield engine
    await client.aclose()


async def check_org(engine: RedisEngine, model: Model, org_id: str, log: list[Any]) -> None:
    view = await engine.load_org(org_id)
    assert view is not None
    assert await engine.state_view(org_id) == views.state(model, org_id)
    assert await engine.dashboard(org_id) == views.dashboard(model, org_id)
    assert check_invariants(view, log) == []
    active = [m for m in view.members.values() if m.active]
    assert await engine.counters(org_id) == {
        "alloc_left": sum(m.ag - m.au for m in active),
        "blocks": sum(m.bk for m in active),
        "debts": sum(m.debt for m in active),
        "next_alloc": sum(TIERS[m.next_tier] * C for m in active),
    }
    keys = engine.keys(org_id)
    paused = {m.decode() for m in await engine.client.zrange(keys.paused, 0, -1)}
    debtors = [m.decode() for m in await engine.client.zrange(keys.debtors, 0, -1)]
    assert paused == {m.member_id for m in active if m.paused}
    by_age = sorted((m for m in active if m.debt), key=lambda m: (m.dsince, m.member_id.encode()))
    assert debtors == [m.member_id for m in by_age]
    assert not await engine.client.hget(keys.org, "jb")  # no chunked work left behind


# A hang guard, not a speed target: 600 examples take ~30 s here (no example above 0.2 s in
# 3,000), but one CI run on a slower, busier machine of this kind needed more than 300 s.
@pytest.mark.timeout(900)
@settings(
    # 6x the profile's count: 600 under "ci" (~30 s), 120 under "dev".
    max_examples=6 * settings().max_examples,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=scenarios())
async def test_engine_matches_model(diff_engine: RedisEngine, batches: Any) -> None:
    run = next(_run)
    engine = diff_engine
    model = Model(tiers=TIERS)
    logs: dict[str, list[Any]] = {}
    for o, items in batches:
        org_id = f"org{o}"
        real = f"r{run}-{org_id}"
        # Refill ids are derived from the org id; the model sees the same org id as the engine.
        items = [_rename(i, org_id, real) for i in items]
        result = await engine.apply(real, items)
        got = ModelResult(result.outcomes, result.dicts)
        want = model.apply(real, items)
        assert got.outcomes == want.outcomes
        g_members, g_other = split_effects(got.effects)
        w_members, w_other = split_effects(want.effects)
        assert g_other == w_other
        assert g_members == w_members
        seqs = [e["seq"] for e in got.effects]
        assert seqs == sorted(set(seqs))
        logs.setdefault(real, []).extend(got.effects)
        if real in model.orgs:
            await check_org(engine, model, real, logs[real])
    for real, log in logs.items():
        assert as_dicts(await engine.outbox_pending(real)) == log


def _rename(item: Item, org_id: str, real: str) -> Item:
    if isinstance(item, CommandItem) and item.command.get("type") == "refill_result":
        c = dict(item.command)
        org, _, n = str(c["request_id"]).partition("|")
        c["request_id"] = derived_id("refill", real, n) if org == org_id else "unknown"
        return CommandItem(c, item.source, item.offset)
    return item
