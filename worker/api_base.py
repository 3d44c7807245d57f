"""What every handler module of the HTTP API shares: app keys, bearer-token auth, JSON errors
and the one-retry read of a store.

``worker/api.py`` builds the app; ``worker/api_entitlement.py``, ``worker/api_export.py`` and
``worker/openapi.py`` hold the handlers of their routes. All of them import from here, never
from each other, so there is no import cycle.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.ids import is_valid_id
from worker import metrics
from worker.tokens import Grant, parse_tokens

if TYPE_CHECKING:
    from worker.config import Settings

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """A store behind a read endpoint does not answer (becomes 503)."""


# --- Auth ------------------------------------------------------------------------------------
class TokenAuth:
    """Bearer-token check against ``Settings.api_tokens`` (constant-time comparison).

    Each token has a ``Grant`` (``worker/tokens.py``): an org (or ``"*"``) and a role.
    """

    def __init__(self, tokens: Mapping[str, Grant]) -> None:
        self._tokens = [(t.encode(), grant) for t, grant in tokens.items() if t]

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenAuth:
        """Parse ``Settings.api_tokens``; a malformed value is a configuration error."""
        return cls(parse_tokens(settings.api_tokens.get_secret_value()))

    def grant(self, token: str | None) -> Grant | None:
        """The grant of a token, ``None`` for a missing or unknown token."""
        if not token:
            return None
        # Header bytes that are not UTF-8 arrive as surrogate escapes: compare them as bytes
        # (they match no token) rather than fail.
        given = token.encode("utf-8", "surrogateescape")
        found: Grant | None = None
        # Compare against every token so the time taken does not reveal which one matched.
        for known, grant in self._tokens:
            if hmac.compare_digest(known, given):
                found = grant
        return found

    def scope(self, token: str | None) -> str | None:
        """The org a token may read (``"*"``: all), ``None`` for a missing or unknown token."""
        grant = self.grant(token)
        return None if grant is None else grant.org

    def session_grant(self, session: str, now_s: int) -> tuple[bytes, Grant] | None:
        """The token key and grant of a page session cookie (``session_value``), if valid.

        The cookie is ``<issued unix seconds>.<HMAC-SHA256(token, issued)>``: derived from the
        token, so it needs no server-side store and is valid on every API replica, and it
        expires ``SESSION_SECONDS`` after it was issued. Every token is tried (constant time).
        """
        issued_text, _, mac = session.partition(".")
        if not issued_text.isdigit() or len(issued_text) > 12 or not mac:
            return None
        issued = int(issued_text)
        if not issued <= now_s + 60 or now_s - issued > SESSION_SECONDS:
            return None
        given = mac.encode("ascii", "replace")
        found: tuple[bytes, Grant] | None = None
        for known, grant in self._tokens:
            if hmac.compare_digest(_mac(known, f"session|{issued}").encode(), given):
                found = (known, grant)
        return found


SESSION_SECONDS = 12 * 3600
"""How long a page session cookie is valid after the page was opened with the token."""


def _mac(key: bytes, message: str) -> str:
    digest = hmac.new(key, message.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def session_value(token_key: bytes, now_s: int) -> str:
    """A new page session cookie value for the token ``token_key`` (see ``session_grant``)."""
    return f"{now_s}.{_mac(token_key, f'session|{now_s}')}"


def form_token(token_key: bytes, session: str, org_id: str) -> str:
    """The per-form CSRF token of one session and org: only a page rendered for this session
    carries it, and it is useless with another session or org."""
    return _mac(token_key, f"form|{session}|{org_id}")


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


def request_grant(request: web.Request, *, allow_query: bool = False) -> Grant | None:
    """The grant of the request's bearer token (or ``?token=``), None when it has none."""
    auth: TokenAuth = request.app[AUTH_KEY]
    return auth.grant(request_token(request, allow_query=allow_query))


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


async def org_document(
    request: web.Request, read: Callable[[web.Request, str], Awaitable[dict[str, Any] | None]]
) -> web.Response:
    """A JSON document of the path's org: 401/403 as ``authorize``, 503 when the store
    fails, 404 for an org it does not know, else the document (never cached)."""
    org_id = request.match_info["org_id"]
    denied = authorize(request, org_id, allow_query=False)
    if denied is not None:
        return denied
    try:
        doc = await read(request, org_id)
    except StoreUnavailable as exc:
        return json_error(503, "unavailable", str(exc))
    if doc is None:
        return json_error(404, "not_found", f"unknown org {org_id!r}")
    return web.json_response(doc, dumps=dumps, headers={"Cache-Control": "no-store"})
