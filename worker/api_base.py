"""What every handler module of the HTTP API shares: app keys, bearer-token auth, JSON errors
and the one-retry read of a store.

``worker/api.py`` builds the app; ``worker/api_entitlement.py``, ``worker/api_export.py`` and
``worker/openapi.py`` hold the handlers of their routes. All of them import from here, never
from each other, so there is no import cycle.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.ids import is_valid_id
from worker import metrics

if TYPE_CHECKING:
    from worker.config import Settings

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """A store behind a read endpoint does not answer (becomes 503)."""


# --- Auth ------------------------------------------------------------------------------------
class TokenAuth:
    """Bearer-token check against ``Settings.api_tokens`` (constant-time comparison)."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = [(t.encode(), scope) for t, scope in tokens.items() if t]

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenAuth:
        """Parse ``Settings.api_tokens``; a malformed value is a configuration error."""
        raw = orjson.loads(settings.api_tokens.get_secret_value() or "{}")
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            raise ValueError('api_tokens must be a JSON object {"token": "org_id" | "*"}')
        return cls(raw)

    def scope(self, token: str | None) -> str | None:
        """The org a token may read (``"*"``: all), ``None`` for a missing or unknown token."""
        if not token:
            return None
        # Header bytes that are not UTF-8 arrive as surrogate escapes: compare them as bytes
        # (they match no token) rather than fail.
        given = token.encode("utf-8", "surrogateescape")
        found: str | None = None
        # Compare against every token so the time taken does not reveal which one matched.
        for known, scope in self._tokens:
            if hmac.compare_digest(known, given):
                found = scope
        return found


SETTINGS_KEY: web.AppKey[Settings] = web.AppKey("settings")
AUTH_KEY: web.AppKey[TokenAuth] = web.AppKey("auth")


def request_token(request: web.Request, *, allow_query: bool) -> str | None:
    """The bearer token of ``Authorization`` (or, for the HTML page only, ``?token=``)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if allow_query:
        return request.query.get("token") or None
    return None


def dumps(obj: Any) -> str:
    """JSON text of a response body (orjson: no floats are ever produced for money)."""
    return orjson.dumps(obj).decode()


def json_error(status: int, code: str, message: str) -> web.Response:
    """``{"error": code, "message": ...}``; a 401 carries ``WWW-Authenticate``."""
    headers = {"WWW-Authenticate": 'Bearer realm="metering"'} if status == 401 else None
    return web.json_response(
        {"error": code, "message": message}, status=status, headers=headers, dumps=dumps
    )


def request_scope(request: web.Request, *, allow_query: bool = False) -> str | None:
    """The scope of the request's token (``"*"`` or one org id), None when it has none."""
    auth: TokenAuth = request.app[AUTH_KEY]
    return auth.scope(request_token(request, allow_query=allow_query))


def may_read(scope: str, org_id: str) -> bool:
    """Whether a token of ``scope`` may read ``org_id``."""
    return scope == "*" or scope == org_id


def authorize(request: web.Request, org_id: str, *, allow_query: bool) -> web.Response | None:
    """None when the request may read ``org_id``; else its 401, 403 or 404 response.

    Order: no token 401, another org 403, then an id outside the alphabet 404 (no such org can
    exist, and nothing is sent to a store), so a scoped token cannot probe which orgs exist.
    """
    scope = request_scope(request, allow_query=allow_query)
    if scope is None:
        return json_error(401, "unauthorized", "missing or unknown bearer token")
    if not may_read(scope, org_id):
        return json_error(403, "forbidden", "token is not valid for this org")
    if not is_valid_id(org_id):
        return json_error(404, "not_found", "unknown org")
    return None


async def read_store(read: Callable[[], Any], what: str, org_id: str | None) -> Any:
    """Run ``read()`` (its result may be awaitable); ``StoreUnavailable`` when the store fails.

    A pooled connection that Redis dropped (a restart, a failover) fails once; the retry gets
    a fresh one.
    """
    try:
        try:
            result = read()
            if inspect.isawaitable(result):
                result = await result
        except (ConnectionError, OSError, RedisConnectionError, RedisTimeoutError):
            result = read()
            if inspect.isawaitable(result):
                result = await result
    except Exception as exc:  # Redis down or failing over: a clear 503, not a stack trace
        metrics.ERRORS.labels(stage="api").inc()
        log.warning("%s read failed", what, extra={"org_id": org_id, "error": repr(exc)})
        raise StoreUnavailable("live balances are unavailable, retry shortly") from exc
    return result
