"""One checker for every end-to-end scenario of the pipeline, plus a workload builder.

``Workload`` builds the input (admin commands, usage events, deliberate duplicates and bad
messages), produces it to Kafka and remembers what was accepted. ``check_pipeline`` then proves,
from the outside, what a user would notice:

1. committed offsets (Kafka's and PostgreSQL's) reach the end of every input partition;
2. every accepted ``event_id`` is decided exactly once (one ``usage_events`` row) and, if
   charged, its ledger movements add up to exactly its credits; every accepted command once;
3. the dead-letter topics hold exactly the bad messages (deduplicated by source coordinates:
   dead letters are at-least-once across crashes), with the SPEC headers;
4. the Python model, applied to exactly the accepted input in the order the worker decided it
   (PostgreSQL's ``seq``), produces the same ledger as PostgreSQL holds, the same dashboard as
   the engine in Redis shows, and the same last pause/resume per member as the compacted
   control topic says.

The crash/restart scenarios reuse it unchanged.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.encode import control_key, encode_admin_command, encode_usage_event
from worker import views
from worker.config import Settings
from worker.connections import kafka_client_kwargs
from worker.model import CommandItem, Model, UsageItem

MINUTE_MS = 60_000


# --- workload --------------------------------------------------------------------------------
@dataclass
class Produced:
    topic: str
    key: bytes | None
    value: bytes
    bad: str | None = None  # expected rejection (dead letter) or None
    ident: str | None = None


@dataclass
class Workload:
    """Input of one scenario and what the worker is expected to accept."""

    settings: Settings
    now_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: list[Produced] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def _t(self, minutes_ago: float) -> int:
        return self.now_ms - int(minutes_ago * MINUTE_MS)

    def command(self, org_id: str, type_: str, minutes_ago: float = 60, **fields: Any) -> str:
        cid = f"c-{uuid.uuid4().hex[:12]}"
        cmd = {"type": type_, "command_id": cid, "org_id": org_id, "at_ms": self._t(minutes_ago)}
        cmd.update(fields)
        self.commands[cid] = cmd
        self.messages.append(
            Produced(
                self.settings.topic_admin, org_id.encode(), encode_admin_command(cmd), ident=cid
            )
        )
        return cid

    def org(self, org_id: str, members: Iterable[str] = (), tier: str = "pro") -> None:
        """An org (anchor day 1) with members, created two hours ago."""
        self.command(org_id, "org_upsert", 120, billing_anchor_day=1)
        for m in members:
            self.command(org_id, "member_add", 119, member_id=m, tier=tier)

    def usage(
        self,
        org_id: str,
        member_id: str,
        credits_mc: int,
        *,
        event_id: str | None = None,
        minutes_ago: float = 30,
        key: bytes | None = None,
    ) -> str:
        """A valid usage event (a second call with the same event_id is a duplicate)."""
        eid = event_id or f"e-{uuid.uuid4().hex[:16]}"
        ev = {
            "event_id": eid,
            "org_id": org_id,
            "member_id": member_id,
            "task_id": f"t-{self.rng.randrange(1000)}",
            "credits_mc": credits_mc,
            "occurred_at_ms": self._t(minutes_ago),
        }
        if eid in self.events:
            ev = self.events[eid]  # a true duplicate: same id, same content
        else:
            self.events[eid] = ev
        value = encode_usage_event(**ev)
        self.messages.append(
            Produced(
                self.settings.topic_usage,
                key if key is not None else org_id.encode(),
                value,
                ident=eid,
            )
        )
        return eid

    def bad_usage(self, value: bytes, code: str, key: bytes | None = b"bad") -> None:
        """A usage message the worker must dead-letter with ``code``."""
        self.messages.append(Produced(self.settings.topic_usage, key, value, bad=code))

    def bad_admin(self, value: bytes, code: str, key: bytes | None = b"bad") -> None:
        self.messages.append(Produced(self.settings.topic_admin, key, value, bad=code))

    def unknown_org_usage(self, org_id: str) -> str:
        """A well-formed event of an org that never exists: dead-lettered after the grace."""
        eid = f"e-{uuid.uuid4().hex[:16]}"
        ev = {
            "event_id": eid,
            "org_id": org_id,
            "member_id": "ghost",
            "task_id": "t",
            "credits_mc": 1000,
            "occurred_at_ms": self._t(1),
        }
        self.messages.append(
            Produced(
                self.settings.topic_usage,
                org_id.encode(),
                encode_usage_event(**ev),
                bad="unknown_org",
                ident=eid,
            )
        )
        return eid

    async def produce(
        self, messages: Sequence[Produced] | None = None, *, random_keys: bool = False
    ) -> None:
        """Send messages in order (``random_keys``: ignore org keying, scatter partitions)."""
        producer = AIOKafkaProducer(
            **kafka_client_kwargs(self.settings),
            enable_idempotence=True,
            acks="all",
            max_request_size=4 * 1024 * 1024,
        )
        await producer.start()
        try:
            futures = []
            for m in messages if messages is not None else self.messages:
                key = uuid.uuid4().hex.encode() if random_keys else m.key
                futures.append(await producer.send(m.topic, m.value, key=key))
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    @property
    def bad_values(self) -> dict[str, Counter[bytes]]:
        out: dict[str, Counter[bytes]] = {
            self.settings.topic_usage: Counter(),
            self.settings.topic_admin: Counter(),
        }
        for m in self.messages:
            if m.bad is not None:
                out[m.topic][m.value] += 1
        return out


# --- reading topics ---------------------------------------------------------------------------
async def read_topic(settings: Settings, topic: str) -> list[Any]:
    """Every record of ``topic`` from the beginning to its current end."""
    consumer = AIOKafkaConsumer(
        **kafka_client_kwargs(settings), enable_auto_commit=False, max_partition_fetch_bytes=8 << 20
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Any] = []
        remaining = {tp for tp in tps if end[tp] > 0}
        deadline = time.monotonic() + 30
        while remaining and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, recs in batch.items():
                out.extend(recs)
                if recs and recs[-1].offset + 1 >= end[tp]:
                    remaining.discard(tp)
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
        assert not remaining, f"could not read {topic} to its end"
        return out
    finally:
        await consumer.stop()


async def end_offsets(settings: Settings, topics: Iterable[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = []
        for t in topics:
            parts = consumer.partitions_for_topic(t)
            if not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(t) or set()
            tps.extend(TopicPartition(t, p) for p in parts)
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def kafka_committed(settings: Settings) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
    await admin.start()
    try:
        got = await admin.list_consumer_group_offsets(settings.consumer_group)
        return {tp: meta.offset for tp, meta in got.items() if meta.offset >= 0}
    finally:
        await admin.close()


def header(record: Any, name: str) -> str | None:
    for k, v in record.headers or ():
        if k == name:
            return bytes(v).decode()
    return None


# --- the checker ------------------------------------------------------------------------------
@dataclass
class Report:
    """What the checker saw (for extra assertions in a scenario)."""

    charged: set[str] = field(default_factory=set)
    rejected: dict[str, str] = field(default_factory=dict)
    dead_letters: dict[str, list[Any]] = field(default_factory=dict)
    ledger_rows: int = 0
    orgs: list[str] = field(default_factory=list)
    model: Model | None = None


async def _pg(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(
        settings.postgres_dsn.get_secret_value(),
        server_settings={"search_path": settings.postgres_schema},
    )


async def check_pipeline(
    settings: Settings,
    workload: Workload,
    *,
    engine: Any,
    check_kafka_commits: bool = True,
    parked_left: int = 0,
) -> Report:
    """Assert everything listed in the module docstring; returns what it saw."""
    report = Report()
    conn = await _pg(settings)
    try:
        # 1. offsets ------------------------------------------------------------------------
        ends = await end_offsets(settings, [settings.topic_usage, settings.topic_admin])
        rows = await conn.fetch(
            "SELECT topic, partition, next_offset FROM consumer_offsets WHERE group_id = $1",
            settings.consumer_group,
        )
        stored = {TopicPartition(r["topic"], r["partition"]): r["next_offset"] for r in rows}
        for tp, end in ends.items():
            if end > 0:
                assert stored.get(tp) == end, (
                    f"postgres offset of {tp} is {stored.get(tp)}, end {end}"
                )
        if check_kafka_commits:
            committed = await kafka_committed(settings)
            for tp, end in ends.items():
                if end > 0:
                    assert committed.get(tp) == end, (
                        f"kafka commit of {tp}: {committed.get(tp)} != {end}"
                    )

        # 2. decided once -------------------------------------------------------------------
        usage_rows = await conn.fetch(
            "SELECT event_id, org_id, seq, status, code, credits_mc FROM usage_events"
        )
        decided = {r["event_id"]: r for r in usage_rows}
        parked_ids = {r[0] for r in await conn.fetch("SELECT event_id FROM parked_events")}
        for eid in workload.events:
            assert eid in decided, (
                f"accepted event {eid} was never decided"
                f" ({'still parked' if eid in parked_ids else 'not parked'},"
                f" {len(parked_ids)} parked)"
            )
        report.charged = {e for e, r in decided.items() if r["status"] == "charged"}
        report.rejected = {e: r["code"] for e, r in decided.items() if r["status"] != "charged"}
        sums = {
            r["source_id"]: r["total"]
            for r in await conn.fetch(
                "SELECT source_id, sum(amount_mc)::bigint AS total FROM ledger_entries"
                " WHERE source_kind = 'usage' GROUP BY source_id"
            )
        }
        for eid in report.charged:
            ev = workload.events.get(eid)
            assert ev is not None, f"charged event {eid} was not in the accepted input"
            assert sums.get(eid) == -ev["credits_mc"], (
                f"event {eid} charged {sums.get(eid)} mc, expected {-ev['credits_mc']}"
            )
        command_rows = await conn.fetch("SELECT command_id, status, code FROM admin_commands")
        decided_cmds = {r["command_id"]: r for r in command_rows}
        for cid in workload.commands:
            assert cid in decided_cmds, f"accepted command {cid} was never decided"
        parked = await conn.fetchval("SELECT count(*) FROM parked_events")
        assert parked == parked_left, f"{parked} events still parked, expected {parked_left}"

        # 3. dead letters -------------------------------------------------------------------
        expected_bad = workload.bad_values
        for src_topic, dlq_topic in (
            (settings.topic_usage, settings.topic_usage_dlq),
            (settings.topic_admin, settings.topic_admin_dlq),
        ):
            records = await read_topic(settings, dlq_topic)
            unique: dict[tuple[str | None, str | None, str | None], Any] = {}
            for r in records:
                for h in (
                    "error.code",
                    "error.detail",
                    "source.topic",
                    "source.partition",
                    "source.offset",
                ):
                    assert header(r, h) is not None, f"dead letter without header {h}"
                coords = (
                    header(r, "source.topic"),
                    header(r, "source.partition"),
                    header(r, "source.offset"),
                )
                unique[coords] = r
            got = Counter(bytes(r.value) for r in unique.values())
            assert got == expected_bad[src_topic], (
                f"{dlq_topic}: {sum(got.values())} dead letters,"
                f" {sum(expected_bad[src_topic].values())} expected;"
                f" unexpected {list(got - expected_bad[src_topic])[:3]},"
                f" missing {list(expected_bad[src_topic] - got)[:3]}"
            )
            codes = {bytes(r.value): header(r, "error.code") for r in unique.values()}
            for m in workload.messages:
                if m.topic == src_topic and m.bad is not None and m.bad != "*":
                    assert codes.get(m.value) == m.bad, (
                        f"dead letter code {codes.get(m.value)!r}, expected {m.bad!r}"
                    )
            report.dead_letters[dlq_topic] = list(unique.values())

        # 4. the model on exactly the accepted input, in the worker's decision order ---------
        model = Model(settings.tiers, settings.pool_block_credits)
        report.model = model
        orgs = sorted(
            {r["org_id"] for r in usage_rows if r["seq"] is not None}
            | {
                r["org_id"]
                for r in await conn.fetch("SELECT org_id FROM admin_commands WHERE seq IS NOT NULL")
            }
        )
        report.orgs = orgs
        model_last_signal: dict[tuple[str, str], tuple[str, str, int]] = {}
        for org_id in orgs:
            order = await conn.fetch(
                "SELECT seq, 'u' AS k, event_id AS id FROM usage_events"
                " WHERE org_id = $1 AND seq IS NOT NULL"
                " UNION ALL SELECT seq, 'c', command_id FROM admin_commands"
                " WHERE org_id = $1 AND seq IS NOT NULL ORDER BY seq",
                org_id,
            )
            effects: list[dict[str, Any]] = []
            for r in order:
                if r["k"] == "u":
                    ev = workload.events.get(r["id"])
                    assert ev is not None, f"worker decided unknown event {r['id']}"
                    item: Any = UsageItem(
                        event_id=ev["event_id"],
                        member_id=ev["member_id"],
                        task_id=ev["task_id"],
                        credits_mc=ev["credits_mc"],
                        occurred_at_ms=ev["occurred_at_ms"],
                    )
                else:
                    cmd = workload.commands.get(r["id"])
                    assert cmd is not None, f"worker decided unknown command {r['id']}"
                    item = CommandItem(command=cmd)
                effects.extend(model.apply(org_id, [item]).effects)
            model_ledger = Counter(
                (
                    e.get("member_id"),
                    e.get("source_id"),
                    e.get("movement"),
                    e.get("bucket"),
                    e.get("amount_mc"),
                    bool(e.get("late")),
                )
                for e in effects
                if e["kind"] == "ledger"
            )
            pg_ledger = Counter(
                (
                    r["member_id"],
                    r["source_id"],
                    r["movement"],
                    r["bucket"],
                    r["amount_mc"],
                    r["late"],
                )
                for r in await conn.fetch(
                    "SELECT member_id, source_id, movement, bucket, amount_mc, late"
                    " FROM ledger_entries WHERE org_id = $1",
                    org_id,
                )
            )
            assert pg_ledger == model_ledger, (
                f"org {org_id}: ledger differs from the model:"
                f" extra {list((pg_ledger - model_ledger).items())[:3]},"
                f" missing {list((model_ledger - pg_ledger).items())[:3]}"
            )
            report.ledger_rows += sum(pg_ledger.values())
            assert await engine.dashboard(org_id) == views.dashboard(model, org_id), (
                f"org {org_id}: Redis dashboard differs from the model"
            )
            for e in effects:
                if e["kind"] == "signal":
                    model_last_signal[(org_id, e["member_id"])] = (
                        e["signal"],
                        e["reason"],
                        e["member_seq"],
                    )
    finally:
        await conn.close()

    # control topic: the last record per member is the model's last signal
    import orjson

    control = await read_topic(settings, settings.topic_control)
    last: dict[tuple[str, str], tuple[str, str, int]] = {}
    compacted: dict[bytes, tuple[str, str, int]] = {}
    for r in control:
        v = orjson.loads(r.value)
        key = (v["org_id"], v["member_id"])
        assert bytes(r.key) == control_key(v["org_id"], v["member_id"])
        if key not in last or v["seq"] > last[key][2]:
            last[key] = (v["signal"], v["reason"], v["seq"])
        # What compaction keeps: the last record by offset (records of a key share a partition).
        compacted[bytes(r.key)] = (v["signal"], v["reason"], v["seq"])
    assert last == model_last_signal, (
        "control topic differs from the model: "
        f"{sorted(set(last.items()) ^ set(model_last_signal.items()))[:4]}"
    )
    want_compacted = {control_key(o, m): sig for (o, m), sig in model_last_signal.items()}
    assert compacted == want_compacted, (
        "the last control record per key is not the member's current state: "
        f"{sorted(set(compacted.items()) ^ set(want_compacted.items()))[:4]}"
    )
    return report
