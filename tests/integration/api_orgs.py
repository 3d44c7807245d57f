"""Two small orgs for the API and dashboard tests, built through the real decoders and rules.

``build_model`` applies them to the rules model, ``build_redis_engine`` to the production
engine in Redis. ``acme`` has a pool, a pro member who drew a block, a max member capped by a
pool limit who ran into debt and is paused, a promo grant, and a removed member; ``globex`` is
a second org whose data must never appear in answers about ``acme``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson

from schemas import Rejection, decode_admin
from worker.config import Settings
from worker.engine import RedisEngine
from worker.model import CommandItem, Model, UsageItem

T0 = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)


def _at(minutes: int) -> str:
    return (T0 + dt.timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def _ms(minutes: int) -> int:
    return int((T0 + dt.timedelta(minutes=minutes)).timestamp() * 1000)


def _cmd(n: int, org_id: str, type_: str, **fields: Any) -> CommandItem:
    raw = {"type": type_, "command_id": f"{org_id}-c{n}", "org_id": org_id, "at": _at(n)}
    raw.update(fields)
    # Decoded as the worker decodes it, with a wall clock late enough for any test's commands.
    record = decode_admin(orjson.dumps(raw), now_ms=_ms(10**6), tiers=("pro", "max"))
    assert not isinstance(record, Rejection), record
    return CommandItem(command=record.command, source="test:0", offset=n)


def _use(n: int, member: str, credits_mc: int, task_id: str | None = None) -> UsageItem:
    task = f"task-{n}" if task_id is None else task_id
    return UsageItem(f"ev-{member}-{n}", member, task, credits_mc, _ms(n), "test:0", n)


command = _cmd
"""An admin command of the org at minute ``n`` after ``T0`` (offset ``n``), decoded as the
worker decodes it."""

usage = _use
"""A usage event of a member at minute ``n`` after ``T0`` (offset ``n``)."""


def acme_items() -> list[CommandItem | UsageItem]:
    """Items of ``acme`` in order."""
    return [
        _cmd(1, "acme", "org_upsert", billing_anchor_day=1),
        _cmd(2, "acme", "member_add", member_id="alice", tier="pro"),
        _cmd(3, "acme", "member_add", member_id="bob", tier="max"),
        _cmd(4, "acme", "member_add", member_id="<carol & co>", tier="pro"),
        _cmd(5, "acme", "pool_purchase", credits="2000"),
        _cmd(6, "acme", "member_limit_set", member_id="bob", limit="500"),
        _cmd(
            7,
            "acme",
            "promo_grant",
            member_id="alice",
            grant_id="welcome",
            credits="20",
            expires_at="2027-01-01T00:00:00Z",
        ),
        _use(8, "alice", 812_500),
        _use(9, "bob", 16_000_000),
        _use(10, "<carol & co>", 100_250),
        _cmd(11, "acme", "member_remove", member_id="<carol & co>"),
    ]


def globex_items() -> list[CommandItem | UsageItem]:
    """Items of ``globex`` in order."""
    return [
        _cmd(1, "globex", "org_upsert", billing_anchor_day=15),
        _cmd(2, "globex", "member_add", member_id="zed", tier="max"),
        _cmd(3, "globex", "pool_purchase", credits="999"),
        _use(4, "zed", 1_500),
    ]


def build_model() -> tuple[Model, dict[str, list[dict[str, Any]]]]:
    """The model with both orgs applied, and the effects per org."""
    model = Model(tiers={"pro": 500, "max": 15_000})
    effects: dict[str, list[dict[str, Any]]] = {}
    for org_id, items in (("acme", acme_items()), ("globex", globex_items())):
        result = model.apply(org_id, items)
        assert all(o.status == "applied" for o in result.outcomes), result.outcomes
        effects[org_id] = result.effects
    return model, effects


async def build_redis_engine(
    settings: Settings,
) -> tuple[RedisEngine, dict[str, list[dict[str, Any]]]]:
    """Both orgs applied through the production engine (Redis Lua) with ``settings``' Redis."""
    engine = RedisEngine.from_settings(settings)
    effects: dict[str, list[dict[str, Any]]] = {}
    for org_id, items in (("acme", acme_items()), ("globex", globex_items())):
        result = await engine.apply(org_id, items)
        assert all(o.status == "applied" for o in result.outcomes), result.outcomes
        effects[org_id] = result.dicts
    return engine, effects
