"""API tokens and their grants: which orgs a token may read, and whether it may change them.

``METERING_API_TOKENS`` is a JSON object from token to grant. A grant is either a string (the
first format, still accepted) or an object ``{"org": ..., "role": ...}``:

- ``"acme"`` (string): read-only on org ``acme``;
- ``"*"`` (string): operator, read and admin on every org (what ``"*"`` tokens could always do
  through the CLI's topic access, and what operators of the first format expect to keep);
- ``{"org": "acme", "role": "read"}`` / ``{"org": "acme", "role": "admin"}``: one org, read-only
  or admin (the admin page's write controls);
- ``{"org": "*", "role": "read"}``: every org, read-only (support staff);
  ``{"org": "*", "role": "admin"}``: the same as ``"*"``.

Parsed once here for both ``Settings`` validation (``--check-config``) and the API.
"""

from __future__ import annotations

import json
from typing import Literal, NamedTuple

from schemas.ids import is_valid_id

Role = Literal["read", "admin"]
ROLES: tuple[Role, ...] = ("read", "admin")
ALL_ORGS = "*"
FORMAT_HINT = (
    'a JSON object {"token": "org_id" | "*" | {"org": "org_id" | "*", "role": "read" | "admin"}}'
)


class Grant(NamedTuple):
    """What one token may do: ``org`` (``"*"``: all orgs) with ``role``."""

    org: str
    role: Role

    def may_read(self, org_id: str) -> bool:
        """Whether the token may read ``org_id``."""
        return self.org == ALL_ORGS or self.org == org_id

    def may_admin(self, org_id: str) -> bool:
        """Whether the token may publish admin commands for ``org_id``."""
        return self.role == "admin" and self.may_read(org_id)


def _grant(value: object) -> Grant:
    if isinstance(value, str):
        if value == ALL_ORGS:
            return Grant(ALL_ORGS, "admin")
        if not is_valid_id(value):
            raise ValueError('a token\'s org must be a valid id or "*"')
        return Grant(value, "read")
    if isinstance(value, dict):
        org, role = value.get("org"), value.get("role", "read")
        if set(value) - {"org", "role"}:
            raise ValueError('a grant object has only the keys "org" and "role"')
        if not isinstance(org, str) or (org != ALL_ORGS and not is_valid_id(org)):
            raise ValueError('a grant\'s "org" must be a valid id or "*"')
        if role not in ROLES:
            raise ValueError('a grant\'s "role" must be "read" or "admin"')
        return Grant(org, role)
    raise ValueError(
        'every entry must be "token": "org_id" | "*" | {"org": "org_id" | "*", "role": ...}'
    )


def parse_tokens(text: str) -> dict[str, Grant]:
    """The grants of ``METERING_API_TOKENS``; ``ValueError`` (never echoing a token) if bad."""
    try:
        parsed = json.loads(text.strip() or "{}")
    except ValueError as exc:
        raise ValueError(
            f"must be JSON, {FORMAT_HINT} (not valid JSON at character {getattr(exc, 'pos', '?')})"
        ) from None
    if not isinstance(parsed, dict):
        raise ValueError(f"must be {FORMAT_HINT}")
    grants: dict[str, Grant] = {}
    for token, value in parsed.items():
        if not token:
            raise ValueError("a token must not be empty")
        grants[token] = _grant(value)
    return grants
