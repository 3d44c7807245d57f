"""The admin page ``GET /orgs/{org_id}``, rendered on the server from the admin view.

Sections: organization credits (pool card, reset date, auto-refill state, "Add credits"),
member usage limits (seat tiers with their pool limits; members with an ellipsis menu and "Set
custom limit"), members in debt (since when, what would clear it), credit requests, usage over
the cycle (SVG charts). Write controls are plain HTML forms (no script; the ellipsis menu is a
``<details>`` element, a dialog is the same page with ``?dialog=``) and are rendered only when
``PageContext.form_token`` is set, that is for a session with the admin role on this org.

Every value is escaped (``_e``): ids are producer data and may hold any character but control
characters. Amounts are shown with thousands separators and their unit, times in UTC.
"""

from __future__ import annotations

import datetime as dt
import html
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

from worker.svg import Series, credits_text, daily_bars, member_bars

PAGE_REFRESH_SECONDS = 5
PENDING_REFRESH_SECONDS = 2
DAY_MS = 86_400_000

DAILY_SERIES = (
    Series("allocation", "Allocation", "#2f5bd3"),
    Series("promo", "Promotions", "#8e5bd3"),
    Series("block", "Pool", "#1f9d6b"),
    Series("debt", "Debt", "#d3452f"),
)
MEMBER_SERIES = (
    Series("allocation", "Allocation", "#2f5bd3"),
    Series("promo", "Promotions", "#8e5bd3"),
    Series("pool", "Pool", "#1f9d6b"),
    Series("debt", "Debt", "#d3452f"),
)


@dataclass
class Pending:
    """A change published from the page: ``status`` ``pending`` until the worker decided it."""

    command_id: str
    description: str
    status: str = "pending"  # pending | applied | rejected
    code: str | None = None


@dataclass
class History:
    """What the page shows from PostgreSQL (``None`` values: the ledger did not answer)."""

    credit_requests: list[dict[str, Any]] | None = None
    refill_failures: list[dict[str, Any]] | None = None
    daily_usage: dict[int, dict[str, int]] | None = None


@dataclass
class PageContext:
    """Who looks at the page and what they asked for."""

    form_token: str | None = None
    """The per-form CSRF token; set only when the session may change this org."""
    pending: list[Pending] = field(default_factory=list)
    dialog: str | None = None  # purchase | auto-refill | tier-limit | member-limit
    dialog_target: str | None = None  # the tier or member of the dialog
    error: str | None = None


# --- Formatting ------------------------------------------------------------------------------
def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def amount(value: object) -> str:
    """A wire decimal credit string with thousands separators: ``"1234.5"`` -> ``1,234.5``."""
    if value is None:
        return ""
    try:
        mc = int(Decimal(str(value)) * 1000)
    except (InvalidOperation, ValueError):
        return str(value)
    return credits_text(mc)


def _credits(value: object) -> str:
    return f'{_e(amount(value))} <span class="unit">credits</span>'


def utc(value: object) -> str:
    """``2026-12-01T00:00:00Z`` -> ``2026-12-01 00:00 UTC`` (unparsable values shown as-is)."""
    if not isinstance(value, str):
        return "" if value is None else str(value)
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return parsed.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def utc_ms(ms: int) -> str:
    """Epoch milliseconds as ``YYYY-MM-DD HH:MM UTC``."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def iso_ms(value: str) -> int:
    """Epoch milliseconds of an RFC 3339 timestamp."""
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int(parsed.timestamp() * 1000)


def member_state(member: Mapping[str, Any]) -> str:
    """``running``, ``paused (reason)`` or ``removed``."""
    if not member.get("active", True):
        return "removed"
    if member.get("state") == "paused":
        reason = member.get("pause_reason")
        return f"paused ({reason})" if reason else "paused"
    return str(member.get("state") or "running")


def limit_text(limit: object) -> str:
    """A pool limit for people: ``no limit`` or ``1,000``."""
    return "no limit" if limit is None else amount(limit)


def describe(command: Mapping[str, Any]) -> str:
    """One line saying what an admin command changes (the pending list)."""
    typ = command.get("type")
    if typ == "member_limit_set":
        lim = command.get("limit")
        what = "the tier's limit" if lim == "inherit" else limit_text(lim)
        if lim not in (None, "inherit"):
            what += " credits"
        return f"Pool limit of member {command.get('member_id')}: {what}"
    if typ == "tier_limit_set":
        lim = command.get("limit")
        what = limit_text(lim) + ("" if lim is None else " credits")
        return f"Pool limit of tier {command.get('tier')}: {what}"
    if typ == "pool_purchase":
        return f"Add {amount(command.get('credits'))} credits to the pool"
    if typ == "auto_refill_set":
        state = "on" if command.get("enabled") else "off"
        return (
            f"Auto-refill {state}: below {amount(command.get('threshold'))}, add "
            f"{amount(command.get('amount'))}, at most {amount(command.get('monthly_limit'))} "
            "credits per month"
        )
    return f"{typ} command"


def _page_url(org_id: str, **query: str) -> str:
    base = f"/orgs/{quote(org_id, safe='')}"
    return f"{base}?{urlencode(query)}" if query else base


def action_url(org_id: str, action: str) -> str:
    """Where a form of the page posts to."""
    return f"/orgs/{quote(org_id, safe='')}/actions/{action}"


def _template(name: str) -> string.Template:
    text = resources.files("worker").joinpath(f"templates/{name}").read_text(encoding="utf-8")
    return string.Template(text)


# --- Sections --------------------------------------------------------------------------------
def _pending_section(ctx: PageContext) -> str:
    if not ctx.pending:
        return ""
    items = []
    for p in ctx.pending:
        label = {"pending": "Pending", "applied": "Applied", "rejected": "Rejected"}[p.status]
        code = f" ({_e(p.code)})" if p.code else ""
        items.append(
            f'<li class="{p.status}" data-command="{_e(p.command_id)}">'
            f'<span class="status">{label}</span>: {_e(p.description)}{code}</li>'
        )
    return f'<section id="pending"><h2>Changes</h2><ul>{"".join(items)}</ul></section>'


def _refill_failure(history: History) -> str:
    failures = history.refill_failures
    if not failures:
        return "refill failed"
    last = failures[0]
    detail = last.get("detail") or {}
    mc = detail.get("credits_mc")
    credits = f" for {credits_text(mc)} credits" if isinstance(mc, int) else ""
    return (
        f"refill request {detail.get('request_id')}{credits} declined by the payment system "
        f"at {utc_ms(int(last['at_ms']))}"
    )


def _org_section(doc: Mapping[str, Any], history: History, ctx: PageContext) -> str:
    pool = doc.get("pool") or {}
    refill = pool.get("auto_refill") or {}
    flags = []
    if pool.get("locked"):
        flags.append("locked (refill failed)")
    if pool.get("refill_pending"):
        flags.append("refill pending")
    pending = refill.get("pending")
    locked = (
        f'<span class="alert" id="pool-locked">Locked after a failed payment: '
        f"{_e(_refill_failure(history))}. No new pool draws until credits are added.</span>"
        if pool.get("locked")
        else '<span id="pool-locked">no</span>'
    )
    add = ""
    if ctx.form_token:
        add = (
            f'<p><a class="button" id="add-credits" '
            f'href="{_e(_page_url(str(doc["org_id"]), dialog="purchase"))}">Add credits</a> '
            f'<a class="button secondary" id="edit-refill" '
            f'href="{_e(_page_url(str(doc["org_id"]), dialog="auto-refill"))}">'
            "Auto-refill settings</a></p>"
        )
    return f"""<section id="org-credits"><h2>Organization credits</h2>
<div class="cards">
  <div class="card"><div class="label">Pool balance</div>
    <div class="value"><span id="pool-balance">{_e(amount(pool.get("balance")))}</span>
    <span class="unit">credits</span></div>
    <div class="sub" id="pool-status">{_e(", ".join(flags) or "ok")}</div></div>
  <div class="card"><div class="label">Pool used this cycle</div>
    <div class="value"><span id="pool-used">{_e(amount(pool.get("used_this_cycle")))}</span>
    <span class="unit">credits</span></div>
    <div class="sub">cycle started <span id="cycle-start">{_e(utc(doc.get("cycle_start")))}</span>
    </div></div>
  <div class="card reset"><div class="label">Resets</div>
    <div class="value" id="reset-at" data-iso="{_e(doc.get("reset_at"))}">{
        _e(utc(doc.get("reset_at")))
    }</div>
    <div class="sub"><span id="member-count">{len(doc.get("members") or [])}</span> members</div>
  </div>
</div>
<dl class="settings" id="auto-refill">
  <dt>Auto-refill</dt><dd id="refill-enabled">{"enabled" if refill.get("enabled") else "off"}</dd>
  <dt>Threshold</dt><dd id="refill-threshold">{_credits(refill.get("threshold"))}</dd>
  <dt>Amount</dt><dd id="refill-amount">{_credits(refill.get("amount"))}</dd>
  <dt>Monthly reload limit</dt><dd id="refill-monthly">{_credits(refill.get("monthly_limit"))}</dd>
  <dt>Refilled this cycle</dt><dd id="refill-refilled">{
        _credits(refill.get("refilled_this_cycle"))
    }</dd>
  <dt>Pending request</dt><dd id="refill-pending">{
        "none"
        if not pending
        else f"{_e(pending.get('request_id'))} for {_credits(pending.get('credits'))}"
    }</dd>
  <dt>Locked</dt><dd>{locked}</dd>
</dl>
{add}
</section>"""


def _pending_for(ctx: PageContext, kind: str, target: str) -> str:
    """A badge on the row a still-pending change is about."""
    for p in ctx.pending:
        if p.status == "pending" and p.description.startswith(f"Pool limit of {kind} {target}:"):
            return ' <span class="badge pending-badge">change pending</span>'
    return ""


def _tiers_section(doc: Mapping[str, Any], ctx: PageContext) -> str:
    org_id = str(doc["org_id"])
    rows = []
    for t in doc.get("tiers") or []:
        tier = str(t.get("tier"))
        edit = ""
        if ctx.form_token:
            url = _page_url(org_id, dialog="tier-limit", tier=tier)
            edit = f'<a class="button secondary edit-tier" href="{_e(url)}">Edit</a>'
        rows.append(
            f'<tr data-tier="{_e(tier)}"><td class="tier">{_e(tier)}</td>'
            f'<td class="num credits">{_e(amount(t.get("credits")))}</td>'
            f'<td class="num tier_limit">{_e(limit_text(t.get("pool_limit")))}'
            f"{_pending_for(ctx, 'tier', tier)}</td>"
            f'<td class="actions">{edit}</td></tr>'
        )
    return f"""<section id="tier-limits"><h2>Member usage limits: seat tiers</h2>
<p class="src">How many pool credits each member of a tier may draw per cycle, on top of the
seat's own allocation. A member's custom limit wins over the tier's.</p>
<table><thead><tr><th>Tier</th><th class="num">Allocation per cycle (credits)</th>
<th class="num">Additional-credit limit (credits)</th><th></th></tr></thead>
<tbody>{"".join(rows)}</tbody></table></section>"""


def _limit_cell(m: Mapping[str, Any], ctx: PageContext) -> str:
    setting = m.get("limit_setting", "inherit")
    source = "tier" if setting == "inherit" else "custom"
    return (
        f'<td class="num pool_limit">{_e(limit_text(m.get("pool_limit")))} '
        f'<span class="src">({source})</span>'
        f"{_pending_for(ctx, 'member', str(m.get('member_id')))}</td>"
    )


def _menu(org_id: str, member_id: str) -> str:
    url = _page_url(org_id, dialog="member-limit", member=member_id)
    return (
        '<details class="menu"><summary aria-label="Actions for '
        f'{_e(member_id)}" title="Actions">&#x22EF;</summary><div class="menu-items">'
        f'<a class="set-limit" href="{_e(url)}">Set custom limit</a></div></details>'
    )


def _members_section(doc: Mapping[str, Any], ctx: PageContext) -> str:
    org_id = str(doc["org_id"])
    rows = []
    for m in doc.get("members") or []:
        state = member_state(m)
        css = "removed" if state == "removed" else ("paused" if "paused" in state else "")
        mid = str(m.get("member_id"))
        menu = _menu(org_id, mid) if ctx.form_token and m.get("active", True) else ""
        rows.append(
            f'<tr class="{css}" data-member="{_e(mid)}">'
            f'<td class="member">{_e(mid)}</td>'
            f'<td class="tier">{_e(m.get("tier"))}</td>'
            f'<td class="num granted">{_e(amount(m.get("granted")))}</td>'
            f'<td class="num used">{_e(amount(m.get("used")))}</td>'
            f'<td class="num remaining">{_e(amount(m.get("remaining")))}</td>'
            f'<td class="num pool_drawn">{_e(amount(m.get("pool_drawn")))}</td>'
            f"{_limit_cell(m, ctx)}"
            f'<td class="num negative_balance">{_e(amount(m.get("negative_balance")))}</td>'
            f'<td class="state">{_e(state)}</td>'
            f'<td class="actions">{menu}</td>'
            "</tr>"
        )
    body = "\n".join(rows) or '<tr><td colspan="10" class="empty">No members yet</td></tr>'
    return f"""<section id="member-limits"><h2>Members</h2>
<table id="members">
<thead><tr>
  <th>Member</th><th>Tier</th><th class="num">Granted</th><th class="num">Used</th>
  <th class="num">Remaining</th><th class="num">Pool drawn</th><th class="num">Pool limit</th>
  <th class="num">Negative balance</th><th>State</th><th></th>
</tr></thead>
<tbody>
{body}
</tbody>
</table><p class="src">All amounts in credits.</p></section>"""


def _mc(value: object) -> int:
    try:
        return int(Decimal(str(value)) * 1000)
    except (InvalidOperation, ValueError):
        return 0


def clear_hint(doc: Mapping[str, Any], m: Mapping[str, Any]) -> str:
    """What would clear a member's debt: funding the pool, a higher limit, or both.

    Settlement draws pool blocks within the member's limit (SPEC section 4), so the debt clears
    once the pool holds it (and is unlocked) and the limit leaves room for it.
    """
    pool = doc.get("pool") or {}
    debt, balance = _mc(m.get("negative_balance")), _mc(pool.get("balance"))
    needs = []
    if pool.get("locked"):
        needs.append(f"add credits to the pool (at least {credits_text(max(1, debt - balance))})")
    elif balance < debt:
        needs.append(f"add at least {credits_text(debt - balance)} credits to the pool")
    lim = m.get("pool_limit")
    if lim is not None:
        room = _mc(lim) - _mc(m.get("pool_drawn"))
        if room < debt:
            target = credits_text(_mc(m.get("pool_drawn")) + debt)
            whose = "the tier's" if m.get("limit_setting") == "inherit" else "the member's"
            needs.append(f"raise {whose} pool limit to at least {target} credits")
    if not needs:
        return "settles with the next evaluation"
    return "; and ".join(needs)


def _debt_section(doc: Mapping[str, Any]) -> str:
    rows = []
    for m in doc.get("members") or []:
        if _mc(m.get("negative_balance")) <= 0:
            continue
        rows.append(
            f'<tr data-member="{_e(m.get("member_id"))}"><td class="member">'
            f"{_e(m.get('member_id'))}</td>"
            f'<td class="num debt">{_e(amount(m.get("negative_balance")))}</td>'
            f'<td class="since">{_e(utc(m.get("debt_since")) or "-")}</td>'
            f'<td class="state">{_e(member_state(m))}</td>'
            f'<td class="clear">{_e(clear_hint(doc, m))}</td></tr>'
        )
    body = "".join(rows) or '<tr><td colspan="5" class="empty">Nobody is in debt</td></tr>'
    return f"""<section id="debt"><h2>Members in debt</h2>
<table><thead><tr><th>Member</th><th class="num">Negative balance (credits)</th>
<th>Since</th><th>State</th><th>What would clear it</th></tr></thead>
<tbody>{body}</tbody></table></section>"""


def _requests_section(history: History) -> str:
    if history.credit_requests is None:
        body = '<tr><td colspan="4" class="empty">The ledger is not available</td></tr>'
    else:
        rows = []
        for r in history.credit_requests:
            detail = r.get("detail") or {}
            mc = detail.get("credits_mc")
            rows.append(
                f'<tr data-member="{_e(r.get("member_id"))}">'
                f'<td class="at">{_e(utc_ms(int(r["at_ms"])))}</td>'
                f'<td class="member">{_e(r.get("member_id"))}</td>'
                f'<td class="num credits">{_e(credits_text(mc) if isinstance(mc, int) else "")}'
                f'</td><td class="note">{_e(detail.get("note") or "")}</td></tr>'
            )
        body = "".join(rows) or '<tr><td colspan="4" class="empty">No credit requests</td></tr>'
    return f"""<section id="credit-requests"><h2>Credit requests</h2>
<p class="src">Members who reached their limit and asked for more, newest first.</p>
<table><thead><tr><th>Asked at</th><th>Member</th><th class="num">Credits</th><th>Note</th>
</tr></thead><tbody>{body}</tbody></table></section>"""


def _usage_section(doc: Mapping[str, Any], history: History) -> str:
    if history.daily_usage is None:
        chart = '<p class="empty">The ledger is not available</p>'
    else:
        start = iso_ms(str(doc["cycle_start"]))
        end = iso_ms(str(doc["reset_at"]))
        first, last = start // DAY_MS, (end - 1) // DAY_MS
        days = []
        for day in range(first, last + 1):
            values = dict(history.daily_usage.get(day, {}))
            values["debt"] = values.get("debt", 0) + values.pop("invoice", 0)
            label = dt.datetime.fromtimestamp(day * 86_400, dt.UTC).strftime("%m-%d")
            days.append((label, values))
        chart = daily_bars(days, DAILY_SERIES, title="Credits used per day this cycle")
    rows = [
        (
            str(m.get("member_id")),
            {
                "allocation": _mc(m.get("used_allocation")),
                "promo": _mc(m.get("used_promotions")),
                "pool": _mc(m.get("used_pool")),
                "debt": _mc(m.get("negative_balance")),
            },
        )
        for m in doc.get("members") or []
    ]
    bars = member_bars(rows, MEMBER_SERIES, title="Credits used this cycle per member")
    return f"""<section id="usage"><h2>Usage over the cycle</h2>
<p class="src">Credits used per day (UTC) from {_e(utc(doc.get("cycle_start")))} to the reset on
{_e(utc(doc.get("reset_at")))}, by what paid them.</p>
<div id="daily-chart">{chart}</div>
<h2>Per member this cycle</h2><div id="member-chart">{bars}</div></section>"""


# --- Dialogs ---------------------------------------------------------------------------------
def _radio(name: str, value: str, label: str, checked: bool) -> str:
    on = " checked" if checked else ""
    return f'<label><input type="radio" name="{name}" value="{_e(value)}"{on}> {_e(label)}</label>'


def _dialog(doc: Mapping[str, Any], ctx: PageContext) -> str:
    org_id = str(doc["org_id"])
    token = ctx.form_token
    if not token or not ctx.dialog:
        return ""
    hidden = f'<input type="hidden" name="form_token" value="{_e(token)}">'
    title, fields, action = "", "", ""
    if ctx.dialog == "member-limit":
        member = next(
            (m for m in doc.get("members") or [] if m.get("member_id") == ctx.dialog_target), None
        )
        if member is None:
            return ""
        setting = member.get("limit_setting", "inherit")
        title = f"Set custom limit for {member.get('member_id')}"
        action = "member-limit"
        value = "" if setting in (None, "inherit") else amount(setting)
        tier_limit = next(
            (t.get("pool_limit") for t in doc.get("tiers") or [] if t["tier"] == member["tier"]),
            None,
        )
        fields = (
            f'<input type="hidden" name="member_id" value="{_e(member.get("member_id"))}">'
            + _radio("mode", "none", "No limit", setting is None)
            + _radio("mode", "limit", "Has limit", setting not in (None, "inherit"))
            + '<label>Limit (credits per cycle) <input type="text" name="limit" id="limit" '
            f'inputmode="numeric" value="{_e(value)}"></label>'
            + _radio(
                "mode",
                "inherit",
                f"Use the {member.get('tier')} tier's ({limit_text(tier_limit)})",
                setting == "inherit",
            )
        )
    elif ctx.dialog == "tier-limit":
        tier = next((t for t in doc.get("tiers") or [] if t["tier"] == ctx.dialog_target), None)
        if tier is None:
            return ""
        lim = tier.get("pool_limit")
        title = f"Additional-credit limit of tier {tier['tier']}"
        action = "tier-limit"
        fields = (
            f'<input type="hidden" name="tier" value="{_e(tier["tier"])}">'
            + _radio("mode", "none", "No limit", lim is None)
            + _radio("mode", "limit", "Has limit", lim is not None)
            + '<label>Limit (credits per member and cycle) <input type="text" name="limit" '
            f'id="limit" inputmode="numeric" value="{_e("" if lim is None else amount(lim))}">'
            "</label>"
        )
    elif ctx.dialog == "purchase":
        title, action = "Add credits to the pool", "pool-purchase"
        fields = (
            '<label>Credits <input type="text" name="credits" id="credits" '
            'inputmode="decimal"></label><p class="src">100 credits = 1 USD. Credits are '
            "added at once; members in debt are settled first.</p>"
        )
    elif ctx.dialog == "auto-refill":
        refill = (doc.get("pool") or {}).get("auto_refill") or {}
        title, action = "Auto-refill", "auto-refill"
        on = " checked" if refill.get("enabled") else ""

        def text(name: str, label: str) -> str:
            value = _e(amount(refill.get(name)))
            return (
                f'<label>{label} (credits) <input type="text" name="{name}" id="{name}" '
                f'inputmode="decimal" value="{value}"></label>'
            )

        fields = (
            f'<label><input type="checkbox" name="enabled" value="true"{on}> Enabled</label>'
            + text("threshold", "Refill when the pool falls below")
            + text("amount", "Amount per refill")
            + text("monthly_limit", "Monthly reload limit")
        )
    else:
        return ""
    error = f'<p class="alert" id="form-error">{_e(ctx.error)}</p>' if ctx.error else ""
    return f"""<div class="overlay"></div>
<div class="dialog" role="dialog" aria-modal="true" id="dialog" data-dialog="{_e(ctx.dialog)}">
<h2>{_e(title)}</h2>{error}
<form method="post" action="{_e(action_url(org_id, action))}" id="dialog-form">{hidden}{fields}
<div class="actions"><button type="submit" id="save">Save</button>
<a class="button secondary" href="{_e(_page_url(org_id))}" id="cancel">Cancel</a></div>
</form></div>"""


def render_page(doc: Mapping[str, Any], history: History, ctx: PageContext) -> str:
    """The whole admin page of one org (all values escaped)."""
    waiting = any(p.status == "pending" for p in ctx.pending)
    refresh_s = PENDING_REFRESH_SECONDS if waiting else PAGE_REFRESH_SECONDS
    # No reload while a dialog is open: it would drop what the admin is typing.
    refresh = "" if ctx.dialog else f'<meta http-equiv="refresh" content="{refresh_s}">'
    body = "\n".join(
        (
            _pending_section(ctx),
            _org_section(doc, history, ctx),
            _tiers_section(doc, ctx),
            _members_section(doc, ctx),
            _debt_section(doc),
            _requests_section(history),
            _usage_section(doc, history),
            _dialog(doc, ctx),
        )
    )
    return _template("admin.html").substitute(
        org_id=_e(doc.get("org_id")),
        refresh=refresh,
        body=body,
        generated_at=_e(dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
        refresh_note="" if ctx.dialog else f"; refreshes every {refresh_s} s.",
    )


def render_message_page(status: int, message: str) -> str:
    """A minimal error page (no data of any org)."""
    return _template("message.html").substitute(status=status, message=_e(message))


def pending_list(
    published: Sequence[tuple[str, str]], decided: Mapping[str, Mapping[str, Any]]
) -> list[Pending]:
    """``Pending`` entries for ``(command_id, description)`` pairs, with the decided ones'
    status."""
    out = []
    for cid, description in published:
        row = decided.get(cid)
        if row is None:
            out.append(Pending(cid, description))
        else:
            status = "applied" if row.get("status") == "applied" else "rejected"
            out.append(Pending(cid, description, status, row.get("code")))
    return out
