"""Entitlement checks for the agent runtime: may this member start a task now?

- ``GET /v1/orgs/{org_id}/members/{member_id}/entitlement``: one member.
- ``POST /v1/entitlements`` with ``{"items": [{"org_id": ..., "member_id": ...}, ...]}``: up to
  :data:`BATCH_MAX_ITEMS` members of any orgs the token may read, answered in request order.

Both read live state from Redis in one read-only script call (per call unit: one call on a
single Redis), through ``RedisEngine.entitlements``; the answer is ``views.entitlement_view``.
``allowed`` is false exactly when the control topic's latest signal for the member is a
``pause`` (a removed member is paused with ``member_removed``), so the runtime and the
orchestrator never disagree. ``as_of_seq`` is the org's last applied effect seq in Redis.

Single checks that arrive together (the requests one turn of the event loop reads) are
answered by one store read (:class:`Coalescer`): under load the Redis round trip and client
work are shared by a few requests, and a lone request waits for nothing but its own turn.

Auth is the other endpoints': 401 without a known token, 403 when the token may not read the
org (in a batch: any item's org), then 404 for an unknown org or member on the single form; in
a batch an unknown org or member is an item ``{"org_id", "member_id", "allowed": false,
"error": "not_found", "message"}``, so a client that only reads ``allowed`` fails closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import orjson
from aiohttp import web

from schemas.ids import is_valid_id
from worker.api_base import (
    StoreUnavailable,
    authorize,
    dumps,
    json_error,
    may_read,
    read_store,
    request_scope,
)

BATCH_MAX_ITEMS = 1_000
"""Members per ``POST /v1/entitlements`` at most (more: 400)."""

BATCH_MAX_BODY_BYTES = 2 * 1024 * 1024
"""Request body limit of the app: 1,000 items of two 128-character ids fit with room to spare."""

_NO_STORE = {"Cache-Control": "no-store"}

Entitlements = dict[str, dict[str, dict[str, Any] | None] | None]


class EntitlementSource(Protocol):
    """What the entitlement routes need from the engine (``RedisEngine.entitlements``)."""

    async def entitlements(self, wanted: Mapping[str, Sequence[str]]) -> Entitlements:
        """Per org, each listed member's entitlement (None: unknown member), or None for an
        unknown org."""


COALESCE_MAX = 256
"""Single checks answered by one store read at most (the rest go in the next read)."""


class Coalescer:
    """One store read for the single checks waiting at the same moment.

    The first check to arrive schedules a read for the end of the current turn of the event
    loop; the checks that arrive before it runs join it (their orgs' member lists merged), and
    each gets its own part of the answer. A store error reaches every check of the read (each
    then retries once, as any read does, ``read_store``). Reads only: nothing can be left
    half-done by a crash.
    """

    def __init__(self, source: EntitlementSource) -> None:
        self._source = source
        self._waiting: list[tuple[Mapping[str, Sequence[str]], asyncio.Future[Entitlements]]] = []
        self._reads: set[asyncio.Task[None]] = set()
        self.reads = 0  # store reads made (for tests and figures)

    async def entitlements(self, wanted: Mapping[str, Sequence[str]]) -> Entitlements:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Entitlements] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._start)
        self._waiting.append((wanted, fut))
        if len(self._waiting) >= COALESCE_MAX:
            self._start()
        return await fut

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        if batch:
            task = asyncio.ensure_future(self._read(batch))
            self._reads.add(task)
            task.add_done_callback(self._reads.discard)

    async def _read(
        self, batch: list[tuple[Mapping[str, Sequence[str]], asyncio.Future[Entitlements]]]
    ) -> None:
        merged: dict[str, list[str]] = {}
        for wanted, _ in batch:
            for org_id, ids in wanted.items():
                merged.setdefault(org_id, []).extend(ids)
        self.reads += 1
        try:
            result = await self._source.entitlements(merged)
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for wanted, fut in batch:
            if fut.done():  # the request went away meanwhile
                continue
            part: Entitlements = {}
            for org_id, ids in wanted.items():
                found = result.get(org_id)
                part[org_id] = None if found is None else {m: found.get(m) for m in ids}
            fut.set_result(part)


ENTITLEMENT_KEY: web.AppKey[EntitlementSource | None] = web.AppKey("entitlements")
COALESCER_KEY: web.AppKey[Coalescer | None] = web.AppKey("entitlement_coalescer")


async def _read(
    request: web.Request, wanted: Mapping[str, Sequence[str]], *, single: bool = False
) -> Entitlements:
    source: EntitlementSource | None = request.app[ENTITLEMENT_KEY]
    if single:
        source = request.app[COALESCER_KEY] or source
    if source is None:
        raise StoreUnavailable("entitlement source not configured")
    org = next(iter(wanted), None) if len(wanted) == 1 else None
    result: Entitlements = await read_store(lambda: source.entitlements(wanted), "entitlement", org)
    return result


async def entitlement_handler(request: web.Request) -> web.Response:
    """``GET /v1/orgs/{org_id}/members/{member_id}/entitlement``."""
    org_id = request.match_info["org_id"]
    member_id = request.match_info["member_id"]
    denied = authorize(request, org_id, allow_query=False)
    if denied is not None:
        return denied
    if not is_valid_id(member_id):  # no such member can exist: never sent to a store
        return json_error(404, "not_found", "unknown member")
    try:
        found = await _read(request, {org_id: [member_id]}, single=True)
    except StoreUnavailable as exc:
        return json_error(503, "unavailable", str(exc))
    members = found.get(org_id)
    if members is None:
        return json_error(404, "not_found", f"unknown org {org_id!r}")
    entitlement = members.get(member_id)
    if entitlement is None:
        return json_error(404, "not_found", f"unknown member {member_id!r}")
    return web.json_response(entitlement, dumps=dumps, headers=_NO_STORE)


def _batch_items(body: bytes) -> list[tuple[str, str]] | str:
    """The ``(org_id, member_id)`` pairs of a batch body, or why it is a bad request."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "body must be JSON"
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        return 'body must be {"items": [{"org_id": ..., "member_id": ...}, ...]}'
    raw = doc["items"]
    if len(raw) > BATCH_MAX_ITEMS:
        return f"at most {BATCH_MAX_ITEMS} items per request, got {len(raw)}"
    items: list[tuple[str, str]] = []
    for n, item in enumerate(raw):
        if not isinstance(item, dict):
            return f"items[{n}] must be an object"
        org_id, member_id = item.get("org_id"), item.get("member_id")
        if not isinstance(org_id, str) or not isinstance(member_id, str):
            return f"items[{n}]: org_id and member_id must be strings"
        items.append((org_id, member_id))
    return items


def _missing(org_id: str, member_id: str, what: str) -> dict[str, Any]:
    return {
        "org_id": org_id,
        "member_id": member_id,
        "allowed": False,
        "error": "not_found",
        "message": f"unknown {what}",
    }


async def entitlements_handler(request: web.Request) -> web.Response:
    """``POST /v1/entitlements``: ``{"results": [...]}``, one per item, in request order."""
    scope = request_scope(request)
    if scope is None:
        return json_error(401, "unauthorized", "missing or unknown bearer token")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return json_error(413, "bad_request", f"body over {BATCH_MAX_BODY_BYTES} bytes")
    items = _batch_items(body)
    if isinstance(items, str):
        return json_error(400, "bad_request", items)
    if any(not may_read(scope, org_id) for org_id, _ in items):
        return json_error(403, "forbidden", "token is not valid for an org of the batch")
    wanted: dict[str, list[str]] = {}
    for org_id, member_id in items:
        # Ids outside the alphabet name nothing that can exist: never sent to a store.
        if is_valid_id(org_id):
            ids = wanted.setdefault(org_id, [])
            if is_valid_id(member_id):
                ids.append(member_id)
    try:
        found = await _read(request, wanted) if wanted else {}
    except StoreUnavailable as exc:
        return json_error(503, "unavailable", str(exc))
    results: list[dict[str, Any]] = []
    for org_id, member_id in items:
        members = found.get(org_id)
        if members is None:
            results.append(_missing(org_id, member_id, "org"))
            continue
        entitlement = members.get(member_id)
        results.append(entitlement or _missing(org_id, member_id, "member"))
    return web.json_response({"results": results}, dumps=dumps, headers=_NO_STORE)
