"""Units, bounds and the Redis key layout shared by the engine, the pipeline and the API."""

from __future__ import annotations

import zlib
from typing import NamedTuple

MC_PER_CREDIT = 1_000
"""Amounts are integer millicredits everywhere inside the worker (1 credit = 1,000 mc)."""

CENTS_PER_CREDIT = 1
"""100 credits = 1 USD, so one credit is one US cent."""

# --- Exact-amount bounds -------------------------------------------------------------------
# The production engine is Redis Lua, whose numbers are IEEE doubles: integers are exact up to
# 2**53 - 1 (about 9.007e15 mc, 9.007e12 credits). Every input amount is capped so that every
# sum the engine forms (a balance plus one input) stays below that bound.
MAX_EXACT_MC = 2**53 - 1
MAX_USAGE_MC = 1_000_000 * MC_PER_CREDIT
"""Largest single usage event (SPEC section 5: credits <= 1,000,000)."""
MAX_AMOUNT_MC = 10**12
"""Largest single admin amount (purchase, promo grant, refill settings, limits): 10^9 credits."""
MAX_BALANCE_MC = 10**13
"""Largest pool balance, member debt or open invoice (10^10 credits); inputs that would pass it
are rejected with ``balance_overflow``. Redis' cjson prints 14 significant digits, so every
amount an effect or a record carries must stay below 10^14 mc; MAX_BALANCE_MC + MAX_AMOUNT_MC
does."""
MAX_TIER_CREDITS = 1_000_000
"""Tier allocations above this could make the proration product inexact in a double."""

MAX_SEATS = 16
"""Closed seats remembered per member (usage in a gap between them is rejected); a member
removed more often has its oldest seats merged, so usage in those oldest gaps is invoiced."""

INACTIVITY_MONTHS = 12
"""The pool expires after this many calendar months without usage or funding (SPEC 3)."""

DEFAULT_WALK_BUDGET = 250
"""Member records one engine script call may visit for org-wide work before it yields."""

# --- Redis key layout ---------------------------------------------------------------------
# Every key of an org is ``<prefix>:{s<shard>}:<suffix>:<org_id>``: the hash tag names one of a
# fixed number of virtual shards (``redis_shards``), not the org, so one script call can apply
# many orgs (every org of a shard is in one Redis Cluster slot). The org id follows the tag as
# plain data: Redis Cluster hashes only the first ``{...}``, so any character of an id is safe.
KEY_ORG = "o"  # hash: org settings, clock, cycle, pool, counters, watermarks, job state
KEY_MEMBERS = "m"  # hash: member_id -> JSON member record (worker/layout.py MEMBER_FIELDS)
KEY_OUTBOX = "x"  # stream: entry id <last seq>-0, field "e" = JSON list of effect rows
KEY_PAUSED = "p"  # zset (score 0): active members currently paused
KEY_DEPENDENTS = "q"  # zset (score 0): running members that can only pay from the pool
KEY_DEBTORS = "b"  # zset: members with debt, scored by the org clock when the debt began
KEY_PROMO_EXPIRY = "e"  # zset: "<member_id>\0<grant_id>" scored by expiry ms
KEY_UNKNOWN = "u"  # set: "u|<source>|<offset>" of usage for a member that did not exist yet
ORG_KEY_SUFFIXES = (
    KEY_ORG,
    KEY_MEMBERS,
    KEY_OUTBOX,
    KEY_PAUSED,
    KEY_DEPENDENTS,
    KEY_DEBTORS,
    KEY_PROMO_EXPIRY,
    KEY_UNKNOWN,
)


class OrgKeys(NamedTuple):
    """The engine's keys of one org, in the order the scripts take them in ``KEYS``."""

    org: str
    members: str
    outbox: str
    paused: str
    dependents: str
    debtors: str
    promo_expiry: str
    unknown: str


def shard_of(org_id: str, shards: int) -> int:
    """The org's virtual shard: CRC-32 of its UTF-8 bytes modulo ``shards``."""
    return zlib.crc32(org_id.encode("utf-8", "surrogatepass")) % shards


def shard_tag(prefix: str, shard: int) -> str:
    """``<prefix>:{s<shard>}:``, the start of every key of the shard's orgs."""
    return f"{prefix}:{{s{shard}}}:"


def org_keys(prefix: str, org_id: str, shards: int) -> OrgKeys:
    """The engine's keys of one org (all share its shard's hash tag)."""
    tag = shard_tag(prefix, shard_of(org_id, shards))
    return OrgKeys(*(f"{tag}{suffix}:{org_id}" for suffix in ORG_KEY_SUFFIXES))


def org_of_key(prefix: str, key: str, suffix: str) -> str | None:
    """The org id of one of its keys (``None`` when ``key`` is not such a key)."""
    head = f"{prefix}:{{s"
    if not key.startswith(head):
        return None
    close = key.find("}:", len(head))
    if close < 0 or not key[len(head) : close].isdigit():
        return None
    rest = key[close + 2 :]
    lead = suffix + ":"
    return rest[len(lead) :] if rest.startswith(lead) else None


# --- Outcome statuses and engine error codes ----------------------------------------------
APPLIED = "applied"
DUPLICATE = "duplicate"
REPLAYED = "replayed"
REJECTED = "rejected"
UNKNOWN = "unknown"
ELSEWHERE = "elsewhere"
"""Not decided here: the org's home is another partition (the code names it)."""

E_UNKNOWN_ORG = "unknown_org"
E_UNKNOWN_MEMBER = "unknown_member"
E_UNKNOWN_TIER = "unknown_tier"
E_MEMBER_REMOVED = "member_removed"
E_MEMBER_EXISTS = "member_exists"
E_INVALID_AMOUNT = "invalid_amount"
E_INVALID_COMMAND = "invalid_command"
E_BALANCE_OVERFLOW = "balance_overflow"
E_PROMO_EXPIRED = "promo_expired"
E_DUPLICATE_GRANT = "duplicate_grant"
E_UNKNOWN_REQUEST = "unknown_request"
"""Not a rejection: a refill_result for an unknown or answered request is applied as a no-op."""
