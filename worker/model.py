"""The billing rules as a pure Python model: the reference the Redis Lua engine is tested against.

No I/O and no ``await``. The model keeps every org and member fully materialised and, after each
item and each due moment, settles every debtor and re-evaluates every member: the obviously
correct (and O(org size)) reading of SPEC sections 2-4. The Lua engine reaches the same results
incrementally; see ``docs/engine.md`` for the conventions both follow (effect order, ledger
movements, the chosen behaviour where the SPEC is silent).

Items and outcomes are the engine contract (``worker.contract``, re-exported here); effects are
plain dicts with the fields listed in ``docs/architecture.md``.
"""

from __future__ import annotations

import calendar
import datetime as dt
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from schemas.ids import derived_id
from worker.constants import (
    APPLIED,
    E_BALANCE_OVERFLOW,
    E_DUPLICATE_GRANT,
    E_INVALID_AMOUNT,
    E_INVALID_COMMAND,
    E_MEMBER_EXISTS,
    E_MEMBER_REMOVED,
    E_PROMO_EXPIRED,
    E_UNKNOWN_MEMBER,
    E_UNKNOWN_ORG,
    E_UNKNOWN_REQUEST,
    E_UNKNOWN_TIER,
    ELSEWHERE,
    INACTIVITY_MONTHS,
    MAX_AMOUNT_MC,
    MAX_BALANCE_MC,
    MAX_SEATS,
    MAX_TIER_CREDITS,
    MAX_USAGE_MC,
    MC_PER_CREDIT,
    REJECTED,
    REPLAYED,
    UNKNOWN,
)
from worker.contract import CommandItem, Item, Outcome, UsageItem

INHERIT = "inherit"
Limit = int | None | str
"""A member pool limit: ``"inherit"`` (use the tier's), ``None`` (no limit) or mc."""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def source_partition(source: str) -> int | None:
    """The partition of an item's ``"<topic>:<partition>"`` source (None: not from Kafka)."""
    _, sep, tail = source.rpartition(":")
    return int(tail) if sep and tail.isdigit() and tail.isascii() else None


# --- Calendar (UTC) --------------------------------------------------------------------------


def to_ms(value: dt.datetime) -> int:
    """Epoch milliseconds of an aware datetime."""
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def from_ms(ms: int) -> dt.datetime:
    """Aware UTC datetime of epoch milliseconds."""
    return _EPOCH + dt.timedelta(milliseconds=ms)


def _anchor_start(year: int, month: int, anchor_day: int) -> int:
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    return to_ms(dt.datetime(year, month, day, tzinfo=dt.UTC))


def _shift(year: int, month: int, n: int) -> tuple[int, int]:
    idx = year * 12 + (month - 1) + n
    return idx // 12, idx % 12 + 1


def cycle_containing(t_ms: int, anchor_day: int) -> tuple[int, int]:
    """The billing cycle ``[start, end)`` containing ``t_ms`` for an anchor day 1..31."""
    d = from_ms(t_ms)
    start = _anchor_start(d.year, d.month, anchor_day)
    if t_ms >= start:
        y, m = _shift(d.year, d.month, 1)
        return start, _anchor_start(y, m, anchor_day)
    y, m = _shift(d.year, d.month, -1)
    return _anchor_start(y, m, anchor_day), start


def next_cycle_end(start_ms: int, anchor_day: int) -> int:
    """The first anchor boundary strictly after ``start_ms`` (a new anchor may shorten a cycle)."""
    d = from_ms(start_ms)
    candidate = _anchor_start(d.year, d.month, anchor_day)
    if candidate > start_ms:
        return candidate
    y, m = _shift(d.year, d.month, 1)
    return _anchor_start(y, m, anchor_day)


def add_months(t_ms: int, months: int) -> int:
    """Same day and time ``months`` calendar months later (day clamped to the month's end)."""
    d = from_ms(t_ms)
    y, m = _shift(d.year, d.month, months)
    day = min(d.day, calendar.monthrange(y, m)[1])
    return to_ms(d.replace(year=y, month=m, day=day))


def prorate_mc(credits_mc: int, start_ms: int, end_ms: int, t_ms: int) -> int:
    """Mid-cycle allocation: floor(credits * (end - t) / (end - start)), whole credits, seconds."""
    credits = credits_mc // MC_PER_CREDIT
    total = end_ms // 1000 - start_ms // 1000
    left = end_ms // 1000 - t_ms // 1000
    if total <= 0 or left <= 0:
        return 0
    left = min(left, total)
    return (credits * left // total) * MC_PER_CREDIT


def cents(mc: int) -> int:
    """USD cents of a non-negative amount: 1 credit = 1 cent, rounded half up."""
    return (mc + 500) // 1000


# --- State ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Grant:
    """One promotional grant of a member."""

    grant_id: str
    rem: int
    exp: int


@dataclass(slots=True)
class Member:
    """Per-member state for the current cycle (field names match the Lua record)."""

    member_id: str
    tier: str
    next_tier: str
    active: bool = True
    cycle_no: int = 0
    ag: int = 0  # allocation granted this cycle
    au: int = 0  # allocation used this cycle
    bk: int = 0  # pool block credits left
    dr: int = 0  # drawn from the pool this cycle
    bu: int = 0  # block credits used this cycle
    pu: int = 0  # promotional credits used this cycle
    debt: int = 0
    dsince: int = 0  # org clock when the current debt began (orders settlement)
    limit: Limit = INHERIT
    paused: bool = False
    reason: str | None = None
    mseq: int = 0
    added_at: int = 0
    removed_at: int | None = None
    promos: list[Grant] = field(default_factory=list)
    seats: list[tuple[int, int]] = field(default_factory=list)
    """Closed seats ``(added_at, removed_at)``, oldest first, at most ``MAX_SEATS``."""
    last_reason: str | None = None
    """Reason of the member's last signal (with ``paused`` and ``mseq``: its current state)."""
    last_at: int = 0
    """Org clock of the member's last signal (its ``issued_at``)."""


@dataclass(slots=True)
class Org:
    """Per-org state."""

    org_id: str
    anchor: int
    clock: int
    cstart: int
    cend: int
    last_act: int
    pending_anchor: int | None = None
    cycle_no: int = 0
    pool: int = 0
    locked: bool = False
    pdrawn: int = 0
    below: bool = False
    rf_enabled: bool = False
    rf_threshold: int = 0
    rf_amount: int = 0
    rf_monthly: int = 0
    refilled: int = 0
    rf_pending_id: str | None = None
    rf_pending_mc: int = 0
    rf_counter: int = 0
    rf_limit_notified: bool = False
    tier_limits: dict[str, int | None] = field(default_factory=dict)
    invoice_extra: int = 0
    seq: int = 0
    home: int | None = None
    """The partition the org is decided from (its creating org_upsert's); None: anywhere."""
    watermarks: dict[str, int] = field(default_factory=dict)
    unknown_seen: set[tuple[str, int]] = field(default_factory=set)
    members: dict[str, Member] = field(default_factory=dict)


def member_order(s: str) -> bytes:
    """Sort key of ids: Redis orders equal-score zset members by their bytes, and so does the
    model."""
    return s.encode()


@dataclass(slots=True)
class _Ctx:
    """Where ledger movements of the current step come from."""

    kind: str  # usage / admin / system
    source_id: str
    task_id: str | None = None
    late: bool = False


@dataclass(slots=True)
class ModelResult:
    """Outcomes (one per item, in order) and the effects produced as plain dicts (``kind``
    and the fields of ``worker/effects.py``), in ``seq`` order."""

    outcomes: list[Outcome]
    effects: list[dict[str, Any]]

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as ``outcomes, effects = model.apply(...)``."""
        return iter((self.outcomes, self.effects))


class Model:
    """Reference implementation of the rules; one instance holds many orgs."""

    def __init__(self, tiers: Mapping[str, int] | None = None, block_credits: int = 500) -> None:
        tiers = dict(tiers) if tiers is not None else {"pro": 500, "max": 15_000}
        for name, credits in tiers.items():
            if not 0 <= credits <= MAX_TIER_CREDITS:
                raise ValueError(f"tier {name!r}: credits must be 0..{MAX_TIER_CREDITS}")
        self.tiers_mc = {k: v * MC_PER_CREDIT for k, v in tiers.items()}
        self.block_mc = block_credits * MC_PER_CREDIT
        self.orgs: dict[str, Org] = {}
        self._effects: list[dict[str, Any]] = []
        self._replay = False

    # --- public API --------------------------------------------------------------------------

    def apply(self, org_id: str, items: Sequence[Item], *, replay: bool = False) -> ModelResult:
        """Apply items of one org in order; returns outcomes and the effects produced.

        ``replay``: recorded decisions replayed by a rebuild, applied wherever they were
        decided (no home check, :meth:`_elsewhere`)."""
        self._effects = []
        self._replay = replay
        outcomes = [self._apply_one(org_id, item) for item in items]
        effects, self._effects = self._effects, []
        return ModelResult(outcomes, effects)

    # --- effects -----------------------------------------------------------------------------

    def _emit(self, org: Org, kind: str, **fields: Any) -> None:
        org.seq += 1
        eff: dict[str, Any] = {"kind": kind, "seq": org.seq, "org_id": org.org_id}
        eff.update(fields)
        self._effects.append(eff)

    def _ledger(
        self,
        org: Org,
        ctx: _Ctx,
        member_id: str | None,
        movement: str,
        bucket: str,
        amount: int,
        grant_id: str | None = None,
        cycle_start: int | None = None,
    ) -> None:
        self._emit(
            org,
            "ledger",
            member_id=member_id,
            source_kind=ctx.kind,
            source_id=ctx.source_id,
            task_id=ctx.task_id,
            movement=movement,
            bucket=bucket,
            grant_id=grant_id,
            amount_mc=amount,
            cycle_start_ms=org.cstart if cycle_start is None else cycle_start,
            late=ctx.late,
            at_ms=org.clock,
        )

    def _notify(self, org: Org, typ: str, member_id: str | None, detail: dict[str, Any]) -> None:
        self._emit(
            org, "notification", type=typ, member_id=member_id, detail=detail, at_ms=org.clock
        )

    # --- member helpers ----------------------------------------------------------------------

    # --- exact-amount bounds (docs/engine.md): the counters the engine keeps as doubles ------

    def _open_debt(self, org: Org) -> int:
        """Member debt plus the open invoice: what this cycle's invoice would be now."""
        return sum(m.debt for m in org.members.values() if m.active) + org.invoice_extra

    def _pool_held(self, org: Org) -> int:
        """The pool plus the block credits out (which return to it)."""
        return org.pool + sum(m.bk for m in org.members.values() if m.active)

    def _next_alloc(self, org: Org) -> int:
        """Next cycle's allocation total."""
        return sum(self.tiers_mc.get(m.next_tier, 0) for m in org.members.values() if m.active)

    def _limit(self, org: Org, m: Member) -> int | None:
        if m.limit == INHERIT:
            return org.tier_limits.get(m.tier)
        assert not isinstance(m.limit, str)
        return m.limit

    def _limit_left(self, org: Org, m: Member) -> int | None:
        lim = self._limit(org, m)
        return None if lim is None else max(0, lim - m.dr)

    def _can_draw(self, org: Org, m: Member) -> bool:
        left = self._limit_left(org, m)
        return (
            not org.locked
            and org.pool > 0
            and (left is None or left > 0)
            # Exact-amount bound: the cycle's drawn counter stays within MAX_BALANCE_MC.
            and org.pdrawn + self.block_mc <= MAX_BALANCE_MC
        )

    def _exhausted(self, m: Member) -> bool:
        return m.ag - m.au + m.bk + sum(g.rem for g in m.promos) == 0

    def _blocked(self, org: Org, m: Member) -> bool:
        return m.debt > 0 or (self._exhausted(m) and not self._can_draw(org, m))

    def _pause_reason(self, org: Org, m: Member) -> str:
        if self._limit_left(org, m) == 0:
            return "member_limit_reached"
        if org.locked:
            return "refill_failed"
        return "pool_exhausted"

    def _signal(self, org: Org, m: Member, signal: str, reason: str) -> None:
        m.mseq += 1
        m.last_reason, m.last_at = reason, org.clock
        self._emit(
            org,
            "signal",
            member_id=m.member_id,
            signal=signal,
            reason=reason,
            member_seq=m.mseq,
            issued_at_ms=org.clock,
        )

    def _pause(self, org: Org, m: Member) -> None:
        reason = self._pause_reason(org, m)
        m.paused, m.reason = True, reason
        self._signal(org, m, "pause", reason)
        if reason == "member_limit_reached":
            self._notify(
                org,
                "pool_limit_reached",
                m.member_id,
                {"limit_mc": self._limit(org, m), "drawn_mc": m.dr},
            )

    # --- the waterfall -----------------------------------------------------------------------

    def _after_draw(self, org: Org, ctx: _Ctx) -> None:
        if not org.rf_enabled or org.pool >= org.rf_threshold:
            return
        if not org.below:
            org.below = True
            self._notify(
                org,
                "pool_below_threshold",
                None,
                {"balance_mc": org.pool, "threshold_mc": org.rf_threshold},
            )
        if org.rf_pending_id is not None:
            return
        if org.refilled < org.rf_monthly:
            credits = min(org.rf_amount, org.rf_monthly - org.refilled)
            org.rf_counter += 1
            rid = derived_id("refill", org.org_id, org.rf_counter)
            org.rf_pending_id, org.rf_pending_mc = rid, credits
            self._emit(
                org,
                "refill_request",
                request_id=rid,
                credits_mc=credits,
                amount_usd_cents=cents(credits),
                at_ms=org.clock,
            )
            self._notify(org, "refill_requested", None, {"request_id": rid, "credits_mc": credits})
        elif not org.rf_limit_notified:
            org.rf_limit_notified = True
            self._notify(
                org,
                "refill_limit_reached",
                None,
                {"monthly_limit_mc": org.rf_monthly, "refilled_mc": org.refilled},
            )

    def _consume(self, org: Org, m: Member, amount: int, ctx: _Ctx, movement: str) -> int:
        """Pay ``amount`` through promo, allocation, block and new draws; returns the unpaid."""
        need = amount
        mid = m.member_id
        for g in m.promos:
            if need == 0:
                break
            take = min(g.rem, need)
            if take:
                g.rem -= take
                m.pu += take
                need -= take
                self._ledger(org, ctx, mid, movement, "promo", -take, grant_id=g.grant_id)
        m.promos = [g for g in m.promos if g.rem > 0]
        if need:
            take = min(m.ag - m.au, need)
            if take:
                m.au += take
                need -= take
                self._ledger(org, ctx, mid, movement, "allocation", -take)
        if need and m.bk:
            take = min(m.bk, need)
            m.bk -= take
            m.bu += take
            need -= take
            self._ledger(org, ctx, mid, movement, "block", -take)
        while need and self._can_draw(org, m):
            left = self._limit_left(org, m)
            d = min(self.block_mc, org.pool) if left is None else min(self.block_mc, left, org.pool)
            org.pool -= d
            org.pdrawn += d
            m.dr += d
            m.bk += d
            self._ledger(org, ctx, mid, "draw", "pool", -d)
            self._ledger(org, ctx, mid, "draw", "block", d)
            self._after_draw(org, ctx)
            take = min(m.bk, need)
            m.bk -= take
            m.bu += take
            need -= take
            self._ledger(org, ctx, mid, movement, "block", -take)
        return need

    def _settle(self, org: Org, m: Member, ctx: _Ctx) -> None:
        unpaid = self._consume(org, m, m.debt, ctx, "settle")
        paid = m.debt - unpaid
        if paid:
            m.debt = unpaid
            self._ledger(org, ctx, m.member_id, "settle", "debt", paid)
            if m.debt == 0:
                m.dsince = 0

    # --- evaluation point ----------------------------------------------------------------------

    def _evaluate(self, org: Org, ctx: _Ctx, resume_reason: str | None) -> None:
        """Settle debts oldest first, then send each member's pause/resume edge."""
        debtors = sorted(
            (m for m in org.members.values() if m.active and m.debt > 0),
            key=lambda m: (m.dsince, member_order(m.member_id)),
        )
        for m in debtors:
            self._settle(org, m, ctx)
        for mid in sorted(org.members, key=member_order):
            m = org.members[mid]
            if not m.active:
                continue
            blocked = self._blocked(org, m)
            if blocked and not m.paused:
                self._pause(org, m)
            elif not blocked and m.paused:
                m.paused, m.reason = False, None
                self._signal(org, m, "resume", resume_reason or "funded")

    # --- time --------------------------------------------------------------------------------

    def _advance(self, org: Org, t: int) -> None:
        """Move the org clock to ``t``, applying due moments in time order first."""
        while True:
            promo_t = min(
                (g.exp for m in org.members.values() if m.active for g in m.promos if g.rem > 0),
                default=None,
            )
            inact_t = add_months(org.last_act, INACTIVITY_MONTHS) if org.pool > 0 else None
            best: tuple[int, int] | None = None
            for rank, when in enumerate((promo_t, inact_t, org.cend)):
                if when is not None and when <= t and (best is None or when < best[0]):
                    best = (when, rank)
            if best is None:
                break
            when, rank = best
            org.clock = max(org.clock, when)
            if rank == 0:
                self._expire_promos(org, when)
            elif rank == 1:
                self._expire_pool(org)
            else:
                self._end_cycle(org)
        org.clock = max(org.clock, t)

    def _expire_promos(self, org: Org, when: int) -> None:
        ctx = _Ctx("system", f"promo_expiry:{when}")
        due = sorted(
            (
                (m, g)
                for m in org.members.values()
                if m.active
                for g in m.promos
                if g.exp == when and g.rem > 0
            ),
            key=lambda mg: member_order(mg[0].member_id + "\0" + mg[1].grant_id),
        )
        for m, g in due:
            self._ledger(org, ctx, m.member_id, "expire", "promo", -g.rem, grant_id=g.grant_id)
            g.rem = 0
        for m, _ in due:
            m.promos = [g for g in m.promos if g.rem > 0]
        self._evaluate(org, ctx, None)

    def _expire_pool(self, org: Org) -> None:
        ctx = _Ctx("system", f"pool_inactivity:{org.clock}")
        amount = org.pool
        org.pool = 0
        self._ledger(org, ctx, None, "expire", "pool", -amount)
        self._notify(org, "pool_expired", None, {"expired_mc": amount})
        self._evaluate(org, ctx, None)

    def _end_cycle(self, org: Org) -> None:
        end = org.cend
        ctx = _Ctx("system", f"cycle_end:{end}")
        active = [m for m in org.members.values() if m.active]
        alloc_left = sum(m.ag - m.au for m in active)
        blocks = sum(m.bk for m in active)
        debts = sum(m.debt for m in active)
        invoice = debts + org.invoice_extra
        if alloc_left:
            self._ledger(org, ctx, None, "expire", "allocation", -alloc_left)
        if blocks:
            self._ledger(org, ctx, None, "return", "block", -blocks)
            self._ledger(org, ctx, None, "return", "pool", blocks)
        if debts:
            self._ledger(org, ctx, None, "invoice", "debt", debts)
            self._ledger(org, ctx, None, "invoice", "invoice", -debts)
        if invoice:
            self._ledger(org, ctx, None, "invoiced", "invoice", invoice)
        self._emit(
            org,
            "invoice",
            cycle_start_ms=org.cstart,
            cycle_end_ms=end,
            negative_balance_mc=invoice,
            amount_usd_cents=cents(invoice),
        )
        if org.pending_anchor is not None:
            org.anchor, org.pending_anchor = org.pending_anchor, None
        org.pool += blocks
        org.cycle_no += 1
        org.cstart, org.cend = end, next_cycle_end(end, org.anchor)
        org.pdrawn = org.refilled = org.invoice_extra = 0
        org.rf_limit_notified = False
        for m in org.members.values():
            roll_member(m, org.cycle_no, self.tiers_mc)
        granted = sum(m.ag for m in active)
        if granted:
            self._ledger(org, ctx, None, "grant", "allocation", granted)
        if org.pool >= org.rf_threshold:
            org.below = False
        self._evaluate(org, ctx, "cycle_reset")

    # --- items -------------------------------------------------------------------------------

    def _elsewhere(self, org: Org, item: Item) -> Outcome | None:
        """The home check (one decider per org, docs/delivery.md "One owner per org"): an item
        read from a partition other than the org's home is not decided here; nothing is
        recorded for it (no watermark), so a replay of its offset is sent on again."""
        if org.home is None or self._replay:
            return None
        part = source_partition(item.source)
        if part is None or part == org.home:
            return None
        return Outcome(ELSEWHERE, str(org.home))

    def _gate(self, org: Org, item: Item) -> Outcome | None:
        """The replay check (an offset already applied); None when the item must be decided.

        Ids are not deduplicated here: "decided once" is the pipeline's (global claims and
        PostgreSQL's unique keys, before the engine sees an item)."""
        if (
            item.offset >= 0
            and org.watermarks.get(item.source, -1) >= item.offset
            and (item.source, item.offset) not in org.unknown_seen
        ):
            return Outcome(REPLAYED)
        return None

    def _mark(self, org: Org, item: Item) -> None:
        if item.offset >= 0:
            org.unknown_seen.discard((item.source, item.offset))
            if org.watermarks.get(item.source, -1) < item.offset:
                org.watermarks[item.source] = item.offset

    def _apply_one(self, org_id: str, item: Item) -> Outcome:
        if isinstance(item, UsageItem):
            return self._usage(org_id, item)
        return self._command(org_id, item)

    def _usage(self, org_id: str, item: UsageItem) -> Outcome:
        org = self.orgs.get(org_id)
        if org is None:
            return Outcome(UNKNOWN, E_UNKNOWN_ORG)
        away = self._elsewhere(org, item)
        if away is not None:
            return away
        m = org.members.get(item.member_id)
        if m is None:
            # Remembered so that a replay of this offset after the member_add is decided
            # rather than skipped as already applied (the watermark moves past it).
            self._mark(org, item)
            if item.offset >= 0:
                org.unknown_seen.add((item.source, item.offset))
            return Outcome(UNKNOWN, E_UNKNOWN_MEMBER)
        gate = self._gate(org, item)
        if gate is not None:
            return gate
        self._advance(org, item.occurred_at_ms)
        self._mark(org, item)
        c = item.credits_mc
        late = item.occurred_at_ms < org.cstart
        ctx = _Ctx("usage", item.event_id, item.task_id, late)
        code: str | None = None
        if not 0 < c <= MAX_USAGE_MC:
            code = E_INVALID_AMOUNT
        elif (seat := seat_of(m, item.occurred_at_ms)) == GAP:
            code = E_MEMBER_REMOVED  # the member had no seat when it occurred
        elif self._open_debt(org) + c > MAX_BALANCE_MC:
            # Exact-amount bound: member debt plus the open invoice (what the cycle's invoice
            # will be) never passes MAX_BALANCE_MC.
            code = E_BALANCE_OVERFLOW
        elif seat == PAST:
            # An earlier seat still owes it: straight on the org's invoice.
            org.invoice_extra += c
            org.last_act = org.clock
            self._ledger(org, ctx, m.member_id, "charge", "invoice", -c)
        else:
            org.last_act = org.clock
            unpaid = self._consume(org, m, c, ctx, "charge")
            if unpaid:
                if m.debt == 0:
                    m.dsince = org.clock
                m.debt += unpaid
                self._ledger(org, ctx, m.member_id, "charge", "debt", -unpaid)
        self._emit(
            org,
            "usage",
            event_id=item.event_id,
            member_id=item.member_id,
            task_id=item.task_id,
            credits_mc=c,
            occurred_at_ms=item.occurred_at_ms,
            status="rejected" if code else "charged",
            code=code,
            late=late,
            source=item.source,
            offset=item.offset,
        )
        self._evaluate(org, ctx, None)
        return Outcome(REJECTED, code) if code else Outcome(APPLIED)

    def _command(self, org_id: str, item: CommandItem) -> Outcome:
        cmd = item.command
        typ = cmd.get("type")
        cid = str(cmd.get("command_id"))
        at = cmd.get("at_ms")
        org = self.orgs.get(org_id)
        if org is None:
            if typ != "org_upsert":
                return Outcome(REJECTED, E_UNKNOWN_ORG)
            day = cmd.get("billing_anchor_day")
            if not isinstance(at, int) or not isinstance(day, int) or not 1 <= day <= 31:
                return Outcome(REJECTED, E_INVALID_COMMAND)
            start, end = cycle_containing(at, day)
            org = Org(org_id=org_id, anchor=day, clock=at, cstart=start, cend=end, last_act=at)
            org.home = source_partition(item.source)
            self.orgs[org_id] = org
            self._mark(org, item)
            self._emit(
                org,
                "command",
                command_id=cid,
                type=typ,
                status="applied",
                code=None,
                command=dict(cmd),
                source=item.source,
                offset=item.offset,
            )
            return Outcome(APPLIED)
        away = self._elsewhere(org, item)
        if away is not None:
            return away
        gate = self._gate(org, item)
        if gate is not None:
            return gate
        if isinstance(at, int):
            self._advance(org, at)
        self._mark(org, item)
        ctx = _Ctx("admin", cid)
        code, reason = self._dispatch(org, cmd, ctx)
        status = REJECTED if code is not None and code != E_UNKNOWN_REQUEST else APPLIED
        self._emit(
            org,
            "command",
            command_id=cid,
            type=typ,
            status="rejected" if status == REJECTED else "applied",
            code=code,
            command=dict(cmd),
            source=item.source,
            offset=item.offset,
        )
        self._evaluate(org, ctx, reason)
        return Outcome(status, code)

    def _member(self, org: Org, cmd: Mapping[str, Any]) -> Member | str:
        m = org.members.get(cmd.get("member_id"))  # type: ignore[arg-type]
        if m is None:
            return E_UNKNOWN_MEMBER
        if not m.active:
            return E_MEMBER_REMOVED
        return m

    def _credit_pool(self, org: Org, amount: int) -> None:
        org.pool += amount
        org.locked = False
        org.last_act = org.clock
        if org.pool >= org.rf_threshold:
            org.below = False

    def _dispatch(
        self, org: Org, cmd: Mapping[str, Any], ctx: _Ctx
    ) -> tuple[str | None, str | None]:
        """Apply one admin command; returns (error code or None, resume reason)."""
        typ = cmd.get("type")
        if not isinstance(cmd.get("at_ms"), int):
            return E_INVALID_COMMAND, None
        if typ == "org_upsert":
            day = cmd.get("billing_anchor_day")
            if not isinstance(day, int) or not 1 <= day <= 31:
                return E_INVALID_COMMAND, None
            org.pending_anchor = None if day == org.anchor else day
            return None, None
        if typ == "tick":
            return None, None
        if typ == "pool_purchase":
            amount = cmd.get("credits_mc")
            if not _amount(amount, 1):
                return E_INVALID_AMOUNT, None
            if self._pool_held(org) + amount > MAX_BALANCE_MC:
                return E_BALANCE_OVERFLOW, None
            self._credit_pool(org, amount)
            self._ledger(org, ctx, None, "purchase", "pool", amount)
            return None, "funded"
        if typ == "auto_refill_set":
            enabled = cmd.get("enabled")
            thr, amt, mon = (
                cmd.get("threshold_mc"),
                cmd.get("amount_mc"),
                cmd.get("monthly_limit_mc"),
            )
            if not isinstance(enabled, bool):
                return E_INVALID_COMMAND, None
            if not (_amount(thr, 0) and _amount(amt, 1) and _amount(mon, 0)):
                return E_INVALID_AMOUNT, None
            org.rf_enabled, org.rf_threshold, org.rf_amount, org.rf_monthly = (
                enabled,
                thr,
                amt,
                mon,
            )
            org.below = False
            return None, None
        if typ == "refill_result":
            status = cmd.get("status")
            if status not in ("succeeded", "failed"):
                return E_INVALID_COMMAND, None
            if org.rf_pending_id is None or cmd.get("request_id") != org.rf_pending_id:
                return E_UNKNOWN_REQUEST, None
            credits = org.rf_pending_mc
            if status == "succeeded" and self._pool_held(org) + credits > MAX_BALANCE_MC:
                return E_BALANCE_OVERFLOW, None
            org.rf_pending_id, org.rf_pending_mc = None, 0
            if status == "succeeded":
                self._credit_pool(org, credits)
                org.refilled += credits
                self._ledger(org, ctx, None, "refill", "pool", credits)
                return None, "funded"
            org.locked = True
            self._notify(
                org,
                "refill_failed",
                None,
                {"request_id": cmd.get("request_id"), "credits_mc": credits},
            )
            return None, None
        if typ == "tier_limit_set":
            tier = cmd.get("tier")
            if tier not in self.tiers_mc:
                return E_UNKNOWN_TIER, None
            lim = cmd.get("limit_mc")
            if lim is not None and not _amount(lim, 0):
                return E_INVALID_AMOUNT, None
            org.tier_limits[tier] = lim
            return None, "limit_raised"
        if typ == "member_add":
            return self._member_add(org, cmd, ctx)
        # Commands about an existing, active member.
        if typ not in (
            "member_remove",
            "member_set_tier",
            "member_limit_set",
            "promo_grant",
            "credit_request",
        ):
            return E_INVALID_COMMAND, None
        found = self._member(org, cmd)
        if isinstance(found, str):
            return found, None
        m = found
        if typ == "member_remove":
            self._member_remove(org, m, ctx)
            return None, "funded"
        if typ == "member_set_tier":
            tier = cmd.get("tier")
            if tier not in self.tiers_mc:
                return E_UNKNOWN_TIER, None
            new_mc, cur_mc = self.tiers_mc[tier], self.tiers_mc.get(m.tier, 0)
            next_mc = self.tiers_mc.get(m.next_tier, 0)
            if self._next_alloc(org) - next_mc + new_mc > MAX_BALANCE_MC:
                return E_BALANCE_OVERFLOW, None
            if new_mc >= cur_mc:
                diff = prorate_mc(new_mc - cur_mc, org.cstart, org.cend, org.clock)
                m.tier = m.next_tier = tier
                if diff:
                    m.ag += diff
                    self._ledger(org, ctx, m.member_id, "grant", "allocation", diff)
            else:
                m.next_tier = tier
            return None, "funded"
        if typ == "member_limit_set":
            lim = cmd.get("limit_mc")
            if lim != INHERIT and lim is not None and not _amount(lim, 0):
                return E_INVALID_AMOUNT, None
            m.limit = lim
            return None, "limit_raised"
        if typ == "promo_grant":
            amount, exp, gid = cmd.get("credits_mc"), cmd.get("expires_at_ms"), cmd.get("grant_id")
            if not isinstance(gid, str) or not isinstance(exp, int):
                return E_INVALID_COMMAND, None
            if not _amount(amount, 1):
                return E_INVALID_AMOUNT, None
            if exp <= org.clock:
                return E_PROMO_EXPIRED, None
            if any(g.grant_id == gid for g in m.promos):
                return E_DUPLICATE_GRANT, None
            if m.pu + sum(g.rem for g in m.promos) + amount > MAX_BALANCE_MC:
                return E_BALANCE_OVERFLOW, None
            m.promos.append(Grant(gid, amount, exp))
            m.promos.sort(key=lambda g: (g.exp, member_order(g.grant_id)))
            self._ledger(org, ctx, m.member_id, "grant", "promo", amount, grant_id=gid)
            return None, "funded"
        # credit_request
        amount = cmd.get("credits_mc")
        if not _amount(amount, 1):
            return E_INVALID_AMOUNT, None
        detail: dict[str, Any] = {"credits_mc": amount, "command_id": ctx.source_id}
        note = cmd.get("note")
        if isinstance(note, str):
            detail["note"] = note
        self._notify(org, "credit_request", m.member_id, detail)
        return None, None

    def _member_add(
        self, org: Org, cmd: Mapping[str, Any], ctx: _Ctx
    ) -> tuple[str | None, str | None]:
        tier = cmd.get("tier")
        mid = cmd.get("member_id")
        if not isinstance(mid, str):
            return E_INVALID_COMMAND, None
        if tier not in self.tiers_mc:
            return E_UNKNOWN_TIER, None
        old = org.members.get(mid)
        if old is not None and old.active:
            return E_MEMBER_EXISTS, None
        if self._next_alloc(org) + self.tiers_mc[tier] > MAX_BALANCE_MC:
            return E_BALANCE_OVERFLOW, None
        alloc = prorate_mc(self.tiers_mc[tier], org.cstart, org.cend, org.clock)
        m = Member(
            member_id=mid,
            tier=tier,
            next_tier=tier,
            cycle_no=org.cycle_no,
            ag=alloc,
            added_at=org.clock,
        )
        if old is not None:
            # A new seat: counters start afresh, but the signal sequence continues.
            m.mseq, m.removed_at, m.seats = old.mseq, old.removed_at, old.seats
            m.last_reason, m.last_at = old.last_reason, old.last_at
        org.members[mid] = m
        if alloc:
            self._ledger(org, ctx, mid, "grant", "allocation", alloc)
        if self._blocked(org, m):
            self._pause(org, m)
        elif old is not None:
            self._signal(org, m, "resume", "member_added")
        return None, None

    def _member_remove(self, org: Org, m: Member, ctx: _Ctx) -> None:
        mid = m.member_id
        left = m.ag - m.au
        if left:
            self._ledger(org, ctx, mid, "forfeit", "allocation", -left)
        for g in m.promos:
            self._ledger(org, ctx, mid, "forfeit", "promo", -g.rem, grant_id=g.grant_id)
        if m.bk:
            self._ledger(org, ctx, mid, "return", "block", -m.bk)
            self._ledger(org, ctx, mid, "return", "pool", m.bk)
            org.pool += m.bk
            if org.pool >= org.rf_threshold:
                org.below = False
        if m.debt:
            self._ledger(org, ctx, mid, "invoice", "debt", m.debt)
            self._ledger(org, ctx, mid, "invoice", "invoice", -m.debt)
            org.invoice_extra += m.debt
        m.ag, m.bk, m.debt, m.dsince, m.promos = m.au, 0, 0, 0, []
        m.active, m.removed_at = False, org.clock
        m.seats = [*m.seats, (m.added_at, org.clock)][-MAX_SEATS:]
        m.paused, m.reason = True, "member_removed"
        self._signal(org, m, "pause", "member_removed")


def _amount(value: object, low: int) -> TypeGuard[int]:
    return (
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= (MAX_AMOUNT_MC)
    )


CURRENT, PAST, GAP = "current", "past", "gap"


def seat_of(m: Member, occurred_at_ms: int) -> str:
    """Which seat of ``m`` a usage event that occurred then belongs to (SPEC section 3).

    ``CURRENT``: the active seat (charged as usual); ``PAST``: an earlier seat (charged to the
    org's invoice); ``GAP``: between a removal and the next add, or after the last removal
    (rejected ``member_removed``). Before the first known seat counts as that seat; a member
    removed more than ``MAX_SEATS`` times has its oldest seats merged into that one.
    """
    if m.active and occurred_at_ms >= m.added_at:
        return CURRENT
    for start, end in reversed(m.seats):
        if occurred_at_ms >= end:
            return GAP
        if occurred_at_ms >= start:
            return PAST
    return CURRENT if m.active and not m.seats else PAST


def roll_member(m: Member, cycle_no: int, tiers_mc: Mapping[str, int]) -> None:
    """Start member ``m`` in cycle ``cycle_no``: fresh allocation, counters reset."""
    if m.cycle_no >= cycle_no:
        return
    m.cycle_no = cycle_no
    m.tier = m.next_tier
    # A tier dropped from the catalogue grants nothing (the engine does the same).
    m.ag = tiers_mc.get(m.tier, 0) if m.active else 0
    m.au = m.bk = m.dr = m.bu = m.pu = m.debt = m.dsince = 0


# --- Rules shared with the views ---------------------------------------------------------------


def effective_limit(org: Org, m: Member) -> int | None:
    """The member's pool limit in mc (None: no limit)."""
    if m.limit == INHERIT:
        return org.tier_limits.get(m.tier)
    assert not isinstance(m.limit, str)
    return m.limit


def check_invariants(org: Org, ledger: Sequence[Mapping[str, Any]]) -> list[str]:
    """Violated invariants of an org given every effect it ever produced ([] when all hold).

    Conservation: the ledger movements summed per bucket equal the balances held (pool, member
    allocations, blocks, promos, debt, open invoice), and everything granted is used, expired,
    forfeited or still held. No balance is negative except the named debt. Effect seqs are
    strictly increasing, and signals per member alternate with strictly increasing member_seq.
    """
    problems: list[str] = []
    sums: dict[str, int] = {}
    granted = used = gone = 0
    last_seq = 0
    per_member: dict[str, list[Mapping[str, Any]]] = {}
    for e in ledger:
        if e["seq"] <= last_seq:
            problems.append(f"seq not increasing at {e['seq']}")
        last_seq = e["seq"]
        if e["kind"] == "signal":
            per_member.setdefault(e["member_id"], []).append(e)
        if e["kind"] != "ledger":
            continue
        sums[e["bucket"]] = sums.get(e["bucket"], 0) + e["amount_mc"]
        mv, amt, bucket = e["movement"], e["amount_mc"], e["bucket"]
        if mv in ("grant", "purchase", "refill"):
            granted += amt
        elif mv in ("charge", "settle") and bucket in ("promo", "allocation", "block"):
            used -= amt
        elif mv in ("expire", "forfeit"):
            gone -= amt
    if last_seq != org.seq:
        problems.append(f"last effect seq {last_seq} != org seq {org.seq}")
    active = [m for m in org.members.values() if m.active]
    held = {
        "pool": org.pool,
        "allocation": sum(m.ag - m.au for m in active),
        "block": sum(m.bk for m in active),
        "promo": sum(g.rem for m in active for g in m.promos),
        "debt": -sum(m.debt for m in active),
        "invoice": -org.invoice_extra,
    }
    for bucket, amount in held.items():
        if sums.get(bucket, 0) != amount:
            problems.append(f"bucket {bucket}: ledger {sums.get(bucket, 0)} != held {amount}")
    remaining = held["pool"] + held["allocation"] + held["block"] + held["promo"]
    if granted != used + gone + remaining:
        problems.append(f"granted {granted} != used {used} + expired {gone} + held {remaining}")
    for m in org.members.values():
        values = (m.ag - m.au, m.bk, m.dr, m.bu, m.pu, m.debt, *(g.rem for g in m.promos))
        if any(v < 0 for v in values):
            problems.append(f"member {m.member_id} has a negative balance")
        if m.debt and (m.ag - m.au or m.bk or any(g.rem for g in m.promos)):
            problems.append(f"member {m.member_id} in debt while holding credits")
    if org.pool < 0:
        problems.append("negative pool")
    for mid, sigs in per_member.items():
        seqs = [s["member_seq"] for s in sigs]
        if seqs != sorted(set(seqs)):
            problems.append(f"member {mid}: member_seq not strictly increasing")
        for a, b in itertools.pairwise(sigs):
            if a["signal"] == b["signal"] and "member_removed" not in (a["reason"], b["reason"]):
                problems.append(f"member {mid}: two {a['signal']} signals in a row")
    return problems
