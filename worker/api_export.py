"""Ledger export for finance: ``GET /v1/orgs/{org_id}/ledger.csv?cycle=YYYY-MM-DD``.

``cycle`` is the start date of a billing cycle (00:00 UTC on that day, what the ledger's
``cycle_start_ms`` holds: every entry belongs to the cycle that was current when the engine
made it, late usage included). Without it, the cycle of the org's newest ledger entry: the
current cycle once PostgreSQL holds anything of it. A date that starts no cycle of the org
gives the header row alone. The export reads PostgreSQL only (the ledger of record), never
Redis; an org PostgreSQL holds nothing of is 404.

The body streams (``StreamResponse``, chunked) in keyset pages of :data:`EXPORT_PAGE_ROWS`,
oldest first, each page one short query, so neither the cycle nor a pool connection is held
for the length of a download. The export stops at the org's highest seq PostgreSQL held when
it began, so rows flushed meanwhile do not change it. A store failure before the first byte
is a 503; after it, the response ends without its last chunk (a client sees a cut transfer,
never a short file that looks complete).

Columns (:data:`COLUMNS`), with a header row: amounts in credits with exactly 3 decimals
(``"-812.500"``, from the integer millicredits), times UTC ``YYYY-MM-DDTHH:MM:SS.mmmZ``,
``late`` as ``true``/``false``, NULL as an empty cell. Cells are CSV-quoted (RFC 4180), and a
cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading
apostrophe so a spreadsheet shows it as text instead of running it as a formula: ids are
producer data. Plain numbers (``-812.500``, a seq) are left as they are: they cannot be
formulas, and finance needs them as numbers.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from aiohttp import web

from schemas.amounts import MC_PER_CREDIT
from worker import metrics
from worker.api_base import authorize, json_error
from worker.sqlfiles import named_queries, quote_ident

log = logging.getLogger(__name__)

EXPORT_PAGE_ROWS = 1_000
"""Ledger rows per keyset page."""

COLUMNS = (
    "org_id", "seq", "member_id", "source_kind", "source_id", "task_id", "movement", "bucket",
    "grant_id", "amount", "cycle_start", "late", "at", "recorded_at",
)  # fmt: skip
"""The CSV header, in column order."""

_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_NUMBER_RE = re.compile(r"-?\d+(\.\d+)?")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class LedgerExportSource(Protocol):
    """Reads a cycle's ledger entries; ``PgLedgerExport`` is the PostgreSQL implementation."""

    async def start(self, org_id: str) -> tuple[int, int | None] | None:
        """The org's highest seq and the cycle start of its newest entry (None: no entry), or
        None when PostgreSQL holds nothing of the org."""

    async def page(
        self, org_id: str, cycle_start_ms: int, after_seq: int, upto_seq: int, limit: int
    ) -> list[Mapping[str, Any]]:
        """Up to ``limit`` entries of the cycle with ``after_seq < seq <= upto_seq``, oldest
        first."""


EXPORT_KEY: web.AppKey[LedgerExportSource | None] = web.AppKey("ledger_export")

_QUERIES = named_queries("api_queries.sql")


class PgLedgerExport:
    """The export's reads, named queries ``export_start`` and ``ledger_cycle_page``."""

    def __init__(self, pool: Any, schema: str) -> None:
        self._pool = pool
        quoted = quote_ident(schema)
        self._start_sql = _QUERIES["export_start"].replace("{schema}", quoted)
        self._page_sql = _QUERIES["ledger_cycle_page"].replace("{schema}", quoted)

    async def start(self, org_id: str) -> tuple[int, int | None] | None:
        """The org's highest seq and its newest entry's cycle start, or None."""
        row = await self._pool.fetchrow(self._start_sql, org_id)
        if row is None:
            return None
        newest = row["newest_cycle_start_ms"]
        return int(row["last_seq"]), None if newest is None else int(newest)

    async def page(
        self, org_id: str, cycle_start_ms: int, after_seq: int, upto_seq: int, limit: int
    ) -> list[Mapping[str, Any]]:
        """Up to ``limit`` entries of the cycle after ``after_seq``, oldest first."""
        rows: list[Mapping[str, Any]] = await self._pool.fetch(
            self._page_sql, org_id, cycle_start_ms, after_seq, upto_seq, limit
        )
        return rows


def credits_3dp(mc: int) -> str:
    """Millicredits as credits with exactly three decimals (``-812500`` -> ``"-812.500"``)."""
    whole, frac = divmod(abs(mc), MC_PER_CREDIT)
    return f"{'-' if mc < 0 else ''}{whole}.{frac:03d}"


def utc_ms(ms: int) -> str:
    """Epoch milliseconds as ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    t = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def safe_cell(value: str) -> str:
    """``value`` with a leading apostrophe when a spreadsheet would read it as a formula."""
    if value.startswith(_FORMULA_START) and _NUMBER_RE.fullmatch(value) is None:
        return "'" + value
    return value


def parse_cycle(value: str) -> int | None:
    """``YYYY-MM-DD`` as epoch ms of 00:00 UTC that day, None when it is not such a date."""
    if _DATE_RE.fullmatch(value) is None:
        return None
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        return None
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return int(start.timestamp()) * 1000


def csv_row(row: Mapping[str, Any]) -> list[str]:
    """One ledger row as the export's cells, in :data:`COLUMNS` order."""
    recorded = row["recorded_at"]
    if isinstance(recorded, dt.datetime):
        recorded_at = recorded.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
            f"{recorded.microsecond // 1000:03d}Z"
        )
    else:
        recorded_at = "" if recorded is None else str(recorded)

    def ms(value: Any) -> str:
        return "" if value is None else utc_ms(int(value))

    def text(value: Any) -> str:
        return "" if value is None else str(value)

    cells = [
        text(row["org_id"]), str(int(row["seq"])), text(row["member_id"]),
        text(row["source_kind"]), text(row["source_id"]), text(row["task_id"]),
        text(row["movement"]), text(row["bucket"]), text(row["grant_id"]),
        credits_3dp(int(row["amount_mc"])), ms(row["cycle_start_ms"]),
        "true" if row["late"] else "false", ms(row["at_ms"]), recorded_at,
    ]  # fmt: skip
    return [safe_cell(c) for c in cells]


def encode_rows(rows: Iterable[list[str]]) -> bytes:
    """CSV text (RFC 4180: CRLF, quotes doubled) of ``rows``, UTF-8."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue().encode("utf-8")


async def ledger_csv_handler(request: web.Request) -> web.StreamResponse:
    """``GET /v1/orgs/{org_id}/ledger.csv?cycle=YYYY-MM-DD``."""
    org_id = request.match_info["org_id"]
    denied = authorize(request, org_id, allow_query=False)
    if denied is not None:
        return denied
    source = request.app[EXPORT_KEY]
    if source is None:
        return json_error(503, "unavailable", "ledger store not configured")
    asked = request.query.get("cycle")
    cycle_ms = None if asked is None else parse_cycle(asked)
    if asked is not None and cycle_ms is None:
        return json_error(400, "bad_request", "cycle must be a date YYYY-MM-DD (cycle start)")
    try:
        start = await source.start(org_id)
        if start is None:
            return json_error(404, "not_found", f"unknown org {org_id!r}")
        upto, newest = start
        cycle_ms = newest if cycle_ms is None else cycle_ms
        rows = [] if cycle_ms is None else await source.page(
            org_id, cycle_ms, 0, upto, EXPORT_PAGE_ROWS
        )  # fmt: skip
    except Exception as exc:  # PostgreSQL down or failing over: 503, not a stack trace
        metrics.ERRORS.labels(stage="api").inc()
        log.warning("ledger export failed", extra={"org_id": org_id, "error": repr(exc)})
        return json_error(503, "unavailable", "ledger store is unavailable, retry shortly")
    day = "none" if cycle_ms is None else utc_ms(cycle_ms)[:10]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="ledger-{day}.csv"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        }
    )
    await response.prepare(request)
    await response.write(encode_rows([list(COLUMNS)]))
    try:
        while rows:
            await response.write(encode_rows(csv_row(r) for r in rows))
            if len(rows) < EXPORT_PAGE_ROWS or cycle_ms is None:
                break
            rows = await source.page(org_id, cycle_ms, int(rows[-1]["seq"]), upto, EXPORT_PAGE_ROWS)
    except ConnectionResetError:  # the client went away: nothing to report
        raise
    except Exception as exc:
        metrics.ERRORS.labels(stage="api").inc()
        log.warning("ledger export cut", extra={"org_id": org_id, "error": repr(exc)})
        raise
    await response.write_eof()
    return response
