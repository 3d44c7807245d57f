"""Token grants, the page's session and form tokens, and the admin page's escaping, without
services."""

from __future__ import annotations

import pytest

from worker.admin_page import History, PageContext, Pending, clear_hint, render_page
from worker.api_base import TokenAuth, form_token, session_value
from worker.model import Model
from worker.tokens import Grant, parse_tokens
from worker.views import admin_view


@pytest.mark.parametrize(
    ("value", "grant"),
    [
        ('"acme"', Grant("acme", "read")),
        ('"*"', Grant("*", "admin")),
        ('{"org": "acme", "role": "admin"}', Grant("acme", "admin")),
        ('{"org": "acme"}', Grant("acme", "read")),
        ('{"org": "*", "role": "read"}', Grant("*", "read")),
    ],
)
def test_token_grants(value: str, grant: Grant) -> None:
    assert parse_tokens('{"t": ' + value + "}") == {"t": grant}


@pytest.mark.parametrize(
    "value",
    ['{"org": "acme", "role": "owner"}', '{"org": 1}', '{"org": "a", "x": 1}', "7", '"a\\u0001"'],
)
def test_bad_grants_are_configuration_errors(value: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_tokens('{"s3cret": ' + value + "}")
    assert "s3cret" not in str(err.value)


def test_roles() -> None:
    assert Grant("acme", "admin").may_admin("acme")
    assert not Grant("acme", "admin").may_admin("globex")
    assert not Grant("acme", "read").may_admin("acme")
    assert Grant("*", "admin").may_admin("anything")
    assert not Grant("*", "read").may_admin("anything") and Grant("*", "read").may_read("x")


def test_sessions_are_bound_to_their_token_and_expire() -> None:
    auth = TokenAuth(parse_tokens('{"tok-a": "acme", "tok-b": "*"}'))
    now = 1_800_000_000
    session = session_value(b"tok-b", now)
    assert auth.session_grant(session, now + 60) == (b"tok-b", Grant("*", "admin"))
    assert auth.session_grant(session, now + 13 * 3600) is None  # expired
    assert auth.session_grant(session_value(b"tok-gone", now), now) is None
    issued, mac = session.split(".")
    assert auth.session_grant(f"{int(issued) + 1}.{mac}", now) is None  # tampered
    assert form_token(b"tok-b", session, "acme") != form_token(b"tok-b", session, "globex")
    assert form_token(b"tok-b", session, "acme") != form_token(
        b"tok-b", session_value(b"tok-b", now + 1), "acme"
    )


HOSTILE = "<script>alert('x')</script> \"{a}/b\" &amp;"


def _org_doc() -> dict[str, object]:
    from tests.integration.api_orgs import command, usage

    model = Model(tiers={"pro": 500, "max": 15_000})
    items = [
        command(1, "acme", "org_upsert", billing_anchor_day=1),
        command(2, "acme", "member_add", member_id=HOSTILE, tier="pro"),
        command(3, "acme", "pool_purchase", credits="100"),
        usage(4, HOSTILE, 700_000),
    ]
    model.apply("acme", items)
    return admin_view(model.orgs["acme"], model.tiers_mc)


def test_every_section_escapes_ids() -> None:
    doc = _org_doc()
    history = History(
        credit_requests=[
            {
                "seq": 9,
                "member_id": HOSTILE,
                "detail": {"credits_mc": 5000, "note": HOSTILE},
                "at_ms": 1_800_000_000_000,
            }
        ],
        refill_failures=[],
        daily_usage={},
    )
    ctx = PageContext(
        form_token="tok",
        pending=[Pending("c1", f"Pool limit of member {HOSTILE}: no limit")],
        dialog="member-limit",
        dialog_target=HOSTILE,
    )
    page = render_page(doc, history, ctx)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "&amp;amp;" in page  # an id's own "&amp;" is shown as typed
    assert "%3Cscript%3E" in page  # the menu's link percent-encodes the id


def test_what_clears_a_debt() -> None:
    doc = _org_doc()
    member = doc["members"][0]  # type: ignore[index]
    # 700 used: 460 of prorated allocation (joined 3 November), the pool's 100, 140 unpaid.
    assert member["negative_balance"] == "140"
    assert member["debt_since"] is not None
    assert clear_hint(doc, member) == "add at least 140 credits to the pool"
