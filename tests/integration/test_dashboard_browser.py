"""The dashboard page in a real headless Chromium: the numbers a person sees are the API's,
and the API's are the rules model's.

Needs Debian's ``chromium`` package (``/usr/bin/chromium``); the screenshot is saved as
``artifacts/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, web
from api_orgs import build_model, build_redis_engine
from cdp import CHROMIUM_FLAGS, chromium_path
from pydantic import SecretStr

from worker import views
from worker.admin_page import amount
from worker.api import create_app
from worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
TOKENS = {"tok-acme": "acme", "tok-globex": "globex"}
CHROMIUM_TIMEOUT = 60.0
MEMBER_COLUMNS = (
    "member",
    "tier",
    "granted",
    "used",
    "remaining",
    "pool_drawn",
    "pool_limit",
    "negative_balance",
    "state",
)


class _Dom(HTMLParser):
    """Collects text by element id and the cells of the member table by column class."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.rows: list[dict[str, str]] = []
        self._stack: list[tuple[str, str | None, str | None]] = []
        self._text: dict[int, list[str]] = {}
        self._in_members = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._in_members = a.get("id") == "members"
        if tag == "tr" and "data-member" in a and self._in_members:
            self.rows.append({})
        self._stack.append((tag, a.get("id"), a.get("class")))
        self._text[len(self._stack)] = []

    def handle_endtag(self, tag: str) -> None:
        if not self._stack:
            return
        depth = len(self._stack)
        _, elem_id, css = self._stack.pop()
        text = " ".join("".join(self._text.pop(depth, [])).split())
        if self._stack:
            self._text.setdefault(depth - 1, []).append(text)
        if elem_id:
            self.by_id[elem_id] = text
        if tag == "table":
            self._in_members = False
        if tag == "td" and css and self.rows and self._in_members:
            column = css.split()[-1]
            self.rows[-1][column] = text

    def handle_data(self, data: str) -> None:
        if self._stack:
            self._text.setdefault(len(self._stack), []).append(data)


def _parse(dom: str) -> _Dom:
    parser = _Dom()
    parser.feed(dom)
    return parser


@pytest.fixture
async def server(settings: Settings, redis_url: str, redis: Any) -> AsyncIterator[str]:
    """The API over both test orgs in the production engine (Redis), on a free loopback port;
    yields its base URL."""
    api_settings = settings.model_copy(
        update={
            "api_tokens": SecretStr(orjson.dumps(TOKENS).decode()),
            "redis_url": SecretStr(redis_url),
        }
    )
    engine, _ = await build_redis_engine(api_settings)
    runner = web.AppRunner(create_app(api_settings, engine=engine))
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await engine.client.aclose()


async def _chromium_run(url: str, *extra: str) -> str:
    with tempfile.TemporaryDirectory(prefix="metering-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            chromium_path(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            *extra,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CHROMIUM_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail(f"chromium did not finish loading {url} in {CHROMIUM_TIMEOUT:g} s")
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        return out.decode()


async def _api(base: str, org_id: str, token: str) -> dict[str, Any]:
    async with ClientSession() as session:
        resp = await session.get(
            f"{base}/v1/orgs/{org_id}/credits", headers={"Authorization": f"Bearer {token}"}
        )
        assert resp.status == 200
        doc: dict[str, Any] = orjson.loads(await resp.read())
        return doc


def _expected_state(member: dict[str, Any]) -> str:
    if not member["active"]:
        return "removed"
    if member["state"] == "paused":
        return f"paused ({member['pause_reason']})"
    return "running"


async def test_page_shows_the_numbers_of_the_api(server: str) -> None:
    url = f"{server}/orgs/acme?token=tok-acme"
    dom = _parse(await _chromium_run(url, "--dump-dom"))
    doc = await _api(server, "acme", "tok-acme")
    model, _ = build_model()
    assert doc == views.dashboard(model, "acme")  # the engine in Redis agrees with the rules

    assert dom.by_id["org-id"] == "acme"
    assert doc["pool"]["balance"] == "1000"
    assert dom.by_id["pool-balance"] == "1,000"
    assert dom.by_id["pool-used"] == amount(doc["pool"]["used_this_cycle"])
    assert dom.by_id["reset-at"] == "2026-12-01 00:00 UTC"
    assert doc["reset_at"] == "2026-12-01T00:00:00Z"
    assert dom.by_id["member-count"] == str(len(doc["members"]))

    seen = {row["member"]: row for row in dom.rows}
    assert set(seen) == {m["member_id"] for m in doc["members"]}
    for m in doc["members"]:
        row = seen[m["member_id"]]
        assert set(row) == {*MEMBER_COLUMNS, "actions"}
        assert row["actions"] == ""  # a read-only token: no menu
        assert row["tier"] == m["tier"]
        for key in ("granted", "used", "remaining", "pool_drawn", "negative_balance"):
            assert row[key] == amount(m[key]), (m["member_id"], key)
        limit = "no limit" if m["pool_limit"] is None else amount(m["pool_limit"])
        assert row["pool_limit"].rsplit(" (", 1)[0] == limit
        assert row["state"] == _expected_state(m)
    # A member id with markup is shown as text, not interpreted.
    assert "<carol & co>" in seen


async def test_page_screenshot_is_saved(server: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    await _chromium_run(f"{server}/orgs/acme?token=tok-acme", f"--screenshot={shot}")
    assert shot.is_file()
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


@pytest.mark.parametrize(
    ("query", "status_text"),
    [("", "401"), ("?token=wrong", "401"), ("?token=tok-globex", "403")],
    ids=["no-token", "unknown-token", "other-org"],
)
async def test_page_without_a_valid_token_shows_no_data(
    server: str, query: str, status_text: str
) -> None:
    dom = await _chromium_run(f"{server}/orgs/acme{query}", "--dump-dom")
    parsed = _parse(dom)
    assert status_text in dom
    assert not parsed.rows
    for secret in ("alice", "bob", "812.5", "pool-balance"):
        assert secret not in dom
