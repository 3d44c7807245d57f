"""``schemas/openapi.json`` against the running app: every route registered in the app is
described, every described operation exists, and real answers of every route (their status
codes, media types and JSON bodies) conform to the document."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from api_stores import ACME, ADMIN, GLOBEX, Stores, api_settings, open_stores
from openapi_validator import schema_problems, validate

from worker import openapi
from worker.api_base import form_token, session_value
from worker.config import Settings

ENT = "/v1/orgs/{org_id}/members/{member_id}/entitlement"
BATCH_ITEMS = [
    {"org_id": "acme", "member_id": "alice"},
    {"org_id": "acme", "member_id": "bob"},
    {"org_id": "acme", "member_id": "nobody"},
    {"org_id": "no-such-org", "member_id": "x"},
]

# An operator's page session and the form tokens of its forms.
_SESSION = session_value(b"tok-admin", int(time.time()))
_FORM = {
    "Cookie": f"metering_session={_SESSION}",
    "Content-Type": "application/x-www-form-urlencoded",
}
_ACTION = "/orgs/{org_id}/actions/{action}"


def _form(org_id: str, **fields: str) -> bytes:
    token = form_token(b"tok-admin", _SESSION, org_id)
    return urlencode({"form_token": token, **fields}).encode()


# (operation path, method, URL, headers, JSON body (bytes: sent as is) or None, status)
CASES: list[tuple[str, str, str, dict[str, str], Any, int]] = [
    ("/v1/orgs/{org_id}/credits", "get", "/v1/orgs/acme/credits", ACME, None, 200),
    ("/v1/orgs/{org_id}/credits", "get", "/v1/orgs/acme/credits", {}, None, 401),
    ("/v1/orgs/{org_id}/credits", "get", "/v1/orgs/acme/credits", GLOBEX, None, 403),
    ("/v1/orgs/{org_id}/credits", "get", "/v1/orgs/nope/credits", ADMIN, None, 404),
    ("/v1/orgs/{org_id}/ledger", "get", "/v1/orgs/acme/ledger?limit=3", ACME, None, 200),
    ("/v1/orgs/{org_id}/ledger", "get", "/v1/orgs/acme/ledger?member_id=alice", ACME, None, 200),
    ("/v1/orgs/{org_id}/ledger", "get", "/v1/orgs/acme/ledger?limit=0", ACME, None, 400),
    ("/v1/orgs/{org_id}/ledger", "get", "/v1/orgs/acme/ledger", {}, None, 401),
    ("/v1/orgs/{org_id}/ledger", "get", "/v1/orgs/acme/ledger", GLOBEX, None, 403),
    ("/v1/orgs/{org_id}/ledger", "get", "/v1/orgs/%01/ledger", ADMIN, None, 404),
    ("/v1/orgs/{org_id}/ledger.csv", "get", "/v1/orgs/acme/ledger.csv", ACME, None, 200),
    ("/v1/orgs/{org_id}/ledger.csv", "get", "/v1/orgs/acme/ledger.csv?cycle=x", ACME, None, 400),
    ("/v1/orgs/{org_id}/ledger.csv", "get", "/v1/orgs/acme/ledger.csv", {}, None, 401),
    ("/v1/orgs/{org_id}/ledger.csv", "get", "/v1/orgs/acme/ledger.csv", GLOBEX, None, 403),
    ("/v1/orgs/{org_id}/ledger.csv", "get", "/v1/orgs/nope/ledger.csv", ADMIN, None, 404),
    (ENT, "get", "/v1/orgs/acme/members/alice/entitlement", ACME, None, 200),
    (ENT, "get", "/v1/orgs/acme/members/bob/entitlement", ACME, None, 200),
    (ENT, "get", "/v1/orgs/acme/members/alice/entitlement", {}, None, 401),
    (ENT, "get", "/v1/orgs/acme/members/alice/entitlement", GLOBEX, None, 403),
    (ENT, "get", "/v1/orgs/acme/members/nobody/entitlement", ACME, None, 404),
    (ENT, "get", "/v1/orgs/nope/members/alice/entitlement", ADMIN, None, 404),
    ("/v1/entitlements", "post", "/v1/entitlements", ADMIN, {"items": BATCH_ITEMS}, 200),
    ("/v1/entitlements", "post", "/v1/entitlements", ADMIN, {"items": "x"}, 400),
    ("/v1/entitlements", "post", "/v1/entitlements", {}, {"items": []}, 401),
    ("/v1/entitlements", "post", "/v1/entitlements", GLOBEX, {"items": BATCH_ITEMS}, 403),
    ("/orgs/{org_id}", "get", "/orgs/acme?token=tok-acme", {}, None, 200),
    ("/orgs/{org_id}", "get", "/orgs/acme", {}, None, 401),
    ("/orgs/{org_id}", "get", "/orgs/acme", GLOBEX, None, 403),
    ("/orgs/{org_id}", "get", "/orgs/nope", ADMIN, None, 404),
    ("/v1/orgs/{org_id}/admin", "get", "/v1/orgs/acme/admin", ACME, None, 200),
    ("/v1/orgs/{org_id}/admin", "get", "/v1/orgs/acme/admin", {}, None, 401),
    ("/v1/orgs/{org_id}/admin", "get", "/v1/orgs/acme/admin", GLOBEX, None, 403),
    ("/v1/orgs/{org_id}/admin", "get", "/v1/orgs/nope/admin", ADMIN, None, 404),
    (_ACTION, "post", "/orgs/acme/actions/pool-purchase", _FORM, _form("acme", credits="5"), 303),
    (_ACTION, "post", "/orgs/acme/actions/pool-purchase", _FORM, _form("acme", credits="x"), 400),
    (_ACTION, "post", "/orgs/acme/actions/tier-limit", {}, b"tier=pro&mode=none", 401),
    (_ACTION, "post", "/orgs/acme/actions/tier-limit", _FORM, b"tier=pro&mode=none", 403),
    (_ACTION, "post", "/orgs/%01/actions/pool-purchase", _FORM, _form("\x01", credits="5"), 404),
    ("/healthz", "get", "/healthz", {}, None, 200),
    ("/readyz", "get", "/readyz", {}, None, 200),
    ("/metrics", "get", "/metrics", {}, None, 200),
    ("/openapi.json", "get", "/openapi.json", {}, None, 200),
]

# The same routes with their stores down.
DOWN_CASES: list[tuple[str, str, str, dict[str, str], Any, int]] = [
    ("/v1/orgs/{org_id}/credits", "get", "/v1/orgs/acme/credits", ACME, None, 503),
    ("/v1/orgs/{org_id}/ledger", "get", "/v1/orgs/acme/ledger", ACME, None, 503),
    ("/v1/orgs/{org_id}/ledger.csv", "get", "/v1/orgs/acme/ledger.csv", ACME, None, 503),
    (ENT, "get", "/v1/orgs/acme/members/alice/entitlement", ACME, None, 503),
    ("/v1/entitlements", "post", "/v1/entitlements", ACME, {"items": BATCH_ITEMS[:1]}, 503),
    ("/orgs/{org_id}", "get", "/orgs/acme?token=tok-acme", {}, None, 503),
    ("/v1/orgs/{org_id}/admin", "get", "/v1/orgs/acme/admin", ACME, None, 503),
    (_ACTION, "post", "/orgs/acme/actions/pool-purchase", _FORM, _form("acme", credits="5"), 503),
    ("/readyz", "get", "/readyz", {}, None, 503),
]


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(openapi.path().read_bytes())
    return document


@pytest.fixture
async def stores(
    settings: Settings, pg_schema: str, redis_url: str, redis: Any
) -> AsyncIterator[Stores]:
    async with open_stores(api_settings(settings, pg_schema, redis_url)) as s:
        yield s


class _Down:
    """Every store at once, failing."""

    async def dashboard(self, org_id: str) -> Any:
        raise ConnectionError("down")

    async def admin_view(self, org_id: str) -> Any:
        raise ConnectionError("down")

    async def publish(self, command: Any) -> Any:
        raise ConnectionError("kafka down")

    async def entitlements(self, wanted: Any) -> Any:
        raise ConnectionError("down")

    async def page(self, *args: Any) -> Any:
        raise ConnectionError("down")

    async def start(self, org_id: str) -> Any:
        raise ConnectionError("down")


def _down_app(stores: Stores) -> web.Application:
    async def failing() -> bool:
        raise ConnectionError("down")

    down = _Down()
    return stores.app(
        engine=down,
        ledger=down,
        entitlements=down,
        export=down,
        admin_sink=down,
        ready_checks={"redis": failing},
    )


class _Sink:
    """Takes the page's commands without Kafka."""

    def __init__(self) -> None:
        self.commands: list[dict[str, Any]] = []

    async def publish(self, command: dict[str, Any]) -> dict[str, Any]:
        self.commands.append(command)
        return {"topic": "admin", "partition": 0, "offset": len(self.commands) - 1}


async def _check(
    doc: dict[str, Any], client: TestClient, case: tuple[str, str, str, dict[str, str], Any, int]
) -> None:
    template, method, url, headers, body, want = case
    client.session.cookie_jar.clear()  # each case brings its own credentials
    data = body if body is None or isinstance(body, bytes) else orjson.dumps(body)
    resp = await client.request(
        method.upper(), url, headers=headers, data=data, allow_redirects=False
    )
    raw = await resp.read()
    assert resp.status == want, (url, resp.status, raw[:300])
    responses = doc["paths"][template][method]["responses"]
    assert str(resp.status) in responses, f"{method} {template}: {resp.status} not documented"
    content = responses[str(resp.status)]["content"]
    media = resp.content_type
    assert media in content, f"{method} {template} {resp.status}: {media} not documented"
    if media == "application/json":
        problems = validate(doc, content[media]["schema"], orjson.loads(raw))
        assert problems == [], (method, url, problems)


async def test_real_answers_conform_to_the_document(doc: dict[str, Any], stores: Stores) -> None:
    sink = _Sink()
    async with TestClient(TestServer(stores.app(admin_sink=sink))) as client:
        for case in CASES:
            await _check(doc, client, case)
    assert [c["type"] for c in sink.commands] == ["pool_purchase"]
    async with TestClient(TestServer(_down_app(stores))) as client:
        for case in DOWN_CASES:
            await _check(doc, client, case)
    # Every documented operation, and every status of it, was answered for real at least once.
    seen = {(c[0], c[1], str(c[5])) for c in CASES + DOWN_CASES}
    for template, ops in doc["paths"].items():
        for method, op in ops.items():
            for status in op["responses"]:
                if status != "413":  # a body over 2 MiB: test_api_entitlement covers it
                    assert (template, method, status) in seen, (template, method, status)


def test_every_route_of_the_app_is_described(doc: dict[str, Any], settings: Settings) -> None:
    from worker.api import create_app

    app = create_app(settings)
    registered = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # aiohttp adds one per GET; it answers as the GET does
            continue
        resource = route.resource
        assert resource is not None
        template = resource.canonical
        registered.add((template, route.method.lower()))
        assert template in doc["paths"], f"route {template} is not in schemas/openapi.json"
        op = doc["paths"][template].get(route.method.lower())
        assert op is not None, f"{route.method} {template} is not in schemas/openapi.json"
        assert op["summary"] and op["responses"]
    documented = {(t, m) for t, ops in doc["paths"].items() for m in ops}
    assert documented == registered  # nothing described that the app does not serve


def test_document_uses_only_what_the_validator_checks(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1.")
    problems: list[str] = []
    for name, schema in doc["components"]["schemas"].items():
        problems += schema_problems(doc, schema, name)
    for template, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                for media, content in response["content"].items():
                    at = f"{method} {template} {status} {media}"
                    problems += schema_problems(doc, content["schema"], at)
    assert problems == []


def test_the_validator_catches_what_it_claims(doc: dict[str, Any]) -> None:
    entitlement = {"$ref": "#/components/schemas/Entitlement"}
    good = {
        "org_id": "acme",
        "member_id": "alice",
        "allowed": True,
        "active": True,
        "state": "running",
        "pause_reason": None,
        "remaining": "1.5",
        "pool_available": "0",
        "negative_balance": "0",
        "as_of_seq": 3,
    }
    assert validate(doc, entitlement, good) == []
    for change in (
        {"allowed": 1},
        {"remaining": 1.5},
        {"remaining": "1.2345"},
        {"state": "stopped"},
        {"pause_reason": "tired"},
        {"as_of_seq": -1},
        {"extra": 1},
        {"member_id": ""},
        {"member_id": "a\u0000b"},
    ):
        assert validate(doc, entitlement, {**good, **change}) != [], change
    missing = dict(good)
    del missing["allowed"]
    assert validate(doc, entitlement, missing) != []
    assert validate(doc, {"maxItems": 1, "items": {"type": "integer"}}, [1, 2]) != []
    assert validate(doc, {"exclusiveMinimum": 1}, 2) != []  # outside the subset: refused


async def test_served_document_is_the_checked_in_file(settings: Settings) -> None:
    from worker.api import create_app

    async with TestClient(TestServer(create_app(settings))) as client:
        resp = await client.get("/openapi.json")  # no token needed
        assert resp.status == 200
        assert await resp.read() == openapi.path().read_bytes()
    assert openapi.path().read_text(encoding="utf-8") == openapi.render()
