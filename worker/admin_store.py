"""What the admin page reads from PostgreSQL: decided commands, notifications, daily usage.

Live balances and settings come from Redis (``views.admin_view``); the history behind the page
comes from the ledger of record: whether a command the page published has been decided yet (the
``admin_commands`` row the worker writes when it flushes the batch that applied it), members'
``credit_request`` notifications and the refill failure that locked the pool (the
``notifications`` rows), and credits used per day (``ledger_entries``). Named queries in
``worker/sql/api_queries.sql``; the schema name is the only thing put into the SQL text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from worker.sqlfiles import named_queries, quote_ident

_QUERIES = named_queries("api_queries.sql")
CREDIT_REQUESTS_SHOWN = 50


class AdminHistorySource(Protocol):
    """The admin page's PostgreSQL reads; ``PgAdminHistory`` implements them."""

    async def decided(self, org_id: str, command_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``{command_id: {"status", "code", "type"}}`` for the ones the worker decided."""

    async def notifications(
        self, org_id: str, type_: str, limit: int = CREDIT_REQUESTS_SHOWN
    ) -> list[dict[str, Any]]:
        """The org's notifications of ``type_``, newest first (``detail`` as a dict)."""

    async def daily_usage(self, org_id: str, cycle_start_ms: int) -> dict[int, dict[str, int]]:
        """``{utc_day_number: {bucket: used_mc}}`` of the cycle starting at ``cycle_start_ms``."""


class PgAdminHistory:
    """``AdminHistorySource`` on an asyncpg pool."""

    def __init__(self, pool: Any, schema: str) -> None:
        self._pool = pool
        quoted = quote_ident(schema)
        self._sql = {name: _QUERIES[name].replace("{schema}", quoted) for name in _QUERIES}

    async def decided(self, org_id: str, command_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not command_ids:
            return {}
        rows = await self._pool.fetch(self._sql["admin_decided"], org_id, list(command_ids))
        return {
            r["command_id"]: {"status": r["status"], "code": r["code"], "type": r["type"]}
            for r in rows
        }

    async def notifications(
        self, org_id: str, type_: str, limit: int = CREDIT_REQUESTS_SHOWN
    ) -> list[dict[str, Any]]:
        rows = await self._pool.fetch(self._sql["admin_notifications"], org_id, type_, limit)
        out = []
        for r in rows:
            detail = r["detail"]
            if isinstance(detail, str | bytes):  # jsonb arrives as text without a codec
                detail = orjson.loads(detail)
            out.append(
                {
                    "seq": r["seq"],
                    "member_id": r["member_id"],
                    "detail": detail,
                    "at_ms": r["at_ms"],
                }
            )
        return out

    async def daily_usage(self, org_id: str, cycle_start_ms: int) -> dict[int, dict[str, int]]:
        rows = await self._pool.fetch(self._sql["admin_daily_usage"], org_id, cycle_start_ms)
        out: dict[int, dict[str, int]] = {}
        for r in rows:
            out.setdefault(int(r["day"]), {})[r["bucket"]] = int(r["used_mc"])
        return out
