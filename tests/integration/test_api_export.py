"""The finance export ``GET /v1/orgs/{org_id}/ledger.csv`` over a real ledger: the same rows as
the ledger JSON endpoint, one cycle at a time, streamed in pages; amounts with 3 decimals;
hostile ids survive CSV quoting and never run as spreadsheet formulas."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from api_orgs import command, usage
from api_stores import ACME, ADMIN, GLOBEX, Stores, api_settings, open_stores

from worker import api_export
from worker.api_export import COLUMNS, credits_3dp, parse_cycle, safe_cell
from worker.config import Settings

EVIL_ORG = '=HYPERLINK("http://x.example/?a,b","open")'
EVIL_MEMBER = "@SUM(1+1)*cmd|' /C calc'!A0"
EVIL_TASK = '-2+3, "quoted"'
MINUTES_TO_DECEMBER = 27 * 24 * 60 + 15 * 60  # T0 (Nov 3, 09:00) to Dec 1, 00:00 UTC


@pytest.fixture
async def stores(
    settings: Settings, pg_schema: str, redis_url: str, redis: Any
) -> AsyncIterator[Stores]:
    async with open_stores(api_settings(settings, pg_schema, redis_url)) as s:
        yield s


@pytest.fixture
async def client(stores: Stores) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(stores.app())) as c:
        yield c


def _path(org_id: str, query: str = "") -> str:
    return f"/v1/orgs/{quote(org_id, safe='')}/ledger.csv" + (f"?{query}" if query else "")


async def _csv(client: TestClient, org_id: str, query: str = "") -> list[dict[str, str]]:
    resp = await client.get(_path(org_id, query), headers=ADMIN)
    body = await resp.read()
    assert resp.status == 200, body[:300]
    assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert resp.headers["Content-Disposition"].startswith("attachment; filename=")
    rows = list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))
    assert rows and tuple(rows[0]) == COLUMNS
    return [dict(zip(COLUMNS, r, strict=True)) for r in rows[1:]]


async def _json_entries(client: TestClient, org_id: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    cursor = None
    while True:
        path = f"/v1/orgs/{quote(org_id, safe='')}/ledger?limit=7"
        resp = await client.get(path + (f"&cursor={cursor}" if cursor else ""), headers=ADMIN)
        assert resp.status == 200
        page = orjson.loads(await resp.read())
        entries.extend(page["entries"])
        if (cursor := page["next_cursor"]) is None:
            return entries[::-1]  # oldest first, as the export


def _same_instant(cell: str, value: str | None) -> bool:
    """The same instant to the millisecond (the export's precision)."""
    if value is None:
        return cell == ""
    want = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    want = want.replace(microsecond=want.microsecond // 1000 * 1000)
    return dt.datetime.fromisoformat(cell.replace("Z", "+00:00")) == want


def assert_row_matches(row: dict[str, str], entry: dict[str, Any], org_id: str) -> None:
    """One CSV row against the JSON endpoint's entry for the same seq."""
    assert row["org_id"] == safe_cell(org_id)
    assert int(row["seq"]) == entry["seq"]
    for key in ("member_id", "source_kind", "source_id", "task_id", "movement", "bucket",
                "grant_id"):  # fmt: skip
        want = entry[key]
        assert row[key] == ("" if want is None else safe_cell(want)), key
    assert row["amount"] == credits_3dp(int(Decimal(entry["amount"]) * 1000))
    assert Decimal(row["amount"]) == Decimal(entry["amount"])
    assert row["late"] == ("true" if entry["late"] else "false")
    assert _same_instant(row["cycle_start"], entry["cycle_start"])
    assert _same_instant(row["at"], entry["at"])
    assert _same_instant(row["recorded_at"], entry["recorded_at"])
    for key in ("cycle_start", "at", "recorded_at"):
        assert row[key].endswith("Z") and len(row[key]) == 24, row[key]


async def test_export_matches_the_ledger_endpoint(client: TestClient) -> None:
    for org_id in ("acme", "globex"):
        entries = await _json_entries(client, org_id)
        rows = await _csv(client, org_id)  # no cycle: the current one, where all entries are
        assert len(rows) == len(entries) >= 3
        for row, entry in zip(rows, entries, strict=True):
            assert_row_matches(row, entry, org_id)
    rows = await _csv(client, "acme", "cycle=2026-11-01")
    assert [int(r["seq"]) for r in rows] == [e["seq"] for e in await _json_entries(client, "acme")]
    # Amounts: exactly three decimals, debits negative.
    assert all(len(r["amount"].split(".")[1]) == 3 for r in rows)
    alice = [Decimal(r["amount"]) for r in rows if r["member_id"] == "alice"]
    assert (
        sum(a for a in alice if a < 0) == Decimal("-812.5") - 500
    )  # her charges, the pool side of her draw
    assert any(r["amount"].endswith(".500") and r["amount"].startswith("-") for r in rows)


async def test_export_is_one_cycle_and_streams_in_pages(
    client: TestClient, stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The org clock passes Dec 1: the November cycle closes, December's allocations are granted.
    await stores.apply("acme", [command(MINUTES_TO_DECEMBER + 5, "acme", "tick")])
    await stores.apply("acme", [usage(MINUTES_TO_DECEMBER + 6, "alice", 1_234)])
    monkeypatch.setattr(api_export, "EXPORT_PAGE_ROWS", 3)  # many pages
    entries = await _json_entries(client, "acme")
    by_cycle: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_cycle.setdefault(e["cycle_start"][:10], []).append(e)
    assert set(by_cycle) == {"2026-11-01", "2026-12-01"}
    for day, want in by_cycle.items():
        rows = await _csv(client, "acme", f"cycle={day}")
        assert len(rows) == len(want), day
        for row, entry in zip(rows, want, strict=True):
            assert_row_matches(row, entry, "acme")
    # The default is the newest entry's cycle: December.
    assert [r["seq"] for r in await _csv(client, "acme")] == [
        r["seq"] for r in await _csv(client, "acme", "cycle=2026-12-01")
    ]
    december = await _csv(client, "acme", "cycle=2026-12-01")
    assert any(r["amount"] == "-1.234" and r["member_id"] == "alice" for r in december)
    # A date that starts no cycle of the org: the header alone.
    assert await _csv(client, "acme", "cycle=2026-11-02") == []


async def test_hostile_ids_survive_quoting_and_never_run_as_formulas(
    client: TestClient, stores: Stores
) -> None:
    await stores.apply(
        EVIL_ORG,
        [
            command(1, EVIL_ORG, "org_upsert", billing_anchor_day=1),
            command(2, EVIL_ORG, "member_add", member_id=EVIL_MEMBER, tier="pro"),
            command(3, EVIL_ORG, "member_add", member_id="+plus", tier="pro"),
            command(4, EVIL_ORG, "member_add", member_id="-5", tier="pro"),
            usage(5, EVIL_MEMBER, 2_500, task_id=EVIL_TASK),
            usage(6, "+plus", 1_000, task_id='say "hi"\u202e'),
        ],
    )
    resp = await client.get(_path(EVIL_ORG), headers=ADMIN)
    raw = (await resp.read()).decode()
    assert resp.status == 200
    # Every line that holds data starts with a quote or a safe character, never a formula one.
    for record in csv.reader(io.StringIO(raw, newline="")):
        for cell in record:
            assert not cell.startswith(("=", "+", "@", "\t", "\r")), cell
            assert not cell.startswith("-") or Decimal(cell) < 0, cell
    rows = await _csv(client, EVIL_ORG)
    entries = await _json_entries(client, EVIL_ORG)
    assert len(rows) == len(entries)
    for row, entry in zip(rows, entries, strict=True):
        assert_row_matches(row, entry, EVIL_ORG)
    assert {r["org_id"] for r in rows} == {"'" + EVIL_ORG}
    members = {r["member_id"] for r in rows}
    assert {"'" + EVIL_MEMBER, "'+plus", "-5"} <= members  # "-5" is a number, not a formula
    tasks = {r["task_id"] for r in rows}
    assert "'" + EVIL_TASK in tasks and 'say "hi"\u202e' in tasks


def test_cells_and_amounts() -> None:
    assert credits_3dp(-812_500) == "-812.500"
    assert credits_3dp(5) == "0.005"
    assert credits_3dp(-1) == "-0.001"
    assert credits_3dp(10**18) == "1000000000000000.000"
    for danger in ("=1+1", "+1", "-1+1", "@x", "\tx", "\rx", "-", "+", "-1e5", "-0x1"):
        assert safe_cell(danger) == "'" + danger
    for fine in ("alice", "-812.500", "-5", "12", "", "'already"):
        assert safe_cell(fine) == fine
    assert parse_cycle("2026-11-01") == 1_793_491_200_000
    for bad in ("2026-11-1", "2026-13-01", "2026-02-30", "20261101", "2026-11-01T00:00:00Z", ""):
        assert parse_cycle(bad) is None, bad


async def test_auth_bad_cycle_unknown_org(client: TestClient) -> None:
    assert (await client.get(_path("acme"))).status == 401
    resp = await client.get(_path("acme"), headers=GLOBEX)
    assert resp.status == 403 and "alice" not in await resp.text()
    assert (await client.get(_path("acme"), headers=ACME)).status == 200
    for query in ("cycle=11/01/2026", "cycle=2026-11-31", "cycle="):
        resp = await client.get(_path("acme", query), headers=ACME)
        assert resp.status == 400, query
        assert (await resp.json())["error"] == "bad_request"
    for org in ("no-such-org", "a\u0000b", "x" * 129):
        resp = await client.get(_path(org), headers=ADMIN)
        assert resp.status == 404, org


async def test_a_failing_store_is_503_before_the_first_byte(stores: Stores) -> None:
    class Down:
        async def start(self, org_id: str) -> Any:
            raise ConnectionRefusedError("postgres://u:pw@db down")

        async def page(self, *args: Any) -> Any:
            raise AssertionError("not reached")

    async with TestClient(TestServer(stores.app(export=Down()))) as c:
        resp = await c.get(_path("acme"), headers=ACME)
        assert resp.status == 503
        assert "pw" not in await resp.text()
