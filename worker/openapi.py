"""The OpenAPI 3.1 document of the HTTP API, checked in as ``schemas/openapi.json``.

``python -m worker.openapi`` writes the file from :func:`document`; ``--check`` only compares
and exits 1 when the checked-in file differs (``tests/unit/test_openapi_document.py`` runs the
same comparison). ``GET /openapi.json`` serves the checked-in file as is, without a token: it
describes routes and shapes, never data. ``tests/integration/test_openapi.py`` validates real
answers of every route against it and fails when a route of the app has no description here.

The response schemas use a small subset of JSON Schema 2020-12 (``type``, ``properties``,
``required``, ``additionalProperties``, ``items``, ``enum``, ``const``, ``pattern``,
``minLength``, ``maxLength``, ``minimum``, ``maxItems``, ``oneOf``, ``$ref``, ``format``,
``description``), which the test's validator implements in full.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from schemas.ids import ID_MAX_LENGTH, ID_PATTERN
from worker import __version__
from worker.api_entitlement import BATCH_MAX_ITEMS

FILE: Final = "openapi.json"
ERROR_CODES: Final = ("unauthorized", "forbidden", "not_found", "bad_request", "unavailable")

PAUSE_REASONS: Final = ("pool_exhausted", "member_limit_reached", "refill_failed", "member_removed")
_JSON = "application/json"
_NULL_STR: Final = {"type": ["string", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(name: str) -> dict[str, Any]:
    return {"oneOf": [_ref(name), {"type": "null"}]}


def _obj(props: dict[str, Any], *, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """A closed object: every property required unless listed in ``optional``."""
    return {
        "type": "object",
        "properties": props,
        "required": [k for k in props if k not in optional],
        "additionalProperties": False,
    }


def _schemas() -> dict[str, Any]:
    entitlement_props = {
        "org_id": _ref("Id"),
        "member_id": _ref("Id"),
        "allowed": {
            "type": "boolean",
            "description": "False while the member is paused (the control topic's latest "
            "signal is a pause) or removed: the runtime must not start a task.",
        },
        "active": {"type": "boolean", "description": "False for a removed member."},
        "state": {"enum": ["running", "paused"]},
        "pause_reason": {"oneOf": [{"enum": list(PAUSE_REASONS)}, {"type": "null"}]},
        "remaining": {
            **_ref("Amount"),
            "description": "Promotional, allocation and block credits left (what the member "
            "can spend without a new pool draw).",
        },
        "pool_available": {
            **_ref("Amount"),
            "description": "What the member could still draw from the pool now: 0 while the "
            "pool is locked or the seat removed, else the pool balance capped by what the "
            "member's pool limit leaves this cycle.",
        },
        "negative_balance": _ref("Amount"),
        "as_of_seq": {
            "type": "integer",
            "minimum": 0,
            "description": "The org's last applied effect seq in Redis when it was read.",
        },
    }
    member = _obj(
        {
            "member_id": _ref("Id"),
            "tier": {"type": "string"},
            "active": {"type": "boolean"},
            "granted": _ref("Amount"),
            "used": _ref("Amount"),
            "remaining": _ref("Amount"),
            "pool_drawn": _ref("Amount"),
            "pool_limit": _nullable("Amount"),
            "negative_balance": _ref("Amount"),
            "state": {"enum": ["running", "paused"]},
            "pause_reason": _NULL_STR,
        }
    )
    admin_member = _obj(
        {
            **member["properties"],
            "limit_setting": {
                "oneOf": [{"const": "inherit"}, _ref("Amount"), {"type": "null"}],
                "description": "The member's own setting: inherit (the tier's), null (no "
                "limit) or credits.",
            },
            "debt_since": _nullable("Timestamp"),
            "used_allocation": _ref("Amount"),
            "used_promotions": _ref("Amount"),
            "used_pool": _ref("Amount"),
        }
    )
    return {
        "Id": {
            "type": "string",
            "minLength": 1,
            "maxLength": ID_MAX_LENGTH,
            "pattern": ID_PATTERN,
            "description": "SPEC section 6: 1-128 characters, no control characters.",
        },
        "Amount": {
            "type": "string",
            "pattern": "^-?[0-9]+(\\.[0-9]{1,3})?$",
            "description": "Credits as a decimal string, at most 3 decimals (never a float).",
        },
        "Timestamp": {
            "type": "string",
            "format": "date-time",
            "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{3})?Z$",
            "description": "RFC 3339, UTC.",
        },
        "Error": _obj({"error": {"enum": list(ERROR_CODES)}, "message": {"type": "string"}}),
        "Credits": {
            **_obj(
                {
                    "org_id": _ref("Id"),
                    "cycle_start": _ref("Timestamp"),
                    "reset_at": _ref("Timestamp"),
                    "pool": _obj(
                        {
                            "balance": _ref("Amount"),
                            "used_this_cycle": _ref("Amount"),
                            "locked": {"type": "boolean"},
                            "refill_pending": {"type": "boolean"},
                        }
                    ),
                    "members": {"type": "array", "items": member},
                }
            ),
            "description": "The admin dashboard of SPEC section 7.",
        },
        "AdminView": {
            **_obj(
                {
                    "org_id": _ref("Id"),
                    "cycle_start": _ref("Timestamp"),
                    "reset_at": _ref("Timestamp"),
                    "clock": _ref("Timestamp"),
                    "pool": _obj(
                        {
                            "balance": _ref("Amount"),
                            "used_this_cycle": _ref("Amount"),
                            "locked": {"type": "boolean"},
                            "refill_pending": {"type": "boolean"},
                            "auto_refill": _obj(
                                {
                                    "enabled": {"type": "boolean"},
                                    "threshold": _ref("Amount"),
                                    "amount": _ref("Amount"),
                                    "monthly_limit": _ref("Amount"),
                                    "refilled_this_cycle": _ref("Amount"),
                                    "pending": {
                                        "oneOf": [
                                            _obj(
                                                {
                                                    "request_id": _ref("Id"),
                                                    "credits": _ref("Amount"),
                                                }
                                            ),
                                            {"type": "null"},
                                        ]
                                    },
                                }
                            ),
                        }
                    ),
                    "tiers": {
                        "type": "array",
                        "items": _obj(
                            {
                                "tier": {"type": "string"},
                                "credits": _ref("Amount"),
                                "pool_limit": _nullable("Amount"),
                            }
                        ),
                    },
                    "members": {"type": "array", "items": admin_member},
                }
            ),
            "description": "The admin page's live document: the SPEC section 7 dashboard plus "
            "auto-refill settings and state, tier limits, and per member the limit setting "
            "(inherit, null or credits), when the debt began and what paid this cycle's usage.",
        },
        "LedgerEntry": _obj(
            {
                "seq": {"type": "integer", "minimum": 1},
                "member_id": _NULL_STR,
                "source_kind": {"enum": ["usage", "admin", "system"]},
                "source_id": _NULL_STR,
                "task_id": _NULL_STR,
                "movement": {"type": "string"},
                "bucket": _NULL_STR,
                "grant_id": _NULL_STR,
                "amount": {**_ref("Amount"), "description": "Signed: debits are negative."},
                "cycle_start": _nullable("Timestamp"),
                "late": {"type": "boolean"},
                "at": _nullable("Timestamp"),
                "recorded_at": {"type": "string", "format": "date-time"},
            }
        ),
        "LedgerPage": _obj(
            {
                "org_id": _ref("Id"),
                "member_id": _NULL_STR,
                "entries": {"type": "array", "items": _ref("LedgerEntry")},
                "next_cursor": {
                    **_NULL_STR,
                    "description": "Pass back as `cursor` for the next page; null on the last.",
                },
            }
        ),
        "Entitlement": _obj(entitlement_props),
        "EntitlementMissing": _obj(
            {
                "org_id": {"type": "string"},
                "member_id": {"type": "string"},
                "allowed": {"const": False},
                "error": {"const": "not_found"},
                "message": {"enum": ["unknown org", "unknown member"]},
            }
        ),
        "EntitlementBatchRequest": _obj(
            {
                "items": {
                    "type": "array",
                    "maxItems": BATCH_MAX_ITEMS,
                    "items": _obj({"org_id": {"type": "string"}, "member_id": {"type": "string"}}),
                }
            }
        ),
        "EntitlementBatch": _obj(
            {
                "results": {
                    "type": "array",
                    "maxItems": BATCH_MAX_ITEMS,
                    "items": {"oneOf": [_ref("Entitlement"), _ref("EntitlementMissing")]},
                    "description": "One per request item, in request order.",
                }
            }
        ),
        "Health": _obj({"status": {"const": "ok"}}),
        "Ready": _obj(
            {
                "status": {"enum": ["ok", "unavailable"]},
                "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
            }
        ),
        "OpenApi": {"type": "object", "required": ["openapi", "paths"]},
    }


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref(schema)}}}


def _text(media: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {
        400: "Bad request (a parameter or the body).",
        401: "No bearer token, or an unknown one.",
        403: "The token may not read this org.",
        404: "Unknown org (or an id no org can have).",
        413: "Body over the size limit.",
        503: "The store behind the route does not answer; retry.",
    }
    return {str(s): _json("Error", words[s]) for s in statuses}


_ORG = {
    "name": "org_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The org id, percent-encoded (any id character, `/` included).",
}
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]
_OPEN: list[dict[str, list[str]]] = []


def _paths() -> dict[str, Any]:
    member = {**_ORG, "name": "member_id", "description": "The member id, percent-encoded."}
    return {
        "/v1/orgs/{org_id}/credits": {
            "get": {
                "operationId": "getCredits",
                "summary": "Live balances of an org: the SPEC section 7 dashboard (Redis).",
                "security": _SECURED,
                "parameters": [_ORG],
                "responses": {
                    "200": _json("Credits", "The dashboard."),
                    **_errors(401, 403, 404, 503),
                },
            }
        },
        "/v1/orgs/{org_id}/ledger": {
            "get": {
                "operationId": "getLedger",
                "summary": "Ledger entries of an org, newest first, keyset-paged (PostgreSQL).",
                "security": _SECURED,
                "parameters": [
                    _ORG,
                    {"name": "member_id", "in": "query", "schema": {"type": "string"}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
                "responses": {
                    "200": _json("LedgerPage", "One page of entries."),
                    **_errors(400, 401, 403, 404, 503),
                },
            }
        },
        "/v1/orgs/{org_id}/ledger.csv": {
            "get": {
                "operationId": "exportLedger",
                "summary": "One billing cycle's ledger as CSV for finance, oldest first, "
                "streamed (PostgreSQL).",
                "description": "Columns: org_id, seq, member_id, source_kind, source_id, "
                "task_id, movement, bucket, grant_id, amount (credits, 3 decimals), "
                "cycle_start, late, at, recorded_at (UTC). Cells a spreadsheet would run as "
                "a formula get a leading apostrophe.",
                "security": _SECURED,
                "parameters": [
                    _ORG,
                    {
                        "name": "cycle",
                        "in": "query",
                        "schema": {"type": "string", "format": "date"},
                        "description": "Start date (YYYY-MM-DD, 00:00 UTC) of the cycle; "
                        "default: the cycle of the org's newest ledger entry.",
                    },
                ],
                "responses": {
                    "200": _text("text/csv", "Header row, then one row per entry."),
                    **_errors(400, 401, 403, 404, 503),
                },
            }
        },
        "/v1/orgs/{org_id}/members/{member_id}/entitlement": {
            "get": {
                "operationId": "getEntitlement",
                "summary": "May this member start a task now? (Redis, one read.)",
                "security": _SECURED,
                "parameters": [_ORG, member],
                "responses": {
                    "200": _json("Entitlement", "The member's entitlement."),
                    **_errors(401, 403),
                    "404": _json("Error", "Unknown org or member."),
                    **_errors(503),
                },
            }
        },
        "/v1/entitlements": {
            "post": {
                "operationId": "getEntitlements",
                "summary": f"Entitlements of up to {BATCH_MAX_ITEMS:,} members of any orgs "
                "the token may read, in request order.",
                "security": _SECURED,
                "requestBody": {
                    "required": True,
                    "content": {_JSON: {"schema": _ref("EntitlementBatchRequest")}},
                },
                "responses": {
                    "200": _json("EntitlementBatch", "One result per item."),
                    **_errors(400),
                    **_errors(401),
                    "403": _json("Error", "The token may not read an org of the batch."),
                    **_errors(413, 503),
                },
            }
        },
        "/v1/orgs/{org_id}/admin": {
            "get": {
                "operationId": "getAdminView",
                "summary": "The admin page's live document (Redis): dashboard, auto-refill, "
                "tier and member limits.",
                "security": _SECURED,
                "parameters": [_ORG],
                "responses": {
                    "200": _json("AdminView", "The document."),
                    **_errors(401, 403, 404, 503),
                },
            }
        },
        "/orgs/{org_id}": {
            "get": {
                "operationId": "getDashboardPage",
                "summary": "The admin page as HTML (token as bearer header, ?token= or the "
                "session cookie the page sets); write controls for admin tokens only.",
                "security": [{"bearer": []}, {"queryToken": []}, {"session": []}],
                "parameters": [
                    _ORG,
                    {
                        "name": "dialog",
                        "in": "query",
                        "schema": {
                            "enum": ["purchase", "auto-refill", "tier-limit", "member-limit"]
                        },
                        "description": "Open a form (admin tokens only).",
                    },
                    {"name": "member", "in": "query", "schema": {"type": "string"}},
                    {"name": "tier", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "pending",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "A command_id published from the page (repeatable): "
                        "shown as pending until the worker decided it.",
                    },
                ],
                "responses": {
                    str(s): _text("text/html", d)
                    for s, d in (
                        (200, "The page."),
                        (401, "Sign-in required."),
                        (403, "Forbidden."),
                        (404, "Unknown org."),
                        (503, "Live balances unavailable."),
                    )
                },
            }
        },
        "/orgs/{org_id}/actions/{action}": {
            "post": {
                "operationId": "postAdminForm",
                "summary": "A form of the admin page: publishes one AdminCommand to the admin "
                "topic, then redirects to the page showing it pending.",
                "description": "Needs the page's session cookie, the form's form_token and a "
                "token with the admin role on the org; cross-site posts are refused. Fields: "
                "member-limit: member_id, mode (none | limit | inherit), limit; tier-limit: "
                "tier, mode (none | limit), limit; pool-purchase: credits; auto-refill: "
                "enabled (true when set), threshold, amount, monthly_limit.",
                "security": [{"session": []}],
                "parameters": [
                    _ORG,
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {
                            "enum": ["member-limit", "tier-limit", "pool-purchase", "auto-refill"]
                        },
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {"schema": {"type": "object"}}
                    },
                },
                "responses": {
                    str(s): _text("text/html", d)
                    for s, d in (
                        (303, "Published: see /orgs/{org_id}?pending=<command_id>."),
                        (400, "Invalid input: the form again, with the reason."),
                        (401, "No valid session cookie."),
                        (403, "Cross-site, no or a wrong form token, or not an admin token."),
                        (404, "An id no org can have."),
                        (503, "Kafka did not take the command (or writes are not configured)."),
                    )
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness: the process answers.",
                "security": _OPEN,
                "responses": {"200": _json("Health", "Alive.")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness: Kafka, Redis and PostgreSQL answer.",
                "security": _OPEN,
                "responses": {
                    "200": _json("Ready", "Every check passed."),
                    "503": _json("Ready", "A check failed."),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (text format), consumer lag included.",
                "security": _OPEN,
                "responses": {"200": _text("text/plain", "The process registry.")},
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "security": _OPEN,
                "responses": {"200": _json("OpenApi", "OpenAPI 3.1.")},
            }
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of ``worker.api.create_app``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "credit-metering API",
            "version": __version__,
            "description": "Live balances, entitlements, ledger, the admin page and "
            "health of the credit-metering worker. Amounts are decimal credit strings; errors are "
            '`{"error": code, "message": ...}`. See docs/operations.md.',
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "security": _SECURED,
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of METERING_API_TOKENS (docs/operations.md).",
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "metering_session",
                    "description": "Set by GET /orgs/{org_id} opened with a token.",
                },
                "queryToken": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
    }


def render() -> str:
    """The document as checked in."""
    return json.dumps(document(), indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def path() -> Path:
    return Path(str(resources.files("schemas") / FILE))


@cache
def _served() -> bytes:
    return path().read_bytes()


async def openapi_handler(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the checked-in document (no token needed)."""
    return web.Response(body=_served(), content_type=_JSON)


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.openapi [--check]``: write (or compare) ``schemas/openapi.json``."""
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in args:
        current = path().read_text(encoding="utf-8") if path().exists() else ""
        if current != text:
            sys.stderr.write(f"{path()} is out of date: run python -m worker.openapi\n")
            return 1
        return 0
    path().write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {path()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
