"""The identifier alphabet of SPEC section 6, defined once.

``event_id``, ``org_id``, ``member_id``, ``task_id``, ``command_id``, ``grant_id`` and
``request_id`` (and tier names) are strings of 1-128 Unicode characters (code points, not
bytes) without control characters (U+0000-U+001F, U+007F-U+009F) and without lone surrogates.
Every other character is allowed and is data everywhere: ``{``, ``}``, ``/``, ``:``, ``%``,
``|``, spaces, emoji, right-to-left marks. Anything else is rejected with
:attr:`~schemas.errors.ErrorCode.INVALID_ID`.

Why these rules: PostgreSQL ``text`` cannot hold U+0000; a lone surrogate cannot be encoded as
UTF-8 (Kafka keys, PostgreSQL, JSON output); control characters would let a producer forge
log lines and confuse operators. What remains can be stored, keyed and published as is, and
the places that give characters a meaning (Redis hash tags, control-topic keys) encode ids
(:func:`hash_tag_part`, :func:`key_part`).

Ids the worker makes itself (refill request ids, tick command ids) follow the same rules:
:func:`derived_id` builds them from a short digest of the org, whatever its length.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

ID_MAX_LENGTH: Final = 128

ID_PATTERN: Final = "^[^\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff]{1,128}$"
"""The alphabet as a JSON Schema / ECMA regular expression (one to 128 allowed characters)."""

_VALID: Final = re.compile("[^\x00-\x1f\x7f-\x9f\ud800-\udfff]{1,128}")
_FORBIDDEN: Final = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

DIGEST_CHARS: Final = 20
"""Hex characters of the org digest in derived ids (80 bits: collisions are not a concern)."""


def is_valid_id(value: object) -> bool:
    """True for a string in the id alphabet (1-128 allowed characters)."""
    return isinstance(value, str) and _VALID.fullmatch(value) is not None


def id_problem(value: str) -> str | None:
    """Why ``value`` is not a valid id (a short, safe sentence), or None when it is one."""
    if not value:
        return "must not be empty"
    if len(value) > ID_MAX_LENGTH:
        return f"is {len(value)} characters long, limit {ID_MAX_LENGTH}"
    bad = _FORBIDDEN.search(value)
    if bad is not None:
        return f"contains U+{ord(bad.group()):04X} at character {bad.start()}"
    return None


def org_digest(org_id: str) -> str:
    """A short, fixed-length digest of an org id (hex): the org's part of a derived id."""
    return hashlib.sha1(org_id.encode("utf-8"), usedforsecurity=False).hexdigest()[:DIGEST_CHARS]


def derived_id(kind: str, org_id: str, suffix: int | str) -> str:
    """An id the worker makes for an org: ``<kind>-<org digest>-<suffix>``, always valid.

    The Lua engine builds refill request ids the same way (``redis.sha1hex``), so the model and
    the engine agree; both are checked to round-trip through the decoder.
    """
    return f"{kind}-{org_digest(org_id)}-{suffix}"


def key_part(value: str) -> str:
    """``value`` with ``%`` and ``/`` percent-encoded: one part of a control-topic key.

    SPEC section 6: the key of ``credits.control.v1`` is ``org_id/member_id`` with each part
    encoded so, which makes distinct members always have distinct keys (``a/b`` + ``c`` is
    ``a%2Fb/c``, ``a`` + ``b/c`` is ``a/b%2Fc``).
    """
    return value.replace("%", "%25").replace("/", "%2F")


def split_key(key: str) -> tuple[str, str]:
    """The ``(org_id, member_id)`` of a control-topic key made by :func:`key_part`."""
    org, sep, member = key.partition("/")
    if not sep:
        raise ValueError("a control-topic key has one unencoded '/'")
    return _unquote(org), _unquote(member)


_KEY_ESCAPES: Final = {"%25": "%", "%2F": "/"}
_KEY_UNQUOTE: Final = re.compile("%25|%2F")
_TAG_ESCAPES: Final = {"%25": "%", "%7B": "{", "%7D": "}"}
_TAG_UNQUOTE: Final = re.compile("%25|%7B|%7D")


def _unquote(part: str) -> str:
    return _KEY_UNQUOTE.sub(lambda m: _KEY_ESCAPES[m.group()], part)


def hash_tag_part(value: str) -> str:
    """``value`` made safe inside a Redis Cluster hash tag ``{...}``.

    Redis hashes the characters between the first ``{`` and the next ``}``; ``%``, ``{`` and
    ``}`` are percent-encoded so that an id can neither end the tag early nor be empty.
    """
    return value.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def unhash_tag_part(part: str) -> str:
    """Inverse of :func:`hash_tag_part`."""
    return _TAG_UNQUOTE.sub(lambda m: _TAG_ESCAPES[m.group()], part)
