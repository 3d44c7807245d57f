"""Hostile input through the real pipeline: no message, id or header can stop the worker, merge
two members, or slip past "decided once" (SPEC sections 5, 6 and 8).

One worker runs as a subprocess on the scenario's own topics, Redis database and PostgreSQL
schema. Every case is produced with a plain producer and followed by a canary event of a healthy
org, which must be charged and committed within seconds: a case that stopped a partition or the
worker would hold the canary back. At the end the shared checker proves, from the outside,
that offsets reached the end, every accepted id was decided once, the dead-letter topics hold
exactly the rejected messages (once each, with the expected ``error.code``), the model applied
to the accepted input gives the same ledger and dashboards, and the last control-topic record
of every member is its current state.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from pipeline_checker import Produced, Workload, check_pipeline, read_topic
from scenario_harness import WorkerProcess, free_port, wait_drained

from schemas.encode import control_key, encode_usage_event
from schemas.ids import derived_id
from worker.config import Settings
from worker.connections import kafka_client_kwargs
from worker.engine import RedisEngine

pytestmark = pytest.mark.timeout(600)

C = 1000
OCCURRED = "2026-01-01T00:00:00Z"


def _event(**fields: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "event_id": f"h-{uuid.uuid4().hex[:12]}",
        "org_id": "canary",
        "member_id": "c",
        "task_id": "t",
        "credits": 1,
        "occurred_at": None,
    }
    ev.update(fields)
    return ev


class Hostile:
    """The scenario: a workload, a raw producer, and the canary that follows every case."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.w = Workload(settings)
        self.now_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1800))
        self.producer: AIOKafkaProducer | None = None
        self.canaries: list[tuple[str, float]] = []

    async def start(self) -> None:
        self.producer = AIOKafkaProducer(
            **kafka_client_kwargs(self.s), acks="all", max_request_size=4 << 20
        )
        await self.producer.start()

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()

    def raw_usage(self, fields: dict[str, Any], code: str | None, key: bytes = b"k") -> bytes:
        """A usage message from ``fields`` (``occurred_at`` filled in), expected to be
        dead-lettered with ``code`` (None: accepted, or a duplicate recorded elsewhere)."""
        if fields.get("occurred_at", 1) is None:
            fields = {**fields, "occurred_at": self.now_iso}
        value = orjson.dumps(fields)
        self.w.messages.append(Produced(self.s.topic_usage, key, value, bad=code))
        return value

    def raw_bytes(self, topic: str, value: bytes, code: str | None, key: bytes = b"k") -> None:
        self.w.messages.append(Produced(topic, key, value, bad=code))

    def raw_admin(self, fields: dict[str, Any], code: str | None, key: bytes = b"k") -> None:
        cmd = {"command_id": f"hc-{uuid.uuid4().hex[:12]}", "org_id": "canary", "at": self.now_iso}
        cmd.update(fields)
        self.raw_bytes(self.s.topic_admin, orjson.dumps(cmd), code, key)

    async def send_pending(self, *, canary: bool = True) -> None:
        """Produce what the workload gained since the last call, then a canary, and wait until
        the canary is charged and committed."""
        assert self.producer is not None
        start = getattr(self, "_sent", 0)
        cid = None
        if canary:
            cid = self.w.usage("canary", "c", 1 * C, minutes_ago=1)
        msgs = self.w.messages[start:]
        self._sent = len(self.w.messages)
        futures = [await self.producer.send(m.topic, m.value, key=m.key) for m in msgs]
        await asyncio.gather(*futures)
        sent_at = time.time()
        if cid is not None:
            await wait_committed(self.s, [cid], timeout=30)
            self.canaries.append((cid, sent_at))


async def _pg(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(
        settings.postgres_dsn.get_secret_value(),
        server_settings={"search_path": settings.postgres_schema},
    )


async def wait_committed(settings: Settings, event_ids: list[str], *, timeout: float) -> None:
    """Until every one of ``event_ids`` has its decision in PostgreSQL."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await _pg(settings)
            try:
                n = await conn.fetchval(
                    "SELECT count(*) FROM usage_events WHERE event_id = ANY($1)", event_ids
                )
            finally:
                await conn.close()
        except asyncpg.UndefinedTableError:
            n = 0
        if n == len(event_ids):
            return
        assert time.monotonic() < deadline, f"{event_ids} not committed after {timeout} s"
        await asyncio.sleep(0.05)


IDS_128 = ["é" * 128, "😀" * 128, "x" * 128]
BRACES = ["}x", "{y}", "a{b}c", "}", "{", "x:y:z", "%7D", "a/b", "a", "100%", "sp ace"]


def hostile_settings(isolated: Settings, **extra: object) -> Settings:
    update: dict[str, object] = {
        "batch_max_records": 2_000,
        "batch_timeout_ms": 20,
        "unknown_grace_seconds": 2,
        "shutdown_grace_seconds": 10.0,
    }
    update.update(extra)
    return isolated.model_copy(update=update)


async def _setup(h: Hostile) -> dict[str, str]:
    """The canary org, and orgs and members whose ids are hostile but valid."""
    w = h.w
    w.org("canary", ["c"])
    w.command("canary", "pool_purchase", 100, credits_mc=10**9)
    members: dict[str, str] = {}
    for org in BRACES:
        w.org(org, ["c", "b/c", "}", ":"])
    for i, big in enumerate(IDS_128):
        w.org(big, [IDS_128[(i + 1) % 3]])
        members[big] = IDS_128[(i + 1) % 3]
    await h.send_pending()
    return members


async def test_hostile_input_never_stops_the_worker(isolated_settings: Settings, tmp_path: Path):
    s = hostile_settings(isolated_settings)
    h = Hostile(s)
    await h.start()
    port = free_port()
    worker = WorkerProcess(s, tmp_path, "hostile", extra_env={"METERING_HTTP_PORT": str(port)})
    await worker.start()
    try:
        members = await _setup(h)
        w = h.w
        U, A = s.topic_usage, s.topic_admin

        # Control characters and U+0000 in every id field, usage and admin.
        for field in ("event_id", "org_id", "member_id", "task_id"):
            for bad in ("x\x00y", "\x01", "a\x1f", "a\x7f", "a\x85", "a\x9f"):
                h.raw_usage(_event(**{field: bad}), "invalid_id")
        await h.send_pending()
        for fields in (
            {"type": "tick", "command_id": "c\x00"},
            {"type": "tick", "org_id": "o\x00"},
            {"type": "tick\x00"},
            {"type": "member_add", "member_id": "m\x00", "tier": "pro"},
            {"type": "member_add", "member_id": "m", "tier": "pro\x00"},
            {"type": "promo_grant", "member_id": "c", "grant_id": "g\x00", "credits": 1,
             "expires_at": "2099-01-01T00:00:00Z"},
            {"type": "refill_result", "request_id": "r\x00", "status": "failed"},
        ):  # fmt: skip
            code = "unknown_command_type" if "\x00" in fields.get("type", "") else "invalid_id"
            h.raw_admin(fields, code)
        await h.send_pending()

        # Bytes that are not text, lone surrogates, sizes.
        h.raw_bytes(U, b'{"event_id": "\xff\xfe", "credits": 1}', "invalid_utf8")
        h.raw_bytes(A, b'{"type": "tick", "command_id": "\xc3("}', "invalid_utf8")
        for field in ("event_id", "task_id", "x"):
            h.raw_bytes(U, b'{"%s": "\\ud800", "event_id": "s"}' % field.encode(), "invalid_json")
        h.raw_bytes(A, b'{"type": "tick", "command_id": "\\udfff"}', "invalid_json")
        h.raw_usage(_event(event_id="é" * 129), "invalid_id")
        h.raw_usage(_event(member_id="😀" * 129), "invalid_id")
        big_id = f"big-{uuid.uuid4().hex[:8]}"
        h.raw_usage(_event(event_id=big_id, pad="x" * 65_536), "message_too_large")
        await h.send_pending()
        # The oversized message decided its id: a valid copy later is a duplicate.
        h.raw_usage(_event(event_id=big_id), None)

        # 128-character multi-byte ids and ids with braces, slashes and colons: all data.
        for org, member in members.items():
            w.usage(org, member, 1 * C, event_id="ё" * 127 + org[0])
        for org in BRACES:
            for member in ("c", "b/c", "}", ":"):
                # 600 credits against a 500-credit seat and no pool: debt, and a pause.
                w.usage(org, member, 600 * C)
        await h.send_pending()

        # Amounts a JSON parser may refuse: the event's id is still decided by it.
        for token in (b"1e999", b"9" * 400, b"-1e-999", b"1.0001"):
            eid = f"amt-{uuid.uuid4().hex[:8]}"
            raw = orjson.dumps(_event(event_id=eid, occurred_at=h.now_iso)).replace(
                b'"credits":1', b'"credits":' + token
            )
            code = {b"1e999": "invalid_field", b"-1e-999": "invalid_field",
                    b"1.0001": "amount_too_precise"}.get(token, "amount_too_large")  # fmt: skip
            h.raw_bytes(U, raw, code)
            await h.send_pending()
            h.raw_usage(_event(event_id=eid), None)  # later valid copy: dropped, not charged
        await h.send_pending()

        # One event_id under two orgs, back to back and in separate batches: charged once.
        for gap in (False, True):
            eid = f"x-{uuid.uuid4().hex[:8]}"
            w.usage("canary", "c", 7 * C, event_id=eid)
            if gap:
                await h.send_pending()
            # Same partition as the first (same key), so "first" is well defined.
            h.raw_usage(
                _event(event_id=eid, org_id="a", member_id="c", credits=3), None, key=b"canary"
            )
            await h.send_pending()
        # Events and commands live in separate namespaces: "c:X", "X" and command X.
        cid = w.command("canary", "tick", 1)
        w.usage("canary", "c", 1 * C, event_id=f"c:{cid}")
        w.usage("canary", "c", 1 * C, event_id=cid)
        await h.send_pending()

        # The SPEC section 5 list.
        h.raw_bytes(U, b"{not json", "invalid_json")
        h.raw_bytes(U, b"[1, 2]", "wrong_type")
        h.raw_usage({k: v for k, v in _event().items() if k != "task_id"}, "missing_field")
        h.raw_usage(_event(task_id=7), "wrong_type")
        for credits, code in (
            (0, "amount_not_positive"),
            (1_000_001, "amount_too_large"),
            ("0.0001", "amount_too_precise"),
        ):
            h.raw_usage(_event(credits=credits), code)
        h.raw_usage(_event(occurred_at="2026-01-01T00:00:00"), "timestamp_without_timezone")
        h.raw_usage(_event(occurred_at="2099-01-01T00:00:00Z"), "timestamp_in_future")
        h.raw_admin({"type": "tick", "at": "2099-01-01T00:00:00Z"}, "timestamp_in_future")
        h.raw_admin({"type": "member_add", "member_id": "z", "tier": "gold"}, "unknown_tier")
        w.command("canary", "member_add", 100, member_id="gone", tier="pro")
        w.command("canary", "member_remove", 50, member_id="gone")
        await h.send_pending()
        # Accepted by the decoder, rejected by the rules: after the removal as the org's clock
        # saw it (the canaries moved it to now - 1 min).
        w.usage("canary", "gone", C, minutes_ago=0)
        w.messages[-1].bad = "member_removed"
        h.raw_usage(_event(org_id="never-created"), "unknown_org")
        h.raw_usage(_event(member_id="never-added"), "unknown_member")
        await h.send_pending()
        # Made-up command types: rejected, and the metric labels stay a fixed set.
        for i in range(300):
            h.raw_admin({"type": f"made-up-{i}"}, "unknown_command_type")
        await h.send_pending()

        # A refill request id for a 125-character org is a valid id, and its answer applies.
        long_org = "r" * 125
        w.org(long_org, ["m"])
        w.command(long_org, "auto_refill_set", 100, enabled=True, threshold_mc=100 * C,
                  amount_mc=1_000 * C, monthly_limit_mc=5_000 * C)  # fmt: skip
        w.command(long_org, "pool_purchase", 100, credits_mc=200 * C)
        w.usage(long_org, "m", 700 * C, minutes_ago=20)
        await h.send_pending()
        request_id = derived_id("refill", long_org, 1)
        billing = [orjson.loads(r.value) for r in await read_topic(s, s.topic_billing)]
        assert [b["request_id"] for b in billing if b["type"] == "refill_request"] == [request_id]
        w.command(long_org, "refill_result", 10, request_id=request_id, status="succeeded")
        await h.send_pending()

        # Grace periods of the unknown cases run out, then everything must be settled.
        await asyncio.sleep(s.unknown_grace_seconds + 2)
        await h.send_pending()
        await wait_drained(s, [U, A], [worker], timeout=120)
        assert worker.alive, worker.log_tail()

        latencies = [t for cid, sent in h.canaries for t in [await _committed_at(s, cid) - sent]]
        assert max(latencies) < 10, latencies  # "within seconds"

        engine = RedisEngine.from_settings(s)
        try:
            report = await check_pipeline(s, w, engine=engine)
            assert await engine.orgs_with_outbox() == []
            dash = await engine.dashboard(long_org)
            assert dash is not None and dash["pool"]["balance"] != "0"
        finally:
            await engine.close()
        # Distinct members of orgs "a/b" and "a" have distinct control keys and states.
        control = {bytes(r.key) for r in await read_topic(s, s.topic_control)}
        for org in BRACES:
            for member in ("c", "b/c", "}", ":"):
                assert control_key(org, member) in control, (org, member)
        assert len(report.charged) >= len(BRACES) * 4
        await _metrics_are_bounded(port)
    finally:
        worker.kill()
        await worker.wait(10)
        await h.stop()


async def _committed_at(settings: Settings, event_id: str) -> float:
    conn = await _pg(settings)
    try:
        value = await conn.fetchval(
            "SELECT extract(epoch FROM decided_at) FROM usage_events WHERE event_id = $1", event_id
        )
    finally:
        await conn.close()
    return float(value)


async def _metrics_are_bounded(port: int) -> None:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    types = {
        line.split('type="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith("metering_admin_commands_total{")
    }
    from schemas.models import COMMAND_TYPES

    assert types <= COMMAND_TYPES | {"unknown"}, types
    assert "unknown" in types


async def test_unknown_org_flood_does_not_hold_back_known_orgs(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    """50,000 events of orgs that never come: the lot takes its cap, the rest is dead-lettered
    at once, and a known org's events are charged within a second meanwhile."""
    # A record that arrives waits for at most about two and a half batches ahead of it (the
    # one being applied, the one fetched, its own: BatchSizer). Batches of 1,000 records keep
    # that under a second on this machine size whatever the flood; the flood itself is 50x
    # that, so a canary that waited for it would take many seconds.
    s = hostile_settings(
        isolated_settings, parked_max_per_org=500, parked_max_total=5_000, batch_max_records=1_000
    )
    h = Hostile(s)
    await h.start()
    worker = WorkerProcess(s, tmp_path, "flood", extra_env={"METERING_LOG_LEVEL": "DEBUG"})
    await worker.start()
    stack = AsyncExitStack()
    try:
        h.w.org("canary", ["c"])
        h.w.command("canary", "pool_purchase", 100, credits_mc=10**9)
        await h.send_pending()
        assert h.producer is not None
        flood = []
        for i in range(50_000):
            ev = encode_usage_event(
                event_id=f"fl-{i}-{uuid.uuid4().hex[:6]}", org_id=f"ghost-{i % 20}",
                member_id="m", task_id="t", credits_mc=C, occurred_at_ms=h.w.now_ms - 60_000,
            )  # fmt: skip
            flood.append(ev)
            h.w.messages.append(Produced(s.topic_usage, b"ghost", ev, bad="unknown_org"))
        h._sent = len(h.w.messages)

        # The flood goes to every partition but the canary's: records of one partition are
        # decided in offset order, so a canary behind 50,000 records of its own partition
        # waits for them whatever the worker does; the other partitions must not hold it back.
        # The canary's partition is its org's home: where its admin commands went (by key).
        from aiokafka.partitioner import DefaultPartitioner

        every = list(range(s.topic_partitions))
        canary_partition = DefaultPartitioner()(b"canary", every, every)

        async def produce_flood() -> None:
            assert h.producer is not None
            parts = [p for p in range(s.topic_partitions) if p != canary_partition]
            for start in range(0, len(flood), 5_000):
                futures = [
                    await h.producer.send(
                        s.topic_usage, v, key=b"ghost", partition=parts[i % len(parts)]
                    )
                    for i, v in enumerate(flood[start : start + 5_000], start)
                ]
                await asyncio.gather(*futures)

        engine = RedisEngine.from_settings(s)
        stack.push_async_callback(engine.close)  # closed even when an assertion fails
        # Charged = visible in the live balances (Redis): the canary member's "used" credits,
        # polled, tell when each canary was charged (each adds exactly 1 credit).
        base = await _used(engine)
        charged_at: list[float] = []

        async def watch() -> None:
            while True:
                used = await _used(engine)
                while len(charged_at) < used - base:
                    charged_at.append(time.time())
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        flooding = asyncio.create_task(produce_flood())
        sent: list[float] = []
        # Canaries every 100 ms while the flood is produced and worked off (a few seconds), and
        # at least 60 of them however slowly the broker acknowledges each one.
        until = time.monotonic() + 6.0
        while not flooding.done() or time.monotonic() < until or len(sent) < 60:
            h.w.usage("canary", "c", 1 * C, minutes_ago=1)
            m = h.w.messages[-1]
            await (await h.producer.send(m.topic, m.value, key=m.key, partition=canary_partition))
            h._sent = len(h.w.messages)
            sent.append(time.time())
            await asyncio.sleep(0.1)
        await flooding
        for _ in range(600):
            if len(charged_at) >= len(sent):
                break
            await asyncio.sleep(0.05)
        watcher.cancel()
        latencies = [c - p for c, p in zip(charged_at, sent, strict=False)]
        assert len(latencies) == len(sent) > 50
        assert max(latencies) < 1.0, sorted(latencies)[-5:]
        await asyncio.sleep(s.unknown_grace_seconds + 3)
        await h.send_pending()
        await wait_drained(s, [s.topic_usage, s.topic_admin], [worker], timeout=180)
        await check_pipeline(s, h.w, engine=engine)
    finally:
        await stack.aclose()
        worker.kill()
        await worker.wait(10)
        await h.stop()


async def _used(engine: RedisEngine) -> int:
    dash = await engine.dashboard("canary")
    assert dash is not None
    member = next(m for m in dash["members"] if m["member_id"] == "c")
    return int(member["used"])
