"""PostgreSQL ledger of record: migrations, batched writes, consumer offsets, parked events.

PostgreSQL is the permanent record. Redis holds live balances and a short dedupe window; this
store holds every decided input (one row per ``event_id`` and ``command_id``, ever), every
ledger movement, the billing records, and the next offset to consume per input partition,
written in the same transaction as the rows those offsets cover. See docs/delivery.md.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from itertools import chain
from operator import attrgetter
from typing import Any

import asyncpg
import orjson

from worker.config import Settings
from worker.connections import pg_connect_kwargs
from worker.contract import Snapshot
from worker.effects import Charge, Effect
from worker.sqlfiles import named_queries

log = logging.getLogger(__name__)

_SCHEMA_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_MIGRATION_RE = re.compile(r"^(\d{3})_(\w+)\.sql$")
# Any constant works; it only has to be the same for every worker so that concurrent starts
# apply migrations one after the other.
_MIGRATION_LOCK_KEY = 0x6D65746572  # "meter"


QUERIES = named_queries("queries.sql")


def _migrations() -> list[tuple[int, str, str]]:
    folder = resources.files("worker").joinpath("sql", "migrations")
    found: list[tuple[int, str, str]] = []
    for entry in folder.iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    return found


def quote_schema(schema: str) -> str:
    """The schema name as a quoted identifier, after checking it is a plain identifier.

    DDL cannot take the schema as a bind parameter, so the name is validated instead.
    """
    if not _SCHEMA_RE.match(schema):
        raise ValueError(f"invalid postgres_schema {schema!r}: letters, digits and _ only")
    return f'"{schema}"'


def _connect_kwargs(settings: Settings) -> dict[str, Any]:
    kwargs = pg_connect_kwargs(settings)
    server_settings = dict(kwargs.get("server_settings") or {})
    server_settings["search_path"] = settings.postgres_schema
    # The worker's statements are short and planned often; JIT compiling one (triggered by
    # the planner's cost estimate of a 20,000-row batch statement) costs more than it saves.
    server_settings.setdefault("jit", "off")
    kwargs["server_settings"] = server_settings
    return kwargs


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A released connection keeps its session: no reset query, one round trip less for every
    flush and every decided-id check. The pool still rolls back an open transaction; nothing
    on these connections sets session state (no SET, LISTEN, cursors or advisory locks; the
    migration's lock is on a connection of its own)."""


async def migrate(settings: Settings) -> list[str]:
    """Create the schema and apply missing numbered migrations; returns the names applied.

    Each migration runs in its own transaction together with its row in ``schema_migrations``,
    so a crash leaves either the whole migration or none of it. An advisory lock serialises
    workers that start at the same time.
    """
    schema = quote_schema(settings.postgres_schema)
    conn = await asyncpg.connect(**_connect_kwargs(settings))
    applied: list[str] = []
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in _migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
    finally:
        await conn.close()
    return applied


# Column lists of the batch tables, in the order of the rows built by FlushBatch.
LEDGER_COLUMNS = (
    "org_id",
    "seq",
    "member_id",
    "source_kind",
    "source_id",
    "task_id",
    "movement",
    "bucket",
    "grant_id",
    "amount_mc",
    "cycle_start_ms",
    "late",
    "at_ms",
)
USAGE_COLUMNS = (
    "event_id",
    "org_id",
    "seq",
    "member_id",
    "task_id",
    "credits_mc",
    "occurred_at_ms",
    "status",
    "code",
    "late",
    "source",
    "source_offset",
)
COMMAND_COLUMNS = (
    "command_id",
    "org_id",
    "seq",
    "type",
    "status",
    "code",
    "command",
    "source",
    "source_offset",
)


_LEDGER_AT = {name: i for i, name in enumerate(LEDGER_COLUMNS)}
_LEDGER_SAME = ("member_id", "source_id", "movement", "amount_mc")
"""Columns that make two ledger rows at one ``(org_id, seq)`` the same movement."""


class SeqCollision(Exception):
    """PostgreSQL holds other decisions at seqs a batch wrote for these orgs: the orgs'
    Redis state diverged from the ledger (see :meth:`Ledger._insert_ledger_checked`)."""

    def __init__(self, org_ids: Sequence[str]) -> None:
        super().__init__(f"seq collision with the ledger for orgs {', '.join(org_ids)}")
        self.org_ids = list(org_ids)


_EFFECT_ROWS: dict[str | None, Callable[[FlushBatch], list[tuple[Any, ...]]]] = {
    name: attrgetter(name)
    for name in ("ledger", "usage", "commands", "invoices", "notifications", "refills")
}
"""An effect's ``TABLE`` -> its row list in a flush batch (charges and signals are handled
inline in ``FlushBatch.add_effects``)."""


@dataclass(slots=True)
class FlushBatch:
    """Everything one batch writes to PostgreSQL, in one transaction."""

    ledger: list[tuple[Any, ...]] = field(default_factory=list)
    usage: list[tuple[Any, ...]] = field(default_factory=list)
    commands: list[tuple[Any, ...]] = field(default_factory=list)
    invoices: list[tuple[Any, ...]] = field(default_factory=list)
    notifications: list[tuple[Any, ...]] = field(default_factory=list)
    refills: list[tuple[Any, ...]] = field(default_factory=list)
    signals: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    parked_add: list[tuple[Any, ...]] = field(default_factory=list)
    parked_del: list[str] = field(default_factory=list)
    parked_move: dict[str, int] = field(default_factory=dict)  # event -> home partition
    org_seq: dict[str, int] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    charges: list[Charge] = field(default_factory=list)
    """Charges not turned into their two rows yet (``rows_ready``): one object instead of two
    tuples while a batch waits for its commit, the larger part of what it holds."""

    def is_empty(self) -> bool:
        return not (
            self.charges
            or self.ledger
            or self.usage
            or self.commands
            or self.invoices
            or self.notifications
            or self.refills
            or self.signals
            or self.parked_add
            or self.parked_del
            or self.parked_move
            or self.org_seq
            or self.offsets
            or self.snapshots
        )

    def add_effects(self, effects: Iterable[Effect]) -> None:
        """Turn engine effects into rows (each effect knows its row, ``worker/effects.py``);
        a ``Charge`` is two rows, ledger and usage, made when a write asks (``rows_ready``).
        Raises the org's ``org_seq`` to the highest seq seen."""
        charges = self.charges.append
        org_seq = self.org_seq
        org: str | None = None
        top = 0
        for e in effects:
            if e.org_id != org:
                if org is not None and top > org_seq.get(org, 0):
                    org_seq[org] = top
                org = e.org_id
                top = org_seq.get(org, 0)
            table = e.TABLE
            if table == "charge":
                charges(e)  # type: ignore[arg-type]
                seq = e.seq + 1
            elif table == "signals":
                # Only the member's latest signal is kept (the table holds current states).
                row = e.row()
                key = (e.org_id, row[1])
                prev = self.signals.get(key)
                if prev is None or row[5] > prev[5]:
                    self.signals[key] = row
                seq = e.seq
            else:
                _EFFECT_ROWS[table](self).append(e.row())
                seq = e.seq
            if seq > top:
                top = seq
        if org is not None and top > org_seq.get(org, 0):
            org_seq[org] = top

    def rows_ready(self) -> FlushBatch:
        """Turn the waiting charges into their ledger and usage rows (the row-by-row write
        paths do this first; the fast COPY makes them as it goes)."""
        if self.charges:
            ledger = self.ledger.append
            usage = self.usage.append
            for c in self.charges:
                row_l, row_u = c.rows()
                ledger(row_l)
                usage(row_u)
            self.charges = []
        return self

    def add_rejected_usage(
        self,
        *,
        event_id: str,
        org_id: str | None,
        member_id: str | None,
        task_id: str | None,
        credits_mc: int | None,
        occurred_at_ms: int | None,
        code: str,
        source: str,
        offset: int | None,
    ) -> None:
        """Record a usage event rejected by the pipeline itself (never reached the engine)."""
        self.usage.append(
            (
                event_id,
                org_id,
                None,
                member_id,
                task_id,
                credits_mc,
                occurred_at_ms,
                "rejected",
                code,
                False,
                source,
                offset,
            )
        )

    def add_rejected_command(
        self,
        *,
        command_id: str,
        org_id: str | None,
        type_: str,
        code: str,
        command: Mapping[str, Any],
        source: str,
        offset: int | None,
    ) -> None:
        """Record an admin command rejected without an engine ``command`` effect."""
        self.commands.append(
            (
                command_id,
                org_id,
                None,
                type_,
                "rejected",
                code,
                orjson.dumps(dict(command)).decode(),
                source,
                offset,
            )
        )

    def merge(self, other: FlushBatch) -> None:
        """Add ``other``'s rows after this batch's (a later batch of the same stage), so that
        several batches commit in one transaction."""
        self.charges.extend(other.charges)
        self.ledger.extend(other.ledger)
        self.usage.extend(other.usage)
        self.commands.extend(other.commands)
        self.invoices.extend(other.invoices)
        self.notifications.extend(other.notifications)
        self.refills.extend(other.refills)
        for key, row in other.signals.items():
            prev = self.signals.get(key)
            if prev is None or row[5] > prev[5]:
                self.signals[key] = row
        self.parked_add.extend(other.parked_add)
        self.parked_del.extend(other.parked_del)
        self.parked_move.update(other.parked_move)
        for org, seq in other.org_seq.items():
            if seq > self.org_seq.get(org, 0):
                self.org_seq[org] = seq
        for (topic, partition), off in other.offsets.items():
            self.set_offset(topic, partition, off)
        for org, snap in other.snapshots.items():
            prev = self.snapshots.get(org)
            if prev is None or snap.seq > prev.seq:
                self.snapshots[org] = snap

    def set_offset(self, topic: str, partition: int, next_offset: int) -> None:
        key = (topic, partition)
        if next_offset > self.offsets.get(key, -1):
            self.offsets[key] = next_offset


@dataclass(slots=True, frozen=True)
class ParkedEvent:
    """A usage event waiting for its org or member (row of ``parked_events``)."""

    event_id: str
    org_id: str
    member_id: str
    task_id: str
    credits_mc: int
    occurred_at_ms: int
    code: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None
    value: bytes
    parked_at_ms: int
    owner_partition: int = -1
    """The partition whose worker retries it: the home of its org once known to be another
    than ``source_partition`` (-1: the source partition)."""
    decided: bool = False
    """PostgreSQL already holds the event as decided: remove the row, never offer it again."""


@dataclass(slots=True, frozen=True)
class Quarantined:
    """A row PostgreSQL refused for its content, set aside in ``quarantined_rows``."""

    table: str
    row: tuple[Any, ...]
    reason: str
    source: str | None
    offset: int | None


_REFUSED = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    ValueError,
    TypeError,
    OverflowError,
)
"""What PostgreSQL (or asyncpg's encoder) raises for a row's content."""


def _escaped(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """The row with what PostgreSQL text cannot hold written as escapes (U+0000 as the six
    characters backslash-u-0000, lone surrogates as backslash escapes)."""
    return tuple(
        v.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")
        if isinstance(v, str)
        else v
        for v in row
    )


def _row_json(row: Sequence[Any]) -> str:
    """A row as ASCII-only JSON (bytes as hex): storable in any text column, whatever it holds."""
    return json.dumps(
        list(row), ensure_ascii=True, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)
    )


# (table, insert statement, column count, position of source and offset in the row or None)
_TABLES: tuple[tuple[str, str, int, tuple[int, int] | None], ...] = (
    ("ledger_entries", "insert_ledger_entries", 13, None),
    ("usage_events", "insert_usage_events", 12, (10, 11)),
    ("admin_commands", "insert_admin_commands", 9, (7, 8)),
    ("invoices", "insert_invoices", 6, None),
    ("notifications", "insert_notifications", 6, None),
    ("refill_requests", "insert_refill_requests", 6, None),
    ("signals", "upsert_signals", 7, None),
    ("parked_events", "insert_parked", 12, None),
)


def _rows_of(b: FlushBatch, table: str) -> list[tuple[Any, ...]]:
    if table == "ledger_entries":
        return b.ledger
    if table == "usage_events":
        return b.usage
    if table == "admin_commands":
        return b.commands
    if table == "invoices":
        return b.invoices
    if table == "notifications":
        return b.notifications
    if table == "refill_requests":
        return b.refills
    if table == "signals":
        return list(b.signals.values())
    return b.parked_add


class Ledger:
    """The PostgreSQL store used by the pipeline (one connection pool)."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._schema = settings.postgres_schema
        self._q = QUERIES

    @classmethod
    async def connect(cls, settings: Settings) -> Ledger:
        """Open a pool whose connections use the configured schema."""
        quote_schema(settings.postgres_schema)
        pool = await asyncpg.create_pool(
            **_connect_kwargs(settings),
            min_size=1,
            max_size=settings.postgres_pool_size,
            reset=_keep_session,
        )
        return cls(pool, settings)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        await self._pool.fetchval("SELECT 1")

    async def decided_ids(
        self, event_ids: Sequence[str], command_ids: Sequence[str]
    ) -> tuple[set[str], set[str]]:
        """Which of these ids PostgreSQL already decided (one round trip per kind present)."""
        events: set[str] = set()
        commands: set[str] = set()
        if not event_ids and not command_ids:
            return events, commands
        async with self._pool.acquire() as conn:
            if event_ids:
                rows = await conn.fetch(self._q["decided_event_ids"], list(event_ids))
                events = {r[0] for r in rows}
            if command_ids:
                rows = await conn.fetch(self._q["decided_command_ids"], list(command_ids))
                commands = {r[0] for r in rows}
        return events, commands

    async def write(self, batch: FlushBatch) -> None:
        """Write one batch and its offsets atomically.

        The fast path COPYs the large tables. COPY has no ON CONFLICT, so if any row already
        exists (an outbox re-drained after a crash between this commit and the outbox ack) the
        transaction rolls back whole and the batch is written again with the replay-safe
        ``unnest ... ON CONFLICT DO NOTHING`` statements. Either way the rows and the offsets
        commit together or not at all.
        """
        if batch.is_empty():
            return
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    await self._write(conn, batch, fast=True)
            except asyncpg.UniqueViolationError:
                async with conn.transaction():
                    await self._write(conn, batch, fast=False)

    async def write_safe(self, batch: FlushBatch) -> None:
        """Like ``write`` but always idempotent (used by the outbox drain and rebuild)."""
        if batch.is_empty():
            return
        async with self._pool.acquire() as conn, conn.transaction():
            await self._write(conn, batch, fast=False)

    async def write_isolated(self, batch: FlushBatch) -> list[Quarantined]:
        """Write a batch whose plain write failed on a data error, setting the bad rows aside.

        One transaction, like ``write_safe``; each table's rows are inserted in a savepoint,
        and a set that PostgreSQL refuses for its content is split in halves until the refused
        rows are found. Those go to ``quarantined_rows`` (as escaped JSON), everything else and
        the offsets commit: one record's content never stops the flush for good. Returns the
        rows set aside (the pipeline dead-letters their inputs and alerts).
        """
        bad: list[Quarantined] = []
        batch.rows_ready()
        async with self._pool.acquire() as conn, conn.transaction():
            if batch.parked_del:
                await conn.execute(self._q["delete_parked"], batch.parked_del)
            for table, name, width, src in _TABLES:
                rows = _rows_of(batch, table)
                if rows:
                    await self._insert_isolating(conn, table, name, width, src, rows, bad)
            await self._write_rest(conn, batch)
            if bad:
                await conn.execute(
                    self._q["insert_quarantined"],
                    [q.table for q in bad],
                    [q.reason for q in bad],
                    [_row_json(q.row) for q in bad],
                    [q.source for q in bad],
                    [q.offset for q in bad],
                )
        return bad

    async def _insert_isolating(
        self,
        conn: asyncpg.Connection,
        table: str,
        name: str,
        width: int,
        src: tuple[int, int] | None,
        rows: list[tuple[Any, ...]],
        bad: list[Quarantined],
    ) -> None:
        try:
            async with conn.transaction():  # a savepoint
                await conn.execute(self._q[name], *_columns(rows, width))
            return
        except _REFUSED as exc:
            if len(rows) > 1:
                half = len(rows) // 2
                for part in (rows[:half], rows[half:]):
                    await self._insert_isolating(conn, table, name, width, src, part, bad)
                return
            row = rows[0]
            source = row[src[0]] if src else None
            offset = row[src[1]] if src else None
            reason = f"{type(exc).__name__}: {exc}"[:500]
            bad.append(Quarantined(table, row, reason, source, offset))
            # The row's decision still counts: stored with its text escaped if PostgreSQL takes
            # it so (a decided id must stay decided), the original kept in quarantined_rows.
            clean = _escaped(row)
            if clean != row:
                try:
                    async with conn.transaction():
                        await conn.execute(self._q[name], *_columns([clean], width))
                except _REFUSED as again:
                    log.error("%s row refused even escaped: %s", table, again)

    async def _write(self, conn: asyncpg.Connection, b: FlushBatch, *, fast: bool) -> None:
        q = self._q
        if b.parked_del:
            await conn.execute(q["delete_parked"], b.parked_del)
        if fast:
            # The charges' rows are made as COPY takes them, never all held at once.
            charges = b.charges
            for table, records, columns, more in (
                ("ledger_entries", b.ledger, LEDGER_COLUMNS, Charge.ledger_row),
                ("usage_events", b.usage, USAGE_COLUMNS, Charge.usage_row),
                ("admin_commands", b.commands, COMMAND_COLUMNS, None),
            ):
                if records or (more is not None and charges):
                    rows = chain(records, map(more, charges)) if more is not None else records
                    await conn.copy_records_to_table(
                        table, records=rows, columns=columns, schema_name=self._schema
                    )
            rest = _TABLES[3:]
        else:
            b.rows_ready()
            rest = _TABLES
        for table, name, width, _ in rest:
            rows = _rows_of(b, table)
            if not rows:
                continue
            if table == "ledger_entries":
                await self._insert_ledger_checked(conn, rows)
            else:
                await conn.execute(q[name], *_columns(rows, width))
        await self._write_rest(conn, b)

    async def _insert_ledger_checked(
        self, conn: asyncpg.Connection, rows: list[tuple[Any, ...]]
    ) -> None:
        """Insert ledger rows skipping those already there, and make sure every skipped row
        is the same movement PostgreSQL holds at its ``(org_id, seq)``.

        A skipped row is normally a copy (an outbox drained again, another worker's effects
        persisted with ours). A different movement at the same seq means two workers decided
        the org from different states (Redis lost writes another worker had already made and
        committed, with producers that do not key by org): :class:`SeqCollision`, raised
        inside the transaction, so nothing of the batch commits. The fast COPY path never
        gets here with a collision: any row already there makes COPY fail, and the batch is
        written again through this path, whose inserts wait for a concurrent writer of the
        same keys to commit.
        """
        inserted = await conn.fetch(
            self._q["insert_ledger_entries"], *_columns(rows, len(LEDGER_COLUMNS))
        )
        if len(inserted) == len(rows):
            return
        org, seq = _LEDGER_AT["org_id"], _LEDGER_AT["seq"]
        done = {(r[org], r[seq]) for r in inserted}
        skipped = [r for r in rows if (r[org], r[seq]) not in done]
        held = await conn.fetch(
            self._q["ledger_at"], [r[org] for r in skipped], [r[seq] for r in skipped]
        )
        # The movement's identity: the columns ledger_at reads, in its order.
        there = {(h["org_id"], h["seq"]): tuple(h[c] for c in _LEDGER_SAME) for h in held}
        diverged = sorted(
            {
                r[org]
                for r in skipped
                if there.get((r[org], r[seq])) != tuple(r[_LEDGER_AT[c]] for c in _LEDGER_SAME)
            }
        )
        if diverged:
            raise SeqCollision(diverged)

    async def _write_rest(self, conn: asyncpg.Connection, b: FlushBatch) -> None:
        """The orgs' seqs, the snapshots they now cover, and the offsets, last, in the same
        transaction as the rows."""
        q = self._q
        if b.parked_move:
            await conn.execute(q["move_parked"], list(b.parked_move), list(b.parked_move.values()))
        if b.org_seq:
            await conn.execute(q["upsert_org_seq"], list(b.org_seq), list(b.org_seq.values()))
        if b.snapshots:
            snaps = list(b.snapshots.values())
            await conn.execute(
                q["upsert_snapshots"],
                [sn.org_id for sn in snaps],
                [sn.seq for sn in snaps],
                [sn.state for sn in snaps],
            )
        if b.offsets:
            keys = list(b.offsets)
            await conn.execute(
                q["upsert_offsets"],
                self._settings.consumer_group,
                [k[0] for k in keys],
                [k[1] for k in keys],
                [b.offsets[k] for k in keys],
            )

    async def load_offsets(self, group: str | None = None) -> dict[tuple[str, int], int]:
        """Next offset to consume per (topic, partition) recorded for the consumer group."""
        rows = await self._pool.fetch(
            self._q["select_offsets"], group or self._settings.consumer_group
        )
        return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}

    async def parked_for_partitions(
        self, topic: str, partitions: Sequence[int], limit: int = 10_000
    ) -> list[ParkedEvent]:
        """Parked events these partitions' worker retries (read there, or handed over as the
        home of their org), oldest first."""
        if not partitions:
            return []
        rows = await self._pool.fetch(
            self._q["parked_for_partitions"], topic, list(partitions), limit
        )
        return [
            ParkedEvent(
                event_id=r["event_id"],
                org_id=r["org_id"],
                member_id=r["member_id"],
                task_id=r["task_id"],
                credits_mc=r["credits_mc"],
                occurred_at_ms=r["occurred_at_ms"],
                code=r["code"],
                source_topic=r["source_topic"],
                source_partition=r["source_partition"],
                source_offset=r["source_offset"],
                key=r["msg_key"],
                value=r["msg_value"],
                parked_at_ms=r["parked_at_ms"],
                owner_partition=r["owner"],
                decided=r["decided"],
            )
            for r in rows
        ]

    async def parked_counts(self) -> dict[str, int]:
        """Parked events per org (bounded by ``parked_max_total``)."""
        rows = await self._pool.fetch(self._q["parked_counts"])
        return {r["org_id"]: int(r["n"]) for r in rows}

    async def count_parked(self) -> int:
        return int(await self._pool.fetchval(self._q["count_parked"]))

    async def org_seqs(self) -> dict[str, int]:
        """Highest effect seq PostgreSQL holds, per org."""
        rows = await self._pool.fetch(self._q["org_seqs"])
        return {r["org_id"]: r["last_seq"] for r in rows}

    async def rebuild_inputs(self, org_id: str, after_seq: int = 0) -> list[asyncpg.Record]:
        """The recorded usage and command decisions of one org after ``after_seq``, in seq
        order."""
        return list(await self._pool.fetch(self._q["rebuild_inputs"], org_id, after_seq))

    async def snapshot(self, org_id: str) -> Snapshot | None:
        """The org's latest stored snapshot (every effect up to its seq is in the ledger)."""
        row = await self._pool.fetchrow(self._q["select_snapshot"], org_id)
        return None if row is None else Snapshot(org_id, row["seq"], bytes(row["state"]))


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows to per-column lists (the shape ``unnest($1, $2, ...)`` takes)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(col) for col in zip(*rows, strict=True)]
