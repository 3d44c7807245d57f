"""Property: whatever string a producer sends as an id, the pipeline either stores, keys and
publishes it as data, or dead-letters the message with a code and still records the decision of
an id it can read.

Each example runs the real pipeline (Kafka, Redis, PostgreSQL, the worker's own loop, bounded)
on generated strings used as org ids, member ids, task ids and event ids at once.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_checker import header, read_topic

from schemas.encode import control_key, encode_usage_event
from schemas.ids import is_valid_id
from worker.config import Settings
from worker.engine import RedisEngine
from worker.runner import run_worker

C = 1000
IDS = st.text(
    alphabet=st.characters(codec="utf-8") | st.sampled_from(list("{}/:%|\x00\x1f\x7f\x85")),
    min_size=0,
    max_size=130,
)
_used_event_ids: set[str] = set()


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


@settings(
    max_examples=max(3, settings().max_examples // 25),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ids=st.lists(
        IDS.filter(lambda x: x not in ("m", "spare", "t", "k")),
        min_size=4,
        max_size=12,
        unique=True,
    )
)
async def test_any_id_is_data_or_a_coded_rejection(
    isolated_settings: Settings, ids: list[str]
) -> None:
    s = isolated_settings.model_copy(
        update={"http_port": 0, "batch_timeout_ms": 20, "unknown_grace_seconds": 30}
    )
    now = int(time.time() * 1000)
    home = f"prop-{uuid.uuid4().hex[:10]}"
    admin: list[bytes] = []
    usage: list[tuple[bytes, str, str, int]] = []  # value, "charged"|code, event id, mc

    def command(fields: dict[str, Any]) -> bytes:
        value = orjson.dumps({"command_id": f"pc-{uuid.uuid4().hex}", "at": _iso(now - 3_600_000),
                              **fields})  # fmt: skip
        admin.append(value)
        return value

    command({"type": "org_upsert", "org_id": home, "billing_anchor_day": 1})
    for x in ids:
        command({"type": "member_add", "org_id": home, "member_id": x, "tier": "pro"})
        command({"type": "org_upsert", "org_id": x, "billing_anchor_day": 1})
        command({"type": "member_add", "org_id": x, "member_id": "m", "tier": "pro"})
    for x in ids:
        ok = is_valid_id(x)
        # As member and task id: 600 credits against a 500-credit seat, so the member pauses.
        eid = f"pe-{uuid.uuid4().hex}"
        usage.append((encode_usage_event(event_id=eid, org_id=home, member_id=x, task_id=x,
                                         credits_mc=600 * C, occurred_at_ms=now - 60_000),
                      "charged" if ok else "invalid_id", eid, 600 * C))  # fmt: skip
        # As an org id.
        eid = f"po-{uuid.uuid4().hex}"
        usage.append((encode_usage_event(event_id=eid, org_id=x, member_id="m", task_id="t",
                                         credits_mc=C, occurred_at_ms=now - 60_000),
                      "charged" if ok else "invalid_id", eid, C))  # fmt: skip
        # As an event id (a repeat of an earlier example's id is a duplicate: decided once).
        want = "invalid_id" if not ok else ("duplicate" if x in _used_event_ids else "charged")
        usage.append((encode_usage_event(event_id=x, org_id=home, member_id="spare",
                                         task_id="t", credits_mc=C, occurred_at_ms=now - 60_000),
                      want, x, C))  # fmt: skip
        if ok:
            _used_event_ids.add(x)
    command({"type": "member_add", "org_id": home, "member_id": "spare", "tier": "max"})

    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for value in admin:
            await producer.send_and_wait(s.topic_admin, value, key=b"k")
        for value, *_ in usage:
            await producer.send_and_wait(s.topic_usage, value, key=b"k")
    finally:
        await producer.stop()
    await run_worker(s, max_events=len(admin) + len(usage), idle_exit_seconds=20)

    conn = await asyncpg.connect(
        s.postgres_dsn.get_secret_value(), server_settings={"search_path": s.postgres_schema}
    )
    try:
        rows = {
            r["event_id"]: r
            for r in await conn.fetch(
                "SELECT event_id, status, code, org_id, member_id FROM usage_events"
            )
        }
        sums = {
            r["source_id"]: -r["total"]
            for r in await conn.fetch(
                "SELECT source_id, sum(amount_mc)::bigint AS total FROM ledger_entries"
                " WHERE source_kind = 'usage' GROUP BY source_id"
            )
        }
    finally:
        await conn.close()
    dead = {bytes(r.value): header(r, "error.code") for r in await read_topic(s, s.topic_usage_dlq)}
    for value, want, eid, mc in usage:
        if want == "charged":
            assert rows[eid]["status"] == "charged", (eid, want)
            assert sums[eid] == mc
            assert value not in dead
        elif want == "duplicate":
            assert value not in dead  # dropped and counted, never dead-lettered again
        else:
            assert dead.get(value) == want, (value, dead.get(value))
            if is_valid_id(eid):
                # Its event id is readable: the rejection decided it.
                assert rows[eid]["status"] == "rejected" and rows[eid]["code"] == want
            else:
                assert eid not in rows  # nothing unstorable is stored
    # Keys: distinct members of the home org have distinct control keys, and each key's last
    # record names exactly that member.
    control = {bytes(r.key): orjson.loads(r.value) for r in await read_topic(s, s.topic_control)}
    engine = RedisEngine.from_settings(s)
    try:
        for x in ids:
            if not is_valid_id(x):
                continue
            rec = control[control_key(home, x)]
            assert (rec["org_id"], rec["member_id"], rec["signal"]) == (home, x, "pause")
            dash = await engine.dashboard(x)
            assert dash is not None and dash["org_id"] == x
            assert [m["member_id"] for m in dash["members"]] == ["m"]
    finally:
        await engine.close()
    bad_admin = {
        bytes(r.value): header(r, "error.code") for r in await read_topic(s, s.topic_admin_dlq)
    }
    for value in admin:
        fields = orjson.loads(value)
        valid = all(is_valid_id(v) for k, v in fields.items() if k in ("org_id", "member_id"))
        if valid:
            # An org of an earlier example (hypothesis repeats strings) already has "m".
            assert bad_admin.get(value) in (None, "member_exists"), fields
        else:
            assert bad_admin.get(value) == "invalid_id", fields
