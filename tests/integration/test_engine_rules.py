"""The SPEC table of ``tests/unit/test_model_rules.py`` run through the Redis Lua engine.

Each scenario runs on the engine and on the model side by side: the scenario's own assertions
check the engine's results, and after every call the engine's outcomes, effects and state must
equal the model's.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from unit.test_model_rules import SCENARIOS

from worker import views
from worker.config import Settings
from worker.engine import RedisEngine
from worker.model import Item, Model, ModelResult, check_invariants


class EngineHarness:
    """RedisEngine behind the scenario harness, shadowed by the model."""

    def __init__(self, engine: RedisEngine) -> None:
        self.engine = engine
        self.model = Model()
        self.effects: dict[str, list[dict[str, Any]]] = {}

    async def run(self, org: str, *items: Item) -> ModelResult:
        result = await self.engine.apply(org, list(items))
        got = ModelResult(result.outcomes, result.dicts)
        want = self.model.apply(org, list(items))
        assert got.outcomes == want.outcomes
        assert got.effects == want.effects
        self.effects.setdefault(org, []).extend(got.effects)
        view = await self.engine.load_org(org)
        assert (view is None) == (org not in self.model.orgs)
        if view is not None:
            assert check_invariants(view, self.effects[org]) == []
            assert await self.engine.state_view(org) == views.state(self.model, org)
        return got

    async def state(self, org: str) -> dict[str, Any]:
        view = await self.engine.state_view(org)
        assert view is not None
        return view

    async def dashboard(self, org: str) -> dict[str, Any] | None:
        got = await self.engine.dashboard(org)
        assert got == views.dashboard(self.model, org)
        return got


@pytest.fixture
async def engine(redis_url: str, settings: Settings) -> RedisEngine:
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    await client.flushdb()
    return RedisEngine(client, settings)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_rule_on_redis(name: str, engine: RedisEngine) -> None:
    await SCENARIOS[name](EngineHarness(engine))
    await engine.client.aclose()
