"""After a Redis restart every API read succeeds: a pooled connection that Redis dropped is
retried once on a fresh one, never answered with 503."""

from __future__ import annotations

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from api_orgs import build_redis_engine
from pydantic import SecretStr
from scenario_harness import PrivateRedis

from worker.api import create_app
from worker.config import Settings

pytestmark = pytest.mark.timeout(120)

ACME = {"Authorization": "Bearer tok-acme"}


async def test_every_read_succeeds_after_a_redis_restart(
    settings: Settings, private_redis: PrivateRedis
) -> None:
    node = private_redis
    s = settings.model_copy(
        update={
            "redis_url": SecretStr(node.url),
            "api_tokens": SecretStr(orjson.dumps({"tok-acme": "acme"}).decode()),
        }
    )
    engine, _ = await build_redis_engine(s)
    try:
        app = create_app(s, engine=engine)
        async with TestClient(TestServer(app)) as c:
            first = await c.get("/v1/orgs/acme/credits", headers=ACME)
            assert first.status == 200
            want = await first.json()
            for _ in range(2):  # twice: each restart drops every pooled connection
                node.stop()  # a clean shutdown: the AOF keeps every write
                await node.start()
                for _ in range(3):
                    resp = await c.get("/v1/orgs/acme/credits", headers=ACME)
                    assert resp.status == 200, await resp.text()
                    assert await resp.json() == want
    finally:
        await engine.close()
