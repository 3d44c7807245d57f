"""The admin page and its write routes.

- ``GET /orgs/{org_id}``: the admin page (``worker/admin_page.py``). The token comes as a
  bearer header or ``?token=``; the answer then sets a session cookie derived from the token
  (``api_base.session_value``), which later requests of the page (dialogs, form posts, the
  redirect after a post) use instead of the token.
- ``GET /v1/orgs/{org_id}/admin``: the page's live document as JSON (``views.admin_view``).
- ``POST /orgs/{org_id}/actions/{member-limit|tier-limit|pool-purchase|auto-refill}``: an HTML
  form of the page. Publishes the same AdminCommand as the CLI (``worker/admin_commands.py``:
  same parsing, same validation by the worker's decoder, a fresh ``command_id``, ``at`` =
  now) to the admin topic, then redirects (303) to the page with ``?pending=<command_id>``;
  the page shows the change as pending until the ``admin_commands`` row of that id exists in
  PostgreSQL (the worker writes it in the flush of the batch that applied it), then as
  applied (or rejected, with the worker's code) next to the new value.

A form post is accepted only with all of: a valid session cookie (``SameSite=Strict``,
``HttpOnly``: a cross-site form does not carry it); the per-form token of that session and
org (``api_base.form_token``, a hidden field only pages rendered for that session hold); no
``Origin`` or ``Sec-Fetch-Site`` header saying the request comes from another site; a token with
the admin role on the org. Otherwise 401 (no session) or 403, and nothing is published.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import OrderedDict
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from aiohttp import web

from schemas.ids import is_valid_id
from worker import metrics
from worker.admin_commands import (
    InvalidCommand,
    build_admin_command,
    check_admin_command,
    parse_credits,
    parse_limit,
)
from worker.admin_page import (
    History,
    PageContext,
    describe,
    iso_ms,
    pending_list,
    render_message_page,
    render_page,
)
from worker.admin_store import AdminHistorySource
from worker.api_base import (
    AUTH_KEY,
    SESSION_SECONDS,
    SETTINGS_KEY,
    StoreUnavailable,
    TokenAuth,
    form_token,
    org_document,
    read_store,
    request_token,
    session_value,
)
from worker.tokens import Grant

log = logging.getLogger(__name__)

SESSION_COOKIE = "metering_session"
ACTIONS = ("member-limit", "tier-limit", "pool-purchase", "auto-refill")
DIALOGS = ("purchase", "auto-refill", "tier-limit", "member-limit")
PENDING_SHOWN = 10
RECENT_KEPT = 1_000


class AdminViewSource(Protocol):
    """What the page needs from the engine: ``RedisEngine.admin_view``."""

    async def admin_view(self, org_id: str) -> dict[str, Any] | None:
        """The admin document of ``org_id`` (``views.admin_view``), None for an unknown org."""


class CommandSink(Protocol):
    """Where the page's commands go: ``admin_commands.AdminPublisher``."""

    async def publish(self, command: dict[str, Any]) -> dict[str, Any]:
        """Publish one AdminCommand keyed by its org."""


ADMIN_VIEW_KEY: web.AppKey[AdminViewSource | None] = web.AppKey("admin_view")
HISTORY_KEY: web.AppKey[AdminHistorySource | None] = web.AppKey("admin_history")
SINK_KEY: web.AppKey[CommandSink | None] = web.AppKey("admin_sink")
RECENT_KEY: web.AppKey[OrderedDict[tuple[str, str], str]] = web.AppKey("admin_recent")


# --- Identity --------------------------------------------------------------------------------
class Identity:
    """Who sent a page request: the grant, the token's key and the page session."""

    def __init__(self, key: bytes, grant: Grant, session: str, fresh: bool) -> None:
        self.key = key
        self.grant = grant
        self.session = session
        self.fresh = fresh  # the session was just made from a token: set the cookie

    def form_token(self, org_id: str) -> str:
        return form_token(self.key, self.session, org_id)


def page_identity(request: web.Request, *, allow_token: bool) -> Identity | None:
    """The identity of a page request: a token (header or ``?token=``, when ``allow_token``),
    else the session cookie; None without either."""
    auth: TokenAuth = request.app[AUTH_KEY]
    now_s = int(time.time())
    if allow_token:
        token = request_token(request, allow_query=True)
        grant = auth.grant(token)
        if token and grant is not None:
            key = token.encode("utf-8", "surrogateescape")
            return Identity(key, grant, session_value(key, now_s), fresh=True)
        if token:
            return None  # an unknown token never falls back to an older session
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        found = auth.session_grant(cookie, now_s)
        if found is not None:
            return Identity(found[0], found[1], cookie, fresh=False)
    return None


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={
            # The page may carry its token in the URL: keep it out of caches and referrers.
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": (
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                "frame-ancestors 'none'; base-uri 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
        },
    )


def _set_session(resp: web.StreamResponse, identity: Identity, secure: bool = False) -> None:
    resp.set_cookie(
        SESSION_COOKIE,
        identity.session,
        path="/orgs/",
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="Strict",
        secure=secure,
    )


def _message(status: int, text: str) -> web.Response:
    return _html(render_message_page(status, text), status=status)


# --- Reads -----------------------------------------------------------------------------------
async def _admin_doc(request: web.Request, org_id: str) -> dict[str, Any] | None:
    source = request.app[ADMIN_VIEW_KEY]
    if source is None:
        raise StoreUnavailable("admin view source not configured")
    doc = await read_store(lambda: source.admin_view(org_id), "admin view", org_id)
    if doc is None or doc.get("org_id") != org_id:
        return None
    result: dict[str, Any] = doc
    return result


async def _history(
    request: web.Request, org_id: str, doc: dict[str, Any], pending_ids: list[str]
) -> tuple[History, dict[str, dict[str, Any]]]:
    source = request.app[HISTORY_KEY]
    if source is None:
        return History(), {}
    try:
        decided = await source.decided(org_id, pending_ids)
        requests = await source.notifications(org_id, "credit_request")
        failures = (
            await source.notifications(org_id, "refill_failed", 1)
            if (doc.get("pool") or {}).get("locked")
            else []
        )
        daily = await source.daily_usage(org_id, iso_ms(str(doc["cycle_start"])))
    except Exception as exc:  # PostgreSQL down: the live sections still render
        metrics.ERRORS.labels(stage="api").inc()
        log.warning("admin history read failed", extra={"org_id": org_id, "error": repr(exc)})
        return History(), {}
    return History(requests, failures, daily), decided


def _pending_ids(request: web.Request) -> list[str]:
    ids = [c for c in request.query.getall("pending", []) if is_valid_id(c)]
    return list(dict.fromkeys(ids))[:PENDING_SHOWN]


async def page_handler(request: web.Request) -> web.Response:
    """``GET /orgs/{org_id}``: the admin page (token as bearer header, ``?token=`` or the
    session cookie)."""
    return await _render(request, request.match_info["org_id"])


async def _render(
    request: web.Request,
    org_id: str,
    *,
    identity: Identity | None = None,
    dialog: str | None = None,
    target: str | None = None,
    error: str | None = None,
    status: int = 200,
) -> web.Response:
    identity = identity or page_identity(request, allow_token=True)
    if identity is None:
        return _message(401, "Sign-in required")
    if not identity.grant.may_read(org_id):
        return _message(403, "Forbidden")
    if not is_valid_id(org_id):
        return _message(404, "Unknown org")
    try:
        doc = await _admin_doc(request, org_id)
    except StoreUnavailable as exc:
        return _message(503, str(exc))
    if doc is None:
        return _message(404, f"Unknown org {org_id}")
    pending_ids = _pending_ids(request)
    history, decided = await _history(request, org_id, doc, pending_ids)
    recent = request.app[RECENT_KEY]
    published = [
        (cid, recent.get((org_id, cid)) or decided.get(cid, {}).get("type") or f"change {cid}")
        for cid in pending_ids
    ]
    may_write = identity.grant.may_admin(org_id) and request.app[SINK_KEY] is not None
    if dialog is None:
        dialog = request.query.get("dialog")
        target = request.query.get("member") or request.query.get("tier")
    ctx = PageContext(
        form_token=identity.form_token(org_id) if may_write else None,
        pending=pending_list(published, decided),
        dialog=dialog if dialog in DIALOGS and may_write else None,
        dialog_target=target,
        error=error,
    )
    resp = _html(render_page(doc, history, ctx), status=status)
    if identity.fresh:
        _set_session(resp, identity, secure=request.secure)
    return resp


async def admin_json_handler(request: web.Request) -> web.Response:
    """``GET /v1/orgs/{org_id}/admin``: the admin page's live document."""
    return await org_document(request, _admin_doc)


# --- Writes ----------------------------------------------------------------------------------
def _cross_site(request: web.Request) -> bool:
    """Whether the browser says the post comes from another origin.

    ``Sec-Fetch-Site`` (sent by current browsers) must be ``same-origin`` (or ``none``: typed
    by the user). Without it, an ``Origin`` must be this server's; ``Origin: null`` is what a
    browser sends for a page served with ``Referrer-Policy: no-referrer``, as this one is.
    """
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return False
    return origin != f"{request.scheme}://{request.host}"


def _form_fields(action: str, form: Any) -> tuple[str, dict[str, Any], str, str | None]:
    """The command type and fields of a form post; its dialog and target for an error."""

    def get(name: str) -> str:
        value = form.get(name, "")
        return value if isinstance(value, str) else ""

    if action == "member-limit":
        member, mode = get("member_id"), get("mode")
        limit = _mode_limit(mode, get("limit"), inherit=True)
        return "member_limit_set", {"member_id": member, "limit": limit}, "member-limit", member
    if action == "tier-limit":
        tier, mode = get("tier"), get("mode")
        limit = _mode_limit(mode, get("limit"), inherit=False)
        return "tier_limit_set", {"tier": tier, "limit": limit}, "tier-limit", tier
    if action == "pool-purchase":
        return "pool_purchase", {"credits": parse_credits(get("credits"))}, "purchase", None
    fields = {
        "enabled": get("enabled") == "true",
        "threshold": parse_credits(get("threshold") or "0", allow_zero=True),
        "amount": parse_credits(get("amount")),
        "monthly_limit": parse_credits(get("monthly_limit")),
    }
    return "auto_refill_set", fields, "auto-refill", None


def _mode_limit(mode: str, text: str, *, inherit: bool) -> str | None:
    if mode == "none":
        return None
    if mode == "inherit" and inherit:
        return "inherit"
    if mode == "limit":
        if not text.strip():
            raise ValueError("enter a limit in whole credits")
        return parse_limit(text, allow_inherit=False)
    raise ValueError("choose one of the options")


async def action_handler(request: web.Request) -> web.Response:
    """``POST /orgs/{org_id}/actions/{action}``: one form of the page."""
    return await _handle_action(request, request.match_info["action"])


async def _handle_action(request: web.Request, action: str) -> web.Response:
    org_id = request.match_info["org_id"]
    if _cross_site(request):
        return _message(403, "Cross-site request refused")
    identity = page_identity(request, allow_token=False)
    if identity is None:
        return _message(401, "Sign-in required")
    form = await request.post()
    given = form.get("form_token")
    expected = identity.form_token(org_id)
    if not isinstance(given, str) or not hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode()
    ):
        return _message(403, "This form has expired or was not sent by the admin page")
    if not identity.grant.may_admin(org_id):
        return _message(403, "This token may not change this org")
    if not is_valid_id(org_id):
        return _message(404, "Unknown org")
    sink = request.app[SINK_KEY]
    if sink is None:
        return _message(503, "Changes are not configured on this server")
    settings = request.app[SETTINGS_KEY]
    dialog, target = None, None
    try:
        cmd_type, fields, dialog, target = _form_fields(action, form)
        command = build_admin_command(cmd_type, org_id, fields, id_prefix="page")
        check_admin_command(command, settings)
    except (ValueError, InvalidCommand) as exc:
        return await _render(
            request,
            org_id,
            identity=identity,
            dialog=dialog or _dialog_of(action),
            target=target,
            error=str(exc),
            status=400,
        )
    try:
        await sink.publish(command)
    except Exception as exc:  # Kafka away: nothing was published, say so
        metrics.ERRORS.labels(stage="api").inc()
        log.warning("admin command not published", extra={"error": repr(exc)})
        return _message(503, "The change could not be sent; try again shortly")
    recent = request.app[RECENT_KEY]
    recent[(org_id, command["command_id"])] = describe(command)
    while len(recent) > RECENT_KEPT:
        recent.popitem(last=False)
    log.info(
        "admin command published from the page",
        extra={"org_id": org_id, "command_id": command["command_id"], "type": cmd_type},
    )
    location = f"/orgs/{quote(org_id, safe='')}?" + urlencode({"pending": command["command_id"]})
    resp = _html(render_message_page(303, "Change sent; back to the page"), status=303)
    resp.headers["Location"] = location
    return resp


def _dialog_of(action: str) -> str:
    return "purchase" if action == "pool-purchase" else action


def add_admin_routes(
    app: web.Application,
    *,
    admin_view: AdminViewSource | None,
    history: AdminHistorySource | None,
    sink: CommandSink | None,
) -> None:
    """Register the page, its JSON document and the form routes on ``app``."""
    app[ADMIN_VIEW_KEY] = admin_view
    app[HISTORY_KEY] = history
    app[SINK_KEY] = sink
    app[RECENT_KEY] = OrderedDict()
    app.router.add_get("/orgs/{org_id:[^/]+}", page_handler)
    app.router.add_get("/v1/orgs/{org_id:[^/]+}/admin", admin_json_handler)
    actions = "|".join(ACTIONS)
    app.router.add_post(f"/orgs/{{org_id:[^/]+}}/actions/{{action:(?:{actions})}}", action_handler)
