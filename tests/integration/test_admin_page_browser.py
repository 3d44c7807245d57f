"""The admin page's writes in a real headless Chromium, against a real worker.

An org is set up through Kafka and applied by the real worker (``run_worker`` in this event
loop, as the pipeline tests run it). The browser opens the page with an admin token, opens a
member's ellipsis menu, sets a custom limit in the dialog, saves, sees the change pending while
the worker is stopped and applied once it runs again (page = API = the rules model); edits a
tier limit; adds credits to a pool that ran dry and sees the paused member running again with
reason ``funded`` on the control topic. A read-only token gets no write controls and a forged
post is refused with 403; a cross-site form post is refused too, and nothing is published.

Screenshots of every screen go to ``artifacts/admin-*.png``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import orjson
import pytest
from aiohttp import ClientSession, web
from cdp import Browser
from pydantic import SecretStr

from tests.integration.pipeline_checker import (
    Workload,
    check_pipeline,
    end_offsets,
    read_topic,
)
from worker.admin_commands import AdminPublisher
from worker.admin_page import amount
from worker.admin_store import PgAdminHistory
from worker.api import PgLedgerReader, create_app
from worker.api_base import form_token
from worker.config import Settings
from worker.connections import pg_connect_kwargs
from worker.engine import RedisEngine
from worker.runner import make_engine, run_worker

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
ORG = "acme"
ODD = "<dan & 'co'> {x}/y"
"""A member id with markup, quotes, braces and a slash: shown and linked as data."""
TOKENS = {
    "tok-admin": {"org": ORG, "role": "admin"},
    "tok-read": ORG,  # the first format: read-only
    "tok-op": "*",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Env:
    settings: Settings
    base: str
    workload: Workload
    engine: Any
    stop: asyncio.Event
    worker: asyncio.Task[dict[str, int]] | None = None

    def start_worker(self) -> None:
        self.stop = asyncio.Event()
        self.worker = asyncio.create_task(
            run_worker(self.settings, stop=self.stop, engine=self.engine)
        )

    async def stop_worker(self) -> None:
        if self.worker is not None:
            self.stop.set()
            await self.worker
            self.worker = None

    async def api(self, path: str, token: str = "tok-op") -> Any:
        async with ClientSession() as session:
            resp = await session.get(
                f"{self.base}{path}", headers={"Authorization": f"Bearer {token}"}
            )
            assert resp.status == 200, await resp.text()
            return orjson.loads(await resp.read())

    async def member(self, member_id: str) -> dict[str, Any]:
        doc = await self.api(f"/v1/orgs/{ORG}/credits")
        found: dict[str, Any] = next(m for m in doc["members"] if m["member_id"] == member_id)
        return found


async def _pg_count(settings: Settings, table: str) -> int:
    conn = await asyncpg.connect(
        settings.postgres_dsn.get_secret_value(),
        server_settings={"search_path": settings.postgres_schema},
    )
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    except asyncpg.UndefinedTableError:
        return -1
    finally:
        await conn.close()


async def _until(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            if await check():
                return
        except AssertionError:
            pass  # the page reloaded itself between two calls: try again
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.3)


def _story(w: Workload) -> None:
    """acme: a 600-credit pool that runs dry; bob ends in debt and paused (pool_exhausted);
    bob asks for credits twice."""
    w.org(ORG, ["alice", "bob"])
    w.command(ORG, "member_add", 118, member_id=ODD, tier="max")
    w.command(ORG, "pool_purchase", 110, credits_mc=600_000)
    w.usage(ORG, "alice", 900_000, minutes_ago=100)  # 500 allocation + 400 of a 500 block
    w.usage(ORG, ODD, 1_250_500, minutes_ago=95)
    w.usage(ORG, "bob", 700_000, minutes_ago=90)  # 500 allocation + 100 pool + 100 debt
    w.command(ORG, "credit_request", 80, member_id="bob", credits_mc=1_000_000, note="first")
    w.command(
        ORG,
        "credit_request",
        70,
        member_id="bob",
        credits_mc=2_500_000,
        note='<script>alert("x")</script> Q4 report',
    )


@pytest.fixture
async def env(isolated_settings: Settings) -> AsyncIterator[Env]:
    s = isolated_settings.model_copy(
        update={
            "http_port": 0,
            "api_tokens": SecretStr(orjson.dumps(TOKENS).decode()),
        }
    )
    w = Workload(s)
    _story(w)
    await w.produce()
    engine = make_engine(s)
    e = Env(s, "", w, engine, asyncio.Event())
    e.start_worker()
    await _until(lambda: _all_decided(s, w), "the worker to apply the set-up", timeout=90.0)
    await e.stop_worker()
    api_engine = RedisEngine.from_settings(s)
    pool = await asyncpg.create_pool(**pg_connect_kwargs(s), min_size=1, max_size=2)
    publisher = AdminPublisher(s)
    app = create_app(
        s,
        engine=api_engine,
        ledger=PgLedgerReader(pool, s.postgres_schema),
        admin_history=PgAdminHistory(pool, s.postgres_schema),
        admin_sink=publisher,
    )
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    e.base = f"http://127.0.0.1:{port}"
    try:
        yield e
    finally:
        await e.stop_worker()
        await runner.cleanup()
        await publisher.close()
        await pool.close()
        await api_engine.close()
        await engine.close()


async def _all_decided(s: Settings, w: Workload) -> bool:
    return await _pg_count(s, "admin_commands") == len(w.commands) and await _pg_count(
        s, "usage_events"
    ) == len(w.events)


async def _admin_offsets(s: Settings) -> int:
    return sum((await end_offsets(s, [s.topic_admin])).values())


async def _adopt_page_commands(e: Env) -> None:
    """Add the commands the page published (as the worker decoded them) to the workload, so
    the pipeline checker replays them in the rules model too."""
    conn = await asyncpg.connect(
        e.settings.postgres_dsn.get_secret_value(),
        server_settings={"search_path": e.settings.postgres_schema},
    )
    try:
        rows = await conn.fetch("SELECT command_id, command FROM admin_commands")
    finally:
        await conn.close()
    for r in rows:
        if r["command_id"] not in e.workload.commands:
            cmd = r["command"]
            e.workload.commands[r["command_id"]] = (
                orjson.loads(cmd) if isinstance(cmd, str | bytes) else cmd
            )


async def test_admin_sets_limits_and_funds_the_pool_in_a_browser(env: Env) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    async with Browser() as b:
        await b.goto(f"{env.base}/orgs/{ORG}?token=tok-admin")
        # Organization credits: the pool ran dry, the reset date is the cycle end.
        doc = await env.api(f"/v1/orgs/{ORG}/admin")
        assert doc["pool"]["balance"] == "0"
        assert await b.text("#pool-balance") == "0"
        assert await b.text("#reset-at") == (
            doc["reset_at"][:10] + " " + doc["reset_at"][11:16] + " UTC"
        )
        assert await b.text("#refill-enabled") == "off"
        await b.shot(ARTIFACTS / "admin-org-credits.png", "#org-credits")
        await b.shot(ARTIFACTS / "admin-tier-limits.png", "#tier-limits")

        # Members in debt: bob (his allocation was prorated: he joined mid-cycle), since when,
        # and what clears it.
        bob = await env.member("bob")
        debt = bob["negative_balance"]
        assert Decimal(debt) > 0 and bob["pause_reason"] == "pool_exhausted"
        assert await b.text('#debt tr[data-member="bob"] td.debt') == amount(debt)
        assert (await b.text('#debt tr[data-member="bob"] td.since') or "").endswith(" UTC")
        assert f"add at least {amount(debt)} credits to the pool" in (
            await b.text('#debt tr[data-member="bob"] td.clear') or ""
        )
        await b.shot(ARTIFACTS / "admin-members-in-debt.png", "#debt")

        # Credit requests, newest first, the note shown as text.
        notes = await b.evaluate(
            "[...document.querySelectorAll('#credit-requests td.note')].map(e => e.innerText)"
        )
        assert notes == ['<script>alert("x")</script> Q4 report', "first"]
        assert await b.count("#credit-requests script") == 0
        assert await b.text("#credit-requests tbody tr:first-child td.credits") == "2,500"
        await b.shot(ARTIFACTS / "admin-credit-requests.png", "#credit-requests")

        # Usage over the cycle: one stacked bar per day, one bar per member.
        assert await b.count("#daily-chart svg rect") > 4
        titles = await b.evaluate(
            "[...document.querySelectorAll('#member-chart rect title')].map(e => e.textContent)"
        )
        assert f"{ODD}: Allocation 1,250.5 credits" in titles
        assert f"bob: Debt {amount(debt)} credits" in titles
        await b.shot(ARTIFACTS / "admin-usage-chart.png", "#usage")

        # Member list: the ellipsis menu of the member with markup in its id.
        menu = f'#members tr[data-member="{ODD}"]'  # ODD has no double quote to escape
        assert await b.text(f"{menu} td.member") == ODD
        await b.click(f"{menu} details.menu > summary")
        assert await b.evaluate(
            f"document.querySelector({orjson.dumps(menu + ' details.menu').decode()}).open"
        )
        await b.shot(ARTIFACTS / "admin-member-menu.png", "#member-limits")
        await b.click(f"{menu} a.set-limit", navigates=True)
        assert await b.text("#dialog h2") == f"Set custom limit for {ODD}"
        await b.goto(f"{env.base}/orgs/{ORG}")  # cancel; the session cookie signs in

        # Set alice's custom limit through her menu and the dialog.
        alice_row = '#members tr[data-member="alice"]'
        await b.click(f"{alice_row} details.menu > summary")
        await b.click(f"{alice_row} a.set-limit", navigates=True)
        assert await b.text("#dialog h2") == "Set custom limit for alice"
        await b.click('#dialog input[name=mode][value="limit"]')
        await b.type("#limit", "1,000")
        await b.shot(ARTIFACTS / "admin-custom-limit-form.png", "#dialog")
        await b.click("#save", navigates=True)
        assert "pending=" in await b.url(), await b.text("body")
        pending = await b.text("#pending li")
        assert pending == "Pending: Pool limit of member alice: 1,000 credits"
        assert "change pending" in (await b.text(f"{alice_row} td.pool_limit") or "")
        assert (await env.member("alice"))["pool_limit"] is None  # not applied yet

        env.start_worker()

        async def applied() -> bool:
            return (await b.text("#pending li") or "").startswith("Applied:")

        await _until(applied, "the custom limit to be applied")
        assert await b.text(f"{alice_row} td.pool_limit") == "1,000 (custom)"
        alice = await env.member("alice")
        assert alice["pool_limit"] == "1000"
        admin_doc = await env.api(f"/v1/orgs/{ORG}/admin")
        row = next(m for m in admin_doc["members"] if m["member_id"] == "alice")
        assert row["limit_setting"] == "1000"

        # Edit the pro tier's limit.
        await b.goto(f"{env.base}/orgs/{ORG}")
        await b.click('#tier-limits tr[data-tier="pro"] a.edit-tier', navigates=True)
        await b.click('#dialog input[name=mode][value="limit"]')
        await b.type("#limit", "2000")
        await b.click("#save", navigates=True)
        await _until(applied, "the tier limit to be applied")
        assert await b.text('#tier-limits tr[data-tier="pro"] td.tier_limit') == "2,000"
        bob = await env.member("bob")
        assert bob["pool_limit"] == "2000"  # bob inherits the tier's
        assert bob["state"] == "paused"  # a limit does not fill an empty pool

        # Add credits to the pool that ran dry: bob's debt is settled and he runs again.
        await b.goto(f"{env.base}/orgs/{ORG}")
        await b.click("#add-credits", navigates=True)
        await b.type("#credits", "5000")
        await b.click("#save", navigates=True)
        assert await b.text("#pending li") == ("Pending: Add 5,000 credits to the pool") or (
            await b.text("#pending li") or ""
        ).startswith("Applied:")
        await _until(applied, "the purchase to be applied")
        bob = await env.member("bob")
        assert bob["state"] == "running" and bob["negative_balance"] == "0"
        assert await b.text('#members tr[data-member="bob"] td.state') == "running"
        assert await b.text("#debt td.empty") == "Nobody is in debt"
        await b.shot(ARTIFACTS / "admin-after-purchase.png")

    await env.stop_worker()
    control = [
        orjson.loads(r.value)
        for r in await read_topic(env.settings, env.settings.topic_control)
        if r.value is not None
    ]
    last_bob = [c for c in control if c["member_id"] == "bob"][-1]
    assert (last_bob["signal"], last_bob["reason"]) == ("resume", "funded")
    # Everything the page published is what the rules say: the checker replays it in the model.
    await _adopt_page_commands(env)
    await check_pipeline(env.settings, env.workload, engine=env.engine)


async def _session(base: str, token: str) -> str:
    async with ClientSession() as session:
        resp = await session.get(f"{base}/orgs/{ORG}?token={quote(token)}")
        assert resp.status == 200
        morsel = resp.cookies.get("metering_session")
        assert morsel is not None
        assert morsel["samesite"] == "Strict" and morsel["httponly"]
        return morsel.value


async def _post(base: str, action: str, cookie: str | None, **form: str) -> tuple[int, str]:
    headers = {"Cookie": f"metering_session={cookie}"} if cookie else {}
    extra = form.pop("_origin", None)
    if extra:
        headers["Origin"] = extra
    async with ClientSession() as session:
        resp = await session.post(
            f"{base}/orgs/{ORG}/actions/{action}",
            data=form,
            headers=headers,
            allow_redirects=False,
        )
        return resp.status, await resp.text()


async def test_read_only_token_sees_no_write_controls_and_a_forged_post_is_403(env: Env) -> None:
    before = await _admin_offsets(env.settings)
    async with Browser() as b:
        await b.goto(f"{env.base}/orgs/{ORG}?token=tok-read")
        assert await b.text("#pool-balance") == "0"
        for control in ("form", "details.menu", "#add-credits", ".edit-tier", "#dialog"):
            assert await b.count(control) == 0, control
        await b.goto(f"{env.base}/orgs/{ORG}?dialog=purchase")  # by the session cookie
        assert await b.count("form") == 0
        assert await b.text("#pool-balance") == "0"
        await b.shot(ARTIFACTS / "admin-read-only.png")
    # The read-only user knows their own token and can compute a form token for it: the role
    # still refuses the post.
    session = await _session(env.base, "tok-read")
    forged = form_token(b"tok-read", session, ORG)
    status, text = await _post(env.base, "pool-purchase", session, credits="100", form_token=forged)
    assert status == 403 and "may not change" in text
    status, _ = await _post(env.base, "pool-purchase", None, credits="100")
    assert status == 401
    assert await _admin_offsets(env.settings) == before


async def test_cross_site_post_is_refused(env: Env) -> None:
    before = await _admin_offsets(env.settings)
    session = await _session(env.base, "tok-admin")
    # The admin's own session, but no form token (what a forged form would send): refused.
    status, _ = await _post(env.base, "pool-purchase", session, credits="100")
    assert status == 403
    # A form token of the session, but posted from another site: refused too.
    token = form_token(b"tok-admin", session, ORG)
    status, _ = await _post(
        env.base,
        "pool-purchase",
        session,
        credits="100",
        form_token=token,
        _origin="http://evil.example",
    )
    assert status == 403
    # A page on another site with a form aimed at the admin page, submitted in a browser
    # that holds an admin session.
    evil = web.Application()

    async def attack(request: web.Request) -> web.Response:
        return web.Response(
            text=(
                f'<form method="post" action="{env.base}/orgs/{ORG}/actions/pool-purchase">'
                '<input name="credits" value="100"><button id="go">win a prize</button></form>'
            ),
            content_type="text/html",
        )

    evil.router.add_get("/", attack)
    runner = web.AppRunner(evil)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with Browser() as b:
            await b.goto(f"{env.base}/orgs/{ORG}?token=tok-admin")
            assert await b.count("#add-credits") == 1  # signed in as admin
            await b.goto(f"http://localhost:{port}/")  # another site than 127.0.0.1
            await b.click("#go", navigates=True)
            assert await b.text("h1") in ("401", "403")
            assert await b.count("#pool-balance") == 0
    finally:
        await runner.cleanup()
    assert await _admin_offsets(env.settings) == before
    # And the legitimate path still works with the same session: the form of the page.
    status, _ = await _post(env.base, "pool-purchase", session, credits="100", form_token=token)
    assert status == 303
    assert await _admin_offsets(env.settings) == before + 1
