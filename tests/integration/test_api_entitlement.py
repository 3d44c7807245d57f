"""Entitlement checks over the production engine in Redis: a paused member is not allowed
until the pool is funded, the batch form agrees with the single one (and with the rules
model), one Redis read per call unit, and the API's auth and id rules."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from api_orgs import acme_items, build_model, build_redis_engine, command, globex_items, usage
from pydantic import SecretStr

from worker import views
from worker.api import create_app
from worker.api_entitlement import BATCH_MAX_ITEMS
from worker.config import Settings
from worker.engine import RedisEngine
from worker.model import Model

TOKENS = {"tok-acme": "acme", "tok-globex": "globex", "tok-admin": "*", "tok-initech": "initech"}
ACME = {"Authorization": "Bearer tok-acme"}
GLOBEX = {"Authorization": "Bearer tok-globex"}
ADMIN = {"Authorization": "Bearer tok-admin"}

ENTITLEMENT_KEYS = {
    "org_id",
    "member_id",
    "allowed",
    "active",
    "state",
    "pause_reason",
    "remaining",
    "pool_available",
    "negative_balance",
    "as_of_seq",
}


def initech_items() -> list[Any]:
    """``ann`` spends past her prorated allocation with an empty pool (paused, in debt);
    ``ben`` has not started; the org may be funded later by :func:`funding`."""
    return [
        command(1, "initech", "org_upsert", billing_anchor_day=1),
        command(2, "initech", "member_add", member_id="ann", tier="pro"),
        command(3, "initech", "member_add", member_id="ben", tier="pro"),
        usage(4, "ann", 600_000),
    ]


def funding() -> list[Any]:
    return [command(5, "initech", "pool_purchase", credits="5000")]


@pytest.fixture
def ent_settings(settings: Settings, redis_url: str, redis: Any) -> Settings:
    return settings.model_copy(
        update={
            "api_tokens": SecretStr(orjson.dumps(TOKENS).decode()),
            "redis_url": SecretStr(redis_url),
        }
    )


@pytest.fixture
async def engine(ent_settings: Settings) -> AsyncIterator[RedisEngine]:
    engine, _ = await build_redis_engine(ent_settings)
    result = await engine.apply("initech", initech_items())
    assert all(o.status == "applied" for o in result.outcomes)
    try:
        yield engine
    finally:
        await engine.client.aclose()


@pytest.fixture
async def client(ent_settings: Settings, engine: RedisEngine) -> AsyncIterator[TestClient]:
    app = create_app(ent_settings, engine=engine, entitlements=engine)
    async with TestClient(TestServer(app)) as c:
        yield c


def _path(org_id: str, member_id: str) -> str:
    from urllib.parse import quote

    return f"/v1/orgs/{quote(org_id, safe='')}/members/{quote(member_id, safe='')}/entitlement"


async def _get(client: TestClient, org_id: str, member_id: str, headers: dict[str, str]) -> Any:
    resp = await client.get(_path(org_id, member_id), headers=headers)
    return resp.status, orjson.loads(await resp.read())


async def _batch(client: TestClient, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await client.post("/v1/entitlements", data=raw, headers=headers)
    return resp.status, orjson.loads(await resp.read())


def _model() -> Model:
    model = build_model()[0]
    model.apply("initech", initech_items())
    return model


# --- What the runtime sees -----------------------------------------------------------------


async def test_a_paused_member_is_allowed_again_once_the_pool_is_funded(
    client: TestClient, engine: RedisEngine
) -> None:
    status, ann = await _get(client, "initech", "ann", {"Authorization": "Bearer tok-initech"})
    assert status == 200
    assert set(ann) == ENTITLEMENT_KEYS
    assert (ann["allowed"], ann["state"], ann["pause_reason"]) == (
        False,
        "paused",
        "pool_exhausted",
    )
    assert ann["remaining"] == "0" and ann["pool_available"] == "0"
    assert ann["negative_balance"] != "0"  # spent past her allocation: debt
    seq_before = ann["as_of_seq"]
    assert seq_before == await engine.last_seq("initech")
    status, ben = await _get(client, "initech", "ben", ADMIN)
    assert (status, ben["allowed"], ben["state"]) == (200, True, "running")

    # The admin buys pool credits (the command as the worker decodes and applies it).
    result = await engine.apply("initech", funding())
    assert all(o.status == "applied" for o in result.outcomes)
    assert any(e.get("signal") == "resume" and e["member_id"] == "ann" for e in result.dicts)

    status, ann = await _get(client, "initech", "ann", ADMIN)
    assert status == 200
    assert (ann["allowed"], ann["state"], ann["pause_reason"]) == (True, "running", None)
    assert ann["negative_balance"] == "0"  # the debt was paid first, from a pool block
    assert ann["as_of_seq"] > seq_before
    model = _model()
    model.apply("initech", funding())
    assert ann == views.entitlements(model, "initech", ["ann"])["ann"]  # type: ignore[index]


async def test_limit_reached_and_removed_members_are_not_allowed(client: TestClient) -> None:
    status, bob = await _get(client, "acme", "bob", ACME)
    assert status == 200
    assert (bob["allowed"], bob["pause_reason"], bob["pool_available"]) == (
        False,
        "member_limit_reached",
        "0",
    )
    status, carol = await _get(client, "acme", "<carol & co>", ACME)
    assert status == 200
    assert (carol["allowed"], carol["active"], carol["pause_reason"]) == (
        False,
        False,
        "member_removed",
    )
    status, alice = await _get(client, "acme", "alice", ACME)
    assert (status, alice["allowed"], alice["remaining"], alice["pool_available"]) == (
        200,
        True,
        "167.5",
        "1000",
    )


async def test_every_answer_equals_the_rules_view(client: TestClient) -> None:
    model = _model()
    for org_id, members in model.orgs.items():
        want = views.entitlements(model, org_id, list(members.members))
        assert want is not None
        for member_id, expected in want.items():
            status, got = await _get(client, org_id, member_id, ADMIN)
            assert (status, got) == (200, expected), (org_id, member_id)


# --- The batch form -------------------------------------------------------------------------


async def test_batch_agrees_with_the_single_form_for_every_member(
    client: TestClient, engine: RedisEngine
) -> None:
    model = _model()
    items = [
        {"org_id": org_id, "member_id": mid}
        for org_id, org in sorted(model.orgs.items())
        for mid in sorted(org.members)
    ]
    missing = [
        {"org_id": "acme", "member_id": "zed"},  # globex's member, not acme's
        {"org_id": "no-such-org", "member_id": "alice"},
        {"org_id": "acme", "member_id": "a\u0000b"},  # no member can have this id
        {"org_id": "x" * 129, "member_id": "alice"},
    ]
    body = {"items": [*items, *missing, items[0]]}  # a repeated item is answered twice
    calls = 0
    script = engine._entitlement

    async def counted(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await script(**kwargs)

    engine._entitlement = counted  # type: ignore[assignment]
    try:
        status, doc = await _batch(client, body, ADMIN)
    finally:
        engine._entitlement = script
    assert status == 200
    assert calls == 1  # three orgs on a single Redis: one script call
    results = doc["results"]
    assert len(results) == len(body["items"])
    for item, result in zip(body["items"], results, strict=True):
        assert (result["org_id"], result["member_id"]) == (item["org_id"], item["member_id"])
    for item, result in zip(items, results[: len(items)], strict=True):
        status, single = await _get(client, item["org_id"], item["member_id"], ADMIN)
        assert status == 200 and result == single
    assert results[-1] == results[0]
    marks = results[len(items) : len(items) + len(missing)]
    assert [m["message"] for m in marks] == [
        "unknown member",
        "unknown org",
        "unknown member",
        "unknown org",
    ]
    for m in marks:
        assert m["allowed"] is False and m["error"] == "not_found"

    # After funding, the two forms still agree (and ann flipped in both).
    await engine.apply("initech", funding())
    status, doc = await _batch(client, {"items": items}, ADMIN)
    assert status == 200
    for item, result in zip(items, doc["results"], strict=True):
        status, single = await _get(client, item["org_id"], item["member_id"], ADMIN)
        assert result == single
    ann = next(r for r in doc["results"] if r["member_id"] == "ann")
    assert ann["allowed"] is True


async def test_batch_limits_and_bad_bodies_are_400(client: TestClient) -> None:
    over = {"items": [{"org_id": "acme", "member_id": f"m{i}"} for i in range(1001)]}
    assert BATCH_MAX_ITEMS == 1000
    status, body = await _batch(client, over, ADMIN)
    assert (status, body["error"]) == (400, "bad_request")
    full = {"items": over["items"][:1000]}
    status, body = await _batch(client, full, ADMIN)
    assert status == 200 and len(body["results"]) == 1000
    assert all(r["message"] == "unknown member" for r in body["results"])
    for bad in (
        b"not json",
        b"[]",
        b"{}",
        b'{"items": {}}',
        b'{"items": [1]}',
        b'{"items": [{"org_id": "acme"}]}',
        b'{"items": [{"org_id": "acme", "member_id": 7}]}',
    ):
        status, body = await _batch(client, bad, ADMIN)
        assert (status, body["error"]) == (400, "bad_request"), bad
    status, body = await _batch(client, {"items": []}, ADMIN)
    assert (status, body) == (200, {"results": []})
    huge = io.BytesIO(b"{" + b" " * (3 * 1024 * 1024) + b"}")
    resp = await client.post("/v1/entitlements", data=huge, headers=ADMIN)
    assert resp.status == 413


# --- Auth and ids -----------------------------------------------------------------------------


async def test_no_token_is_401_on_both_forms(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "tok-acme"}):
        status, body = await _get(client, "acme", "alice", headers)
        assert (status, body["error"]) == (401, "unauthorized")
        status, body = await _batch(
            client, {"items": [{"org_id": "acme", "member_id": "alice"}]}, headers
        )
        assert (status, body["error"]) == (401, "unauthorized")
        assert "alice" not in orjson.dumps(body).decode()


async def test_another_orgs_token_is_403_without_data(client: TestClient) -> None:
    for org_id, member_id in (("acme", "alice"), ("acme", "nobody"), ("no-such-org", "x")):
        status, body = await _get(client, org_id, member_id, GLOBEX)
        assert (status, body["error"]) == (403, "forbidden")
    # One foreign org anywhere in the batch: the whole batch is refused.
    items = [{"org_id": "globex", "member_id": "zed"}, {"org_id": "acme", "member_id": "alice"}]
    resp = await client.post(
        "/v1/entitlements", data=orjson.dumps({"items": items}), headers=GLOBEX
    )
    raw = await resp.text()
    assert resp.status == 403 and orjson.loads(raw)["error"] == "forbidden"
    assert "alice" not in raw and "zed" not in raw
    # Its own org alone is fine.
    status, body = await _batch(client, {"items": items[:1]}, GLOBEX)
    assert status == 200 and body["results"][0]["allowed"] is True


async def test_unknown_and_impossible_ids_are_404(client: TestClient) -> None:
    for org_id, member_id, message in (
        ("no-such-org", "alice", "unknown org"),
        ("acme", "zed", "unknown member"),
        ("acme", "a\u0000b", "unknown member"),
        ("acme", "m" * 129, "unknown member"),
        ("a\u0001b", "alice", "unknown org"),
    ):
        status, body = await _get(client, org_id, member_id, ADMIN)
        assert (status, body["error"]) == (404, "not_found"), (org_id, member_id)
        assert message in body["message"]


async def test_ids_are_data(ent_settings: Settings, engine: RedisEngine) -> None:
    org_id, member_id = "{org}/:%20 \u202e", "m/{x}:%2F"
    items = [
        command(1, org_id, "org_upsert", billing_anchor_day=31),
        command(2, org_id, "member_add", member_id=member_id, tier="max"),
    ]
    assert all(o.status == "applied" for o in (await engine.apply(org_id, items)).outcomes)
    app = create_app(ent_settings, engine=engine, entitlements=engine)
    async with TestClient(TestServer(app)) as c:
        status, got = await _get(c, org_id, member_id, ADMIN)
        assert status == 200
        assert (got["org_id"], got["member_id"], got["allowed"]) == (org_id, member_id, True)
        status, doc = await _batch(
            c, {"items": [{"org_id": org_id, "member_id": member_id}]}, ADMIN
        )
        assert doc["results"] == [got]


async def test_a_failing_store_is_503(ent_settings: Settings) -> None:
    class Down:
        async def entitlements(self, wanted: Any) -> Any:
            raise ConnectionError("redis://:pw@cache down")

    app = create_app(ent_settings, entitlements=Down())
    async with TestClient(TestServer(app)) as c:
        status, body = await _get(c, "acme", "alice", ACME)
        assert (status, body["error"]) == (503, "unavailable")
        assert "pw" not in orjson.dumps(body).decode()
        status, body = await _batch(c, {"items": [{"org_id": "acme", "member_id": "a"}]}, ACME)
        assert (status, body["error"]) == (503, "unavailable")
        assert (await _get(c, "acme", "alice", {}))[0] == 401  # auth first


# --- Redis Cluster ----------------------------------------------------------------------------


async def test_entitlements_on_the_cluster_equal_the_rules(cluster_settings: Settings) -> None:
    engine = RedisEngine.from_settings(cluster_settings)
    try:
        for org_id, items in (
            ("acme", acme_items()),
            ("globex", globex_items()),
            ("initech", initech_items()),
        ):
            assert all(o.status == "applied" for o in (await engine.apply(org_id, items)).outcomes)
        model = _model()
        wanted = {o: [*sorted(org.members), "nobody"] for o, org in model.orgs.items()}
        wanted["no-such-org"] = ["x"]
        got = await engine.entitlements(wanted)
        assert got == {o: views.entitlements(model, o, ids) for o, ids in wanted.items()}
    finally:
        await engine.close()


async def test_checks_that_arrive_together_share_one_read(
    client: TestClient, engine: RedisEngine
) -> None:
    """Many runtimes asking at once: each gets its own member's answer (the same as when
    asked alone), unknown members and orgs still 404, and the answers came from fewer store
    reads than requests."""
    import asyncio

    from worker.api_entitlement import COALESCER_KEY

    asks = [("initech", "ann"), ("initech", "ben"), ("initech", "nobody"), ("ghost", "ann")] * 10
    alone = [await _get(client, org, mid, ADMIN) for org, mid in asks[:4]]
    coalescer = client.server.app[COALESCER_KEY]
    assert coalescer is not None
    reads = coalescer.reads
    together = await asyncio.gather(*(_get(client, org, mid, ADMIN) for org, mid in asks))
    assert together == alone * 10
    assert [status for status, _ in together[:4]] == [200, 200, 404, 404]
    assert coalescer.reads - reads < len(asks)
