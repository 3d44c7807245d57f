"""HTTP read API, admin dashboard page, health and metrics (aiohttp).

Routes (every one described in ``schemas/openapi.json``):

- ``GET /v1/orgs/{org_id}/credits``: the live dashboard JSON of SPEC section 7, from Redis.
- ``GET /v1/orgs/{org_id}/ledger?member_id=&cursor=&limit=``: ledger entries from PostgreSQL,
  newest first, keyset-paged by ``seq`` with an opaque cursor.
- ``GET /v1/orgs/{org_id}/ledger.csv?cycle=YYYY-MM-DD``: one cycle's ledger as streamed CSV
  for finance (``worker/api_export.py``).
- ``GET /v1/orgs/{org_id}/members/{member_id}/entitlement`` and ``POST /v1/entitlements``
  (up to 1,000 members): may a member start a task now, from Redis in one read
  (``worker/api_entitlement.py``).
- ``GET /orgs/{org_id}``: the admin page (HTML, reloads itself), ``GET
  /v1/orgs/{org_id}/admin`` (its document as JSON) and the page's form posts
  ``POST /orgs/{org_id}/actions/...``, which publish admin commands (``worker/api_admin.py``).
- ``GET /healthz`` (process alive), ``GET /readyz`` (Kafka, Redis, PostgreSQL reachable),
  ``GET /metrics`` (Prometheus text), ``GET /openapi.json`` (the API's OpenAPI 3.1 document,
  ``worker/openapi.py``).

Reads need ``Authorization: Bearer <token>`` (the page also accepts ``?token=`` and its session
cookie); tokens come from ``Settings.api_tokens`` with a grant each (``worker/tokens.py``: an
org or ``"*"``, role ``read`` or ``admin``). A token scoped to one org gets
403 on every other org (in a batch: when any item names another org), so no response ever
carries another org's data. Health, readiness, metrics and the OpenAPI document are open.
Auth, errors and the store retry are shared through ``worker/api_base.py``.

The app runs inside the worker process (``serve_worker_http``, called by the runner) or
standalone via ``metering api`` (``run_api``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, suppress
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from schemas.amounts import format_credits
from schemas.ids import is_valid_id
from schemas.timestamps import format_timestamp
from worker import metrics
from worker.admin_commands import AdminPublisher
from worker.admin_store import AdminHistorySource, PgAdminHistory
from worker.api_admin import CommandSink, add_admin_routes
from worker.api_base import (
    AUTH_KEY,
    SETTINGS_KEY,
    StoreUnavailable,
    TokenAuth,
    authorize,
    dumps,
    json_error,
    org_document,
    read_store,
)
from worker.api_entitlement import (
    BATCH_MAX_BODY_BYTES,
    COALESCER_KEY,
    ENTITLEMENT_KEY,
    Coalescer,
    EntitlementSource,
    entitlement_handler,
    entitlements_handler,
)
from worker.api_export import EXPORT_KEY, LedgerExportSource, PgLedgerExport, ledger_csv_handler
from worker.openapi import openapi_handler
from worker.sqlfiles import named_queries, quote_ident

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.contract import Engine

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[bool]]

LEDGER_DEFAULT_LIMIT = 100
LEDGER_MAX_LIMIT = 1_000
_CURSOR_PREFIX = b"l1:"
_READY_TIMEOUT_SECONDS = 2.0


class DashboardSource(Protocol):
    """What the API needs from the engine: ``RedisEngine.dashboard`` (SPEC section 7 JSON)."""

    def dashboard(self, org_id: str) -> Any:
        """The dashboard dict of ``org_id``, or ``None`` for an unknown org (may be async)."""

    async def admin_view(self, org_id: str) -> dict[str, Any] | None:
        """The admin page's document of ``org_id`` (``views.admin_view``), None if unknown."""


class LedgerSource(Protocol):
    """Reads ledger pages; ``PgLedgerReader`` is the PostgreSQL implementation."""

    async def page(
        self, org_id: str, member_id: str | None, before_seq: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` entries of the org with ``seq < before_seq``, newest first."""


# --- Named queries ---------------------------------------------------------------------------
API_QUERIES = named_queries("api_queries.sql")


class PgLedgerReader:
    """Ledger pages from PostgreSQL through the named query ``ledger_page``.

    The schema name is the only thing put into the SQL text (quoted as an identifier; it comes
    from settings, never from a request); every value is an asyncpg ``$n`` parameter.
    """

    def __init__(self, pool: Any, schema: str) -> None:
        self._pool = pool
        quoted = quote_ident(schema)
        self._org_sql = API_QUERIES["ledger_page"].replace("{schema}", quoted)
        self._member_sql = API_QUERIES["ledger_page_member"].replace("{schema}", quoted)

    async def page(
        self, org_id: str, member_id: str | None, before_seq: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` entries of the org with ``seq < before_seq``, newest first."""
        if member_id is None:
            rows = await self._pool.fetch(self._org_sql, org_id, before_seq, limit)
        else:
            rows = await self._pool.fetch(self._member_sql, org_id, member_id, before_seq, limit)
        return [dict(r) for r in rows]


def _ledger_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key == "org_id":
            continue
        if key == "amount_mc":
            out["amount"] = format_credits(int(value))
        elif key.endswith("_ms") and (value is None or isinstance(value, int)):
            out[key.removesuffix("_ms")] = None if value is None else format_timestamp(value)
        elif isinstance(value, dt.datetime):
            out[key] = value.isoformat()
        else:
            out[key] = value
    return out


_MAX_SEQ = 2**63 - 1  # a PostgreSQL bigint


def encode_cursor(seq: int) -> str:
    """Opaque cursor for the next page (entries with a smaller ``seq``)."""
    return base64.urlsafe_b64encode(_CURSOR_PREFIX + str(seq).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Inverse of ``encode_cursor``; ``ValueError`` for anything it did not produce."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid cursor") from exc
    if not raw.startswith(_CURSOR_PREFIX):
        raise ValueError("invalid cursor")
    digits = raw[len(_CURSOR_PREFIX) :]
    if not digits.isdigit() or len(digits) > 19 or int(digits) > _MAX_SEQ:
        raise ValueError("invalid cursor")
    return int(digits)


# --- Handlers --------------------------------------------------------------------------------
ENGINE_KEY: web.AppKey[DashboardSource | None] = web.AppKey("engine")
LEDGER_KEY: web.AppKey[LedgerSource | None] = web.AppKey("ledger")
READY_KEY: web.AppKey[dict[str, ReadyCheck]] = web.AppKey("ready_checks")


async def _dashboard(request: web.Request, org_id: str) -> dict[str, Any] | None:
    engine = request.app[ENGINE_KEY]
    if engine is None:
        raise StoreUnavailable("dashboard source not configured")
    result = await read_store(lambda: engine.dashboard(org_id), "dashboard", org_id)
    if result is None:
        return None
    data: dict[str, Any] = result
    if data.get("org_id") != org_id:  # defence in depth: never serve another org's document
        log.error("dashboard returned another org", extra={"org_id": org_id})
        return None
    return data


async def credits_handler(request: web.Request) -> web.Response:
    """``GET /v1/orgs/{org_id}/credits``."""
    return await org_document(request, _dashboard)


async def ledger_handler(request: web.Request) -> web.Response:
    """``GET /v1/orgs/{org_id}/ledger``: newest first; ``next_cursor`` is null on the last page.

    Entries written after the first page have a higher ``seq``, so they never shift later
    pages (keyset pagination, unlike OFFSET).
    """
    org_id = request.match_info["org_id"]
    denied = authorize(request, org_id, allow_query=False)
    if denied is not None:
        return denied
    ledger = request.app[LEDGER_KEY]
    if ledger is None:
        return json_error(503, "unavailable", "ledger store not configured")
    try:
        limit = int(request.query.get("limit", LEDGER_DEFAULT_LIMIT))
    except ValueError:
        return json_error(400, "bad_request", "limit must be an integer")
    if not 1 <= limit <= LEDGER_MAX_LIMIT:
        return json_error(400, "bad_request", f"limit must be 1..{LEDGER_MAX_LIMIT}")
    cursor = request.query.get("cursor") or None
    try:
        before = decode_cursor(cursor) if cursor else None
    except ValueError:
        return json_error(400, "bad_request", "invalid cursor")
    member_id = request.query.get("member_id") or None
    if member_id is not None and not is_valid_id(member_id):
        return json_error(400, "bad_request", "member_id is not a valid id")
    # One extra row tells whether another page exists without a COUNT query.
    try:
        rows = await ledger.page(org_id, member_id, before, limit + 1)
    except Exception as exc:  # PostgreSQL down or failing over: 503, not a stack trace
        metrics.ERRORS.labels(stage="api").inc()
        log.warning("ledger read failed", extra={"org_id": org_id, "error": repr(exc)})
        return json_error(503, "unavailable", "ledger store is unavailable, retry shortly")
    more = len(rows) > limit
    rows = rows[:limit]
    body = {
        "org_id": org_id,
        "member_id": member_id,
        "entries": [_ledger_entry(r) for r in rows],
        "next_cursor": encode_cursor(int(rows[-1]["seq"])) if more and rows else None,
    }
    return web.json_response(body, dumps=dumps, headers={"Cache-Control": "no-store"})


async def healthz_handler(request: web.Request) -> web.Response:
    """``GET /healthz``: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz_handler(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 when every dependency check passes, else 503 with the failures."""
    checks = request.app[READY_KEY]

    async def run(name: str, check: ReadyCheck) -> tuple[str, bool]:
        try:
            return name, bool(await asyncio.wait_for(check(), _READY_TIMEOUT_SECONDS))
        except Exception as exc:
            log.info("readiness check failed", extra={"check": name, "error": repr(exc)})
            return name, False

    results = dict(await asyncio.gather(*(run(n, c) for n, c in checks.items())))
    ok = bool(results) and all(results.values())
    return web.json_response(
        {"status": "ok" if ok else "unavailable", "checks": results}, status=200 if ok else 503
    )


async def metrics_handler(request: web.Request) -> web.Response:
    """``GET /metrics``: the process registry in Prometheus text format."""
    resp = web.Response(body=metrics.render())
    resp.headers["Content-Type"] = metrics.CONTENT_TYPE
    return resp


@web.middleware
async def _count_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.HTTP_REQUESTS.labels(route=name, status=str(status)).inc()


def create_app(
    settings: Settings,
    *,
    engine: DashboardSource | None = None,
    ledger: LedgerSource | None = None,
    entitlements: EntitlementSource | None = None,
    export: LedgerExportSource | None = None,
    admin_history: AdminHistorySource | None = None,
    admin_sink: CommandSink | None = None,
    ready_checks: Mapping[str, ReadyCheck] | None = None,
) -> web.Application:
    """The aiohttp application; the caller owns the engine, ledger readers and their clients.

    A route whose source is not given answers 503 (the admin page without ``admin_sink`` shows
    no write controls; without ``admin_history`` it shows the live sections only). Every route
    is described in ``schemas/openapi.json`` (``tests/integration/test_openapi.py`` fails
    otherwise).
    """
    app = web.Application(middlewares=[_count_requests], client_max_size=BATCH_MAX_BODY_BYTES)
    app[SETTINGS_KEY] = settings
    app[AUTH_KEY] = TokenAuth.from_settings(settings)
    app[ENGINE_KEY] = engine
    app[LEDGER_KEY] = ledger
    app[ENTITLEMENT_KEY] = entitlements
    app[COALESCER_KEY] = Coalescer(entitlements) if entitlements is not None else None
    app[EXPORT_KEY] = export
    app[READY_KEY] = dict(ready_checks or {})
    app.router.add_get("/v1/orgs/{org_id:[^/]+}/credits", credits_handler)
    app.router.add_get("/v1/orgs/{org_id:[^/]+}/ledger", ledger_handler)
    app.router.add_get("/v1/orgs/{org_id:[^/]+}/ledger.csv", ledger_csv_handler)
    app.router.add_get(
        "/v1/orgs/{org_id:[^/]+}/members/{member_id:[^/]+}/entitlement", entitlement_handler
    )
    app.router.add_post("/v1/entitlements", entitlements_handler)
    add_admin_routes(app, admin_view=engine, history=admin_history, sink=admin_sink)
    app.router.add_get("/healthz", healthz_handler)
    app.router.add_get("/readyz", readyz_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi_handler)
    return app


# --- Standalone process ----------------------------------------------------------------------
def default_ready_checks(
    settings: Settings, redis: Any, pg_pool: Any, kafka_admin: Any
) -> dict[str, ReadyCheck]:
    """Readiness checks for Redis (PING), PostgreSQL (SELECT 1) and Kafka (cluster metadata)."""

    async def redis_ok() -> bool:
        return bool(await redis.ping())

    async def pg_ok() -> bool:
        return bool((await pg_pool.fetchval("SELECT 1")) == 1)

    async def kafka_ok() -> bool:
        cluster = await kafka_admin.describe_cluster()
        return bool(cluster.get("brokers"))

    return {"redis": redis_ok, "postgres": pg_ok, "kafka": kafka_ok}


async def build_standalone(settings: Settings, stack: AsyncExitStack) -> web.Application:
    """Clients and app for ``metering api``; everything opened is closed by ``stack``."""
    import asyncpg
    from aiokafka.admin import AIOKafkaAdminClient

    from worker.connections import kafka_client_kwargs, pg_connect_kwargs, redis_client
    from worker.lag import LagMonitor, group_lag_source

    engine = make_dashboard_engine(settings)
    stack.push_async_callback(close_engine, engine)
    redis = redis_client(settings)
    stack.push_async_callback(redis.aclose)
    pool = await asyncpg.create_pool(
        **pg_connect_kwargs(settings), min_size=1, max_size=settings.postgres_pool_size
    )
    stack.push_async_callback(pool.close)
    kwargs = kafka_client_kwargs(settings)
    kwargs["client_id"] = f"{settings.client_id}-api"
    admin = AIOKafkaAdminClient(**kwargs)
    await admin.start()
    stack.push_async_callback(admin.close)
    # Without a consumer of its own, this process reports the lag of the group's commits.
    monitor = LagMonitor(group_lag_source(settings, pg_pool=pool), interval=5.0)
    monitor.start()
    stack.push_async_callback(monitor.stop)
    return create_app(
        settings,
        engine=engine,
        ledger=PgLedgerReader(pool, settings.postgres_schema),
        entitlements=engine,
        export=PgLedgerExport(pool, settings.postgres_schema),
        admin_history=PgAdminHistory(pool, settings.postgres_schema),
        admin_sink=_admin_publisher(settings, stack),
        ready_checks=default_ready_checks(settings, redis, pool, admin),
    )


def _admin_publisher(settings: Settings, stack: AsyncExitStack) -> AdminPublisher:
    """The admin page's producer (started on its first command), closed with ``stack``."""
    publisher = AdminPublisher(settings)
    stack.push_async_callback(publisher.close)
    return publisher


def make_dashboard_engine(settings: Settings) -> Engine:
    """The production engine (``worker.engine.RedisEngine``) with its own Redis client.

    Imported when first needed, so the API module (and the CLI) load without Redis' client.
    """
    from worker.engine import RedisEngine

    return RedisEngine.from_settings(settings)


async def close_engine(engine: Engine) -> None:
    """Release the engine's connections."""
    await engine.close()


async def start_http(
    settings: Settings,
    stack: AsyncExitStack,
    *,
    engine: DashboardSource | None,
    entitlements: EntitlementSource | None = None,
    pg_pool: Any | None = None,
    ready_checks: Mapping[str, ReadyCheck] | None = None,
) -> web.AppRunner:
    """Serve the API inside another process (the worker) on ``http_host:http_port``.

    ``pg_pool`` (an asyncpg pool, e.g. ``Ledger.pool``) backs the ledger endpoints; the server
    stops when ``stack`` closes. Probes and scrapes hit this server, so the worker should call
    this early in start-up: ``/healthz`` answers at once, ``/readyz`` reports the checks.
    """
    schema = settings.postgres_schema
    app = create_app(
        settings,
        engine=engine,
        ledger=PgLedgerReader(pg_pool, schema) if pg_pool is not None else None,
        entitlements=entitlements,
        export=PgLedgerExport(pg_pool, schema) if pg_pool is not None else None,
        admin_history=PgAdminHistory(pg_pool, schema) if pg_pool is not None else None,
        admin_sink=_admin_publisher(settings, stack),
        ready_checks=ready_checks,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, settings.http_host, settings.http_port).start()
    log.info("http listening", extra={"host": settings.http_host, "port": settings.http_port})
    return runner


async def serve_worker_http(
    settings: Settings,
    stack: AsyncExitStack,
    *,
    engine: Engine,
    ledger: Any,
    publisher: Any,
) -> web.AppRunner | None:
    """The worker's HTTP server: health, readiness, ``/metrics`` and the read API.

    Readiness: PostgreSQL through ``ledger.ping()``, Redis through a PING on a client of its
    own, Kafka through a metadata request on the publisher's producer. A port already in use
    is logged and counted (``metering_errors_total{stage="http"}``) instead of stopping the
    worker: metering matters more than its probes, and an orchestrator notices the failing
    probe anyway.
    """
    from worker.connections import redis_client

    redis = redis_client(settings)
    stack.push_async_callback(redis.aclose)

    async def postgres_ok() -> bool:
        await ledger.ping()
        return True

    async def redis_ok() -> bool:
        return bool(await redis.ping())

    async def kafka_ok() -> bool:
        # Brokers answer and the input topics exist (a worker on deleted topics is not ready).
        cluster = await publisher.producer.client.fetch_all_metadata()
        topics = cluster.topics()
        return bool(cluster.brokers()) and {settings.topic_usage, settings.topic_admin} <= topics

    try:
        return await start_http(
            settings,
            stack,
            engine=engine,
            entitlements=engine,
            pg_pool=ledger.pool,
            ready_checks={"postgres": postgres_ok, "redis": redis_ok, "kafka": kafka_ok},
        )
    except OSError as exc:
        metrics.ERRORS.labels(stage="http").inc()
        log.error(
            "http server not started: %s",
            exc,
            extra={"host": settings.http_host, "port": settings.http_port},
        )
        return None


async def run_api(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve the API on ``Settings.http_host:http_port`` until ``stop`` is set or SIGTERM."""
    import signal

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        app = await build_standalone(settings, stack)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        # reuse_port: several standalone API processes may serve one port (the kernel spreads
        # connections over them), one way to add capacity for entitlement checks.
        site = web.TCPSite(runner, settings.http_host, settings.http_port, reuse_port=True)
        await site.start()
        log.info(
            "api listening",
            extra={"host": settings.http_host, "port": settings.http_port},
        )
        started = time.monotonic()
        await stop.wait()
        log.info("api stopped", extra={"uptime_s": round(time.monotonic() - started, 1)})
