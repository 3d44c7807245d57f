"""The read API over real stores (the Redis engine, the PostgreSQL ledger): auth (401/403,
never another org's data), the SPEC section 7 document, ledger paging, health, readiness and
metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from api_orgs import build_model, build_redis_engine
from api_stores import write_effects
from pydantic import SecretStr

from schemas.amounts import format_credits as format_mc
from worker import metrics, views
from worker.api import PgLedgerReader, create_app, decode_cursor, encode_cursor
from worker.config import Settings
from worker.connections import pg_connect_kwargs
from worker.engine import RedisEngine
from worker.ledger import migrate
from worker.model import Model

TOKENS = {"tok-acme": "acme", "tok-globex": "globex", "tok-admin": "*"}
ACME = {"Authorization": "Bearer tok-acme"}
GLOBEX = {"Authorization": "Bearer tok-globex"}
ADMIN = {"Authorization": "Bearer tok-admin"}

SECTION7_KEYS = {"org_id", "cycle_start", "reset_at", "pool", "members"}
POOL_KEYS = {"balance", "used_this_cycle", "locked", "refill_pending"}
MEMBER_KEYS = {
    "member_id",
    "tier",
    "active",
    "granted",
    "used",
    "remaining",
    "pool_drawn",
    "pool_limit",
    "negative_balance",
    "state",
    "pause_reason",
}


@pytest.fixture
def api_settings(settings: Settings, pg_schema: str, redis_url: str, redis: Any) -> Settings:
    """Tokens, a fresh ledger schema and this session's flushed Redis test database."""
    return settings.model_copy(
        update={
            "api_tokens": SecretStr(orjson.dumps(TOKENS).decode()),
            "postgres_schema": pg_schema,
            "redis_url": SecretStr(redis_url),
        }
    )


@pytest.fixture
async def stores(
    api_settings: Settings,
) -> AsyncIterator[tuple[Model, dict[str, Any], asyncpg.Pool, RedisEngine]]:
    """Both orgs applied by the production engine in Redis, its effects written to a fresh
    ledger schema the way the pipeline writes them; the rules model alongside for comparison."""
    model, model_effects = build_model()
    engine, effects = await build_redis_engine(api_settings)
    assert effects == model_effects  # the engine and the rules agree before the API is asked
    await migrate(api_settings)
    await write_effects(api_settings, effects)
    # The API's own pool: no search_path, its queries name the schema explicitly.
    pool = await asyncpg.create_pool(**pg_connect_kwargs(api_settings), min_size=1, max_size=2)
    try:
        yield model, effects, pool, engine
    finally:
        await pool.close()
        await engine.client.aclose()


@pytest.fixture
async def client(
    api_settings: Settings, stores: tuple[Model, dict[str, Any], asyncpg.Pool, RedisEngine]
) -> AsyncIterator[TestClient]:
    _, _, pool, engine = stores

    async def pg_ok() -> bool:
        return bool(await pool.fetchval("SELECT 1") == 1)

    app = create_app(
        api_settings,
        engine=engine,
        ledger=PgLedgerReader(pool, api_settings.postgres_schema),
        ready_checks={"postgres": pg_ok},
    )
    async with TestClient(TestServer(app)) as c:
        yield c


async def get_json(client: TestClient, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    resp = await client.get(path, headers=headers)
    return resp.status, orjson.loads(await resp.read())


# --- Auth --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dG9rLWFjbWU6"},
        {"Authorization": "tok-acme"},
        {"Authorization": "Bearer tok-acm"},
    ],
    ids=["none", "empty", "unknown", "basic", "no-scheme", "prefix"],
)
@pytest.mark.parametrize("path", ["/v1/orgs/acme/credits", "/v1/orgs/acme/ledger"])
async def test_missing_or_unknown_token_is_401(
    client: TestClient, headers: dict[str, str], path: str
) -> None:
    status, body = await get_json(client, path, headers)
    assert status == 401
    assert body["error"] == "unauthorized"
    assert "alice" not in orjson.dumps(body).decode()


async def test_bearer_bytes_that_are_not_text_are_401_not_500(client: TestClient) -> None:
    # Raw bytes on the wire (an HTTP client library would re-encode them): not UTF-8, UTF-8
    # that is not ASCII, a cut multi-byte character.
    import asyncio

    for raw in (b"Bearer \xff\xfe", b"Bearer caf\xc3\xa9", b"Bearer \xe2\x82"):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(
            b"GET /v1/orgs/acme/credits HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: " + raw + b"\r\n\r\n"
        )
        await writer.drain()
        reply = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
        assert b'"unauthorized"' in reply


async def test_an_org_id_no_org_can_have_is_404(client: TestClient) -> None:
    for org in ("a%00b", "%01", "x" * 129):
        status, body = await get_json(client, f"/v1/orgs/{org}/credits", ADMIN)
        assert (status, body["error"]) == (404, "not_found"), org
        status, body = await get_json(client, f"/v1/orgs/{org}/ledger", ADMIN)
        assert (status, body["error"]) == (404, "not_found"), org


async def test_query_token_is_not_accepted_by_the_json_api(client: TestClient) -> None:
    status, _ = await get_json(client, "/v1/orgs/acme/credits?token=tok-acme", {})
    assert status == 401


@pytest.mark.parametrize(
    "path",
    [
        "/v1/orgs/acme/credits",
        "/v1/orgs/acme/ledger",
        "/v1/orgs/acme/ledger?member_id=alice",
        "/v1/orgs/no-such-org/credits",
    ],
)
async def test_token_of_another_org_is_403_without_data(client: TestClient, path: str) -> None:
    resp = await client.get(path, headers=GLOBEX)
    raw = await resp.text()
    assert resp.status == 403
    assert orjson.loads(raw)["error"] == "forbidden"
    for secret in ("alice", "bob", "812.5", "1000"):
        assert secret not in raw


async def test_each_token_sees_only_its_org(client: TestClient) -> None:
    status, acme = await get_json(client, "/v1/orgs/acme/credits", ACME)
    assert status == 200 and acme["org_id"] == "acme"
    status, globex = await get_json(client, "/v1/orgs/globex/credits", GLOBEX)
    assert status == 200 and globex["org_id"] == "globex"
    assert {m["member_id"] for m in globex["members"]} == {"zed"}
    assert "zed" not in orjson.dumps(acme).decode()
    # The all-orgs token reads both, and the same documents.
    assert (await get_json(client, "/v1/orgs/acme/credits", ADMIN))[1] == acme
    assert (await get_json(client, "/v1/orgs/globex/credits", ADMIN))[1] == globex


async def test_health_and_metrics_need_no_token(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"postgres": True}
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert "metering_events_total" in text
    assert 'metering_http_requests_total{route="/readyz",status="200"}' in text


async def test_readyz_is_503_when_a_dependency_fails(api_settings: Settings) -> None:
    async def ok() -> bool:
        return True

    async def down() -> bool:
        raise ConnectionError("redis down")

    app = create_app(api_settings, ready_checks={"postgres": ok, "redis": down})
    async with TestClient(TestServer(app)) as c:
        resp = await c.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["checks"] == {"postgres": True, "redis": False}


# --- The SPEC section 7 document ---------------------------------------------------------------


async def test_credits_document_has_the_spec_shape_and_numbers(client: TestClient) -> None:
    status, doc = await get_json(client, "/v1/orgs/acme/credits", ACME)
    assert status == 200
    assert set(doc) == SECTION7_KEYS
    assert set(doc["pool"]) == POOL_KEYS
    assert doc["cycle_start"] == "2026-11-01T00:00:00Z"
    assert doc["reset_at"] == "2026-12-01T00:00:00Z"
    # 2000 purchased, alice and bob drew one 500-credit block each.
    assert doc["pool"] == {
        "balance": "1000",
        "used_this_cycle": "1000",
        "locked": False,
        "refill_pending": False,
    }
    members = {m["member_id"]: m for m in doc["members"]}
    assert set(members) == {"alice", "bob", "<carol & co>"}
    for m in members.values():
        assert set(m) == MEMBER_KEYS
        for key in ("granted", "used", "remaining", "pool_drawn", "negative_balance"):
            assert isinstance(m[key], str)  # amounts are decimal strings, never floats
    alice = members["alice"]
    assert (alice["used"], alice["pool_drawn"], alice["state"]) == ("812.5", "500", "running")
    assert alice["pool_limit"] is None
    bob = members["bob"]
    assert (bob["pool_limit"], bob["state"], bob["pause_reason"]) == (
        "500",
        "paused",
        "member_limit_reached",
    )
    assert bob["negative_balance"] != "0"
    assert members["<carol & co>"]["active"] is False


async def test_unknown_org_is_404(client: TestClient) -> None:
    status, body = await get_json(client, "/v1/orgs/no-such-org/credits", ADMIN)
    assert status == 404
    assert body["error"] == "not_found"


async def test_document_equals_the_rules_view(
    client: TestClient, stores: tuple[Model, dict[str, Any], asyncpg.Pool, RedisEngine]
) -> None:
    model = stores[0]
    for org_id, headers in (("acme", ACME), ("globex", GLOBEX)):
        status, doc = await get_json(client, f"/v1/orgs/{org_id}/credits", headers)
        assert status == 200
        assert doc == views.dashboard(model, org_id)


# --- Ledger ------------------------------------------------------------------------------------


async def _all_pages(
    client: TestClient, org_id: str, headers: dict[str, str], extra: str = "", limit: int = 4
) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        path = f"/v1/orgs/{org_id}/ledger?limit={limit}{extra}"
        if cursor:
            path += f"&cursor={cursor}"
        status, body = await get_json(client, path, headers)
        assert status == 200, body
        assert len(body["entries"]) <= limit
        entries.extend(body["entries"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(body["entries"]) == limit  # only the last page may be short
        assert pages < 100
    return entries


async def test_ledger_pages_cover_every_entry_once_newest_first(
    client: TestClient, stores: tuple[Model, dict[str, Any], asyncpg.Pool, RedisEngine]
) -> None:
    effects = stores[1]
    expected = sorted(
        (e for e in effects["acme"] if e["kind"] == "ledger"), key=lambda e: -e["seq"]
    )
    assert len(expected) > 8  # several pages of 4
    entries = await _all_pages(client, "acme", ACME)
    assert [e["seq"] for e in entries] == [e["seq"] for e in expected]
    first, want = entries[-1], expected[-1]
    assert first["member_id"] == want["member_id"]
    assert first["movement"] == want["movement"] and first["bucket"] == want["bucket"]
    assert first["amount"] == format_mc(want["amount_mc"])
    assert first["at"].endswith("Z")
    assert "org_id" not in first and "amount_mc" not in first
    # Amounts are signed decimal credit strings: usage debits are negative.
    debit = next(e for e in entries if e["source_kind"] == "usage" and e["member_id"] == "alice")
    assert debit["amount"].startswith("-")


async def test_ledger_member_filter_and_org_isolation(
    client: TestClient, stores: tuple[Model, dict[str, Any], asyncpg.Pool, RedisEngine]
) -> None:
    effects = stores[1]
    alice = await _all_pages(client, "acme", ACME, "&member_id=alice", limit=2)
    assert alice and {e["member_id"] for e in alice} == {"alice"}
    assert len(alice) == sum(
        1 for e in effects["acme"] if e["kind"] == "ledger" and e["member_id"] == "alice"
    )
    globex = await _all_pages(client, "globex", GLOBEX)
    assert globex and {e["member_id"] for e in globex} <= {"zed", None}
    # Another org's member id used as a filter finds nothing in this org.
    assert await _all_pages(client, "acme", ACME, "&member_id=zed") == []


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "cursor=not-a-cursor",
        f"cursor={encode_cursor(5)}x",
        f"cursor={encode_cursor(2**63)}",  # past a PostgreSQL bigint
        f"cursor={encode_cursor(10**19 - 1)}",
        "member_id=%00",
        "member_id=" + "m" * 129,
    ],
)
async def test_ledger_rejects_bad_paging_parameters(client: TestClient, query: str) -> None:
    status, body = await get_json(client, f"/v1/orgs/acme/ledger?{query}", ACME)
    assert status == 400
    assert body["error"] == "bad_request"


def test_cursor_is_opaque_and_round_trips() -> None:
    cursor = encode_cursor(123456789)
    assert "123456789" not in cursor
    assert decode_cursor(cursor) == 123456789
    with pytest.raises(ValueError):
        decode_cursor("bDE6LTE")  # "l1:-1"


async def test_requests_are_counted_by_route_and_status(client: TestClient) -> None:
    def count(status: str) -> float:
        value = metrics.REGISTRY.get_sample_value(
            "metering_http_requests_total",
            {"route": "/v1/orgs/{org_id}/credits", "status": status},
        )
        return value or 0.0

    before = count("403")
    await client.get("/v1/orgs/acme/credits", headers=GLOBEX)
    assert count("403") == before + 1


async def test_a_failing_store_is_503_not_a_stack_trace(api_settings: Settings) -> None:
    class DownEngine:
        async def dashboard(self, org_id: str) -> dict[str, Any] | None:
            raise ConnectionError("redis://:pw@cache down")

        async def admin_view(self, org_id: str) -> dict[str, Any] | None:
            raise ConnectionError("redis://:pw@cache down")

    class DownLedger:
        async def page(self, *args: Any) -> list[dict[str, Any]]:
            raise ConnectionRefusedError("postgres down")

    app = create_app(api_settings, engine=DownEngine(), ledger=DownLedger())
    async with TestClient(TestServer(app)) as c:
        for path in ("/v1/orgs/acme/credits", "/v1/orgs/acme/ledger", "/v1/orgs/acme/admin"):
            resp = await c.get(path, headers=ACME)
            assert resp.status == 503
            body = await resp.json()
            assert body["error"] == "unavailable"
            assert "pw" not in orjson.dumps(body).decode()
        page = await c.get("/orgs/acme?token=tok-acme")
        assert page.status == 503
        assert "pw" not in await page.text()
        # Auth still comes first: a bad token learns nothing about the stores.
        assert (await c.get("/v1/orgs/acme/credits")).status == 401
