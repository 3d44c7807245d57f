"""Views of the rules' state: the SPEC section 7 dashboard and the comparable state snapshot.

The rules (``worker/model.py``) keep the state; the views turn it into what the API serves
(``dashboard_view``: credit strings, RFC 3339 times; ``entitlement_view``: one member's
go/no-go for the agent runtime) and what the tests compare engine against
model with (``state_view``). Both engines build the same ``Org`` (``RedisEngine.load_org`` from
Redis, ``Model`` in memory) and show it through these functions, so the dashboard cannot differ
between them. Money and times are formatted by the wire contract's one formatter each
(``schemas.amounts.format_credits``, ``schemas.timestamps.format_timestamp``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.amounts import format_credits as format_mc
from schemas.timestamps import format_timestamp as iso
from worker.model import Member, Model, Org, effective_limit, member_order


def dashboard(model: Model, org_id: str) -> dict[str, Any] | None:
    """The model's dashboard of ``org_id`` (None for an unknown org)."""
    org = model.orgs.get(org_id)
    return None if org is None else dashboard_view(org, model.tiers_mc)


def state(model: Model, org_id: str) -> dict[str, Any] | None:
    """The model's comparable state of ``org_id`` (None for an unknown org)."""
    org = model.orgs.get(org_id)
    return None if org is None else state_view(org)


def dashboard_view(org: Org, tiers_mc: Mapping[str, int]) -> dict[str, Any]:
    """SPEC section 7 dashboard of an org whose members are all rolled to its cycle."""
    members = []
    for mid in sorted(org.members, key=member_order):
        m = org.members[mid]
        promo_left = sum(g.rem for g in m.promos)
        used = m.au + m.pu + m.bu
        remaining = (m.ag - m.au) + m.bk + promo_left
        lim = effective_limit(org, m)
        members.append(
            {
                "member_id": mid,
                "tier": m.tier,
                "active": m.active,
                "granted": format_mc(used + remaining),
                "used": format_mc(used),
                "remaining": format_mc(remaining),
                "pool_drawn": format_mc(m.dr),
                "pool_limit": None if lim is None else format_mc(lim),
                "negative_balance": format_mc(m.debt),
                "state": "paused" if m.paused else "running",
                "pause_reason": m.reason if m.paused else None,
            }
        )
    return {
        "org_id": org.org_id,
        "cycle_start": iso(org.cstart),
        "reset_at": iso(org.cend),
        "pool": {
            "balance": format_mc(org.pool),
            "used_this_cycle": format_mc(org.pdrawn),
            "locked": org.locked,
            "refill_pending": org.rf_pending_id is not None,
        },
        "members": members,
    }


def admin(model: Model, org_id: str) -> dict[str, Any] | None:
    """The model's admin view of ``org_id`` (None for an unknown org)."""
    org = model.orgs.get(org_id)
    return None if org is None else admin_view(org, model.tiers_mc)


def _limit_setting(limit: int | str | None) -> str | None:
    if isinstance(limit, str):
        return limit  # "inherit"
    return None if limit is None else format_mc(limit)


def admin_view(org: Org, tiers_mc: Mapping[str, int]) -> dict[str, Any]:
    """The admin page's document: the SPEC section 7 dashboard plus the settings behind it.

    Added to the dashboard: the org clock; the auto-refill settings and state (``refilled``:
    successful refills this cycle; ``pending``: the open refill request); the seat tiers with
    their credits per cycle and pool limit (``null``: no limit); per member the limit setting
    (``"inherit"``, ``null`` or credits), when the current debt began (``debt_since``, org
    clock) and what this cycle's usage was paid from (``used_allocation``, ``used_promotions``,
    ``used_pool``).
    """
    doc = dashboard_view(org, tiers_mc)
    doc["clock"] = iso(org.clock)
    doc["pool"]["auto_refill"] = {
        "enabled": org.rf_enabled,
        "threshold": format_mc(org.rf_threshold),
        "amount": format_mc(org.rf_amount),
        "monthly_limit": format_mc(org.rf_monthly),
        "refilled_this_cycle": format_mc(org.refilled),
        "pending": None
        if org.rf_pending_id is None
        else {"request_id": org.rf_pending_id, "credits": format_mc(org.rf_pending_mc)},
    }
    doc["tiers"] = [
        {
            "tier": tier,
            "credits": format_mc(credits),
            "pool_limit": _limit_setting(org.tier_limits.get(tier)),
        }
        for tier, credits in sorted(tiers_mc.items(), key=lambda kv: (kv[1], kv[0]))
    ]
    for row in doc["members"]:
        m = org.members[row["member_id"]]
        row["limit_setting"] = _limit_setting(m.limit)
        row["debt_since"] = iso(m.dsince) if m.debt > 0 and m.dsince else None
        row["used_allocation"] = format_mc(m.au)
        row["used_promotions"] = format_mc(m.pu)
        row["used_pool"] = format_mc(m.bu)
    return doc


def entitlements(model: Model, org_id: str, member_ids: list[str]) -> dict[str, Any] | None:
    """The model's entitlements of members of ``org_id`` (None for an unknown org; a member
    the org does not have maps to None)."""
    org = model.orgs.get(org_id)
    if org is None:
        return None
    return {
        mid: None if mid not in org.members else entitlement_view(org, org.members[mid])
        for mid in member_ids
    }


def entitlement_view(org: Org, m: Member) -> dict[str, Any]:
    """What the agent runtime checks before it starts a task for member ``m`` (rolled to the
    org's cycle).

    ``allowed`` follows the member's pause state as the control topic shows it (a removed
    member is paused with ``member_removed``); ``remaining`` is the dashboard's (promotions,
    allocation and block left); ``pool_available`` is what the member could still draw from
    the pool now: nothing while the pool is locked or the seat removed, else the pool balance
    capped by what the member's pool limit leaves this cycle.
    """
    lim = effective_limit(org, m)
    if org.locked or not m.active:
        pool_available = 0
    elif lim is None:
        pool_available = org.pool
    else:
        pool_available = min(org.pool, max(0, lim - m.dr))
    remaining = (m.ag - m.au) + m.bk + sum(g.rem for g in m.promos)
    return {
        "org_id": org.org_id,
        "member_id": m.member_id,
        "allowed": m.active and not m.paused,
        "active": m.active,
        "state": "paused" if m.paused else "running",
        "pause_reason": m.reason if m.paused else None,
        "remaining": format_mc(remaining),
        "pool_available": format_mc(pool_available),
        "negative_balance": format_mc(m.debt),
        "as_of_seq": org.seq,
    }


ORG_VIEW_FIELDS = (
    "anchor",
    "pending_anchor",
    "clock",
    "cycle_no",
    "cstart",
    "cend",
    "last_act",
    "pool",
    "locked",
    "pdrawn",
    "below",
    "rf_enabled",
    "rf_threshold",
    "rf_amount",
    "rf_monthly",
    "refilled",
    "rf_pending_id",
    "rf_pending_mc",
    "rf_counter",
    "rf_limit_notified",
    "invoice_extra",
    "seq",
)
MEMBER_VIEW_FIELDS = (
    "tier",
    "next_tier",
    "active",
    "ag",
    "au",
    "bk",
    "dr",
    "bu",
    "pu",
    "debt",
    "dsince",
    "limit",
    "paused",
    "reason",
    "mseq",
    "added_at",
    "removed_at",
    "seats",
    "last_reason",
    "last_at",
)


def state_view(org: Org) -> dict[str, Any]:
    """Comparable snapshot: org fields, tier limits, watermarks and every member."""
    view: dict[str, Any] = {f: getattr(org, f) for f in ORG_VIEW_FIELDS}
    view["tier_limits"] = {k: v for k, v in org.tier_limits.items()}
    view["watermarks"] = dict(org.watermarks)
    view["members"] = {
        mid: {
            **{f: getattr(m, f) for f in MEMBER_VIEW_FIELDS},
            "promos": [(g.grant_id, g.rem, g.exp) for g in m.promos if g.rem > 0],
        }
        for mid, m in org.members.items()
    }
    return view
