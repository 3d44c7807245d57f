"""Units of the model: amounts, cents, proration bounds, calendar, and the invariant checker."""

from __future__ import annotations

import datetime as dt

import pytest

from schemas.amounts import format_credits as format_mc
from schemas.timestamps import format_timestamp as iso
from worker.model import (
    CommandItem,
    Model,
    UsageItem,
    add_months,
    cents,
    check_invariants,
    cycle_containing,
    prorate_mc,
    to_ms,
)


def T(y: int, m: int, d: int, h: int = 0) -> int:
    return to_ms(dt.datetime(y, m, d, h, tzinfo=dt.UTC))


@pytest.mark.parametrize(
    ("mc", "text"),
    [(0, "0"), (1, "0.001"), (1500, "1.5"), (812_500, "812.5"), (10**13, "10000000000"),
     (-12_345, "-12.345")],
)  # fmt: skip
def test_format_mc(mc: int, text: str) -> None:
    assert format_mc(mc) == text


@pytest.mark.parametrize(
    ("mc", "usd_cents"), [(0, 0), (499, 0), (500, 1), (12_345, 12), (12_500, 13), (999, 1)]
)
def test_cents_round_half_up(mc: int, usd_cents: int) -> None:
    assert cents(mc) == usd_cents


def test_proration_bounds() -> None:
    s, e = T(2026, 4, 1), T(2026, 5, 1)
    assert prorate_mc(500_000, s, e, s) == 500_000  # joined at the start: everything
    assert prorate_mc(500_000, s, e, e - 1000) == 0  # one second left: floor to 0 credits
    assert prorate_mc(500_000, s, e, T(2026, 4, 30)) == 16_000  # 1 day of 30: 16.66 -> 16
    assert prorate_mc(15_000_000, s, e, T(2026, 4, 10, 12)) == 10_250_000


def test_calendar() -> None:
    # Anchor 31 in February falls on the 28th.
    assert cycle_containing(T(2026, 3, 30), 31) == (T(2026, 2, 28), T(2026, 3, 31))
    assert cycle_containing(T(2026, 3, 31), 31) == (T(2026, 3, 31), T(2026, 4, 30))
    assert add_months(T(2024, 2, 29, 5), 12) == T(2025, 2, 28, 5)
    assert iso(T(2026, 1, 2) + 5) == "2026-01-02T00:00:00.005Z"


def test_invariant_checker_catches_a_broken_state() -> None:
    model = Model()
    at = T(2026, 1, 1)
    res = model.apply(
        "o",
        [CommandItem({"type": "org_upsert", "command_id": "c1", "at_ms": at,
                      "billing_anchor_day": 1}),
         CommandItem({"type": "member_add", "command_id": "c2", "at_ms": at, "member_id": "a",
                      "tier": "pro"}),
         CommandItem({"type": "pool_purchase", "command_id": "c3", "at_ms": at,
                      "credits_mc": 100_000}),
         UsageItem("e1", "a", "t", 650_000, at + 1)],
    )  # fmt: skip
    org = model.orgs["o"]
    assert check_invariants(org, res.effects) == []
    org.pool += 1  # a credit from nowhere
    assert any("bucket pool" in p for p in check_invariants(org, res.effects))
    org.pool -= 1
    signal = next(e for e in res.effects if e["kind"] == "signal")
    assert any("two" in p for p in check_invariants(org, [*res.effects, dict(signal, seq=99)]))
    assert any("seq" in p for p in check_invariants(org, list(reversed(res.effects))))


def test_an_org_is_decided_only_from_the_partition_that_created_it() -> None:
    """The org_upsert's partition is the org's home: items read from another partition are
    answered ``elsewhere`` with the home and change nothing (no seq, no watermark, so a
    replay is sent on again); from the home they are decided; a rebuild's replay is decided
    wherever it was recorded; items with no Kafka source decide anywhere."""
    m = Model()
    at = T(2026, 1, 5)

    def command(typ: str, cid: str, src: str, off: int, **fields: object) -> CommandItem:
        return CommandItem({"type": typ, "command_id": cid, "at_ms": at, **fields}, src, off)

    def usage(eid: str, src: str, off: int) -> UsageItem:
        return UsageItem(eid, "m", "t", 1000, at, src, off)

    created = m.apply("o", [command("org_upsert", "c1", "admin:2", 0, billing_anchor_day=1)])
    assert [o.status for o in created.outcomes] == ["applied"]
    assert m.orgs["o"].home == 2
    away = m.apply("o", [command("member_add", "c2", "admin:3", 0, member_id="m", tier="pro")])
    assert [(o.status, o.code) for o in away.outcomes] == [("elsewhere", "2")]
    assert away.effects == [] and "m" not in m.orgs["o"].members
    assert m.orgs["o"].watermarks == {"admin:2": 0}
    home = m.apply("o", [command("member_add", "c2", "admin:2", 1, member_id="m", tier="pro")])
    assert [o.status for o in home.outcomes] == ["applied"]
    seq = m.orgs["o"].seq
    again = m.apply("o", [usage("e1", "usage:3", 7), usage("e1", "usage:3", 7)])
    assert [o.status for o in again.outcomes] == ["elsewhere", "elsewhere"]
    assert m.orgs["o"].seq == seq
    assert [o.status for o in m.apply("o", [usage("e1", "usage:2", 4)]).outcomes] == ["applied"]
    replayed = m.apply("o", [usage("e2", "usage:3", -1)], replay=True)
    assert [o.status for o in replayed.outcomes] == ["applied"]
    assert [o.status for o in m.apply("o", [usage("e3", "", -1)]).outcomes] == ["applied"]
    m.apply("n", [command("org_upsert", "c9", "", -1, billing_anchor_day=1)])
    assert m.orgs["n"].home is None
