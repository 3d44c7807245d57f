"""The API's stores for the API tests: the ``api_orgs`` orgs applied by the production engine
in Redis, their effects written to a fresh ledger schema the way the pipeline writes them, and
an app over both (``create_app`` with every source)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from api_orgs import build_redis_engine
from pydantic import SecretStr

from worker.api import PgLedgerReader, create_app
from worker.api_export import PgLedgerExport
from worker.config import Settings
from worker.connections import pg_connect_kwargs
from worker.effects import from_dict
from worker.engine import RedisEngine
from worker.ledger import FlushBatch, Ledger, migrate
from worker.model import Item

TOKENS = {"tok-acme": "acme", "tok-globex": "globex", "tok-admin": "*"}
ACME = {"Authorization": "Bearer tok-acme"}
GLOBEX = {"Authorization": "Bearer tok-globex"}
ADMIN = {"Authorization": "Bearer tok-admin"}


def api_settings(settings: Settings, pg_schema: str, redis_url: str) -> Settings:
    """Tokens, a fresh ledger schema and the session's flushed Redis test database."""
    return settings.model_copy(
        update={
            "api_tokens": SecretStr(orjson.dumps(TOKENS).decode()),
            "postgres_schema": pg_schema,
            "redis_url": SecretStr(redis_url),
        }
    )


@dataclass
class Stores:
    engine: RedisEngine
    pool: asyncpg.Pool
    settings: Settings
    effects: dict[str, list[dict[str, Any]]]

    async def apply(self, org_id: str, items: Sequence[Item]) -> list[dict[str, Any]]:
        """Apply items through the engine and write their effects to the ledger (as the
        pipeline does), returning the effects."""
        result = await self.engine.apply(org_id, items)
        assert all(o.status == "applied" for o in result.outcomes), result.outcomes
        await write_effects(self.settings, {org_id: result.dicts})
        self.effects.setdefault(org_id, []).extend(result.dicts)
        return result.dicts

    def app(self, **overrides: Any) -> web.Application:
        async def pg_ok() -> bool:
            return bool(await self.pool.fetchval("SELECT 1") == 1)

        kwargs: dict[str, Any] = {
            "engine": self.engine,
            "ledger": PgLedgerReader(self.pool, self.settings.postgres_schema),
            "entitlements": self.engine,
            "export": PgLedgerExport(self.pool, self.settings.postgres_schema),
            "ready_checks": {"postgres": pg_ok},
        }
        kwargs.update(overrides)
        return create_app(self.settings, **kwargs)


async def write_effects(
    settings: Settings, effects: Mapping[str, Iterable[Mapping[str, Any]]]
) -> None:
    ledger = await Ledger.connect(settings)
    try:
        batch = FlushBatch()
        for org_id, org_effects in effects.items():
            batch.add_effects(from_dict({"org_id": org_id, **e}) for e in org_effects)
        await ledger.write(batch)
    finally:
        await ledger.close()


@asynccontextmanager
async def open_stores(settings: Settings) -> AsyncIterator[Stores]:
    """``acme`` and ``globex`` in Redis and in a migrated ledger schema; the API's own pool
    (no search_path: its queries name the schema)."""
    engine, effects = await build_redis_engine(settings)
    await migrate(settings)
    await write_effects(settings, effects)
    pool = await asyncpg.create_pool(**pg_connect_kwargs(settings), min_size=1, max_size=2)
    try:
        yield Stores(engine, pool, settings, effects)
    finally:
        await pool.close()
        await engine.client.aclose()
